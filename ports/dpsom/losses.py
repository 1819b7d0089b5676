"""DPSOM loss terms (specs/dpsom.md §5), one pure function each, with the original's reductions.

Names follow the original code (``loss_reconstruction_ze``, ``loss_commit``, ``loss_som``,
``loss_a``); the paper's names are in the docstrings. Stop-gradients are where the original puts
them: L_SOM and the SOM-initialisation loss train the embeddings only.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DPSOMConfig
from .model import student_t_q, z_dist_flat


def sg(t: Tensor) -> Tensor:
    """The paper's stop-gradient ``sg(·)`` (TF's ``tf.stop_gradient``)."""
    return t.detach()


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """``-(1/B) Σ_i Σ_p [x log σ(l) + (1-x) log(1-σ(l))]``: sum over pixels, mean over batch.

    Written as TFP evaluates Bernoulli.log_prob: ``x·softplus(-l) + (1-x)·softplus(l)``.
    """
    per_pixel = x * F.softplus(-logits) + (1.0 - x) * F.softplus(logits)
    return per_pixel.flatten(1).sum(1).mean()


def kl_posterior_prior(mu: Tensor, tril_stats: tuple[Tensor, Tensor], prior_std: float) -> Tensor:
    """KL(N(mu, L Lᵀ) ‖ N(0, s² I)) averaged over the batch (analytic, as TFP):

    ``½ [‖L‖_F²/s² + ‖mu‖²/s² − D + 2D ln s − 2 Σ_d ln L_dd]``; ``tril_stats`` = (‖L‖_F², Σ_d ln L_dd) per
    sample (:func:`model.tril_stats`; the model's forward has them as ``Trace.kl_stats``).
    """
    d = mu.shape[-1]
    s2 = prior_std**2
    frob2, log_det = tril_stats
    kl = 0.5 * (frob2 / s2 + mu.square().sum(-1) / s2 - d + 2 * d * math.log(prior_std)) - log_det
    return kl.mean()


def loss_commit(p: Tensor, q: Tensor) -> Tensor:
    """Clustering loss (paper: KL(P‖Q), CAH): ``(1/B) Σ_i Σ_j p_ij log(p_ij / q_ij)``, no clipping."""
    return (p * torch.log(p / q)).sum(1).mean()


def _neighbour_maps(values: Tensor, som_dim: tuple[int, int]) -> tuple[Tensor, ...]:
    """Values at the up/down/right/left torus neighbours of every node, flattened row-major.

    up = (r+1) mod R, down = (r-1) mod R, right = (c+1) mod C, left = (c-1) mod C.
    """
    grid = values.reshape(values.shape[0], *som_dim, *values.shape[2:])
    shifted = (
        torch.roll(grid, -1, dims=1),  # value at r+1
        torch.roll(grid, 1, dims=1),  # value at r-1
        torch.roll(grid, -1, dims=2),  # value at c+1
        torch.roll(grid, 1, dims=2),  # value at c-1
    )
    return tuple(s.reshape(values.shape) for s in shifted)


def loss_som(q: Tensor, q_ng: Tensor, som_dim: tuple[int, int]) -> Tensor:
    """SOM neighbourhood loss (paper: S-SOM): ``-(1/B) Σ_i Σ_j sg(q_ij) Σ_{e∈N(j)} log q_ng,ie``.

    ``q_ng`` is q computed from sg(z), so the gradient reaches the embeddings only. No epsilon in the log.
    """
    log_neighbours = sum(torch.log(n) for n in _neighbour_maps(q_ng, som_dim))
    return -(sg(q) * log_neighbours).sum(1).mean()


def neighbour_nodes(k: Tensor, som_dim: tuple[int, int]) -> Tensor:
    """[B, 5] flat indices of (self, up, down, right, left) on the torus."""
    rows, cols = som_dim
    r, c = k // cols, k % cols
    return torch.stack(
        [k, ((r + 1) % rows) * cols + c, ((r - 1) % rows) * cols + c, r * cols + (c + 1) % cols, r * cols + (c - 1) % cols],
        dim=1,
    )


@functools.cache
def _neighbour_table(som_dim: tuple[int, int], device: torch.device) -> Tensor:
    """:func:`neighbour_nodes` of every node, [R·C, 5]: a step looks its batch's rows up (one gather
    instead of a dozen integer ops on the batch)."""
    return neighbour_nodes(torch.arange(som_dim[0] * som_dim[1], device=device), som_dim)


def loss_som_init(z: Tensor, embeddings_flat: Tensor, k: Tensor, som_dim: tuple[int, int]) -> dict[str, Tensor]:
    """Classic-SOM initialisation loss ``L_a = L_som_s + L_commit_s`` (embeddings only, sg on z).

    ``L_commit_s = mean_{i,d} (sg z_i - m_{k_i})²`` over B·D; ``L_som_s`` the same over the node and its
    4 torus neighbours, a mean over B·5·D. Both terms are one autograd node (:class:`_SOMInitLoss`).
    """
    nodes = _neighbour_table(som_dim, k.device).index_select(0, k)
    commit, som = _SOMInitLoss.apply(sg(z), embeddings_flat, k, nodes)
    return {"loss.som_init.commit": commit, "loss.som_init.som": som, "loss.som_init": som + commit}


class _SOMInitLoss(torch.autograd.Function):
    """``mean (sg z_i - m_{k_i})²`` and ``mean (sg z_i - m_{n})²`` over the 5 nodes n of k_i as one node, whose
    backward is one product and one ``index_add_`` per term. Autograd's chain for the composed ops
    (mean -> g/N, square -> (g/N)·(2·diff), minus -> negation, gather -> ``index_add_`` into zeros) gives
    the same floats: ×2 and the sign are exact, so each element has one rounding in both; the two terms
    meet in one (commutative) addition (tests/test_port_dpsom.py).

    The rows are gathered with ``index_select``, whose gradient (``index_add_``) sums a node's rows in
    batch order on CPU whatever torch's deterministic flag, whereas ``embeddings_flat[k]``'s
    (``index_put_`` with accumulate) adds them from several threads in any order unless
    ``torch.use_deterministic_algorithms(True)``; the floats are that mode's (measured: 200 of 200 random
    B=300 batches bit-identical), so T3/T4 are unchanged. The sum runs along dim 1 of the transposed
    gradient: the same sequence of additions, without the radix sort and buffers of the dim-0 kernel
    (B·5 = 1500 rows of 100: 0.11 against 0.33 ms; B = 300: 0.02 against 0.31).
    """

    @staticmethod
    def forward(ctx, zs: Tensor, embeddings_flat: Tensor, k: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        commit_diff = zs - embeddings_flat.index_select(0, k)
        som_diff = zs.unsqueeze(1) - embeddings_flat.index_select(0, nodes.flatten()).view(*nodes.shape, -1)
        ctx.save_for_backward(commit_diff, som_diff, k, nodes)
        ctx.num_nodes = embeddings_flat.shape[0]
        ctx.set_materialize_grads(False)
        return commit_diff.square().mean(), som_diff.square().mean()

    @staticmethod
    def backward(ctx, g_commit: Tensor | None, g_som: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        commit_diff, som_diff, k, nodes = ctx.saved_tensors
        grad_t = None  # [D, K]
        for g, diff, index in ((g_commit, commit_diff, k), (g_som, som_diff, nodes.flatten())):
            if g is not None:
                rows = diff.view(index.numel(), -1) * (-2 * (g / diff.numel()))
                term = rows.new_zeros(rows.shape[1], ctx.num_nodes).index_add_(1, index, rows.t())
                grad_t = term if grad_t is None else grad_t + term
        return None, None if grad_t is None else grad_t.t().contiguous(), None, None


def target_distribution(q: Tensor) -> Tensor:
    """DEC target ``p_ij = (q_ij²/f_j) / Σ_j' (q_ij'²/f_j')``, ``f_j = Σ_i q_ij`` over the whole set."""
    weight = q.square() / q.sum(0)
    return weight / weight.sum(1, keepdim=True)


