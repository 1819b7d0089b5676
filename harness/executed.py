"""T0: the hyper-parameters each side *actually* uses, side by side, against a deviation registry.

Values come from running the side wherever that is possible (LR schedule probed through the side's
own step function, posterior form from its forward output, BatchNorm and dropout from
``harness.bn_detector``); Adam's constants are read from the optimizer object each side builds.
Every difference must be declared in ``harness/deviations/<model>.csv`` or a user's ``--deviations``
file (key, reference value, port
value, reason, expected effect): a declared one is reported as DECLARED with its reason, anything
else FAILS the tier.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np
import pandas as pd

from harness.compare import Comparison

def _decay(side: Any, phase: str) -> tuple[int | None, float | None]:
    """First global step where the LR fed as 1.0 changes in ``phase`` (bisection up to 1e7), and the factor there."""
    base = side.learning_rate_at(phase, 1.0, 0)
    lo, hi = 0, 10_000_000
    if side.learning_rate_at(phase, 1.0, hi) == base:
        return None, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if side.learning_rate_at(phase, 1.0, mid) == base else (lo, mid)
    return hi, round(side.learning_rate_at(phase, 1.0, hi) / base, 6)


def per_phase(*sides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """For each side ``{phase: {key: value}}`` -> ``{key: value}``: one ``key`` where every phase
    agrees on every side, else ``key[phase]`` per phase (on all sides, so the names still pair up)."""
    phases = list(sides[0])
    keys = list(dict.fromkeys(k for side in sides for ph in phases for k in side[ph]))
    same = {k: all(side[ph].get(k) == side[phases[0]].get(k) for side in sides for ph in phases) for k in keys}
    return [{name: value for k in keys for name, value in
             ([(k, side[phases[0]].get(k))] if same[k] else [(f"{k}[{ph}]", side[ph].get(k)) for ph in phases])} for side in sides]


def executed(side: Any, batch: Mapping[str, np.ndarray], bn: pd.DataFrame | None, label: str, spec: Any) -> dict[str, Any]:
    """``{key: value}`` for one side (``bn``: the detector's table, rows of this side under ``label``):
    ``{phase: {key: value}}`` entries for the LR decay and the optimizer constants (collapsed by
    :func:`diff`), the model's own entries (``spec.executed``) and the BatchNorm behaviour measured."""
    values: dict[str, Any] = {ph.name: {**dict(zip(("lr.decay_steps", "lr.decay_factor"), _decay(side, ph.name))),
                                        **{f"adam.{k}": v for k, v in side.optimizer_constants(ph.name).items()}} for ph in spec.phases}
    values.update(spec.executed(side, batch))
    if not spec.has_batchnorm:
        values["batchnorm"] = "none"
    elif bn is not None:
        rows = bn[bn["side"] == label]
        for prop in ("stats", "updated", "position", "dropout"):
            values[f"batchnorm.{prop}"] = ", ".join(sorted({str(v) for v in rows[prop]}))
        values["batchnorm.eps"] = ", ".join(sorted({f"{v:.3g}" for v in rows["eps"]}))
    return values


def load_registry(path: str | Path) -> dict[str, dict[str, str] | list[dict[str, str]]]:
    """The deviation registry at ``path`` (a model's ``harness/deviations/<model>.csv`` or a user's
    ``--deviations`` file): columns key, reference, port, reason, expected_effect. A key declared on
    several rows (one per variant: DEKM's ``init.embedding.kernel`` is Glorot in the conv model,
    U(±0.05) in the dense one) keeps every row, as a list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: deviation registry not found (CSV: key,reference,port,reason,expected_effect)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"key", "reference", "port", "reason", "expected_effect"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns {sorted(need)} expected, got {sorted(rows[0])}")
    out: dict[str, Any] = {}
    for r in rows:
        if r["key"] in out:
            prev = out[r["key"]]
            out[r["key"]] = [*(prev if isinstance(prev, list) else [prev]), r]
        else:
            out[r["key"]] = r
    return out


def flat(values: dict[str, Any]) -> dict[str, Any]:
    """One side's :func:`executed` with its per-phase entries collapsed (for a record of that side alone)."""
    phases = [k for k, v in values.items() if isinstance(v, dict)]
    if not phases:
        return dict(values)
    return {**per_phase({k: values[k] for k in phases})[0], **{k: v for k, v in values.items() if k not in phases}}


def diff(reference: dict[str, Any], port: dict[str, Any], registry: dict[str, dict[str, str]]) -> list[Comparison]:
    """One Comparison per key: PASS (same), DECLARED (in the registry with these values), FAIL.
    Per-phase entries are collapsed first (:func:`per_phase`)."""
    phases = [k for k, v in reference.items() if isinstance(v, dict)]
    if phases:
        ref_ph, port_ph = per_phase({k: reference[k] for k in phases}, {k: port.get(k, {}) for k in phases})
        reference = {**ref_ph, **{k: v for k, v in reference.items() if k not in phases}}
        port = {**port_ph, **{k: v for k, v in port.items() if k not in phases}}
    out = []
    for key in list(reference) + [k for k in port if k not in reference]:
        a, b = reference.get(key, "<absent>"), port.get(key, "<absent>")
        same = a == b or (isinstance(a, float) and isinstance(b, float) and np.isclose(a, b, rtol=1e-6, atol=0))
        rows = registry.get(key) or []
        declared = next((d for d in (rows if isinstance(rows, list) else [rows]) if d["reference"] == str(a) and d["port"] == str(b)), None)
        if same:
            verdict, note = "PASS", f"{a}"
        elif declared:
            verdict, note = "DECLARED", f"reference {a} / port {b}: {declared['reason']} (expected: {declared['expected_effect']})"
        else:
            verdict, note = "FAIL", f"reference {a} / port {b}: not in the deviation registry"
        out.append(Comparison(key, (), 0.0 if same else float("nan"), 0.0, 0.0, (), 0.0, 0.0, 0.0, verdict, note))
    return out
