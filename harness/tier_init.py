"""I: the native-initialiser tier. Each side's OWN initialisers, drawn many times, against the
distributions the original defines, and against each other.

Every other tier overwrites both sides' initial weights with the harness's draw, so a port whose
own initialisers are wrong (torch's defaults left in place, a clamped normal where TF truncates)
passes them all and trains from another start. Here each side redraws every weight ``draws`` times
(``initial_weights()``, an optional protocol capability: TF re-evaluates its variables' initial
values, advancing the graph-seeded random ops; a torch port builds a fresh module under a seeded
``fork_rng``), and the expected distribution of every weight comes from the spec's rule table,
the one the harness draws from (``spec.initialisers``, harness/init.py: Glorot-uniform
``U(-l, l)`` with ``l = sqrt(6 / (fan_in + fan_out))``, TF's truncated normal re-drawn beyond 2 sd,
constants). Random weights are standardised by their scale (``w / l``, ``w / sd``) and tested:

* **support**: every element of every draw (full tensors) within the bound (|w| <= l, |w| <= 2 sd,
  up to float32 rounding of the bound, ``SUPPORT_SLACK``), and the bound approached: under the
  expected law the largest |w| of n elements falls below the observed one with probability
  ``G(max)^n`` (``G`` the law of |w|; max raised by float32's ``RESOLUTION`` of a uniform draw), the
  p-value of "never gets near the bound";
* **mass at the bound** (full tensors): elements within ``WINDOW`` (relative) of the bound, a
  binomial test against the law's own probability of that window; a normal clamped at ±2 sd piles
  2 Φ(-2) = 4.55 % exactly there, a truncated one has density only;
* **sd**: the mean of x² (the mean is known, 0) against the law's variance, z-test with the law's
  fourth moment (closed forms from scipy.stats: uniform(-1, 2), truncnorm(-2, 2));
* **KS**: ``scipy.stats.kstest`` against the exact cdf, on a subsample of at most ``sample_cap``
  elements per tensor and draw (positions drawn from the run's numpy PCG64 stream).

Constants (zeros, ones) must hold exactly in every draw. Per family a pooled row tests every
weight's standardised subsample together. A third section compares the two sides' standardised
samples with two-sample KS (``ks_2samp``) per weight and pooled, and the constants' draws bit for bit.

Levels and power. Each side's section is tested at family-wise level ``ALPHA`` = 1e-3 (Bonferroni:
every test at ``ALPHA / m``, m the section's number of tests), so a faithful side fails a section by
chance with probability <= 1e-3. The power of each KS test against the mistake that matters for
its law is computed in closed form and printed in the row's note: truncated normal vs a normal
clamped at ±2 sd; Glorot-uniform vs ``U(0, 1)`` (``nn.init.uniform_``'s default). One-sample: a
lower bound, P(|F_n(x*) - F0(x*)| > d_crit) with ``n F_n(x*) ~ Binomial(n, F1(x*))`` at the x* of
largest |F1 - F0| and d_crit the exact ``kstwo`` critical value (D_n >= that difference, so the test
rejects at least that often). Two-sample: the normal approximation of the same difference between
the two empirical cdfs, d_crit from ``kstwo`` at n m / (n + m) (scipy's asymptotic rule). ``draws``
(default ``None``: the smallest of ``DRAWS_MIN``..``DRAWS_MAX`` giving every row power >=
``POWER_TARGET``) is stated in the section notes.

Row columns (``format_table``): ``max_abs`` the largest |w| drawn, ``tol`` the support bound,
``max_rel`` their ratio, ``floor`` the law's sd, ``mean_abs`` the sample's sd (``multiple`` = bound /
sd); two-sample rows: ``max_abs`` = D, ``tol`` = d_crit. A FAIL's note names the closest of the
known mistakes (:func:`closest_mistake`).

Deliberately not observable: Glorot's fan_in / fan_out swapped (e.g. a conv-transpose kernel read
as (kh, kw, in, out) instead of Keras' (kh, kw, out, in)): the limit depends on their sum only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import stats

from harness.compare import Comparison, compare_exact, format_table
from harness.engine import skipped
from harness.init import TRUNCATION_SDS as CUT  # the truncated normal's bound in sd
from harness.protocols import Unsupported
from harness.spec import ModelSpec

ALPHA = 1e-3  # family-wise level of each section (Bonferroni over its tests)
POWER_TARGET = 0.99
DRAWS_MIN, DRAWS_MAX = 8, 64
SAMPLE_CAP = 4096  # elements per tensor and draw entering sd and KS (support and mass at the bound use all)
WINDOW = 1e-3  # "at the bound": |w| >= bound (1 - WINDOW)
SUPPORT_SLACK = 1e-6  # float32 rounding of the bound (a few ulp: uniform's min + (max - min) u, normal x sd)
# TF's float32 uniform takes 2^23 levels of u in [0, 1), so w = -l + 2 l u never comes closer to l
# than 2^-22 l: the approach test counts that close as reaching the bound. (Measured, conv posterior
# head, 8 x 64.6 M draws: max |w| / l = 1 - 4.8e-8 on both sides, TF and torch, which a continuous
# law calls p = 1.7e-11.)
RESOLUTION = 2.0 ** -22
SECTIONS = ("I initialisers: reference", "I initialisers: port", "I initialisers: reference vs port (two-sample KS)")


# --- the laws, standardised --------------------------------------------------------------------

def null_law(kind: str):
    """The expected law of ``w / scale``: ``U(-1, 1)`` or the normal truncated at ±2."""
    if kind == "uniform":
        return stats.uniform(loc=-1.0, scale=2.0)
    if kind == "truncated_normal":
        return stats.truncnorm(-CUT, CUT)
    raise ValueError(f"no continuous law for kind {kind!r}")


def clamped_normal_cdf(x: np.ndarray, cut: float = CUT) -> np.ndarray:
    """cdf of ``clamp(N(0, 1), -cut, cut)``: atoms 2 Φ(-cut) at ±cut (a float32 bound standardised in
    float64 may land a few ulp outside: counted at the atom)."""
    x = np.asarray(x, np.float64)
    lo, hi = -cut * (1 + SUPPORT_SLACK), cut * (1 - SUPPORT_SLACK)
    return np.where(x < lo, 0.0, np.where(x >= hi, 1.0, stats.norm.cdf(np.clip(x, -cut, cut))))


def mistakes(kind: str, shape: tuple[int, ...], scale: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Standardised cdfs of the realistic mistakes for a weight of this law, the first being the one
    whose power is required (truncated normal: clamped normal; Glorot-uniform: U(0, 1))."""
    if kind == "truncated_normal":
        return {"clamped normal at ±2 sd": clamped_normal_cdf,
                "untruncated normal": stats.norm.cdf,
                "U(0, 1)": lambda x: np.clip(np.asarray(x) * scale, 0.0, 1.0)}
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    torch_bound = 1.0 / math.sqrt(receptive * shape[-2]) / scale  # torch Linear/Conv default: U(±1/sqrt(fan_in))
    return {"U(0, 1) (nn.init.uniform_ default)": lambda x: np.clip(np.asarray(x) * scale, 0.0, 1.0),
            "Glorot normal, untruncated (nn.init.xavier_normal_)": lambda x: stats.norm.cdf(np.asarray(x) * math.sqrt(3.0)),
            "Glorot normal, truncated (Keras glorot_normal)": lambda x: stats.truncnorm(-CUT, CUT).cdf(
                np.asarray(x) * math.sqrt(3.0) * stats.truncnorm(-CUT, CUT).std()),
            "torch default (kaiming_uniform a=sqrt(5))": lambda x: stats.uniform(-torch_bound, 2 * torch_bound).cdf(x)}


