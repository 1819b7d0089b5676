"""Evaluation as the original scores it (specs/dekm.md §6), plus unrounded metrics for the harness.

The original scores the k-means labels of each refit against all N ground-truth labels
(transductive: MNIST train + test together) with ``utils.get_ACC_NMI``: ACC by the Hungarian method
on a square contingency table over the *predicted* labels' count, NMI with sklearn's default
(arithmetic) averaging, both rounded to 5 decimals. Its label renaming before the NMI is injective,
so the NMI here is computed on the labels as given.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix


def _labels(y: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y).reshape(-1), np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y and y_pred must be non-empty and of equal length, got {t.size} and {p.size}")
    return t, p


def get_acc_nmi(y: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """The original's ``get_ACC_NMI``: (ACC, NMI arithmetic), each rounded to 5 decimals.

    C[i, j] = #(pred = s_i, true = t_j) over the sorted unique predicted labels s and classes t,
    square N_p x N_p with N_p = len(s); ACC = the max-matching (Hungarian on max(C) − C) / N. With
    fewer clusters than classes the classes beyond N_p are ignored, as in the original; with more
    clusters than classes the original fails (IndexError), here a ValueError says why.
    """
    t, p = _labels(y, y_pred)
    s, classes = np.unique(p), np.unique(t)
    n_p = len(s)
    if n_p > len(classes):
        raise ValueError(f"{n_p} predicted clusters but {len(classes)} classes: the original's square table "
                         "(N_p x N_p over the classes) is undefined (it raises IndexError)")
    c = np.zeros((n_p, n_p), dtype=np.int64)
    p_idx, t_idx = np.searchsorted(s, p), np.searchsorted(classes, t)
    keep = t_idx < n_p
    np.add.at(c, (p_idx[keep], t_idx[keep]), 1)
    rows, cols = linear_sum_assignment(c.max() - c)
    acc = c[rows, cols].sum() / t.size
    nmi = normalized_mutual_info_score(t, p, average_method="arithmetic")
    return round(float(acc), 5), round(float(nmi), 5)


def cluster_metrics(y: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Unrounded ``acc`` (Hungarian on the rectangular contingency table), ``nmi`` (arithmetic) and
    ``purity`` ((1/N)·Σ_k max_j n_kj, absent from the original)."""
    t, p = _labels(y, y_pred)
    classes_by_cluster = contingency_matrix(t, p)  # rows: classes, columns: clusters
    rows, cols = linear_sum_assignment(classes_by_cluster, maximize=True)
    return {
        "acc": float(classes_by_cluster[rows, cols].sum() / t.size),
        "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "purity": float(classes_by_cluster.max(axis=0).sum() / t.size),
    }