def elbo_terms(cfg: DPSOMConfig, out: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """``L_ELBO = NLL + prior · KL_VAE`` (encoder + decoder)."""
    nll = bernoulli_nll(out["decoder.logits"], x)
    kl = kl_posterior_prior(out["posterior.mu"], out.kl_stats, cfg.prior_var)
    return {"loss.elbo.nll": nll, "loss.elbo.kl": kl, "loss.elbo": nll + cfg.prior * kl}


def joint_terms(cfg: DPSOMConfig, out: dict[str, Tensor], x: Tensor, p: Tensor, embeddings_flat: Tensor) -> dict[str, Tensor]:
    """``L = θ·L_ELBO + γ·L_KL + β·L_SOM`` with every term."""
    terms = elbo_terms(cfg, out, x)
    q_ng = student_t_q(z_dist_flat(sg(out["z"]), embeddings_flat), cfg.alpha, cfg.q_epsilon)
    terms["loss.kl_pq"] = loss_commit(p, out["som.q"])
    terms["loss.som"] = loss_som(out["som.q"], q_ng, cfg.som_dim)
    terms["loss.total"] = cfg.theta * terms["loss.elbo"] + cfg.gamma * terms["loss.kl_pq"] + cfg.beta * terms["loss.som"]
    return terms