# --- statistics -------------------------------------------------------------------------------

def _worst_point(null_cdf: Callable, alt_cdf: Callable, extent: float) -> tuple[float, float]:
    """(F0(x*), F1(x*)) at the x* of largest |F1 - F0| on a fine grid of [-extent, extent] (with ±1, ±2)."""
    x = np.unique(np.concatenate([np.linspace(-extent, extent, 20001), [-CUT, -1.0, 0.0, 1.0, CUT]]))
    f0, f1 = null_cdf(x), alt_cdf(x)
    i = int(np.argmax(np.abs(f1 - f0)))
    return float(f0[i]), float(f1[i])


def ks_power(null_cdf: Callable, alt_cdf: Callable, n: int, alpha: float, m: int | None = None, extent: float = 4.0) -> float:
    """Power of the two-sided KS test at level ``alpha`` when the data follow ``alt_cdf``.

    One-sample (``m`` None): the lower bound P(|B/n - F0(x*)| > d_crit), B ~ Binomial(n, F1(x*)),
    d_crit = ``kstwo.isf(alpha, n)`` (exact). Two-sample (``m`` the second sample's size, that sample
    from ``null_cdf``): P(|N(Δ, v)| > d_crit) with Δ = F1(x*) - F0(x*), v = F1(1 - F1)/n + F0(1 - F0)/m,
    d_crit = ``kstwo.isf(alpha, round(n m / (n + m)))``."""
    f0, f1 = _worst_point(null_cdf, alt_cdf, extent)
    if m is None:
        crit = float(stats.kstwo.isf(alpha, n))
        hi, lo = n * (f0 + crit), n * (f0 - crit)
        return float(stats.binom.sf(math.floor(hi), n, f1) + (stats.binom.cdf(math.ceil(lo) - 1, n, f1) if lo > 0 else 0.0))
    crit = float(stats.kstwo.isf(alpha, round(n * m / (n + m))))
    sd = math.sqrt(f1 * (1 - f1) / n + f0 * (1 - f0) / m)
    delta = f1 - f0
    if sd == 0:
        return float(abs(delta) > crit)
    return float(stats.norm.sf((crit - delta) / sd) + stats.norm.cdf((-crit - delta) / sd))


