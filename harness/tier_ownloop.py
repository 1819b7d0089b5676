"""Own-loop T4: each side runs its OWN training loop; the harness compares what they did, step by step.

The harness's T4 (harness/training_parity.py) drives ``step()`` on both sides through the spec's
plan, so it cannot see a difference in the loops themselves. Here each side runs its own loop
(``fit_records``, protocols.py) over the spec's reduced schedule (``spec.ownloop_overrides``: every
phase and stage, a per-epoch target recomputed once, the LR decay reached), from the same initial
weights (``spec.draw_weights``), with every forward's noise taken from one numpy PCG64 stream in the
order the loop asks for it (:class:`NoiseStream`: the next rows of one stream, so a chunked and an
unchunked pass over a set draw the same numbers). Each loop reports per step: phase, epoch, global
step, fed and effective LR, the target rows it used with the global step they were computed at,
and every loss term.

Compared step by step, in this order, so the first difference is named where it happens:

* structure, exact: ``phase``, ``epoch``, ``global_step``, ``lr_feed`` and ``lr`` (as float32),
  ``p_step``; plus the number of steps and of noise rows each loop drew;
* values, within a measured band: every loss term and the target rows ``p``, compared at each step
  (``harness.compare``, with ``harness.engine.diagnose`` on a FAIL) against ``MULTIPLE`` x the larger
  of each side's own float32 vs float64 distance at that step (the side's float64 twin running the
  same loop on the same noise; running maximum over the steps so far, since free-running float32
  trajectories only separate), only on the steps before the first structural difference. Unlike
  the quick tier this band is NOT capped at ``FLOOR_MAX_REL``: it is a trajectory band, and a
  free-running float32 trajectory can legitimately leave its float64 twin (Adam turns an activation
  kink flip into a ±lr step; measured, conv at batch 16: p at step 15 differs by 1.3e-2 between one
  side's float32 and float64 runs, the port-vs-reference distance 1.3e-2 as well). Where the band
  is that wide the row says so: the values judge little there and the structure rows carry the check.

``python -m harness.tier_ownloop --model dpsom --variant tiny-dense`` prints the sections and exits
1 on FAIL.

Why the target rows are judged by value and ``p_step`` exactly, not by a hash: each side computes
its target from its own float32 soft assignments, so two faithful sides hold different bytes (the
sha1 of each side's rows is printed beside the ``p`` row, equal only side against itself); the
cadence is what ``p_step`` pins down. No batch-order hook: the loops compared here take their
batches in order (the original's generator); a port that shuffles differs in every loss term from
step 0, and is named there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from typing import Any
from collections.abc import Callable, Mapping

import numpy as np

from harness.compare import Comparison, compare_all, format_table
from harness.engine import FLOOR_MAX_REL, MULTIPLE, abs_max, diagnose, skipped
from harness.protocols import Unsupported
from harness.spec import ModelSpec, get_spec

SCHEDULE = "T4 own loop: schedule"
VALUES = "T4 own loop: values"
STRUCTURE = ("phase", "epoch", "global_step", "lr_feed", "lr", "p_step")
MakePort = Callable[[Any, str], Any]


class NoiseStream:
    """The harness's noise for one side's run: each call ``(shape)`` returns the next ``shape[0]`` rows
    of standard normals (float32) of one PCG64 stream; ``rows`` / ``calls`` count what was drawn."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.rows, self.calls = 0, 0

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        self.rows += shape[0]
        self.calls += 1
        return self._rng.standard_normal(shape, dtype=np.float32)

    def state(self) -> dict[str, Any]:
        """Where the stream is (JSON-able): what :meth:`restore` continues from, row for row."""
        return {"rows": self.rows, "calls": self.calls, "bit_generator": self._rng.bit_generator.state}

    def restore(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["bit_generator"]
        self.rows, self.calls = int(state["rows"]), int(state["calls"])


def p_hash(p: Any) -> str | None:
    """sha1 (first 12 hex digits) of the target rows' float32 bytes, None where there are none."""
    return None if p is None else hashlib.sha1(np.ascontiguousarray(p, np.float32).tobytes()).hexdigest()[:12]


def _row(name: str, n: int, bad: int, verdict: str, note: str) -> Comparison:
    return Comparison(name, (n,), float(bad), bad / max(n, 1), bad / max(n, 1), (), 0.0, 0.0, 0.0, verdict, note)


def _same(field: str, a: Any, b: Any) -> bool:
    if field in ("lr", "lr_feed") and a is not None and b is not None:
        return bool(np.float32(a) == np.float32(b))
    return a == b


def _where(rec: Mapping[str, Any], i: int) -> str:
    return f"step {i} ({rec.get('phase')}, epoch {rec.get('epoch')})"


def _segments(records: list[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """Runs of consecutive steps with one (phase, lr_feed): ``(phase, lr_feed, steps)``."""
    out: list[tuple[str, float, int]] = []
    for r in records:
        key = (r["phase"], float(np.float32(r["lr_feed"])))
        if out and out[-1][:2] == key:
            out[-1] = (*key, out[-1][2] + 1)
        else:
            out.append((*key, 1))
    return out


def _explain(field: str, i: int, ref: list[dict], port: list[dict]) -> str:
    """What a structural difference at step ``i`` most likely is (model-agnostic readings of the record)."""
    a, b = ref[i], port[i]
    if field in ("phase", "epoch", "lr_feed"):
        for (pa, la, na), (pb, lb, nb) in zip(_segments(ref), _segments(port)):
            if (pa, la) != (pb, lb):
                return f"the schedules differ: the reference runs {pa} at lr_feed {la:g} there, the port {pb} at {lb:g}"
            if na != nb:
                return (f"{pa} at lr_feed {la:g} runs {na} steps on the reference, {nb} on the port "
                        f"({'an extra' if nb > na else 'a missing'} step/epoch in the port's schedule)")
        return "the schedules differ"
    if field == "global_step":
        start = next(j for j in range(i, -1, -1) if j == 0 or port[j - 1]["phase"] != b["phase"])
        if b["global_step"] == i - start + 1 and start > 0:
            return f"the port's step counter restarted when {b['phase']} began (step {start})"
        return "a step taken (or counted) on one side only"
    if field == "lr":
        if np.float32(b["lr"]) == np.float32(b["lr_feed"]) and np.float32(a["lr"]) != np.float32(a["lr_feed"]):
            return f"the port feeds lr_feed {b['lr_feed']:g} undecayed: no LR decay in {b['phase']}"
        return "same global step and fed LR, another effective LR: the decay schedule differs"
    if field == "p_step":
        if a["p_step"] is not None and b["p_step"] is not None and b["p_step"] > a["p_step"]:
            return (f"the port's target was computed at global step {b['p_step']}, the reference's at the epoch start "
                    f"({a['p_step']}): the port recomputed p within the epoch")
        return "the target distribution is computed at another point of the loop"
    return ""


def compare_records(ref: list[dict], port: list[dict], ref64: list[dict] | None, port64: list[dict] | None,
                    noise: Mapping[str, NoiseStream], multiple: float = MULTIPLE,
                    constants: Mapping[str, float] | None = None) -> tuple[dict[str, list[Comparison]], str | None]:
    """The two sections and the first divergence's text (None when there is none)."""
    n = min(len(ref), len(port))
    first: tuple[int, str] | None = None
    structure: list[Comparison] = []
    diverged_at = n  # the first step whose structure differs: values are compared before it only
    for field in STRUCTURE:
        bad = [i for i in range(n) if not _same(field, ref[i].get(field), port[i].get(field))]
        if not bad:
            structure.append(_row(field, n, 0, "PASS", "identical at every step"))
            continue
        i = bad[0]
        diverged_at = min(diverged_at, i)
        why = _explain(field, i, ref, port)
        text = f"{_where(ref[i], i)}: {field} differs: reference {ref[i].get(field)}, port {port[i].get(field)}" + (f": {why}" if why else "")
        structure.append(_row(field, n, len(bad), "FAIL", f"first at {text}; {len(bad)} of {n} steps differ"))
        if first is None or i < first[0]:  # fields in STRUCTURE order: at one step the earlier field is named
            first = (i, text)
    if len(ref) != len(port):
        text = f"step {n}: the reference runs {len(ref)} steps, the port {len(port)}"
        structure.append(_row("steps", max(len(ref), len(port)), abs(len(ref) - len(port)), "FAIL", text))
        first = first or (n, text)
    else:
        structure.append(_row("steps", n, 0, "PASS", f"{n} steps on both sides"))
    a_rows, b_rows = noise["reference"].rows, noise["port"].rows
    structure.append(_row("noise rows drawn", 1, int(a_rows != b_rows), "PASS" if a_rows == b_rows else "FAIL",
                          f"reference {a_rows} rows in {noise['reference'].calls} draws, port {b_rows} in {noise['port'].calls}"))

    values, value_first = _judge_values(ref, port, ref64, port64, diverged_at, multiple, constants or {})
    if value_first is not None and (first is None or value_first[0] < first[0]):
        first = value_first
    if first is None and a_rows != b_rows:
        first = (n, f"after step {n - 1}: the sides drew {a_rows} vs {b_rows} noise rows")
    verdicts = {r.verdict for r in structure + values}
    top = "FAIL" if "FAIL" in verdicts else "INACCURATE" if "INACCURATE" in verdicts else "PASS"
    head = _row("first divergence", n, 0 if first is None else 1, top,
                "none: every step's structure identical, every value within its band" if first is None else first[1])
    return {SCHEDULE: [head, *structure], VALUES: values}, None if first is None else first[1]


def _values(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The step's target rows (an input of the step: named first when it differs) and its loss terms."""
    out = {} if rec.get("p") is None else {"p": np.asarray(rec["p"])}
    out.update((k, v) for k, v in rec.items() if k.startswith("loss."))
    return out


def _judge_values(ref, port, ref64, port64, upto: int, multiple: float, constants) -> tuple[list[Comparison], tuple[int, str] | None]:
    """Per name: the first step it leaves its band (with that step's row), else its worst step."""
    running: dict[str, float] = {}
    best: dict[str, tuple[float, int, Comparison]] = {}
    first_bad: dict[str, tuple[int, Comparison]] = {}
    for i in range(upto):
        a, b = _values(ref[i]), _values(port[i])
        for lo, hi in ((ref, ref64), (port, port64)):
            if hi is None or i >= len(hi):
                continue
            x, y = _values(lo[i]), _values(hi[i])
            for k in x:
                if k in y and np.shape(x[k]) == np.shape(y[k]):
                    d = float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64))))
                    running[k] = max(running.get(k, 0.0), d)
        for r in _compare_step(a, b, running, multiple, constants):
            ratio = r.max_abs / r.tolerance if r.tolerance > 0 else (0.0 if r.max_abs == 0 else np.inf)
            if r.verdict != "PASS" and r.name not in first_bad:
                first_bad[r.name] = (i, r)
            if r.name not in best or ratio > best[r.name][0]:
                best[r.name] = (ratio, i, r)
    rows, first = [], None
    for name in best:
        if name in first_bad:
            i, r = first_bad[name]
            note = f"first at {_where(ref[i], i)}: {r.note}".rstrip(": ")
            if first is None or i < first[0]:
                first = (i, f"{_where(ref[i], i)}: {name} differs beyond its band (|diff| {r.max_abs:.3g} > tol {r.tolerance:.3g})")
        else:
            ratio, i, r = best[name]
            note = (f"worst at {_where(ref[i], i)}: {ratio:.3g} x tol" + (f"; {r.note}" if r.note else "")
                    + (f"; p sha1 {p_hash(ref[i]['p'])} / {p_hash(port[i]['p'])}" if name == "p" else ""))
        rows.append(Comparison(r.name, r.shape, r.max_abs, r.max_rel, r.mean_abs, r.worst_index, r.floor, r.multiple, r.tolerance,
                               r.verdict, note))
    if upto < min(len(ref), len(port)):
        rows.append(skipped("after the structure diverges", f"values compared on steps 0..{upto - 1} only"))
    return rows, first


