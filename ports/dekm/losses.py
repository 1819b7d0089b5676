"""DEKM's loss terms (specs/dekm.md §4), one pure function each, with the original's reductions.

* ``loss.recon`` (pretraining, ``model.fit`` on the reconstruction slice): Keras ``losses.mse`` per
  sample, averaged over the batch = the mean over all B·P elements.
* ``loss.cluster`` (the clustering phase, ``GradientTape.gradient`` of the per-sample vector
  ``losses.mse(t, h·V)``): the tape differentiates the vector's SUM over the batch, B times the
  gradient of a batch mean. ``V`` (d x d) and the targets ``t`` are constants of the refit.
"""

from __future__ import annotations

from torch import Tensor


def recon_loss(x: Tensor, reconstruction: Tensor) -> Tensor:
    """``(1/(B·P)) Σ_b Σ_p (x̂_bp − x_bp)²`` with x flattened channels-last (NHWC), as Keras' Flatten."""
    return (reconstruction - x.reshape(x.shape[0], -1)).square().mean()


def cluster_loss_vector(h: Tensor, V: Tensor, t: Tensor) -> Tensor:
    """Per sample: ``(1/d)·‖h_b·V − t_b‖²`` (Keras ``losses.mse`` = mean over the last axis), shape [B]."""
    return (h @ V - t).square().mean(dim=-1)


def cluster_loss(h: Tensor, V: Tensor, t: Tensor, reduction: str = "sum") -> Tensor:
    """The paper's DEKM loss: ``Σ_b (1/d)·‖h_b·V − t_b‖²`` (the tape's sum).

    ``reduction="mean"``: the declared deviation ``cluster_reduction="mean"`` (torch ``MSELoss()``,
    1/B of the original's gradient).
    """
    per_sample = cluster_loss_vector(h, V, t)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction={reduction!r}; expected 'sum' (the original) or 'mean' (deviation)")