def bound_window_prob(kind: str) -> float:
    """P(|w| >= bound (1 - WINDOW)) under the expected law."""
    law = null_law(kind)
    b = 1.0 if kind == "uniform" else CUT
    return float(2 * law.sf(b * (1 - WINDOW)))


def at_bound_power(kind: str, n: int, alpha: float, atom: float = 2 * stats.norm.cdf(-CUT)) -> float:
    """Power of the mass-at-the-bound test (one-sided binomial at level ``alpha``) against a law with
    an extra ``atom`` at the bound (default: the clamped normal's 4.55 %)."""
    p0 = bound_window_prob(kind)
    k = int(stats.binom.isf(alpha, n, p0)) + 1  # smallest count rejected: P0(K >= k) <= alpha
    while k > 0 and stats.binom.sf(k - 2, n, p0) <= alpha:
        k -= 1
    return float(stats.binom.sf(k - 1, n, p0 + atom * (1 - p0)))


def approach_pvalue(kind: str, max_std: float, n: int) -> float:
    """P(max |x| of n draws <= max_std) under the expected law, ``max_std`` raised by the float32
    resolution (``RESOLUTION`` x bound): small when the draws never get near the bound (a law too narrow)."""
    law, b = null_law(kind), (1.0 if kind == "uniform" else CUT)
    max_std = max_std + b * RESOLUTION
    if max_std >= b:
        return 1.0
    tail = 2 * float(law.sf(max_std))  # P(|x| > max_std)
    return float(math.exp(n * math.log1p(-tail))) if tail < 1 else 0.0