def _compare_step(a: Mapping[str, Any], b: Mapping[str, Any], floor: Mapping[str, float], multiple: float,
                  constants: Mapping[str, float]) -> list[Comparison]:
    """One step's values against the (uncapped) trajectory band; a FAIL carries the engine's diagnosis
    and a wide band (floor above ``FLOOR_MAX_REL`` of the value) is named."""
    out = []
    for r in compare_all(a, b, floor, multiple):
        notes = [r.note] if r.note else []
        if r.name in a and r.name in b:
            if r.verdict == "FAIL":
                found = diagnose(r.name, a[r.name], b[r.name], constants)
                notes = [found, *notes] if found else notes
            scale = abs_max(b[r.name])
            if scale and floor.get(r.name, 0.0) > FLOOR_MAX_REL * scale:
                notes.append(f"wide trajectory band: own float32 vs float64 {floor[r.name]:.3g} ({floor[r.name] / scale:.2g} of the value)")
        out.append(dataclasses.replace(r, note="; ".join(notes)))
    return out


def _run_side(side: Any, weights: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray], seed: int):
    try:
        side.set_weights(weights)
        noise = NoiseStream(seed)
        records = side.fit_records(data, noise)
        for i, rec in enumerate(records):
            missing = [k for k in (*STRUCTURE, "p") if k not in rec]
            if missing:
                raise ValueError(f"{getattr(side, 'name', type(side).__name__)}.fit_records: record {i} lacks {missing} "
                                 f"(expected keys {[*STRUCTURE, 'p']} and the loss terms)")
        return records, noise
    finally:
        close = getattr(side, "close", None)
        if close is not None:
            close()


