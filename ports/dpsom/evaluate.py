"""Evaluation protocol of the original DPSOM (specs/dpsom.md §7).

Cluster of an image = BMU of a *random sample* z from q(z|x) (``eval_assignment="sample"``; the
stream restarts from the seed, so it is deterministic given the weights), or of the posterior mean
(``"mean"``, what the public port does). Only full batches are evaluated: 33 x 300 = 9 900 of the
10 000 test images. Metrics: NMI (geometric), purity, AMI, ACC from ``harness.metrics``.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.metrics import cluster_metrics, nmi

from .config import DPSOMConfig
from .model import DPSOM, z_dist_flat


@torch.no_grad()
def assign_clusters(model: DPSOM, x: np.ndarray, config: DPSOMConfig, seed: int | None = None) -> np.ndarray:
    """BMU index for the first ``(len(x) // batch_size) * batch_size`` images."""
    generator = torch.Generator().manual_seed(config.random_seed if seed is None else seed)
    bs = config.batch_size
    ks = []
    model.eval()
    for i in range(len(x) // bs):
        out = model(torch.from_numpy(x[i * bs : (i + 1) * bs]), decode=False, generator=generator)
        if config.eval_assignment == "mean":
            ks.append(z_dist_flat(out["posterior.mu"], model.som.flat()).argmin(1))
        else:
            ks.append(out["som.k"])
    model.train()
    return torch.cat(ks).numpy() if ks else np.zeros(0, dtype=np.int64)


def evaluate(model: DPSOM, x: np.ndarray, y: np.ndarray, config: DPSOMConfig) -> dict[str, float]:
    """NMI (config.nmi_average_method), purity, AMI and ACC on the full batches of ``(x, y)``."""
    k = assign_clusters(model, x, config)
    metrics = cluster_metrics(y[: len(k)], k)
    metrics["nmi"] = nmi(y[: len(k)], k, average_method=config.nmi_average_method)
    metrics["n_evaluated"] = int(len(k))
    return metrics