def sd_test(x: np.ndarray, kind: str) -> tuple[float, float]:
    """(sd ratio, p): the mean of x² (known mean 0) against the law's variance, z with its 4th moment."""
    law = null_law(kind)
    var, m4 = float(law.var()), float(law.moment(4))
    v = float(np.mean(np.square(x)))
    z = (v - var) / math.sqrt((m4 - var * var) / len(x))
    return math.sqrt(v / var), float(2 * stats.norm.sf(abs(z)))


def ks_distance(x: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray], left: float = 1e-5) -> float:
    """sup |F_n - F| for a law that may have atoms: at each distinct value u both the right limits
    (F_n(u), F(u)) and the left ones (F_n(u-), F(u - left |u|)) are compared. (``kstest`` compares
    F(x_i) with (i-1)/n at each of n tied points: a clamped sample's 4.55 % at -2 reads as a distance
    of 0.0228 from the clamped law itself.) ``left`` (relative) steps past float32 rounding of an atom."""
    u, counts = np.unique(np.asarray(x, np.float64), return_counts=True)
    upper = np.cumsum(counts) / len(x)
    lower = upper - counts / len(x)
    return float(max(np.max(np.abs(upper - cdf(u))), np.max(np.abs(lower - cdf(u - left * np.maximum(np.abs(u), 1.0))))))


def closest_mistake(x: np.ndarray, kind: str, shape: tuple[int, ...], scale: float) -> tuple[str, float]:
    """The law among the expected one and its known mistakes nearest to ``x`` (:func:`ks_distance`)."""
    laws = {"the expected law": null_law(kind).cdf, **mistakes(kind, shape, scale)}
    found = {name: ks_distance(x, cdf) for name, cdf in laws.items()}
    best = min(found, key=found.get)
    return best, found[best]


# --- drawing ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Acc:
    """What one weight's draws leave: full-tensor support and window counts, the standardised subsample."""

    init: Any
    shape: tuple[int, ...]
    n: int = 0
    max_abs: float = 0.0
    outside: int = 0
    at_bound: int = 0
    not_constant: int = 0
    worst_constant: float = 0.0
    first: np.ndarray | None = None  # constants: the first draw, for the cross-side exact row
    parts: list = dataclasses.field(default_factory=list)

    def add(self, w: np.ndarray, rng: np.random.Generator, cap: int) -> None:
        self.n += w.size
        init = self.init
        if init.kind == "constant":
            wrong = w != np.asarray(init.scale, w.dtype)
            self.not_constant += int(np.count_nonzero(wrong))
            if wrong.any():
                self.worst_constant = max(self.worst_constant, float(np.max(np.abs(w[wrong].astype(np.float64) - init.scale))))
            if self.first is None:
                self.first = np.array(w)
            return
        hi, lo = float(np.max(w)), float(np.min(w))  # reductions on views: no temporary of the tensor
        self.max_abs = max(self.max_abs, hi, -lo)
        limit, window = init.bound * (1 + SUPPORT_SLACK), init.bound * (1 - WINDOW)
        outside = int(np.count_nonzero(w > limit)) + int(np.count_nonzero(w < -limit))
        self.outside += outside
        self.at_bound += int(np.count_nonzero(w >= window)) + int(np.count_nonzero(w <= -window)) - outside  # within the support
        flat = w.reshape(-1) if w.flags.c_contiguous else None
        if w.size <= cap:
            pick = np.asarray(w, np.float64).reshape(-1)
        else:
            idx = np.sort(rng.choice(w.size, cap, replace=False))
            pick = (flat[idx] if flat is not None else w[np.unravel_index(idx, w.shape)]).astype(np.float64)
        self.parts.append(pick / init.scale)

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0)


