"""harness.compare on hand-built arrays: verdict bands, non-finite values, bit-exact round trips.

numpy only (no TensorFlow, no torch). Values are dyadic fractions, so every difference and every
tolerance below is exact in float64 and each boundary is tested at its exact value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.compare import (
    FLOAT32_EPS,
    INACCURATE_FACTOR,
    Comparison,
    compare,
    compare_all,
    compare_exact,
    constant_ratio,
    first_divergence,
    format_table,
)

INF, NAN = np.inf, np.nan


def _pair(delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([0.5, 1.0])
    return a, np.array([0.5, 1.0 + delta])


# ---------------------------------------------------------------------------------------------
# verdict bands: tolerance = multiple x max(floor, resolution x magnitude)


def test_tolerance_from_floor_and_pass_at_boundary():
    # floor 2^-10 beats resolution x magnitude (1.19e-7 x 1.0039); tol = 4 x 2^-10 = 2^-8
    r = compare("t", *_pair(2.0**-8), floor=2.0**-10, multiple=4)
    assert r.floor == 2.0**-10
    assert r.multiple == 4
    assert r.tolerance == 2.0**-8
    assert r.max_abs == 2.0**-8
    assert r.verdict == "PASS"
    assert r.worst_index == (1,)
    assert r.shape == (2,)
    assert r.mean_abs == 2.0**-9
    assert r.max_rel == pytest.approx(2.0**-8 / (1.0 + 2.0**-8), rel=1e-15)
    assert r.note == ""


def test_inaccurate_just_above_tolerance_and_at_upper_band():
    r = compare("t", *_pair(2.0**-7), floor=2.0**-10, multiple=4)
    assert r.max_abs == 2.0**-7 and r.tolerance == 2.0**-8
    assert r.verdict == "INACCURATE"
    assert INACCURATE_FACTOR == 100.0
    # exactly INACCURATE_FACTOR x tol = 100 x 2^-8 = 0.390625 (exact in binary): still INACCURATE
    r = compare("t", *_pair(0.390625), floor=2.0**-10, multiple=4)
    assert r.max_abs == 0.390625
    assert r.verdict == "INACCURATE"


def test_fail_beyond_inaccurate_band():
    r = compare("t", *_pair(0.390625 + 2.0**-20), floor=2.0**-10, multiple=4)
    assert r.max_abs == 0.390625 + 2.0**-20
    assert r.tolerance == 2.0**-8
    assert r.verdict == "FAIL"
    assert r.note == ""  # B/A is 1 then 1.39: not a constant ratio


def test_resolution_times_magnitude_raises_a_small_floor():
    a = np.array([64.0, 1.0])
    # floor 0 -> resolution x magnitude = 2^-10 x 64 = 2^-4; tol = 2 x 2^-4 = 0.125
    r = compare("t", a, np.array([64.0, 1.125]), floor=0.0, multiple=2, resolution=2.0**-10)
    assert (r.floor, r.tolerance, r.max_abs, r.verdict) == (0.0625, 0.125, 0.125, "PASS")
    r = compare("t", a, np.array([64.0, 1.25]), floor=0.0, multiple=2, resolution=2.0**-10)
    assert (r.floor, r.tolerance, r.max_abs, r.verdict) == (0.0625, 0.125, 0.25, "INACCURATE")
    # magnitude is max(|a|, |b|) over both sides: b's -128 doubles the floor
    r = compare("t", np.array([0.0, 1.0]), np.array([0.0, -128.0]), floor=0.0, multiple=1, resolution=2.0**-10)
    assert r.floor == 0.125 and r.tolerance == 0.125 and r.max_abs == 129.0 and r.verdict == "FAIL"
    # a floor above resolution x magnitude is kept as given
    r = compare("t", a, np.array([64.0, 1.25]), floor=0.5, multiple=2, resolution=2.0**-10)
    assert (r.floor, r.tolerance, r.verdict) == (0.5, 1.0, "PASS")


def test_default_resolution_is_float32_eps():
    assert FLOAT32_EPS == 2.0**-23
    # identical tensors, floor 0: judged at float32 resolution of the magnitude, not bit equality
    r = compare("t", np.array([3.0, -8.0]), np.array([3.0, -8.0 + 2.0**-20]), floor=0.0, multiple=1)
    assert r.floor == 2.0**-23 * 8.0
    assert r.tolerance == 2.0**-20
    assert r.max_abs == 2.0**-20
    assert r.verdict == "PASS"


def test_float32_inputs_are_compared_in_float64():
    a = np.array([1.0, 2.0], np.float32)
    b = np.array([1.0, 2.0 + 2.0**-22], np.float32)  # one ulp of 2.0 in float32
    r = compare("t", a, b, floor=0.0, multiple=1)
    assert r.max_abs == 2.0**-22
    assert r.floor == 2.0**-23 * (2.0 + 2.0**-22)
    assert r.verdict == "PASS"


# ---------------------------------------------------------------------------------------------
# structure: shape, integers, empty


def test_shape_mismatch_fails():
    r = compare("s", np.zeros((2, 3)), np.zeros((3, 2)), floor=1.0, multiple=10)
    assert r.verdict == "FAIL"
    assert r.note == "shape (2, 3) vs (3, 2)"
    assert r.shape == (2, 3)
    assert math.isnan(r.max_abs) and math.isnan(r.tolerance)


def test_integer_tensors_compare_exactly():
    a = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    r = compare("i", a, a.copy(), floor=100.0, multiple=100)
    assert (r.verdict, r.max_abs, r.tolerance, r.note) == ("PASS", 0.0, 0.0, "")
    b = a.copy()
    b[1, 0] = 5  # off by one: a huge floor does not matter for integers
    r = compare("i", a, b, floor=100.0, multiple=100)
    assert r.verdict == "FAIL"
    assert r.max_abs == 1.0  # number of differing elements
    assert r.max_rel == 1.0 / 6.0
    assert r.worst_index == (1, 0)
    assert r.note == "1 of 6 differ"
    # one integer side is enough to compare exactly
    r = compare("i", np.array([1, 2]), np.array([1.0, 2.5]), floor=1.0, multiple=10)
    assert r.verdict == "FAIL" and r.worst_index == (1,)


def test_empty_tensors_pass():
    r = compare("e", np.zeros((0, 4)), np.zeros((0, 4)), floor=2.0, multiple=3)
    assert (r.verdict, r.note, r.shape, r.max_abs, r.tolerance, r.floor) == ("PASS", "empty", (0, 4), 0.0, 0.0, 2.0)
    assert compare("e", np.zeros((0, 4)), np.zeros((4, 0)), floor=2.0, multiple=3).verdict == "FAIL"


# ---------------------------------------------------------------------------------------------
# non-finite values: equal only where both sides hold the same non-finite value


def test_plus_inf_vs_minus_inf_fails():
    r = compare("n", np.array([1.0, INF]), np.array([1.0, -INF]), floor=1.0, multiple=10)
    assert r.verdict == "FAIL"
    assert r.note == "non-finite mismatch at (1,): A=inf B=-inf"


def test_nan_vs_inf_fails():
    r = compare("n", np.array([[NAN, 0.0]]), np.array([[INF, 0.0]]), floor=1.0, multiple=10)
    assert r.verdict == "FAIL"
    assert r.note == "non-finite mismatch at (0, 0): A=nan B=inf"


def test_finite_vs_non_finite_fails():
    r = compare("n", np.array([2.0, 1.0]), np.array([2.0, NAN]), floor=1.0, multiple=10)
    assert r.verdict == "FAIL"
    assert r.note == "non-finite mismatch at (1,): A=1.0 B=nan"


def test_same_non_finite_values_at_same_places_pass():
    a = np.array([NAN, INF, -INF, 1.0])
    b = np.array([NAN, INF, -INF, 1.0 + 2.0**-8])
    r = compare("n", a, b, floor=2.0**-10, multiple=4)
    assert r.verdict == "PASS"
    # judged on the finite part only: inf contributes neither a difference nor a magnitude
    assert r.max_abs == 2.0**-8
    assert r.worst_index == (3,)
    assert r.floor == 2.0**-10 and r.tolerance == 2.0**-8
    r = compare("n", np.array([NAN, 2.0]), np.array([NAN, 2.0]), floor=0.0, multiple=1)
    assert (r.verdict, r.max_abs, r.mean_abs) == ("PASS", 0.0, 0.0)


def test_nan_at_different_places_fails():
    r = compare("n", np.array([NAN, 1.0, 2.0]), np.array([1.0, NAN, 2.0]), floor=1.0, multiple=10)
    assert r.verdict == "FAIL"
    assert r.note == "non-finite mismatch at (0,): A=nan B=1.0"


def test_same_infinity_in_float32_passes():
    a = np.array([INF, -INF, 0.25], np.float32)
    r = compare("n", a, a.copy(), floor=0.0, multiple=1)
    assert (r.verdict, r.max_abs) == ("PASS", 0.0)
    assert r.floor == 2.0**-23 * 0.25


# ---------------------------------------------------------------------------------------------
# compare_all


def test_compare_all_missing_names_both_directions():
    a = {"x": np.array([1.0]), "y": np.array([2.0])}
    b = {"z": np.array([3.0]), "x": np.array([1.0 + 2.0**-8])}
    out = compare_all(a, b, floors={"x": 2.0**-10}, multiple=4)
    assert [r.name for r in out] == ["x", "y", "z"]  # a's order, then names only in b
    x, y, z = out
    assert (x.verdict, x.floor, x.tolerance, x.max_abs) == ("PASS", 2.0**-10, 2.0**-8, 2.0**-8)
    assert (y.verdict, y.note) == ("FAIL", "missing on side B")
    assert (z.verdict, z.note) == ("FAIL", "missing on side A")


def test_compare_all_default_floor_and_resolution():
    a = {"w": np.array([4.0, 1.0])}
    b = {"w": np.array([4.0, 1.5])}
    # no floor given -> 0, raised to resolution x magnitude = 2^-4 x 4 = 0.25; tol = 2 x 0.25 = 0.5
    (r,) = compare_all(a, b, floors={}, multiple=2, resolution=2.0**-4)
    assert (r.floor, r.tolerance, r.max_abs, r.verdict) == (0.25, 0.5, 0.5, "PASS")


# ---------------------------------------------------------------------------------------------
# constant_ratio: naming a sum-vs-mean style mismatch


A = np.array([1.0, 2.0, -3.0, 0.0, 5.5])


def test_constant_ratio_times_two():
    assert constant_ratio(A, 2 * A) == "constant ratio B/A = x2 (a reduction/convention mismatch: sum vs mean?)"


def test_constant_ratio_one_over_two():
    assert constant_ratio(A, A / 2) == "constant ratio B/A = x 1/2 (a reduction/convention mismatch: sum vs mean?)"


def test_constant_ratio_non_integer():
    assert constant_ratio(A, 1.5 * A) == "constant ratio B/A = 1.5 (a reduction/convention mismatch?)"


def test_constant_ratio_not_constant_or_unity():
    assert constant_ratio(A, A + 1.0) == ""
    assert constant_ratio(A, A * np.array([2.0, 2.0, 2.0, 1.0, 2.01])) == ""  # 2.01 / 2 - 1 = 5e-3 > spread
    assert constant_ratio(A, A.copy()) == ""  # ratio 1: not a rescaling
    assert constant_ratio(np.zeros(3), np.ones(3)) == ""  # no element to divide by
    # within the float32-rounding spread (1e-4) it is still one constant
    assert constant_ratio(A, 2 * A * np.array([1.0, 1 + 1e-6, 1.0, 1.0, 1 - 1e-6])).startswith("constant ratio B/A = x2 ")


def test_constant_ratio_tolerates_a_near_zero_element_off_by_its_operands_rounding():
    """A GEMM output c·a where one entry came out of cancellation: its own ratio is off by 5e-3, the
    tensor is c·a to 1e-9 of its scale (what T2's BN-before-activation layer showed on an AVX-512 host)."""
    a = np.array([1.0, -2.0, 3.0, 1e-6])
    b = 2 * a + np.array([0.0, 0.0, 0.0, 1e-8])
    assert abs(b[3] / a[3] / 2 - 1) > 1e-4  # the element's own ratio is outside the spread
    assert constant_ratio(a, b).startswith("constant ratio B/A = x2 ")


def test_compare_fail_names_constant_ratio():
    r = compare("loss", A, 4 * A, floor=1e-6, multiple=10)
    assert r.verdict == "FAIL"
    assert r.max_abs == 3 * 5.5
    assert r.note == "constant ratio B/A = x4 (a reduction/convention mismatch: sum vs mean?)"


# ---------------------------------------------------------------------------------------------
# compare_exact: bit for bit


def test_compare_exact_pass_including_nan():
    a = np.array([1.5, NAN, -INF, -0.0], np.float32)
    r = compare_exact("w", a, a.copy())
    assert (r.verdict, r.note, r.max_abs, r.shape) == ("PASS", "bit-exact", 0.0, (4,))


def test_compare_exact_negative_zero_differs_in_bytes():
    r = compare_exact("w", np.array([1.0, -0.0]), np.array([1.0, 0.0]))
    assert r.verdict == "FAIL"
    assert r.note == "1 of 2 elements differ"
    assert r.max_abs == 0.0  # equal values, different bits
    assert r.worst_index == (1,)


def test_compare_exact_one_ulp():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    b = a.copy()
    b[2] = np.nextafter(np.float32(3.0), np.float32(4.0))
    r = compare_exact("w", a, b)
    assert (r.verdict, r.note, r.worst_index) == ("FAIL", "1 of 3 elements differ", (2,))
    assert r.max_abs == 2.0**-22


def test_compare_exact_shape_and_dtype():
    r = compare_exact("w", np.zeros(2, np.float32), np.zeros((1, 2), np.float32))
    assert r.verdict == "FAIL"
    assert r.note == "shape/dtype (2,) float32 vs (1, 2) float32"
    r = compare_exact("w", np.zeros(2, np.float32), np.zeros(2, np.float64))
    assert (r.verdict, r.note) == ("FAIL", "shape/dtype (2,) float32 vs (2,) float64")


def test_compare_exact_all_nan_with_different_payloads_does_not_warn():
    a = np.full(3, NAN)
    b = a.copy()
    b.view(np.uint64)[1] ^= 1  # another quiet NaN
    assert np.isnan(b).all()
    r = compare_exact("w", a, b)  # filterwarnings=error: an All-NaN warning would raise here
    assert r.verdict == "FAIL"
    assert r.note == "1 of 3 elements differ"
    assert r.worst_index == (1,)
    assert math.isnan(r.max_abs)


def test_compare_exact_integers_and_empty():
    r = compare_exact("step", np.array([7, 9], np.int64), np.array([7, 4], np.int64))
    assert (r.verdict, r.max_abs, r.note) == ("FAIL", 5.0, "1 of 2 elements differ")
    r = compare_exact("e", np.zeros((0, 3)), np.zeros((0, 3)))
    assert r.verdict == "PASS"


# ---------------------------------------------------------------------------------------------
# first_divergence / format_table


def _c(name: str, verdict: str) -> Comparison:
    return Comparison(name, (1,), 0.0, 0.0, 0.0, (0,), 0.0, 1.0, 0.0, verdict)


def test_first_divergence():
    assert first_divergence([]) is None
    assert first_divergence([_c("a", "PASS"), _c("b", "PASS")]) is None
    first = first_divergence([_c("a", "PASS"), _c("b", "INACCURATE"), _c("c", "FAIL")])
    assert first is not None and first.name == "b" and first.verdict == "INACCURATE"
    out = compare_all({"p": np.ones(2), "q": np.ones(2)}, {"p": np.ones(2), "q": np.array([1.0, INF])}, {}, 10)
    first = first_divergence(out)
    assert first is not None and first.name == "q" and first.note == "non-finite mismatch at (1,): A=1.0 B=inf"


def test_format_table_lists_every_result():
    out = compare_all({"x": np.array([1.0]), "y": np.array([1.0])}, {"x": np.array([1.0])}, {}, 10)
    lines = format_table(out).splitlines()
    assert len(lines) == 3
    assert lines[1].split()[0] == "x" and lines[1].rstrip().endswith("PASS")
    assert lines[2].split()[0] == "y" and lines[2].rstrip().endswith("FAIL  missing on side B")
