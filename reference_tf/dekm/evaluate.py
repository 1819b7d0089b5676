"""Evaluation of the DEKM TF reference: the original's ``get_ACC_NMI`` (specs/dekm.md §6).

Reproduces ``utils.get_ACC_NMI`` of github spdj2271/DEKM (HEAD e58f506; paper arXiv 2109.15149),
written from the spec: ACC by the Hungarian algorithm on a square N_p×N_p contingency table over
the sorted unique predicted (rows) and true (columns) labels, N_p = number of distinct predicted
labels; NMI = sklearn ``normalized_mutual_info_score`` with its default (arithmetic) averaging,
after the original's (injective) renaming of the predicted labels; both rounded to 5 decimals. The
k-means labels of a refit are scored on all N points (transductive).

As the original: with fewer predicted clusters than classes the classes beyond N_p are ignored
(ACC under-counted); with more it fails (the original's IndexError, here with a message). No
configuration of the original reaches either case. Deviation: the caller's ``y_pred`` is not
modified (the renaming works on a copy).

``cluster_metrics`` reports the field's definitions unrounded (rectangular Hungarian ACC, arithmetic
NMI) and purity (absent in the original).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score


def _contingency(y, y_pred):
    y = np.asarray(y).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y.shape != y_pred.shape or y.size == 0:
        raise ValueError(f"y and y_pred must be non-empty and of the same length, got {y.shape} and {y_pred.shape}")
    s, t = np.unique(y_pred), np.unique(y)
    n = len(s)
    if n > len(t):
        raise IndexError(f"{n} distinct predicted labels > {len(t)} classes: the original's square ACC table "
                         "indexes classes beyond the last (IndexError in get_ACC_NMI)")
    c = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            c[i, j] = np.count_nonzero((y_pred == s[i]) & (y == t[j]))
    row, col = linear_sum_assignment(c.max() - c)
    return y, y_pred, c, row, col


def _acc_nmi(y, y_pred):
    y, y_pred, c, row, col = _contingency(y, y_pred)
    acc = c[row, col].sum() / len(y)
    renamed = np.array(y_pred)
    for i in range(len(col)):
        renamed[y_pred == col[i]] = i
    nmi = normalized_mutual_info_score(y, renamed)
    return float(acc), float(nmi)


def get_acc_nmi(y, y_pred) -> tuple[float, float]:
    """The original's ``(ACC, NMI)``, both rounded to 5 decimals."""
    acc, nmi = _acc_nmi(y, y_pred)
    return float(np.round(acc, 5)), float(np.round(nmi, 5))


def purity(y, y_pred) -> float:
    """(1/N)·Σ_k max_j n_kj over the predicted clusters k and the classes j."""
    y = np.asarray(y).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    _, p = np.unique(y_pred, return_inverse=True)
    _, t = np.unique(y, return_inverse=True)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return float(table.max(axis=1).sum() / len(y))


def cluster_metrics(y, y_pred) -> dict:
    """``{'acc', 'nmi', 'purity'}`` unrounded, by the field's definitions: ACC by the Hungarian
    algorithm on the rectangular clusters x classes table (equal to the original's when there are as
    many clusters as classes, not otherwise: :func:`get_acc_nmi` is the original's), NMI arithmetic."""
    from sklearn.metrics.cluster import contingency_matrix

    y, y_pred = np.asarray(y).reshape(-1), np.asarray(y_pred).reshape(-1)
    table = contingency_matrix(y_pred, y)
    row, col = linear_sum_assignment(table, maximize=True)
    return {"acc": float(table[row, col].sum() / len(y)), "nmi": float(normalized_mutual_info_score(y, y_pred)),
            "purity": purity(y, y_pred)}
