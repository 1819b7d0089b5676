"""BatchNorm behaviour and ordering detector (issue 4, item 8).

A port can match the original's *config* and still normalise differently: the original's Keras
learning phase is never set, so its BatchNormalization is a frozen affine map placed after the
LeakyReLU and its Dropout(0.4) never fires, while the common public port runs
Linear -> BN(batch statistics) -> LeakyReLU -> Dropout (specs/dpsom.md §1.1, §11.2). This module
*measures* what every normalisation layer of each side does, framework-free, through the adapter
protocol only (``trace``, ``get_weights`` / ``set_weights``, ``optimizer_state`` /
``set_optimizer_state``; harness/protocols.py), and prints both sides as one table.

Per (layer, side), all from tensors of real runs (``<bn>.input``: what the layer received,
``<bn>``: its output, the LeakyReLU output of its block), never from a config:

``stats``      "batch" when the layer's per-feature map input -> output, fitted on one batch,
               fails to predict sample 0 of a second batch that shares sample 0 but differs
               elsewhere (``batch_dep``: that misprediction, relative); else "moving".
``updated``    whether the moving statistics (``get_weights``) change in one optimizer step.
``eps``        solved from the slope ``a = gamma / sqrt(var + eps)`` of the per-feature least-squares
               fit (all B [x H x W] elements, float64: better conditioned than any one element),
               ``var`` the moving variance or the batch's biased variance, whichever ``stats``
               found; median over features.
``momentum``   share of the batch mean (of the step's own BN input) mixed into the moving mean by that
               step (torch's convention; Keras momentum = 1 - this), median over features; NaN when
               the statistics are frozen. The mean, not the variance: Keras and torch may differ in
               the variance estimator of the update (biased / unbiased, specs/dpsom.md §14.2).
``position``   "act -> BN" (the BN input *is* the LeakyReLU output), "act -> dropout(p) -> BN" (it is
               that output with a fraction p zeroed and the rest scaled by 1/(1-p)), "BN -> act" (the
               LeakyReLU output is leaky_relu(BN output) for a measured slope in (0, 1)), or "?".
``dropout``    "fires" when two identical training-mode runs differ anywhere, else "never fires".

During the measurement every BN parameter is replaced by random values, the same on every side
(``probe_seed``): at gamma = 1, beta = 0, mean = 0, var = 1 a wrong eps shows only at 5e-4
relative and a dropped beta or mean not at all. Weights and optimizer state are restored after.
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from harness.memory import fresh, release, zeros_as_views

PROPERTIES = ("stats", "updated", "eps", "momentum", "position", "dropout")  # what `differences` compares
NUMERIC = ("eps", "momentum")
NUMERIC_RTOL = 0.05  # measured sides agree to ~1e-4 (see tests); a real deviation is 100x (eps 1e-5 vs 1e-3)
SAME_REL = 1e-4  # float32 results of one map agree to ~1e-6 relative; batch statistics change them by ~1e-1
ARROW = "\u2192"


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (last axis) least-squares ``y = a x + c`` over all other axes, float64.

    Features whose input barely varies (slope undetermined) get NaN.
    """
    x2, y2 = (np.asarray(t, np.float64).reshape(-1, t.shape[-1]) for t in (x, y))
    xc, yc = x2 - x2.mean(0), y2 - y2.mean(0)
    var = (xc**2).mean(0)
    ok = var > 1e-12 * max(float(np.abs(x2).max()) ** 2, 1e-30)
    a = np.where(ok, (xc * yc).mean(0) / np.where(ok, var, 1.0), np.nan)
    return a, y2.mean(0) - a * x2.mean(0)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b| (NaN entries, from undetermined slopes, ignored)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.nanmax(np.abs(a - b)) / max(np.abs(b).max(), 1e-30))


def _activation_of(bn: str, tensors: dict[str, np.ndarray]) -> str:
    """The LeakyReLU output of the BN's block: the canonical ``deconvN`` / ``convN`` / ``fcN`` beside ``bnN``."""
    part, _, idx = bn.rpartition(".bn")
    for kind in ("deconv", "conv", "fc"):
        if f"{part}.{kind}{idx}" in tensors:
            return f"{part}.{kind}{idx}"
    raise KeyError(f"no activation tensor found for {bn}")


