"""DEKM training as the original runs it (specs/dekm.md §4-§5), in PyTorch.

1. Pretraining: ``pretrain_epochs`` epochs of ``loss.recon`` over the windowed-shuffle batches
   (``shuffle(8000).batch(256)``, reshuffled every epoch), with a fresh Keras Adam.
2. The clustering loop (§5.3), ``ite`` = 0 … ``max_iter``-1, with a second fresh Keras Adam:
   every ``update_interval`` steps a refit (H over all N in one forward; k-means with ``n_init`` 100,
   then ``int(2·n_iter_)``; Hungarian relabelling of the old labels -> ``n_changed``; S_w, V, targets);
   stop *before* the step if ``n_changed ≤ tol·N``; one ``loss.cluster`` step on the batch
   ``index·B : min((index+1)·B, N)`` in fixed order, the pointer carried across refits.
3. The result: the last refit's k-means labels, scored on all N (§6).

Randomness (§7) can be injected: the data permutation (``data.get_xy``), each pretraining epoch's
order (``pretrain_orders``) and each refit's k-means candidate centres (``kmeans_inits``); without
them the port draws its own, unseeded like the original (or from ``rng``).

Entry point: ``python -m ports.dekm.train --variant conv --data-dir DIR [--out FILE [--overwrite]] key=value ...``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from .config import DEKMConfig, get_config, parse_overrides
from .data import epoch_order, get_xy, pretrain_batches
from .evaluate import get_acc_nmi
from .losses import cluster_loss, recon_loss
from .model import DEKM, as_tensor
from .optim import TorchAdam, make_optimizer

PHASES = ("pretrain", "cluster")
LOSS_KEYS = {"pretrain": "loss.recon", "cluster": "loss.cluster"}


class Trainer:
    """Model + one fresh optimizer per phase; ``step`` is one ``train_on_batch`` / tape step of the original."""

    def __init__(self, config: DEKMConfig, model: DEKM | None = None, compiled: bool = False) -> None:
        """``compiled``: each step's loss (and, through AOTAutograd, its backward) runs through
        ``torch.compile``: a fast mode, not parity-exact (the compiler's kernels and fusions)."""
        self.config = config
        self.model = model if model is not None else DEKM(config)
        self.optimizers: dict[str, TorchAdam] = {}
        self.compiled = compiled

    @functools.cached_property
    def _compiled_terms(self) -> Callable[..., dict[str, torch.Tensor]]:
        """:meth:`compute_terms` through ``torch.compile``, made at the first compiled step (an eager
        trainer never imports the compiler)."""
        return torch.compile(self.compute_terms)

    def optimizer(self, phase: str) -> TorchAdam:
        """The phase's optimizer, created when the phase first steps (``shared_optimizer``: one for both)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if phase not in self.optimizers:
            shared = self.config.shared_optimizer and self.optimizers
            self.optimizers[phase] = next(iter(self.optimizers.values())) if shared else make_optimizer(
                self.model.parameters(), self.config)
        return self.optimizers[phase]

    def _tensor(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        return as_tensor(a, self.model.embedding.weight)

    def compute_terms(self, phase: str, x: np.ndarray | torch.Tensor, V: Any = None, t: Any = None) -> dict[str, torch.Tensor]:
        """``{"loss.recon"}`` (pretrain) or ``{"loss.cluster"}`` (cluster), with their graphs.

        ``V``: [d, d], or the harness's per-sample copies [B, d, d] (the first one is used); ``t``: [B, d].
        The clustering phase runs the encoder only: the decoder's gradient is zero in the original.
        """
        if phase == "pretrain":
            x = self._tensor(x)
            return {"loss.recon": recon_loss(x, self.model(x)["reconstruction"])}
        if phase == "cluster":
            if V is None or t is None:
                raise ValueError("the cluster phase needs V [d, d] and the batch's targets t [B, d]")
            V, t = self._tensor(V), self._tensor(t)
            V = V[0] if V.dim() == 3 else V
            h = self.model.embed(x)
            return {"loss.cluster": cluster_loss(h, V, t, self.config.cluster_reduction)}
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def step(self, phase: str, x: np.ndarray | torch.Tensor, lr_feed: float = 1e-3, V: Any = None, t: Any = None) -> dict[str, Any]:
        """One optimizer step: the loss before the update, ``lr`` (= ``lr_feed``), ``global_step`` after it."""
        if len(x) == 0:
            raise ValueError(f"empty batch in phase {phase!r}: Keras would still move the weights by Adam momentum; refused")
        opt = self.optimizer(phase)
        compute = self.compute_terms
        if self.compiled:  # tensors in: the compiled function sees no numpy array
            compute, x, V, t = self._compiled_terms, self._tensor(x), *(None if a is None else self._tensor(a) for a in (V, t))
        terms = compute(phase, x, V, t)
        loss = terms[LOSS_KEYS[phase]]
        for group in opt.param_groups:
            group["lr"] = lr_feed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record: dict[str, Any] = {k: float(v.detach()) for k, v in terms.items()}
        record["lr"] = float(lr_feed)
        record["global_step"] = opt.iterations
        return record

    @torch.no_grad()
    def embed_all(self, x: np.ndarray | torch.Tensor, chunk: int | None = None) -> np.ndarray:
        """H [N, d] float32: one forward over all N like the original (``chunk``: in pieces of that size)."""
        n = len(x)
        size = n if chunk is None else chunk
        parts = [self.model.embed(self._tensor(x[i : i + size])) for i in range(0, n, max(size, 1))]
        return torch.cat(parts).cpu().numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class Refit:
    """One k-means refit (§4.2, §5.3): labels, centres U, n_iter_, the relabelled change count, S_w, V, targets."""

    labels: np.ndarray
    centres: np.ndarray
    n_iter: int
    n_changed: int
    S_w: np.ndarray
    eigvals: np.ndarray
    V: np.ndarray
    targets: np.ndarray


def relabelled_changes(labels_new: np.ndarray, labels_old: np.ndarray, n_clusters: int) -> int:
    """§5.3: w[new, old] co-occurrences (old −1 labels index column K−1, as numpy's negative index),
    ``linear_sum_assignment(−w)``, old label ``col[i]`` renamed to i (all at once), then the count of
    points whose new label differs from the renamed old one. −1 labels are never renamed: N changes."""
    new, old = np.asarray(labels_new), np.asarray(labels_old)
    w = np.zeros((n_clusters, n_clusters), dtype=np.int64)
    np.add.at(w, (new, old), 1)
    _, col = linear_sum_assignment(-w)
    renamed = old.copy()
    for i in range(n_clusters):
        renamed[old == col[i]] = i
    return int(np.sum(new != renamed))


def refit(H: np.ndarray, assignment_old: np.ndarray, n_clusters: int, n_init: int, inits: Sequence[np.ndarray] | None = None) -> Refit:
    """k-means on H, the change count against ``assignment_old``, and the rotation V with its targets.

    ``inits`` None: ``KMeans(n_clusters, n_init=n_init)`` (unseeded, the original). Else one
    ``KMeans(n_clusters, init=c, n_init=1)`` per candidate, the lowest inertia kept (first on ties).
    S_w = Σ_k (H_k − u_k)ᵀ(H_k − u_k) in float32; ``np.linalg.eig`` sorted ascending, real part kept;
    targets = H·V with the last column replaced by (U·V)[label, −1].
    """
    H = np.asarray(H, dtype=np.float32)
    if inits is None:
        best = KMeans(n_clusters, n_init=n_init).fit(H)
    else:
        best = None
        for c in inits:
            km = KMeans(n_clusters, init=np.asarray(c, dtype=H.dtype), n_init=1).fit(H)
            if best is None or km.inertia_ < best.inertia_:
                best = km
        if best is None:
            raise ValueError("inits is empty: give at least one candidate set of initial centres")
    labels = np.asarray(best.labels_)
    U = np.asarray(best.cluster_centers_, dtype=np.float32)
    n_changed = relabelled_changes(labels, assignment_old, n_clusters)
    d = H.shape[1]
    S_w = np.zeros((d, d), dtype=np.float32)
    for k in range(n_clusters):
        diff = H[labels == k] - U[k]
        S_w += diff.T @ diff
    eigvals, vecs = np.linalg.eig(S_w)
    order = np.argsort(eigvals)
    eigvals, V = np.real(eigvals[order]), np.ascontiguousarray(np.real(vecs[:, order]), dtype=np.float32)
    targets = H @ V
    targets[:, -1] = (U @ V)[labels, -1]
    return Refit(labels, U, int(best.n_iter_), n_changed, S_w, eigvals, V, targets)


KMeansInits = Callable[[int, int, np.ndarray], Sequence[np.ndarray] | None]


def cluster_batch(index: int, n: int, batch_size: int) -> tuple[np.ndarray, int]:
    """The clustering phase's batch at pointer ``index`` and the next pointer (the original's rule):
    ``index·B : min((index+1)·B, N)`` in the fixed order, then ``index + 1`` if ``(index+1)·B <= N``
    else 0 (so a partial last batch is taken, and N divisible by B yields an empty batch next)."""
    return np.arange(index * batch_size, min((index + 1) * batch_size, n)), (index + 1 if (index + 1) * batch_size <= n else 0)


def fit(trainer: Trainer, x: np.ndarray, y: np.ndarray, pretrain_orders: Sequence[np.ndarray] | None = None,
        kmeans_inits: KMeansInits | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
        *, rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """The original's whole schedule (module docstring); one record per optimizer step, then a ``stop`` record.

    ``pretrain_orders[e]``: epoch e's index order (length N, cut into batches of ``pretrain_batch_size``);
    None: the port's own (``rng``, unseeded if None). ``kmeans_inits(refit_index, n_init, H)``: candidate
    initial centres for that refit (None or returning None: native k-means). ``on_step(record)``: called
    with every record. Records: ``phase``, ``epoch`` / ``refit``, ``global_step``, ``lr``, the loss term,
    ``n_changed`` (clustering); last ``{"phase": "stop", "reason": "tol" | "max_iter", "labels", "acc",
    "nmi", "refits"}`` (``refits``: how many refits ran).
    """
    cfg = trainer.config
    x = np.asarray(x, dtype=np.float32)  # Keras casts each float64 batch to float32: the same values
    n = len(x)
    rng = rng if rng is not None else np.random.default_rng()
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        if on_step is not None:
            on_step(record)

    if pretrain_orders is not None and len(pretrain_orders) < cfg.pretrain_epochs:
        raise ValueError(f"pretrain_orders has {len(pretrain_orders)} epochs, pretrain_epochs={cfg.pretrain_epochs}")
    for epoch in range(cfg.pretrain_epochs):
        if pretrain_orders is not None:
            order = np.asarray(pretrain_orders[epoch])
            if order.shape != (n,) or order.dtype.kind not in "iu" or (n and (order.min() < 0 or order.max() >= n)):
                raise ValueError(f"pretrain_orders[{epoch}]: expected {n} indices in [0, {n}), got {order.dtype} {order.shape}")
        else:
            order = epoch_order(n, cfg.shuffle_buffer, rng, cfg.pretrain_shuffle)
        for idx in pretrain_batches(order, cfg.pretrain_batch_size):
            rec = trainer.step("pretrain", x[idx], cfg.learning_rate)
            emit({"phase": "pretrain", "epoch": epoch, **rec})

    B, K = cfg.batch_size, cfg.n_clusters
    assignment = np.full(n, -1, dtype=np.int64)
    n_init, index, n_refits = cfg.kmeans_n_init, 0, 0
    current: Refit | None = None
    reason = "max_iter"
    for ite in range(cfg.max_iter):
        if ite % cfg.update_interval == 0:
            H = trainer.embed_all(x)
            inits = kmeans_inits(n_refits, n_init, H) if kmeans_inits is not None else None
            current = refit(H, assignment, K, n_init, inits)
            assignment, n_init = current.labels, int(2 * current.n_iter)
            n_refits += 1
        assert current is not None
        if current.n_changed <= cfg.tol * n:
            reason = "tol"
            break
        idx, next_index = cluster_batch(index, n, B)
        if len(idx) == 0:
            raise ValueError(f"empty clustering batch at step {ite}: N={n} is a multiple of batch_size={B}, so the "
                             "original's pointer reaches an empty batch (Keras would still move the weights); refused")
        rec = trainer.step("cluster", x[idx], cfg.learning_rate, V=current.V, t=current.targets[idx])
        emit({"phase": "cluster", "refit": n_refits - 1, **rec, "n_changed": current.n_changed})
        index = next_index
    labels = assignment if current is not None else np.full(n, -1, dtype=np.int64)
    acc, nmi = get_acc_nmi(y, labels) if current is not None else (float("nan"), float("nan"))
    emit({"phase": "stop", "reason": reason, "labels": labels, "acc": acc, "nmi": nmi, "refits": n_refits})
    return records


# The errors a command line can provoke (bad keys or values, missing data, an existing --out, a
# data set of the wrong shape): reported on one line, exit status 2 (argparse's own usage errors too).
USER_ERRORS = (KeyError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """``python -m ports.dekm.train --variant conv --data-dir DIR [--seed S] [--out FILE [--overwrite]] key=value ...``.

    An expected error (:data:`USER_ERRORS`) is printed as one ``error: ...`` line on stderr and exits
    with status 2; ``--out`` naming an existing file is refused before any work unless ``--overwrite``."""
    parser = argparse.ArgumentParser(prog="python -m ports.dekm.train", description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="conv")
    parser.add_argument("--data-dir", default=None, help="data directory or file (default: $PARITY_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=None, help="seeds torch and the port's numpy draws (default: unseeded)")
    parser.add_argument("--out", default=None, help="write the step records and the result as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> int:
    cfg = get_config(args.variant, **parse_overrides(args.overrides))
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists (another run's results); pass --overwrite to replace it")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x, y = get_xy(cfg.ds_name, data_dir=args.data_dir, flatten=not cfg.convolution, rng=rng)
    if tuple(x.shape[1:]) != cfg.input_shape:
        raise ValueError(f"{cfg.ds_name} gives samples of shape {x.shape[1:]}, the variant expects {cfg.input_shape}")
    start = time.time()

    def progress(rec: dict[str, Any]) -> None:
        if rec["phase"] == "cluster" and (rec["global_step"] - 1) % cfg.update_interval == 0:
            print(f"refit {rec['refit']}: n_changed {rec['n_changed']}, loss {rec['loss.cluster']:.5f}", flush=True)
        elif rec["phase"] == "pretrain" and rec["global_step"] % 1000 == 0:
            print(f"pretrain epoch {rec['epoch']} step {rec['global_step']}: loss {rec['loss.recon']:.5f}", flush=True)

    records = fit(Trainer(cfg), x, y, on_step=progress, rng=rng)
    stop = records[-1]
    print(f"stop ({stop['reason']}) after {stop['refits']} refits: acc {stop['acc']}, nmi {stop['nmi']}, {time.time() - start:.0f} s")
    if args.out:
        result = {k: v for k, v in stop.items() if k != "labels"}
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"config": cfg.to_dict(), "result": result, "steps": records[:-1]}, fh)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
