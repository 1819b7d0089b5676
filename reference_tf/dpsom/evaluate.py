"""Evaluation of the DPSOM TF reference: the original protocol (specs/dpsom.md §7).

Reproduces ``evaluate_model`` of ``DPSOM.py`` (github ratschlab/dpsom, commit 8e3cddc, HEAD
eb41e7d; paper arXiv 1910.01590): a NEW session holding the trained weights (every random stream
restarts, so the result is deterministic given the weights) assigns each image to the BMU of a
random sample z ~ q(z|x) (``config.eval_assignment == "sample"``, the original), batch by batch;
only full batches are used (33 x 300 = 9 900 of the 10 000 test images). Metrics: NMI (geometric),
purity and AMI from ``harness.metrics``.

Deviation, opt-in only: ``eval_assignment="mean"`` takes the BMU of the posterior mean (what the
PyTorch port of elin-d does); it needs no random numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from reference_tf.dpsom.model import DPSOM


def assign_clusters(model: DPSOM, x, batch_size: int | None = None, assignment: str | None = None,
                    eps: Callable[[tuple[int, ...]], np.ndarray] | None = None, return_distances: bool = False):
    """BMU index (int64) of every image in the full batches of ``x``, in order.

    ``eps(shape)``, optional: the ε [batch, D] of each batch's sample, in batch order, fed instead
    of the new session's native stream (the posterior-mean assignment draws none).
    ``return_distances``: also the [N, K] squared distances the BMU is the argmin of (fetched in the
    same ``session.run``), as ``(k, distances)``."""
    cfg = model.config
    batch_size = batch_size or cfg.batch_size
    assignment = assignment or cfg.eval_assignment
    if assignment not in ("sample", "mean"):
        raise ValueError(f"assignment={assignment!r}; expected 'sample' or 'mean'")
    n = len(x) // batch_size
    if n == 0:
        raise ValueError(f"no full batch: {len(x)} images < batch_size {batch_size}")
    batches = [x[i * batch_size : (i + 1) * batch_size] for i in range(n)]
    k = model.k_mean if assignment == "mean" else model.forward_tensors["som.k"]
    fetch = (k, k.op.inputs[0]) if return_distances else k  # the argmin's input: the distances it ranks
    if assignment == "mean":
        runs = [model.session.run(fetch, model._feed(b)) for b in batches]  # noqa: SLF001
    else:
        with model.fresh_session() as session:
            runs = [session.run(fetch, model._feed(b, None if eps is None else eps((len(b), cfg.latent_dim)))) for b in batches]  # noqa: SLF001
    if not return_distances:
        return np.concatenate(runs).astype(np.int64)
    return np.concatenate([r[0] for r in runs]).astype(np.int64), np.concatenate([r[1] for r in runs])


def evaluate(model: DPSOM, x, y, batch_size: int | None = None, assignment: str | None = None,
             eps: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> dict:
    """``harness.metrics.cluster_metrics`` of the assignments, plus ``n_evaluated`` (``eps``: as
    :func:`assign_clusters`)."""
    from harness.metrics import cluster_metrics

    k = assign_clusters(model, x, batch_size, assignment, eps)
    metrics = cluster_metrics(np.asarray(y)[: len(k)].astype(np.int64), k)
    metrics["n_evaluated"] = int(len(k))
    return metrics
