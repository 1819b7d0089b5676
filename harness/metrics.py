"""Clustering metrics shared by every model (DPSOM, T-DPSOM, DEKM), framework-free.

Each function takes ``y_true`` (ground-truth class ids) and ``y_pred`` (cluster ids), both 1-D,
non-empty, non-negative integer arrays of the same length, and returns a Python ``float``. Inputs
are validated first so that a transposed, float or empty array fails with a message naming the
argument instead of producing a silently wrong number.

* :func:`nmi` — sklearn ``normalized_mutual_info_score``. DPSOM passes
  ``average_method='geometric'`` explicitly (I/sqrt(H(Y) H(K))); DEKM uses sklearn's default
  ``'arithmetic'`` (2I/(H(Y)+H(K))). A table mixing models must say which one it shows.
* :func:`purity` — the original DPSOM definition: a D x D contingency table with
  D = max(max pred, max true) + 1, each cluster mapped to its majority class (ties to the lowest
  class index, empty clusters to class 0), purity = (1/N) sum_k max_c n_kc.
* :func:`ami` — sklearn ``adjusted_mutual_info_score`` with its default averaging (as DPSOM).
* :func:`acc` — best one-to-one cluster->class matching (Hungarian, ``linear_sum_assignment``), as
  DEKM's ``get_ACC_NMI``. Deliberate deviation: we build the full rectangular contingency table
  (distinct predictions x distinct classes), so the result is also right when the number of
  clusters differs from the number of classes, where DEKM's code under-counts or raises. When the
  two numbers are equal (every DEKM configuration) the values are identical.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

NMI_AVERAGE_METHODS = ("geometric", "arithmetic", "min", "max")


def _check_labels(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated int64 copies of both label vectors (errors name the offending argument)."""
    out = []
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        a = np.asarray(y)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{name} is empty; metrics need at least one sample")
        if a.dtype.kind not in "iu":
            raise ValueError(
                f"{name} must hold integer labels, got dtype {a.dtype} (cast explicitly, e.g. "
                "with .astype(np.int64), if the values are whole numbers)"
            )
        if a.min() < 0:
            raise ValueError(f"{name} must be non-negative, got minimum {a.min()}")
        out.append(a.astype(np.int64))
    if out[0].shape != out[1].shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {out[0].size} and {out[1].size}"
        )
    return out[0], out[1]


def nmi(y_true: ArrayLike, y_pred: ArrayLike, average_method: str = "geometric") -> float:
    """Normalized mutual information; geometric by default because DPSOM reports that one."""
    t, p = _check_labels(y_true, y_pred)
    if average_method not in NMI_AVERAGE_METHODS:
        raise ValueError(
            f"average_method must be one of {NMI_AVERAGE_METHODS}, got {average_method!r}"
        )
    return float(normalized_mutual_info_score(t, p, average_method=average_method))


def cluster_to_class(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """The original DPSOM majority vote: ``mapping[k]`` = class most frequent in cluster ``k``.

    Contingency table is D x D with D = max(max pred, max true) + 1 (64 x 64 for an 8 x 8 SOM on
    10 classes); ``argmax`` breaks ties towards the lowest class index and maps empty clusters to 0.
    """
    t, p = _check_labels(y_true, y_pred)
    d = int(max(p.max(), t.max())) + 1
    table = np.bincount(p * d + t, minlength=d * d).reshape(d, d)  # rows: cluster, cols: class
    return table.argmax(axis=1)


def purity(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples whose cluster's majority class is their class: (1/N) sum_k max_c n_kc."""
    t, p = _check_labels(y_true, y_pred)
    mapping = cluster_to_class(t, p)
    return float(np.mean(mapping[p] == t))


def ami(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted mutual information, sklearn default averaging (what DPSOM writes to its files)."""
    t, p = _check_labels(y_true, y_pred)
    return float(adjusted_mutual_info_score(t, p))


def acc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Unsupervised accuracy: best one-to-one cluster->class assignment (Hungarian), over N."""
    t, p = _check_labels(y_true, y_pred)
    pred_ids, p_idx = np.unique(p, return_inverse=True)
    true_ids, t_idx = np.unique(t, return_inverse=True)
    table = np.zeros((pred_ids.size, true_ids.size), dtype=np.int64)
    np.add.at(table, (p_idx, t_idx), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.size)


def cluster_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """All metrics at once, keys named by method so tables cannot mix NMI averagings up."""
    t, p = _check_labels(y_true, y_pred)
    return {
        "nmi": nmi(t, p, "geometric"),
        "nmi_arithmetic": nmi(t, p, "arithmetic"),
        "purity": purity(t, p),
        "ami": ami(t, p),
        "acc": acc(t, p),
    }
