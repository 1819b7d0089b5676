"""harness.metrics against hand computations on small contingency tables.

Expected values come from closed forms written here with numpy logs (entropies, mutual
information, the hypergeometric expected MI) or from counting by hand; sklearn is not used to
produce any expectation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import metrics

# Table A, rows = clusters k, columns = classes c (N = 15):
#          c0 c1 c2 | n_k
#     k0 [  5, 1, 0]|  6
#     k1 [  3, 0, 1]|  4
#     k2 [  0, 2, 3]|  5
#   n_c     8  3  4
TABLE_A = np.array([[5, 1, 0], [3, 0, 1], [0, 2, 3]])

# Table B: classes {0, 1}, clusters {0, 1, 3}; cluster 2 is empty; cluster 0 is a 2:2 tie (N = 9).
TABLE_B = np.array([[2, 2], [1, 3], [0, 0], [0, 1]])


def expand(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample-level (y_true, y_pred) with ``table[k, c]`` samples of cluster k and class c."""
    k, c = np.nonzero(table)
    counts = table[k, c]
    return np.repeat(c, counts), np.repeat(k, counts)


def entropies(table: np.ndarray) -> tuple[float, float, float]:
    """(H(K), H(C), I(K;C)) in nats, straight from the definitions."""
    p = table / table.sum()
    pk, pc = p.sum(axis=1), p.sum(axis=0)
    hk = -np.sum(pk[pk > 0] * np.log(pk[pk > 0]))
    hc = -np.sum(pc[pc > 0] * np.log(pc[pc > 0]))
    nz = p > 0
    mi = np.sum(p[nz] * np.log(p[nz] / np.outer(pk, pc)[nz]))
    return float(hk), float(hc), float(mi)


def expected_mi(table: np.ndarray) -> float:
    """E[I] under the permutation (hypergeometric) model, Vinh et al. 2010, with log-factorials."""
    n = int(table.sum())
    a, b = table.sum(axis=1), table.sum(axis=0)
    lf = lambda v: math.lgamma(v + 1)  # noqa: E731
    total = 0.0
    for ai in a[a > 0]:
        for bj in b[b > 0]:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                log_p = (
                    lf(ai) + lf(bj) + lf(n - ai) + lf(n - bj)
                    - lf(n) - lf(nij) - lf(ai - nij) - lf(bj - nij) - lf(n - ai - bj + nij)
                )
                total += nij / n * math.log(n * nij / (ai * bj)) * math.exp(log_p)
    return total


def test_nmi_table_a_matches_entropy_closed_form() -> None:
    y_true, y_pred = expand(TABLE_A)
    hk, hc, mi = entropies(TABLE_A)
    # H(K) = -(6/15 ln 6/15 + 4/15 ln 4/15 + 5/15 ln 5/15) = 1.08519 nats
    by_hand = -(6 / 15 * math.log(6 / 15) + 4 / 15 * math.log(4 / 15) + 5 / 15 * math.log(5 / 15))
    assert hk == pytest.approx(by_hand, abs=1e-15) and hk == pytest.approx(1.0851886, abs=1e-7)
    geometric, arithmetic = mi / math.sqrt(hk * hc), 2 * mi / (hk + hc)
    assert metrics.nmi(y_true, y_pred) == pytest.approx(geometric, abs=1e-12)
    assert metrics.nmi(y_true, y_pred, "arithmetic") == pytest.approx(arithmetic, abs=1e-12)
    # The same numbers written out (from the closed form above).
    assert geometric == pytest.approx(0.4347832328, abs=1e-9)
    assert arithmetic == pytest.approx(0.4345001896, abs=1e-9)


def test_purity_and_acc_table_a_by_hand() -> None:
    y_true, y_pred = expand(TABLE_A)
    # Purity: every cluster votes its majority class: 5 (k0->c0) + 3 (k1->c0) + 3 (k2->c2) = 11.
    assert metrics.purity(y_true, y_pred) == pytest.approx(11 / 15, abs=1e-15)
    assert metrics.cluster_to_class(y_true, y_pred).tolist() == [0, 0, 2]
    # ACC, one-to-one. All 6 permutations (k0,k1,k2) -> classes:
    #   (0,1,2) 5+0+3=8  (0,2,1) 5+1+2=8  (1,0,2) 1+3+3=7
    #   (1,2,0) 1+1+0=2  (2,0,1) 0+3+2=5  (2,1,0) 0+0+0=0   -> best 8.
    assert metrics.acc(y_true, y_pred) == pytest.approx(8 / 15, abs=1e-15)


def test_ami_table_a_matches_expected_mi_closed_form() -> None:
    y_true, y_pred = expand(TABLE_A)
    hk, hc, mi = entropies(TABLE_A)
    emi = expected_mi(TABLE_A)
    expected = (mi - emi) / ((hk + hc) / 2 - emi)  # sklearn's default average is arithmetic
    assert metrics.ami(y_true, y_pred) == pytest.approx(expected, abs=1e-10)
    assert expected == pytest.approx(0.3181956700, abs=1e-9)
    assert metrics.ami(y_pred, y_true) == pytest.approx(expected, abs=1e-10)  # symmetric


