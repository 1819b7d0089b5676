"""The judging engine shared by every tier, every model and every port: noise floors, the batch
split, ``judge()``, the activation-kink explanation, diagnoses of what a difference looks like,
and verdicts. It knows nothing about any model: losses' reductions come from the model spec.

Tolerance of a tensor = ``MULTIPLE`` x its noise floor, the largest of what harmless perturbations
do to it on each side alone: float32 vs float64 (the port, and the reference's double-precision
build where there is one) and splitting the batch into two halves (the reference only: samples are
independent, so only the reduction order of every batch sum changes; not the port, where a
sample-coupling bug would widen its own band). A floor above ``FLOOR_MAX_REL`` of the tensor is
not rounding noise and is capped; a difference beyond a capped band is a FAIL, never INACCURATE
(a port drawing its own randomness cannot buy itself a wider band).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from harness.compare import FLOAT32_EPS, Comparison, compare_all

# |TF32 - torch32| vs |torch32 - torch64|: two float32 computations of the same function each sit
# about one floor away from the exact value, so their distance is up to ~2 floors; reductions over
# thousands of terms in a different order add a few more. 10 leaves room for that and nothing more.
MULTIPLE = 10.0
FLOAT64_EPS = float(np.finfo(np.float64).eps)
FLOOR_MAX_REL = 1e-3  # a floor above this fraction of the tensor's magnitude is not rounding noise
REDUCTIONS = ("per_sample", "mean", "sum")
VERDICT_ORDER = ("FAIL", "STRUCTURAL", "INACCURATE", "DECLARED", "SKIPPED", "PASS")


CHUNK = 1 << 20  # elements per chunk of the float64 temporaries of large tensors (8 MiB each)


def _chunkable(a: np.ndarray, *others: np.ndarray) -> bool:
    """Whether whole-array element-wise work on ``a`` (and ``others``, same shape) may run chunk by chunk
    over the flat C-order views: large, and every operand C-contiguous (a flat view, not a copy)."""
    return a.size > CHUNK and a.flags.c_contiguous and all(o.shape == a.shape and o.flags.c_contiguous for o in others)


def max_abs_diff(a: Any, b: Any) -> float:
    """``max |a - b|`` in float64, NaN if any difference is NaN: the value of
    ``np.max(np.abs(a.astype(float64) - b.astype(float64)))``, chunk by chunk for large tensors (no
    whole-tensor float64 copies: 3 x 517 MB for a 64.6 M-element kernel)."""
    a, b = np.asarray(a), np.asarray(b)
    if not _chunkable(a, b):
        return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    af, bf = a.reshape(-1), b.reshape(-1)
    return float(np.max([np.max(np.abs(af[i:i + CHUNK].astype(np.float64) - bf[i:i + CHUNK].astype(np.float64)))
                         for i in range(0, af.size, CHUNK)]))


def abs_max(a: Any) -> float:
    """``max |a|`` in float64 (0 for an empty tensor): ``np.max(np.abs(a.astype(float64)), initial=0)``, chunked."""
    a = np.asarray(a)
    if not _chunkable(a):
        return float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0))
    af = a.reshape(-1)
    return float(np.max([np.max(np.abs(af[i:i + CHUNK].astype(np.float64)), initial=0.0) for i in range(0, af.size, CHUNK)],
                        initial=0.0))


def floors(a32: Mapping[str, Any], a64: Mapping[str, Any]) -> dict[str, float]:
    """Per name, max |a32 - a64| over the float tensors present on both sides (no whole-dict copies;
    large tensors chunk by chunk). Either side may be a lazy mapping (harness.memory.SpillView):
    each value is fetched once and dropped before the next."""
    out = {}
    for k in a32:
        if k not in a64:
            continue
        a = np.asarray(a32[k])
        if a.dtype.kind != "f":
            continue
        b = np.asarray(a64[k])
        out[k] = max_abs_diff(a, b) if a.size and a.shape == b.shape else 0.0
        del a, b
    return out


def max_floors(*parts: Mapping[str, float]) -> dict[str, float]:
    names = dict.fromkeys(k for p in parts for k in p)
    return {k: max(p.get(k, 0.0) for p in parts) for k in names}


def halves(batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, int]:
    n = len(next(iter(batch.values())))
    h = n // 2
    return {k: v[:h] for k, v in batch.items()}, {k: v[h:] for k, v in batch.items()}, h, n - h


def split(fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]], batch: Mapping[str, np.ndarray],
          reduction: str | Mapping[str, str]) -> dict[str, Any]:
    """``fn`` on the two halves of the batch, recombined so that in exact arithmetic it equals ``fn``
    on the whole batch: rows concatenated (``per_sample``), averaged with the halves' sizes as
    weights (``mean``), or added (``sum``). ``reduction`` is one of these or a per-name mapping (a
    losses dict mixes them). Only the float rounding of the batch reductions changes."""
    a_batch, b_batch, na, nb = halves(batch)
    a, b = fn(a_batch), fn(b_batch)
    out = {}
    for k in a:
        how = reduction if isinstance(reduction, str) else reduction.get(k, "mean")
        if how not in REDUCTIONS:
            raise ValueError(f"{k}: reduction {how!r}; expected one of {REDUCTIONS}")
        if how == "per_sample":
            out[k] = np.concatenate([a[k], b[k]])
        elif how == "sum":
            out[k] = np.asarray(a[k], np.float64) + np.asarray(b[k], np.float64)
        else:
            out[k] = (na * np.asarray(a[k], np.float64) + nb * np.asarray(b[k], np.float64)) / (na + nb)
    return out


def split_floors(full: Mapping[str, Any], fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]], batch: Mapping[str, np.ndarray],
                 reduction: str | Mapping[str, str],
                 park: Callable[[Mapping[str, Any]], Mapping[str, Any]] = dict) -> dict[str, float]:
    """``floors(full, split(fn, batch, reduction))``, the same numbers, without holding the recombined
    split: each tensor is recombined, measured against ``full`` and dropped, large ones chunk by
    chunk (for a model's gradients the split is a float64 copy of every weight). ``park``: where the
    first half's values wait while the second half runs (e.g. a :class:`harness.memory.Spill`: then
    ``fn``'s working memory never sits beside two of its results)."""
    a_batch, b_batch, na, nb = halves(batch)
    a = dict(park(fn(a_batch)))  # a spilled dict: its arrays memory-mapped, resident while compared
    b = dict(fn(b_batch))
    how = {}
    for k in a:
        how[k] = reduction if isinstance(reduction, str) else reduction.get(k, "mean")
        if how[k] not in REDUCTIONS:
            raise ValueError(f"{k}: reduction {how[k]!r}; expected one of {REDUCTIONS}")
    out = {}
    for k in full:
        if k not in a:
            continue
        f = np.asarray(full[k])
        if f.dtype.kind != "f":
            continue
        ak, bk = np.asarray(a.pop(k)), np.asarray(b.pop(k))
        out[k] = _split_floor(f, ak, bk, na, nb, how[k])
        del f, ak, bk
    return out


def _split_floor(f: np.ndarray, a: np.ndarray, b: np.ndarray, na: int, nb: int, how: str) -> float:
    """``floors``' value for one tensor: max |f - recombine(a, b)|, 0 where empty or shapes differ."""
    if how == "per_sample":
        if (f.size and a.ndim and a.dtype == b.dtype and f.shape == (len(a) + len(b), *a.shape[1:])
                and b.shape[1:] == a.shape[1:] and _chunkable(f)):  # the two row blocks of the concatenation
            return float(np.max([max_abs_diff(f[:len(a)], a), max_abs_diff(f[len(a):], b)]))
        s = np.concatenate([a, b])
    elif _chunkable(f, a, b):
        ff, af, bf = f.reshape(-1), a.reshape(-1), b.reshape(-1)

        def part(i: int) -> np.ndarray:
            x, y = af[i:i + CHUNK].astype(np.float64), bf[i:i + CHUNK].astype(np.float64)
            return x + y if how == "sum" else (na * x + nb * y) / (na + nb)

        return float(np.max([np.max(np.abs(ff[i:i + CHUNK].astype(np.float64) - part(i))) for i in range(0, ff.size, CHUNK)]))
    elif how == "sum":
        s = np.asarray(a, np.float64) + np.asarray(b, np.float64)
    else:
        s = (na * np.asarray(a, np.float64) + nb * np.asarray(b, np.float64)) / (na + nb)
    s = np.asarray(s)
    return max_abs_diff(f, s) if f.size and f.shape == s.shape else 0.0


def judge(reference: Mapping[str, Any], port: Mapping[str, Any], parts: Mapping[str, Mapping[str, float]], multiple: float = MULTIPLE,
          resolution: float = FLOAT32_EPS, absent: Iterable[str] = (), constants: Mapping[str, float] | None = None) -> list[Comparison]:
    """Every tensor of ``reference`` against ``port`` within ``multiple`` x its floor (the largest of
    the floor components ``parts``, capped at ``FLOOR_MAX_REL`` of the tensor). A name the port
    declares ``absent`` is STRUCTURAL (reported, not compared); a difference beyond a capped band is
    a FAIL; every FAIL carries the diagnosis of what the difference looks like (:func:`diagnose`)."""
    band = max_floors(*parts.values()) if parts else {}
    capped = {}
    for k, f in band.items():
        if k in port and np.asarray(port[k]).size:
            limit = FLOOR_MAX_REL * abs_max(port[k])
            if f > limit:
                capped[k], band[k] = f, limit
    absent = set(absent)
    rows = compare_all(_Without(reference, absent), _Without(port, absent), band, multiple, resolution)
    out = []
    for r in rows:
        if r.name in capped:
            note = f"floor capped: measured {capped[r.name]:.3g} (port float32 vs float64 differ grossly: un-injected randomness?)"
            r = dataclasses.replace(r, verdict="FAIL" if r.verdict == "INACCURATE" else r.verdict, note=f"{r.note} {note}".strip())
        if r.verdict == "FAIL" and r.name in reference and r.name in port:
            found = diagnose(r.name, reference[r.name], port[r.name], constants or {})
            if found and found not in r.note:
                r = dataclasses.replace(r, note=f"{found}; {r.note}".strip("; "))
        out.append(r)
    return out + [structural(k, "absent in the port (partial mapping)") for k in reference if k in absent]


class _Without(Mapping):
    """``values`` without the names in ``absent``, lazily (a lazy mapping stays lazy: one tensor at a time)."""

    def __init__(self, values: Mapping[str, Any], absent: set[str]) -> None:
        self._values, self._absent = values, absent

    def __getitem__(self, name: str) -> Any:
        if name in self._absent:
            raise KeyError(name)
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name not in self._absent and name in self._values

    def __iter__(self):
        return (k for k in self._values if k not in self._absent)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def structural(name: str, note: str) -> Comparison:
    nan = float("nan")
    return Comparison(name, (), nan, nan, nan, (), nan, nan, nan, "STRUCTURAL", note)


def skipped(name: str, note: str) -> Comparison:
    return Comparison(name, (), 0.0, 0.0, 0.0, (), 0.0, 0.0, 0.0, "SKIPPED", note)


# --- diagnoses: what a FAIL looks like, named ------------------------------------------------------

def diagnose(name: str, a: Any, b: Any, constants: Mapping[str, float]) -> str:
    """The shape of a difference between ``a`` (reference) and ``b`` (port), when it has a name:

    * a missing activation: where A is negative, B = A / slope for a known slope; elsewhere equal;
    * a lower triangle present on one side only (full vs diagonal covariance);
    * a β1 / β2 power lagging by k steps (``B/A = 1/β^k``: an optimizer restarted per phase);
    * a learning rate fed as a Python float (float64) vs the float32 the other side uses;
    * one constant ratio B/A for every element, named after the config constant it equals
      (1/784 = 1/n_pixels ...) where it does, else "sum vs mean?" for integers.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape or not a64.size or not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        return ""
    # Elements within rounding of 0 carry no relative information (float32: a logit of 1.7e-6 next to
    # 0.18 differs by 1.8e-3 relative between two faithful sides), hence an absolute floor at 1e-4 of the scale.
    atol = 1e-4 * float(np.max(np.abs(a64)))
    for label, slope in ((k, v) for k, v in constants.items() if k.endswith("slope")):
        neg, pos = a64 < 0, a64 > 0
        same_pos = np.allclose(b64[pos], a64[pos], rtol=1e-4, atol=atol)
        if neg.any() and same_pos and np.allclose(b64[neg] * slope, a64[neg], rtol=1e-3, atol=atol):
            return f"missing activation: negatives of A are B x {label} ({slope:g}), positives equal (LeakyReLU absent on side B)"
        if neg.any() and same_pos and np.allclose(a64[neg] * slope, b64[neg], rtol=1e-3, atol=atol):
            return f"extra activation: negatives of B are A x {label} ({slope:g}) (LeakyReLU only on side B)"
    if a64.ndim >= 2 and a64.shape[-1] == a64.shape[-2] and a64.shape[-1] > 1:
        low_a, low_b = (np.abs(np.tril(t, -1)).max() for t in (a64, b64))
        if (low_a > 0) != (low_b > 0):
            return f"lower triangle zero on side {'B' if low_a > 0 else 'A'} only: full vs diagonal covariance"
    if name.endswith(("beta1_power", "beta2_power")) and a64.size == 1 and float(a64.ravel()[0]) > 0:
        beta = constants.get("adam.beta1" if "beta1" in name else "adam.beta2")
        ratio = float(b64.ravel()[0] / a64.ravel()[0])
        if beta and 0 < beta < 1 and ratio > 1:
            k = np.log(ratio) / -np.log(beta)
            if abs(k - round(k)) < 1e-3:
                return f"B/A = 1/{'β1' if 'beta1' in name else 'β2'}^{round(k)}: side B's optimizer has taken {round(k)} fewer steps (restarted per phase?)"
    if a64.size == 1 and float(a64.ravel()[0]) != 0:
        x, y = float(a64.ravel()[0]), float(b64.ravel()[0])
        if abs(y - x) / abs(x) < 1e-6 and (float(np.float32(x)) == x) != (float(np.float32(y)) == y):
            return f"{'B' if float(np.float32(x)) == x else 'A'} is not a float32 value: a Python float (float64) vs float32 learning rate/constant"
    return named_ratio(a64, b64, constants)


def named_ratio(a: np.ndarray, b: np.ndarray, constants: Mapping[str, float], spread: float = 1e-4) -> str:
    """``b = c·a`` with one c for every element, named after a config constant (or its inverse) it equals.

    ``spread``: the ratio may vary by float32 rounding of two long reductions (~1e-6 relative); 1e-4
    keeps a genuinely different computation from looking like a rescaling."""
    mask = (a != 0) & (b != 0)
    if mask.sum() < 1:
        return ""
    ratio = b[mask] / a[mask]
    c = float(np.median(ratio))
    if c == 0 or abs(c - 1) < spread or np.max(np.abs(ratio / c - 1)) > spread:
        return ""
    for label, value in constants.items():
        if value and value != 1:
            if abs(c / value - 1) < spread:
                return f"constant ratio B/A = {c:.6g} = {label}"
            if abs(c * value - 1) < spread:
                return f"constant ratio B/A = {c:.6g} = 1/{label}"
    for n, label in ((c, "x"), (1 / c, "x 1/")):
        if n >= 2 and abs(n - round(n)) < spread * n:
            return f"constant ratio B/A = {label}{round(n)} (a reduction/convention mismatch: sum vs mean?)"
    return f"constant ratio B/A = {c:.6g} (a formula or constant differs)"


# --- activation kinks --------------------------------------------------------------------------

def kink_flips(reference: Mapping[str, np.ndarray], port: Mapping[str, np.ndarray], rows: list[Comparison],
               activations: Callable[[str], bool]) -> dict[str, int]:
    """Activation outputs (``activations(name)``) whose sign differs between the sides at some element
    although the tensor PASSED: a pre-activation within rounding of 0 on opposite sides of the kink.
    The derivative there is 1 on one side and the slope on the other."""
    out = {}
    for r in rows:
        if r.verdict == "PASS" and activations(r.name) and r.name in port:
            n = int(np.count_nonzero(np.sign(reference[r.name]) != np.sign(port[r.name])))
            if n:
                out[r.name] = n
    return out


def explain_by_kinks(rows: list[Comparison], kinks: Mapping[str, int], order: list[str], where: str = "in T2") -> list[Comparison]:
    """A gradient beyond its band when T2 found kink flips is reported INACCURATE with the flips named:
    each flip changes that element's gradient by (1 - slope) x its upstream gradient, which no
    rounding floor models. (Measured: DPSOM conv, PCG64 seed 0, one element of decoder.deconv1 at
    -2.4e-9 in float64 lands positive in TF; decoder.deconv1.bias then differs by 2e-3 of 20.)
    Only parameters at or before the last flipped tensor (execution order) are downstream of a flip
    in the backward pass; a gradient beyond its band elsewhere stays unexplained."""
    if not kinks:
        return rows
    flips = ", ".join(f"{k} ({n})" for k, n in kinks.items())
    upstream = set(order[: max(order.index(k) for k in kinks) + 1])
    return [dataclasses.replace(r, verdict="INACCURATE", note=f"{r.note} activation kink flips {where}: {flips}".strip())
            if r.verdict in ("FAIL", "INACCURATE") and r.name.rsplit(".", 1)[0] in upstream else r for r in rows]


def confirm_kinks_in_float64(sections: dict[str, list[Comparison]]) -> None:
    """A gradient explained by kink flips is checked against the same gradient with both sides in
    float64, where no element sits within rounding of a kink: PASS there confirms that the float32
    difference is the flip, not the formula; anything else says the explanation does not hold."""
    for name, rows in sections.items():
        twin = {r.name: r for r in sections.get(f"{name} (float64)", [])}
        if twin:
            sections[name] = [dataclasses.replace(r, note=f"{r.note}; float64: {twin[r.name].verdict} (max_abs {twin[r.name].max_abs:.3g}, "
                                                           f"tol {twin[r.name].tolerance:.3g})")
                              if "kink flips" in r.note and r.name in twin else r for r in rows]


# --- verdicts ------------------------------------------------------------------------------------

def worst(verdicts: Iterable[str]) -> str:
    found = set(verdicts)
    return next((v for v in VERDICT_ORDER if v in found and v not in ("SKIPPED",)), "PASS")


def verdict(sections: Mapping[str, list[Comparison]]) -> str:
    """FAIL / STRUCTURAL / INACCURATE / PASS; DECLARED when the port runs declared deviations (T0) and
    nothing undeclared differs there: what follows is then the deviations' measured effect, not a bug."""
    t0 = [r.verdict for name, rs in sections.items() if name.startswith("T0") for r in rs]
    if "DECLARED" in t0 and "FAIL" not in t0:
        return "DECLARED"
    return worst(r.verdict for rs in sections.values() for r in rs)


def first_divergence(sections: Mapping[str, list[Comparison]]) -> tuple[str, Comparison] | None:
    """The first row (section order, then row order) that is neither PASS nor SKIPPED."""
    return next(((name, r) for name, rs in sections.items() for r in rs if r.verdict not in ("PASS", "SKIPPED")), None)


def ratio(r: Comparison) -> float:
    """|A - B| / tolerance of one row (0 where both are exact, inf where only the tolerance is 0)."""
    if r.tolerance and r.tolerance == r.tolerance:
        return r.max_abs / r.tolerance
    return 0.0 if not r.max_abs else float("inf")