def _position(x_in: np.ndarray, act: np.ndarray, y: np.ndarray) -> str:
    x_in, act, y = (np.asarray(t, np.float64) for t in (x_in, act, y))
    if _rel(x_in, act) <= SAME_REL:
        return f"act {ARROW} BN"
    kept = x_in != 0
    if kept.any() and (~kept & (act != 0)).any():  # zeros the activation did not have: dropped
        scale = float(np.median(x_in[kept] / act[kept]))
        if scale > 1 and _rel(x_in[kept], scale * act[kept]) <= SAME_REL:
            return f"act {ARROW} dropout({1 - 1 / scale:.2f}) {ARROW} BN"
    pos, neg = y > 0, y < 0
    slope = float(np.median(act[neg] / y[neg])) if neg.any() else np.nan
    if 0 < slope < 1 and _rel(act[pos], y[pos]) <= SAME_REL and _rel(act[neg], slope * y[neg]) <= SAME_REL:
        return f"BN {ARROW} act"
    return "?"


def _probe(weights: dict[str, np.ndarray], seed: int | None) -> dict[str, np.ndarray]:
    """``weights`` with every BN parameter and statistic redrawn (None: unchanged)."""
    if seed is None:
        return dict(weights)
    rng, ranges = np.random.default_rng(seed), {"gamma": (0.5, 1.5), "beta": (-0.5, 0.5),
                                                 "moving_mean": (-0.2, 0.2), "moving_variance": (0.2, 1.0)}
    out = dict(weights)
    for name, value in weights.items():
        kind = name.rpartition(".")[2]
        if ".bn" in name and kind in ranges:
            out[name] = rng.uniform(*ranges[kind], size=value.shape).astype(value.dtype)
    return out


def _measure(label: str, side: Any, batch: Mapping[str, np.ndarray], probe: dict[str, np.ndarray], phase: str,
             lr_feed: float) -> list[dict[str, Any]]:
    x = np.asarray(batch["x"])
    other = {**batch, "x": np.concatenate([x[:1], 0.5 * x[1:]])}  # shares sample 0, other batch statistics
    runs = {}
    for key, b in (("a", batch), ("again", batch), ("b", other)):
        side.set_weights(probe)  # a batch-statistics forward may move the moving statistics
        runs[key] = side.trace(b)
    side.set_weights(probe)
    stepped = side.trace(batch, step=(phase, lr_feed))
    after = side.get_weights()
    a, again, b = runs["a"], runs["again"], runs["b"]
    fires = any(_rel(again[k], a[k]) > SAME_REL for k in a if np.asarray(a[k]).dtype.kind == "f")
    rows = []
    for bn in [k[: -len(".input")] for k in a if re.search(r"\.bn\d+\.input$", k)]:
        x_in, y = a[f"{bn}.input"], a[bn]
        axes = tuple(range(x_in.ndim - 1))
        slope, shift = _fit(x_in, y)
        batch_dep = _rel(slope * np.asarray(b[f"{bn}.input"][0], np.float64) + shift, b[bn][0])
        stats = "moving" if batch_dep <= SAME_REL else "batch" if batch_dep > SAME_REL else "?"
        var = np.asarray(x_in, np.float64).var(axes) if stats == "batch" else probe[f"{bn}.moving_variance"]
        eps_est = float(np.nanmedian((probe[f"{bn}.gamma"] / slope) ** 2 - var))
        old, new = (np.asarray(w[f"{bn}.moving_mean"], np.float64) for w in (probe, after))
        updated = bool(np.any(new != old) or np.any(after[f"{bn}.moving_variance"] != probe[f"{bn}.moving_variance"]))
        momentum = np.nan
        if updated:
            gap = np.asarray(stepped[f"{bn}.input"], np.float64).mean(axes) - old
            use = np.abs(gap) > 1e-3 * np.abs(gap).max()
            momentum = float(np.median((new - old)[use] / gap[use]))
        rows.append({"layer": bn, "side": label, "stats": stats, "batch_dep": batch_dep, "updated": updated,
                     "eps": eps_est, "momentum": momentum,
                     "position": _position(x_in, a[_activation_of(bn, a)], y),
                     "dropout": "fires" if fires else "never fires"})
    return rows


COLUMNS = ("layer", "side", "stats", "batch_dep", "updated", "eps", "momentum", "position", "dropout")


def measure(label: str, side: Any, batch: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], *,
            probe_seed: int | None = 0, phase: str = "vae", lr_feed: float = 1e-3) -> list[dict[str, Any]]:
    """One side's rows (see :func:`detect`), measured alone: the side's weights and optimizer state
    are restored afterwards, so the sides of one table can be measured at different times."""
    # an all-zero optimizer state (before any step: 2 x the weights) is saved as zero-strided views
    saved, opt = side.get_weights(), zeros_as_views(side.optimizer_state())
    try:
        # a weight the shared set lacks (a partially mapped port's) keeps this side's own value
        return _measure(label, side, batch, {**saved, **_probe(dict(weights), probe_seed)}, phase, lr_feed)
    finally:
        side.set_weights(saved)
        side.set_optimizer_state(fresh(opt))
        del saved, opt
        release()  # what the side's step left in the C heap, before the next side