def run(spec: ModelSpec, variant: str, *, seed: int = 0, dataset: str | None = None, make_port: MakePort | None = None,
        multiple: float = MULTIPLE, overrides: Mapping[str, str] | None = None, twins: bool = True,
        reuse: dict | None = None) -> dict[str, list[Comparison]]:
    """The own-loop sections for ``spec``'s ``variant`` (module docstring). ``twins=False`` skips the
    float64 runs (values then judged at float32 resolution only). ``reuse``: a dict kept by the
    caller across runs with the same arguments; the reference's runs are stored there and not
    repeated (several ports against one reference)."""
    make_port = make_port or (lambda c, dtype: spec.make_port(c, dtype))
    cfg = spec.get_config(variant, overrides)
    cfg = spec.replace_config(cfg, spec.ownloop_overrides(cfg))
    data, _ = spec.ownloop_data(cfg, dataset)
    rng = np.random.Generator(np.random.PCG64(seed))
    key = ("ownloop", spec.name, variant, seed, dataset, tuple(sorted((overrides or {}).items())), twins)
    cached = (reuse or {}).get(key)
    reference = None if cached else spec.make_reference(cfg)
    weights = cached["weights"] if cached else spec.draw_weights({k: v.shape for k, v in reference.get_weights().items()}, rng)
    noise_seed = int(rng.integers(2**63)) if not cached else cached["noise_seed"]
    makers = {"reference": lambda: reference, "port": lambda: make_port(cfg, "float32")}
    if twins:
        makers.update({"reference64": lambda: spec.make_reference(cfg, "float64"), "port64": lambda: make_port(cfg, "float64")})
    out: dict[str, tuple[list[dict], NoiseStream]] = dict(cached["out"]) if cached else {}
    for label, make in makers.items():
        if label in out:
            continue
        try:
            out[label] = _run_side(make(), weights, data, noise_seed)
        except Unsupported as err:
            if label in ("reference", "port"):
                return {SCHEDULE: [skipped("fit_records", f"{label}: {err}")]}
    if reuse is not None and not cached:
        reuse[key] = {"weights": weights, "noise_seed": noise_seed, "out": {k: v for k, v in out.items() if k.startswith("reference")}}
    sections, _ = compare_records(out["reference"][0], out["port"][0], out.get("reference64", (None,))[0],
                                  out.get("port64", (None,))[0], {k: out[k][1] for k in ("reference", "port")}, multiple,
                                  spec.constants(cfg))
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tier_ownloop",
                                     description="Own-loop T4: each side's own training loop on the same weights and noise, "
                                                 "compared step by step; exits 1 on FAIL.")
    parser.add_argument("--model", default="dpsom", help="model spec name (default: dpsom)")
    parser.add_argument("--variant", default="dense", help="config variant (default: dense)")
    parser.add_argument("--seed", type=int, default=0, help="PCG64 seed of the weights and the noise (default: 0)")
    parser.add_argument("--dataset", default=None, help="data set name (default: the spec's first one found offline)")
    args = parser.parse_args(argv)
    sections = run(get_spec(args.model), args.variant, seed=args.seed, dataset=args.dataset)
    failed = False
    for name, rows in sections.items():
        print(f"\n== {name}\n{format_table(rows)}")
        failed |= any(r.verdict == "FAIL" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
