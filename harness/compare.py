"""Element-wise comparison of named tensors with three-state verdicts (PASS / INACCURATE / FAIL).

A tolerance is never a constant: it is ``multiple x floor``, where ``floor`` is a measured noise
floor for that tensor (the same side computed twice under a harmless perturbation, e.g. float32
vs float64), and both numbers are stored with the verdict. INACCURATE = finite, same shape, beyond
the tolerance but within ``INACCURATE_FACTOR`` times it (worth a look, not a structural bug); FAIL
= anything else (shape or dtype mismatch, non-finite mismatch, or far outside the band).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

INACCURATE_FACTOR = 100.0
FLOAT32_EPS = float(np.finfo(np.float32).eps)
CHUNK = 1 << 20  # elements per block of a large tensor's float64 temporaries (8 MiB each)


@dataclass(frozen=True)
class Comparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    mean_abs: float
    worst_index: tuple[int, ...]
    floor: float
    multiple: float
    tolerance: float
    verdict: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _fail(name: str, note: str, shape=()) -> Comparison:
    nan = float("nan")
    return Comparison(name, tuple(shape), nan, nan, nan, (), nan, nan, nan, "FAIL", note)


def compare(name: str, a: np.ndarray, b: np.ndarray, floor: float, multiple: float, resolution: float = FLOAT32_EPS) -> Comparison:
    """Compare ``a`` (side A) with ``b`` (side B) against ``multiple * floor`` (absolute).

    The floor is raised to ``resolution`` (float32's epsilon unless the comparison is in float64)
    times the tensor's magnitude, so an exactly reproducible tensor (floor 0) is still judged at the
    resolution of its precision rather than demanding bit equality.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return _fail(name, f"shape {a.shape} vs {b.shape}", a.shape)
    if a.size == 0:
        return Comparison(name, a.shape, 0.0, 0.0, 0.0, (), floor, multiple, 0.0, "PASS", "empty")
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(b.dtype, np.integer):
        diff = a != b
        n = int(diff.sum())
        worst = tuple(int(i) for i in np.argwhere(diff)[0]) if n else ()
        return Comparison(name, a.shape, float(n), float(n) / a.size, float(n) / a.size, worst, 0.0, 1.0, 0.0,
                          "PASS" if n == 0 else "FAIL", f"{n} of {a.size} differ" if n else "")
    if a.size > CHUNK and a.flags.c_contiguous and b.flags.c_contiguous:
        return _compare_chunked(name, a, b, floor, multiple, resolution)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite_a, finite_b = np.isfinite(a64), np.isfinite(b64)
    # Where either side is non-finite, both must hold the same value: NaN==NaN, +inf==+inf, -inf==-inf.
    same_nonfinite = (np.isnan(a64) & np.isnan(b64)) | (a64 == b64)
    bad = ~(finite_a & finite_b) & ~same_nonfinite
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return _fail(name, f"non-finite mismatch at {idx}: A={float(a64[idx])} B={float(b64[idx])}", a.shape)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf at matching infinities (masked out below); overflow -> inf
        diff = np.where(finite_a, np.abs(a64 - b64), 0.0)
    flat = int(np.argmax(diff))
    worst = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    max_abs = float(diff.reshape(-1)[flat])
    scale = np.maximum(np.abs(a64), np.abs(b64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, diff / scale, 0.0)
    floor = max(float(floor), resolution * float(np.max(np.where(finite_a, scale, 0.0))))
    tol = multiple * floor
    if max_abs <= tol:
        verdict = "PASS"
    elif max_abs <= INACCURATE_FACTOR * tol:
        verdict = "INACCURATE"
    else:
        verdict = "FAIL"
    note = constant_ratio(a64, b64) if verdict == "FAIL" else ""
    return Comparison(name, a.shape, max_abs, float(rel.max()), float(diff.mean()), worst, floor, multiple, tol, verdict, note)


def _pairwise_leaves(n: int) -> list[tuple[int, int]]:
    """The blocks of at most CHUNK elements at which numpy's pairwise summation of ``n`` contiguous
    float64 values splits (each half rounded down to a multiple of 8), in order: summing each block
    with ``np.add.reduce`` and combining the block sums along the same tree gives numpy's sum bit for
    bit (see :func:`_pairwise_sum`)."""
    out: list[tuple[int, int]] = []

    def walk(lo: int, hi: int) -> None:
        if hi - lo <= CHUNK:
            out.append((lo, hi))
            return
        half = (hi - lo) // 2
        half -= half % 8
        walk(lo, lo + half)
        walk(lo + half, hi)

    walk(0, n)
    return out


def _pairwise_sum(sums: dict[int, np.float64], lo: int, hi: int) -> np.float64:
    """The pairwise tree of :func:`_pairwise_leaves` over the block sums (keyed by block start)."""
    if hi - lo <= CHUNK:
        return sums[lo]
    half = (hi - lo) // 2
    half -= half % 8
    return _pairwise_sum(sums, lo, lo + half) + _pairwise_sum(sums, lo + half, hi)


def _compare_chunked(name: str, a: np.ndarray, b: np.ndarray, floor: float, multiple: float, resolution: float) -> Comparison:
    """:func:`compare` of two large C-contiguous float tensors, block by block: the same element-wise
    float64 operations, so every number is the one the whole-array code gives (first non-finite
    mismatch and first worst element in C order, max over blocks, the mean by numpy's own pairwise
    summation tree), with float64 temporaries of one block (not seven copies of the tensor)."""
    af, bf = a.reshape(-1), b.reshape(-1)
    n = af.size
    worst_flat, max_abs, rel_max, scale_max, sums = 0, -1.0, 0.0, 0.0, {}
    for lo, hi in _pairwise_leaves(n):
        a64, b64 = af[lo:hi].astype(np.float64), bf[lo:hi].astype(np.float64)
        finite_a, finite_b = np.isfinite(a64), np.isfinite(b64)
        same_nonfinite = (np.isnan(a64) & np.isnan(b64)) | (a64 == b64)
        bad = ~(finite_a & finite_b) & ~same_nonfinite
        if bad.any():
            i = int(np.argmax(bad))
            idx = tuple(int(j) for j in np.unravel_index(lo + i, a.shape))
            return _fail(name, f"non-finite mismatch at {idx}: A={float(a64[i])} B={float(b64[i])}", a.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(finite_a, np.abs(a64 - b64), 0.0)
        i = int(np.argmax(diff))
        if diff[i] > max_abs:  # strictly: the first maximum in C order, as np.argmax over the whole
            worst_flat, max_abs = lo + i, float(diff[i])
        sums[lo] = np.add.reduce(diff)
        scale = np.maximum(np.abs(a64), np.abs(b64))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_max = max(rel_max, float(np.where(scale > 0, diff / scale, 0.0).max()))
        scale_max = max(scale_max, float(np.max(np.where(finite_a, scale, 0.0))))
    worst = tuple(int(i) for i in np.unravel_index(worst_flat, a.shape))
    mean_abs = float(_pairwise_sum(sums, 0, n) / n)
    floor = max(float(floor), resolution * scale_max)
    tol = multiple * floor
    if max_abs <= tol:
        verdict = "PASS"
    elif max_abs <= INACCURATE_FACTOR * tol:
        verdict = "INACCURATE"
    else:
        verdict = "FAIL"
    note = constant_ratio(a.astype(np.float64), b.astype(np.float64)) if verdict == "FAIL" else ""
    return Comparison(name, a.shape, max_abs, rel_max, mean_abs, worst, floor, multiple, tol, verdict, note)


def constant_ratio(a: np.ndarray, b: np.ndarray, spread: float = 1e-4) -> str:
    """Name a reduction / convention mismatch: ``b = c·a`` with one factor c for every element.

    ``spread``: ``|b - c·a|`` may reach float32 rounding of two long reductions (~1e-6 of the tensor's
    largest value) and nothing more; 1e-4 of it keeps a genuinely different computation from looking
    like a rescaling. Measured against the tensor's scale, not each element's: an element near zero
    from cancellation (a dot product of a GEMM) carries its operands' rounding, so its own ratio can
    be off by more than the spread while the tensor is c·a to float32 rounding. Measured in T2 on an
    AVX-512 host (BN moved before the activation, encoder.fc3, 5 x 37): ratio spread 1.3e-4, |b - c·a|
    2.7e-7 of the scale; the tensors that are not a rescaling there stay at 4.8e-2 to 0.8 of it.
    """
    finite = np.isfinite(a) & np.isfinite(b)
    mask = (a != 0) & finite
    if not mask.any():
        return ""
    c = float(np.median(b[mask] / a[mask]))
    scale = float(np.max(np.abs(b[finite])))
    if c == 0 or abs(c - 1) < spread or np.max(np.abs(b[finite] - c * a[finite])) > spread * scale:
        return ""
    for n, label in ((c, "x"), (1 / c, "x 1/")):
        if n >= 2 and abs(n - round(n)) < spread * n:
            return f"constant ratio B/A = {label}{round(n)} (a reduction/convention mismatch: sum vs mean?)"
    return f"constant ratio B/A = {c:.6g} (a reduction/convention mismatch?)"


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """``a.tobytes() == b.tobytes()`` for two C-contiguous arrays of one dtype, block by block (no copies)."""
    if a.nbytes <= 8 * CHUNK or a.dtype.kind not in "biufc":
        return a.tobytes() == b.tobytes()
    ab, bb = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    return all(ab[i:i + 8 * CHUNK].tobytes() == bb[i:i + 8 * CHUNK].tobytes() for i in range(0, ab.size, 8 * CHUNK))


def compare_exact(name: str, a: np.ndarray, b: np.ndarray) -> Comparison:
    """Bit for bit (transplant round trips): PASS only when shape, dtype and every byte agree."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return _fail(name, f"shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}", a.shape)
    if _same_bytes(a, b):
        return Comparison(name, a.shape, 0.0, 0.0, 0.0, (), 0.0, 0.0, 0.0, "PASS", "bit-exact")
    # Count elements whose bytes differ (NaN payloads, -0.0 vs 0.0), not elements with a != b.
    differs = np.any(
        np.frombuffer(a.tobytes(), np.uint8).reshape(a.size, -1) != np.frombuffer(b.tobytes(), np.uint8).reshape(b.size, -1), axis=1
    ).reshape(a.shape)
    n = int(np.count_nonzero(differs))
    worst = tuple(int(i) for i in np.argwhere(differs)[0])
    max_abs = float("nan")  # stays NaN when only NaNs (or non-numbers) differ
    if a.dtype.kind in "biuf":
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(a.astype(np.float64)[differs] - b.astype(np.float64)[differs])
        d = d[~np.isnan(d)]
        if d.size:
            max_abs = float(d.max())
    return Comparison(name, a.shape, max_abs, float("nan"), float("nan"), worst, 0.0, 0.0, 0.0, "FAIL", f"{n} of {a.size} elements differ")


def compare_all(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], floors: Mapping[str, float], multiple: float,
    resolution: float = FLOAT32_EPS,
) -> list[Comparison]:
    """Compare every name of ``a`` (in its order); a name missing on either side is a FAIL."""
    out = []
    for name in list(a) + [n for n in b if n not in a]:
        if name not in a or name not in b:
            out.append(_fail(name, f"missing on side {'A' if name not in a else 'B'}"))
            continue
        out.append(compare(name, a[name], b[name], floors.get(name, 0.0), multiple, resolution))
    return out


def first_divergence(results: list[Comparison]) -> Comparison | None:
    return next((r for r in results if r.verdict != "PASS"), None)


def format_table(results: list[Comparison]) -> str:
    lines = [f"{'tensor':28s} {'shape':>16s} {'max_abs':>10s} {'max_rel':>10s} {'floor':>10s} {'tol':>10s}  verdict"]
    for r in results:
        lines.append(
            f"{r.name:28s} {str(r.shape):>16s} {r.max_abs:10.3g} {r.max_rel:10.3g} {r.floor:10.3g} {r.tolerance:10.3g}  "
            f"{r.verdict}{'  ' + r.note if r.note else ''}"
        )
    return "\n".join(lines)