def collect(side: Any, initialisers: Callable[[Mapping[str, tuple[int, ...]]], Mapping[str, Any]], draws: int, cap: int,
            rng: np.random.Generator, first: dict[str, np.ndarray] | None = None) -> dict[str, _Acc]:
    """``draws`` draws of ``side.initial_weights()`` (``first``, if given, is the first), each reduced
    to the accumulators and dropped."""
    acc: dict[str, _Acc] = {}
    for i in range(draws):
        got = first if (i == 0 and first is not None) else side.initial_weights()
        first = None
        if not acc:
            rules = initialisers({k: tuple(np.shape(v)) for k, v in got.items()})
            acc = {k: _Acc(rules[k], tuple(np.shape(v))) for k, v in got.items()}
        for name in list(got):
            w = np.asarray(got.pop(name))
            if name not in acc or tuple(w.shape) != acc[name].shape:
                raise ValueError(f"{getattr(side, 'name', side)}.initial_weights(): {name} has shape {w.shape}, the first draw had "
                                 f"{acc[name].shape if name in acc else 'no such weight'}")
            acc[name].add(w, rng, cap)
            del w
        del got
    return acc


def choose_draws(shapes: Mapping[str, tuple[int, ...]], rules: Mapping[str, Any], cap: int, alpha: float) -> int:
    """The smallest number of draws in ``DRAWS_MIN``..``DRAWS_MAX`` giving every random weight's KS
    test power >= ``POWER_TARGET`` against its required mistake, one-sample and two-sample."""
    for draws in range(DRAWS_MIN, DRAWS_MAX + 1):
        if all(min(_powers(rules[k], tuple(s), min(int(np.prod(s)), cap) * draws, alpha).values()) >= POWER_TARGET
               for k, s in shapes.items() if rules[k].kind != "constant"):
            return draws
    return DRAWS_MAX


def _powers(init: Any, shape: tuple[int, ...], n: int, alpha: float) -> dict[str, float]:
    name, cdf = next(iter(mistakes(init.kind, shape, init.scale).items()))
    null = null_law(init.kind).cdf
    return {f"KS vs {name}": ks_power(null, cdf, n, alpha), f"two-sample KS vs {name}": ks_power(null, cdf, n, alpha, m=n)}


# --- judging ------------------------------------------------------------------------------------

TESTS_PER_WEIGHT = 4  # support (exact, no level), approach, at bound, sd, KS


def pooled_families(rules: Mapping[str, Any]) -> list[str]:
    """The laws (Keras names) of at least two random weights: each gets a pooled row."""
    count: dict[str, int] = {}
    for init in rules.values():
        if init.kind != "constant":
            count[init.keras] = count.get(init.keras, 0) + 1
    return sorted(k for k, n in count.items() if n > 1)


def judge_side(acc: Mapping[str, _Acc], alpha: float) -> list[Comparison]:
    """One row per weight, then one pooled row per law family; every test at ``alpha / m``."""
    random = [k for k, a in acc.items() if a.init.kind != "constant"]
    families = pooled_families({k: acc[k].init for k in random})
    level = alpha / max(1, TESTS_PER_WEIGHT * len(random) + 3 * len(families))
    rows = []
    for name, a in acc.items():
        rows.append(_constant_row(name, a) if a.init.kind == "constant" else _random_row(name, a, level))
    for fam in families:
        members = [acc[k] for k in random if acc[k].init.keras == fam]
        rows.append(_pooled_row(f"[{fam}, pooled]", members, level))
    return rows


def _constant_row(name: str, a: _Acc) -> Comparison:
    ok = a.not_constant == 0
    note = (f"{a.init.keras}: exactly {a.init.scale:g} in every element of every draw" if ok else
            f"{a.not_constant} of {a.n} elements differ from {a.init.scale:g} (largest |w - {a.init.scale:g}| {a.worst_constant:.3g})")
    return Comparison(name, a.shape, a.worst_constant, float("nan"), a.worst_constant, (), 0.0, 0.0, 0.0, "PASS" if ok else "FAIL", note)