def test_purity_tie_goes_to_lowest_class_and_empty_cluster_to_zero() -> None:
    y_true, y_pred = expand(TABLE_B)
    # D = max(3, 1) + 1 = 4. k0 [2,2] tie -> class 0; k1 [1,3] -> 1; k2 empty -> 0; k3 [0,1] -> 1.
    assert metrics.cluster_to_class(y_true, y_pred).tolist() == [0, 1, 0, 1]
    # Correct after the vote: 2 (k0) + 3 (k1) + 1 (k3) = 6 of 9.
    assert metrics.purity(y_true, y_pred) == pytest.approx(6 / 9, abs=1e-15)
    # The tie does not change purity: swap the tied columns' meaning and purity is still 6/9.
    assert metrics.purity(1 - y_true, y_pred) == pytest.approx(6 / 9, abs=1e-15)


def test_acc_with_more_clusters_than_classes() -> None:
    y_true, y_pred = expand(TABLE_B)
    # Two classes, three non-empty clusters: best pairs k1->c1 (3) + k0->c0 (2) = 5 of 9.
    # (DEKM's own code raises IndexError here; ours uses the full rectangular table.)
    assert metrics.acc(y_true, y_pred) == pytest.approx(5 / 9, abs=1e-15)


def test_perfect_clustering_under_relabelling_scores_one() -> None:
    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([7, 7, 3, 3, 3, 0, 0, 0, 0])  # a renaming of the classes
    result = metrics.cluster_metrics(y_true, y_pred)
    assert result == pytest.approx(
        {"nmi": 1.0, "nmi_arithmetic": 1.0, "purity": 1.0, "ami": 1.0, "acc": 1.0}, abs=1e-12
    )


def test_cluster_metrics_keys_and_values() -> None:
    y_true, y_pred = expand(TABLE_A)
    result = metrics.cluster_metrics(y_true, y_pred)
    assert list(result) == ["nmi", "nmi_arithmetic", "purity", "ami", "acc"]
    assert all(type(v) is float for v in result.values())
    assert result["purity"] == pytest.approx(11 / 15) and result["acc"] == pytest.approx(8 / 15)
    assert result["nmi"] == pytest.approx(0.4347832328, abs=1e-9)


def test_nmi_ceiling_of_64_pure_equal_clusters() -> None:
    # 64 pure clusters of 100 samples; 10 classes made of 7,7,7,7,6,6,6,6,6,6 clusters (as balanced
    # as 64 clusters allow). Pure => I = H(C); equal clusters => H(K) = ln 64; so
    # NMI_geo = sqrt(H(C) / ln 64), within 5e-4 of the balanced limit sqrt(ln 10 / ln 64) = 0.7441.
    per_class = [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    cluster_class = np.repeat(np.arange(10), per_class)
    y_pred = np.repeat(np.arange(64), 100)
    y_true = cluster_class[y_pred]
    pc = np.array(per_class) / 64
    hc = -np.sum(pc * np.log(pc))
    got = metrics.nmi(y_true, y_pred)
    assert got == pytest.approx(math.sqrt(hc / math.log(64)), abs=1e-12)
    assert got == pytest.approx(math.sqrt(math.log(10) / math.log(64)), abs=5e-4)
    assert math.sqrt(math.log(10) / math.log(64)) == pytest.approx(0.744080, abs=1e-6)
    arithmetic = metrics.nmi(y_true, y_pred, "arithmetic")
    assert arithmetic == pytest.approx(2 * hc / (hc + math.log(64)), abs=1e-12)
    assert arithmetic == pytest.approx(0.7127, abs=1e-3)  # spec: ~0.713 for the balanced limit
    assert metrics.purity(y_true, y_pred) == 1.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        (np.zeros((2, 3), dtype=int), np.zeros(6, dtype=int), "y_true must be 1-D"),
        (np.zeros(3, dtype=int), np.zeros((3, 1), dtype=int), "y_pred must be 1-D"),
        (np.array([], dtype=int), np.array([], dtype=int), "y_true is empty"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "y_true must hold integer labels"),
        (np.array([0, 1]), np.array([0.5, 1.0]), "y_pred must hold integer labels"),
        (np.array([0, 1, 1]), np.array([0, 1]), "same length, got 3 and 2"),
        (np.array([0, -1]), np.array([0, 1]), "y_true must be non-negative"),
    ],
)
@pytest.mark.parametrize(
    "fn", [metrics.nmi, metrics.purity, metrics.ami, metrics.acc, metrics.cluster_metrics]
)
def test_bad_inputs_raise_naming_the_argument(fn, y_true, y_pred, match) -> None:
    with pytest.raises(ValueError, match=match):
        fn(y_true, y_pred)


def test_unknown_nmi_average_method() -> None:
    with pytest.raises(ValueError, match="average_method must be one of"):
        metrics.nmi([0, 1], [0, 1], "harmonic")
