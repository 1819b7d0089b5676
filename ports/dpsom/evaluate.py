"""Evaluation protocol of the original DPSOM (specs/dpsom.md §7).

Cluster of an image = BMU of a *random sample* z from q(z|x) (``eval_assignment="sample"``; the
stream restarts from the seed, so it is deterministic given the weights), or of the posterior mean
(``"mean"``, what the public port does). Only full batches are evaluated: 33 x 300 = 9 900 of the
10 000 test images. Metrics: NMI (``config.nmi_average_method``, geometric by default, plus the
arithmetic one), purity, AMI and ACC, computed here with scikit-learn / scipy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from .config import DPSOMConfig
from .model import DPSOM, device_generator, z_dist_flat


@torch.no_grad()
def assign_clusters(model: DPSOM, x: np.ndarray, config: DPSOMConfig, seed: int | None = None,
                    eps: Callable[[tuple[int, ...]], np.ndarray] | None = None, return_distances: bool = False):
    """BMU index for the first ``(len(x) // batch_size) * batch_size`` images.

    ``eps(shape)``, optional: the ε [batch, D] of each batch's sample, in batch order (replaces the
    restarted generator; the posterior-mean assignment draws none). ``return_distances``: also the
    [N, K] squared distances the BMU is the argmin of, as ``(k, distances)``."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    generator = device_generator(device, config.random_seed if seed is None else seed)
    bs = config.batch_size
    ks, dists = [], []
    model.eval()
    for i in range(len(x) // bs):
        e = None
        if eps is not None and config.eval_assignment == "sample":
            e = torch.as_tensor(eps((bs, config.latent_dim)), dtype=dtype, device=device)
        out = model(torch.as_tensor(x[i * bs : (i + 1) * bs], dtype=dtype, device=device), e, decode=False, generator=generator)
        dist = z_dist_flat(out["posterior.mu"], model.som.flat()) if config.eval_assignment == "mean" else out["som.z_dist"]
        ks.append(dist.argmin(1))
        dists.append(dist)
    model.train()
    k = torch.cat(ks).cpu().numpy() if ks else np.zeros(0, dtype=np.int64)
    if not return_distances:
        return k
    return k, (torch.cat(dists).cpu().numpy() if dists else np.zeros((0, model.som.flat().shape[0]), dtype=np.float32))


def cluster_metrics(y_true: np.ndarray, y_pred: np.ndarray, nmi_average_method: str = "geometric") -> dict[str, float]:
    """``nmi`` (``nmi_average_method``), ``nmi_arithmetic``, ``purity``, ``ami`` and ``acc`` as floats.

    * purity: the original DPSOM's majority vote, (1/N) sum over clusters of the count of the
      cluster's most frequent class (empty clusters count 0).
    * ami: sklearn's default averaging, as the original writes to its result files.
    * acc: best one-to-one cluster -> class matching (Hungarian) on the rectangular contingency table.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu":
            raise ValueError(f"{name} must be a non-empty 1-D integer array, got shape {a.shape} dtype {a.dtype}")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    classes_by_cluster = contingency_matrix(t, p)  # rows: classes, columns: clusters (both sorted)
    rows, cols = linear_sum_assignment(classes_by_cluster.T, maximize=True)
    return {
        "nmi": float(normalized_mutual_info_score(t, p, average_method=nmi_average_method)),
        "nmi_arithmetic": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "purity": float(classes_by_cluster.max(axis=0).sum() / t.size),
        "ami": float(adjusted_mutual_info_score(t, p)),
        "acc": float(classes_by_cluster.T[rows, cols].sum() / t.size),
    }


def evaluate(model: DPSOM, x: np.ndarray, y: np.ndarray, config: DPSOMConfig,
             eps: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> dict[str, float]:
    """NMI (config.nmi_average_method), purity, AMI and ACC on the full batches of ``(x, y)``
    (``eps``: as :func:`assign_clusters`)."""
    k = assign_clusters(model, x, config, eps=eps)
    if len(k) == 0:
        raise ValueError(f"nothing to evaluate: {len(x)} images give no full batch of {config.batch_size}")
    metrics = cluster_metrics(np.asarray(y[: len(k)]), k, config.nmi_average_method)
    metrics["n_evaluated"] = int(len(k))
    return metrics
