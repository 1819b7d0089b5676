"""T0: the hyper-parameters each side *actually* uses, side by side, against a deviation registry.

Values come from running the side wherever that is possible (LR schedule probed through the side's
own step function, posterior form from its forward output, BatchNorm and dropout from
``harness.bn_detector``); Adam's constants are read from the optimizer object each side builds.
Every difference must be declared in ``harness/deviations/<model>.csv`` (key, reference value, port
value, reason, expected effect): a declared one is reported as DECLARED with its reason, anything
else FAILS the tier.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.compare import Comparison

REGISTRY_DIR = Path(__file__).resolve().parent / "deviations"


def _decay(side: Any) -> tuple[int | None, float | None]:
    """First global step where the LR fed as 1.0 changes (bisection up to 1e7), and the factor there."""
    base = side.learning_rate_at(1.0, 0)
    lo, hi = 0, 10_000_000
    if side.learning_rate_at(1.0, hi) == base:
        return None, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if side.learning_rate_at(1.0, mid) == base else (lo, mid)
    return hi, round(side.learning_rate_at(1.0, hi) / base, 6)


def executed(side: Any, x: np.ndarray, eps: np.ndarray, bn: pd.DataFrame | None, label: str) -> dict[str, Any]:
    """``{key: value}`` for one side (``bn``: the detector's table, rows of this side under ``label``)."""
    decay_steps, decay_factor = _decay(side)
    out = side.forward(x, eps)
    L = np.asarray(out["posterior.scale_tril"])
    values: dict[str, Any] = {
        "lr.decay_steps": decay_steps,
        "lr.decay_factor": decay_factor,
        **{f"adam.{k}": v for k, v in side.optimizer_constants().items()},
        "posterior": "full covariance (lower-triangular scale)" if np.any(np.tril(L, -1)) else "diagonal",
    }
    if bn is not None:
        rows = bn[bn["side"] == label]
        for prop in ("stats", "updated", "position", "dropout"):
            values[f"batchnorm.{prop}"] = ", ".join(sorted({str(v) for v in rows[prop]}))
        values["batchnorm.eps"] = ", ".join(sorted({f"{v:.3g}" for v in rows["eps"]}))
    return values


def load_registry(model: str) -> dict[str, dict[str, str]]:
    path = REGISTRY_DIR / f"{model}.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"key", "reference", "port", "reason", "expected_effect"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns {sorted(need)} expected, got {sorted(rows[0])}")
    return {r["key"]: r for r in rows}


def diff(reference: dict[str, Any], port: dict[str, Any], registry: dict[str, dict[str, str]]) -> list[Comparison]:
    """One Comparison per key: PASS (same), DECLARED (in the registry with these values), FAIL."""
    out = []
    for key in list(reference) + [k for k in port if k not in reference]:
        a, b = reference.get(key, "<absent>"), port.get(key, "<absent>")
        same = a == b or (isinstance(a, float) and isinstance(b, float) and np.isclose(a, b, rtol=1e-6, atol=0))
        declared = registry.get(key)
        if same:
            verdict, note = "PASS", f"{a}"
        elif declared and declared["reference"] == str(a) and declared["port"] == str(b):
            verdict, note = "DECLARED", f"reference {a} / port {b}: {declared['reason']} (expected: {declared['expected_effect']})"
        else:
            verdict, note = "FAIL", f"reference {a} / port {b}: not in {REGISTRY_DIR.name}/ registry"
        out.append(Comparison(key, (), 0.0 if same else float("nan"), 0.0, 0.0, (), 0.0, 0.0, 0.0, verdict, note))
    return out