def _random_row(name: str, a: _Acc, level: float) -> Comparison:
    init, x = a.init, a.sample
    b = 1.0 if init.kind == "uniform" else CUT
    checks: list[tuple[bool, str]] = []
    checks.append((a.outside == 0, f"support: {a.outside} of {a.n} beyond ±{init.bound:.6g}, max|w|/bound {a.max_abs / init.bound:.6f}"))
    p = approach_pvalue(init.kind, a.max_abs / init.scale, a.n)
    checks.append((p >= level, f"bound approached: p {p:.3g}"))
    p0 = bound_window_prob(init.kind)
    p = float(stats.binom.sf(a.at_bound - 1, a.n, p0)) if a.at_bound else 1.0
    checks.append((p >= level, f"at bound (within {WINDOW:g}): {a.at_bound} of {a.n}, expected {p0 * a.n:.3g}, p {p:.3g}"))
    ratio, p = sd_test(x, init.kind)
    checks.append((p >= level, f"sd {ratio:.4f} x expected (n {len(x)}), p {p:.3g}"))
    ks = stats.kstest(x, null_law(init.kind).cdf)
    checks.append((ks.pvalue >= level, f"KS D {ks.statistic:.4f} p {ks.pvalue:.3g}"))
    null = null_law(init.kind).cdf
    power_note = ", ".join(f"KS vs {k} {ks_power(null, cdf, len(x), level):.4f}" for k, cdf in mistakes(init.kind, a.shape, init.scale).items())
    if init.kind == "truncated_normal":
        power_note += f", at bound vs clamped normal {at_bound_power(init.kind, a.n, level):.4f}"
    failed = [msg for ok, msg in checks if not ok]
    verdict = "FAIL" if failed else "PASS"
    note = f"{init.keras} ±{init.bound:.4g}: " + "; ".join(failed + [msg for ok, msg in checks if ok])
    if failed:
        like, d = closest_mistake(x, init.kind, a.shape, init.scale)
        note = f"closest known law: {like} (D {d:.4f}); " + note
    note += f"; power at level {level:.2g}: {power_note}"
    sd_law = float(null_law(init.kind).std()) * init.scale
    return Comparison(name, a.shape, a.max_abs, a.max_abs / init.bound, float(np.sqrt(np.mean(np.square(x)))) * init.scale, (),
                      sd_law, b / float(null_law(init.kind).std()), init.bound, verdict, note)


def _pooled_row(label: str, members: list[_Acc], level: float) -> Comparison:
    kind = members[0].init.kind
    x = np.concatenate([m.sample for m in members])
    n, at_bound = sum(m.n for m in members), sum(m.at_bound for m in members)
    p0 = bound_window_prob(kind)
    checks = []
    p = float(stats.binom.sf(at_bound - 1, n, p0)) if at_bound else 1.0
    checks.append((p >= level, f"at bound: {at_bound} of {n}, expected {p0 * n:.3g}, p {p:.3g}"))
    ratio, p = sd_test(x, kind)
    checks.append((p >= level, f"sd {ratio:.4f} x expected (n {len(x)}), p {p:.3g}"))
    ks = stats.kstest(x, null_law(kind).cdf)
    checks.append((ks.pvalue >= level, f"KS D {ks.statistic:.4f} p {ks.pvalue:.3g}"))
    failed = [msg for ok, msg in checks if not ok]
    law = null_law(kind)
    max_std = max(m.max_abs / m.init.scale for m in members)
    b = 1.0 if kind == "uniform" else CUT
    note = f"{len(members)} weights, w / scale: " + "; ".join(failed + [msg for ok, msg in checks if ok])
    return Comparison(label, (len(x),), max_std, max_std / b, float(np.sqrt(np.mean(np.square(x)))), (), float(law.std()),
                      b / float(law.std()), b, "FAIL" if failed else "PASS", note)