def table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> pd.DataFrame:
    """The detector's table from :func:`measure`'s rows: one row per (BN layer, side), sides adjacent
    in the order of ``labels``."""
    out = pd.DataFrame(list(rows), columns=list(COLUMNS))
    if out.empty:
        return out
    rank_layer = {name: i for i, name in enumerate(dict.fromkeys(out["layer"]))}
    rank_side = {label: i for i, label in enumerate(labels)}
    ranks = out["layer"].map(rank_layer) * len(labels) + out["side"].map(rank_side)
    return out.iloc[np.argsort(ranks.to_numpy(), kind="stable")].reset_index(drop=True)


def detect(sides: Mapping[str, Any] | Sequence[Any], batch: Mapping[str, np.ndarray], *,
           weights: dict[str, np.ndarray] | None = None, probe_seed: int | None = 0, phase: str = "vae",
           lr_feed: float = 1e-3) -> pd.DataFrame:
    """One row per (BN layer, side) with the measured properties (module docstring), sides adjacent.

    ``sides``: adapters, or ``{label: adapter}`` when their ``name``s clash (two torch ports).
    ``batch`` (its input ``x`` with B >= 3 samples, and whatever else the model takes) feeds every
    run; a model without BatchNorm gives an empty table (:func:`format_table` says so). All sides get the same weights
    (``weights``, default the first side's) with the BN parameters probed; ``phase`` / ``lr_feed``
    make the one optimizer step. Each side's weights and optimizer state are restored afterwards
    (its RNG streams are not).
    """
    named = dict(sides) if isinstance(sides, Mapping) else {s.name: s for s in sides}
    if len(named) < (len(sides) if not isinstance(sides, Mapping) else 1):
        raise ValueError("two sides share a name; pass {label: side}")
    weights = weights if weights is not None else next(iter(named.values())).get_weights()
    rows = [row for label, side in named.items()
            for row in measure(label, side, batch, weights, probe_seed=probe_seed, phase=phase, lr_feed=lr_feed)]
    return table(rows, list(named))


def _equal(prop: str, values: list[Any]) -> bool:
    if prop in NUMERIC:
        v = np.asarray(values, np.float64)
        if np.isnan(v).all():
            return True
        return not np.isnan(v).any() and bool(np.all(np.abs(v - v[0]) <= NUMERIC_RTOL * np.abs(v[0])))
    return all(value == values[0] for value in values)


def differences(table: pd.DataFrame) -> pd.DataFrame:
    """(layer, property, value per side) for every measured property that is not the same on all sides."""
    sides = list(dict.fromkeys(table["side"]))
    rows = []
    for layer, group in table.groupby("layer", sort=False):
        by_side = group.set_index("side")
        for prop in PROPERTIES:
            values = [by_side.at[s, prop] if s in by_side.index else None for s in sides]
            if not _equal(prop, values):
                rows.append({"layer": layer, "property": prop, **dict(zip(sides, values))})
    return pd.DataFrame(rows, columns=["layer", "property", *sides])


def format_table(table: pd.DataFrame) -> str:
    """The table as text (one row per layer and side), with the differences below it."""
    if table.empty:
        return "no BatchNorm layer on any side"
    shown = table.assign(
        behaves_as=[("frozen affine" if s == "moving" and not u else f"{s} stats, {'updated' if u else 'frozen'}")
                    for s, u in zip(table["stats"], table["updated"])],
        batch_dep=table["batch_dep"].map(lambda v: f"{v:.1e}"),
        updated=table["updated"].map({True: "yes", False: "no"}),
        eps=table["eps"].map(lambda v: f"{v:.4g}"),
        momentum=table["momentum"].map(lambda v: "n/a (frozen)" if np.isnan(v) else f"{v:.4g}"),
    )
    cols = ["layer", "side", "behaves_as", "stats", "batch_dep", "updated", "eps", "momentum", "position", "dropout"]
    diff = differences(table)
    lines = [shown[cols].to_string(index=False), ""]
    if diff.empty:
        lines.append("differences: none")
    else:
        lines += ["differences:", diff.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    return "\n".join(lines)