def judge_pair(ref: Mapping[str, _Acc], port: Mapping[str, _Acc], alpha: float) -> list[Comparison]:
    """Two-sample KS of the standardised samples per random weight and pooled per family; constants'
    first draws bit for bit (``compare_exact``). A weight on one side only is a FAIL."""
    names = [k for k in ref if k in port]
    random = [k for k in names if ref[k].init.kind != "constant"]
    families = pooled_families({k: ref[k].init for k in random})
    level = alpha / max(1, len(random) + len(families))
    rows = []
    for name in names:
        a, b = ref[name], port[name]
        if a.init.kind == "constant":
            rows.append(dataclasses.replace(compare_exact(name, a.first, b.first), note=f"{a.init.keras}, first draws"))
            continue
        rows.append(_two_sample(name, a.shape, a.init, a.sample, b.sample, level))
    for fam in families:
        ks = [k for k in random if ref[k].init.keras == fam]
        rows.append(_two_sample(f"[{fam}, pooled]", (), ref[ks[0]].init, np.concatenate([ref[k].sample for k in ks]),
                                np.concatenate([port[k].sample for k in ks]), level, pooled=len(ks)))
    for name in [k for k in ref if k not in port] + [k for k in port if k not in ref]:
        rows.append(Comparison(name, (), *(float("nan"),) * 3, (), *(float("nan"),) * 3, "FAIL",
                               f"drawn by the {'reference' if name in ref else 'port'} only"))
    return rows


def _two_sample(name: str, shape: tuple[int, ...], init: Any, x: np.ndarray, y: np.ndarray, level: float, pooled: int = 0) -> Comparison:
    res = stats.ks_2samp(x, y, method="asymp")
    crit = float(stats.kstwo.isf(level, round(len(x) * len(y) / (len(x) + len(y)))))
    mistake, cdf = next(iter(mistakes(init.kind, shape or (1, 1), init.scale).items()))
    power = ks_power(null_law(init.kind).cdf, cdf, len(y), level, m=len(x)) if not pooled else float("nan")
    sd_x, sd_y = float(np.sqrt(np.mean(np.square(x)))), float(np.sqrt(np.mean(np.square(y))))
    verdict = "PASS" if res.pvalue >= level else "FAIL"
    note = (f"{f'{pooled} weights, ' if pooled else ''}w / scale: D {res.statistic:.4f} p {res.pvalue:.3g} (n {len(x)}, m {len(y)}), "
            f"sd {sd_x:.4f} vs {sd_y:.4f}")
    if not pooled:
        note += f"; power at level {level:.2g} vs a port drawing {mistake}: {power:.4f}"
    return Comparison(name, shape, float(res.statistic), float(res.statistic) / crit, abs(sd_x - sd_y), (), crit, 1.0, crit, verdict, note)


# --- the tier -----------------------------------------------------------------------------------

def run(spec: ModelSpec, variant: str, *, seed: int = 0, dataset: str | None = None, make_port: Callable | None = None,
        make_reference: Callable | None = None, draws: int | None = None, sample_cap: int = SAMPLE_CAP, alpha: float = ALPHA,
        sides: tuple[str, ...] = ("reference", "port"), notes: dict[str, str] | None = None, **kw: Any) -> dict[str, list[Comparison]]:
    """The three sections (one per side in ``sides``, and the two-sample one when both ran).

    ``make_port(cfg, dtype)`` / ``make_reference(cfg, dtype)`` default to the spec's; ``draws`` None
    chooses it for power (see the module docstring); ``notes``, when given, receives one line per
    section (draws, caps, level, time). ``dataset`` and other keywords are accepted for the common
    tier signature and unused (no data is read)."""
    cfg = spec.get_config(variant, kw.get("overrides"))
    makers = {"reference": make_reference or spec.make_reference, "port": make_port or spec.make_port}
    sections: dict[str, list[Comparison]] = {}
    accs: dict[str, dict[str, _Acc]] = {}
    for label, section in zip(("reference", "port"), SECTIONS):
        if label not in sides:
            continue
        t0 = time.perf_counter()
        side = makers[label](cfg, "float32")
        try:
            first = side.initial_weights()
        except Unsupported as err:
            sections[section] = [skipped("initial_weights", str(err))]
            continue
        shapes = {k: tuple(np.shape(v)) for k, v in first.items()}
        rules = spec.initialisers(shapes)
        random = [k for k in shapes if rules[k].kind != "constant"]
        n_tests = TESTS_PER_WEIGHT * len(random) + 3 * len(pooled_families(rules))
        n_draws = draws or choose_draws(shapes, rules, sample_cap, alpha / max(1, n_tests))
        powers = [_powers(rules[k], shapes[k], min(int(np.prod(shapes[k])), sample_cap) * n_draws, alpha / max(1, n_tests))
                  for k in random]
        least = {kind: min((p[kind] for p in powers if kind in p), default=float("nan")) for kind in sorted({k for p in powers for k in p})}
        rng = np.random.Generator(np.random.PCG64([seed, SECTIONS.index(section)]))
        accs[label] = collect(side, spec.initialisers, n_draws, sample_cap, rng, first)
        del first
        sections[section] = judge_side(accs[label], alpha)
        if hasattr(side, "close") and {"reference": make_reference, "port": make_port}[label] is None:  # built here: ours to close
            side.close()
        del side
        if notes is not None:
            notes[section] = (f"{n_draws} draws of initial_weights(); sd and KS on at most {sample_cap} elements "
                              f"per tensor and draw, support and mass at the bound on every element; {n_tests} tests at "
                              f"{alpha:g} / {n_tests} each (family-wise {alpha:g}); least power over the weights (closed form, "
                              f"target {POWER_TARGET}): " + ", ".join(f"{k} {v:.4f}" for k, v in least.items())
                              + f"; {time.perf_counter() - t0:.1f} s")
    if len(accs) == 2:
        sections[SECTIONS[2]] = judge_pair(accs["reference"], accs["port"], alpha)
        if notes is not None:
            notes[SECTIONS[2]] = (f"ks_2samp (asymptotic) of w / scale per weight and pooled, at {alpha:g} / number of tests; "
                                  "constants: first draws bit for bit")
    elif len(sides) == 2:
        sections[SECTIONS[2]] = [skipped("initial_weights", "needs both sides' draws")]
    return sections


def main(argv: list[str] | None = None) -> int:
    from harness.spec import get_spec

    ap = argparse.ArgumentParser(prog="python -m harness.tier_init", description=(
        "Native-initialiser tier: each side's own initialisers drawn many times, tested against the spec's "
        "distributions (support, mass at the bound, sd, KS with stated power) and against each other "
        "(two-sample KS). Exits 1 on any FAIL."))
    ap.add_argument("--model", default="dpsom", help="model spec name (default dpsom)")
    ap.add_argument("--variant", default="dense", help="config variant (default dense)")
    ap.add_argument("--seed", type=int, default=0, help="numpy PCG64 seed of the subsample positions (default 0)")
    ap.add_argument("--draws", type=int, default=None, help=f"draws per side (default: the fewest in {DRAWS_MIN}..{DRAWS_MAX} "
                                                            f"with power >= {POWER_TARGET})")
    ap.add_argument("--sample-cap", type=int, default=SAMPLE_CAP, help=f"elements per tensor and draw for sd/KS (default {SAMPLE_CAP})")
    ap.add_argument("--side", choices=("both", "reference", "port"), default="both", help="which side(s) to draw (default both)")
    args = ap.parse_args(argv)
    notes: dict[str, str] = {}
    sides = ("reference", "port") if args.side == "both" else (args.side,)
    sections = run(get_spec(args.model), args.variant, seed=args.seed, draws=args.draws, sample_cap=args.sample_cap, sides=sides, notes=notes)
    for name, rows in sections.items():
        print(f"\n== {name}" + (f"\n   {notes[name]}" if name in notes else ""))
        print(format_table(rows))
    failed = any(r.verdict == "FAIL" for rows in sections.values() for r in rows)
    print(f"\nverdict: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
