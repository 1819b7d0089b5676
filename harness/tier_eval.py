"""Evaluation tier: the same weights and the same injected noise through each side's OWN evaluation.

Each side runs its evaluation code (``evaluate_assignments``, protocols.py) on the spec's reduced
evaluation set (``spec.ownloop_data``) from weights drawn once by ``spec.draw_weights``, its noise
taken from one numpy PCG64 stream in the order it asks (harness.tier_ownloop.NoiseStream). Then:

* ``assignments``: identical, element for element (same inputs evaluated, same cluster each). Where
  both sides report the ``distances`` each assignment is the argmin of, an input assigned
  differently is a rounding tie when both the reference's margin between the two clusters and the
  two sides' largest distance difference on that input are within float32 resolution
  (``MULTIPLE`` x float32 epsilon x the input's largest distance: the same distances, rounded
  differently; a side computing other distances, e.g. from another quantity, is far outside; measured:
  1 of 9 900 MNIST test images with the dense model's embeddings scaled by 0.05, none at
  initialisation): the row is then INACCURATE with every tie listed, and FAIL if any flip is not a tie;
* every metric: equal, bit for bit (tolerance 0: identical assignments give identical sklearn numbers;
  INACCURATE where the assignments differ by ties only);
* T0-style rows: ``eval.assign_from`` (what the assignment is computed from, as each side reports
  it: e.g. a sample z or the posterior mean) and ``eval.nmi_average`` (MEASURED: the sklearn
  averaging whose NMI of the side's own assignments equals the ``nmi`` it reports), diffed through
  the model's deviation registry (harness/executed.py).

``python -m harness.tier_eval --model dpsom --variant tiny-dense`` prints the sections and exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from harness.compare import FLOAT32_EPS, Comparison, compare_exact, format_table
from harness.engine import MULTIPLE, skipped
from harness.executed import diff, load_registry
from harness.protocols import Unsupported
from harness.spec import ModelSpec, get_spec
from harness.tier_ownloop import MakePort, NoiseStream

ASSIGNMENTS, METRICS, T0 = "eval: assignments", "eval: metrics", "eval: T0 as executed"
NMI_AVERAGES = ("geometric", "arithmetic", "min", "max")


def measured_nmi_average(labels: np.ndarray, assignments: np.ndarray, nmi: float) -> str:
    """The sklearn ``average_method`` (or several, joined by ``=``, where they coincide on these labels)
    whose NMI equals ``nmi`` to 1e-12; ``"none of <methods> (nmi=...)"`` otherwise."""
    found = [m for m in NMI_AVERAGES
             if abs(normalized_mutual_info_score(labels, assignments, average_method=m) - nmi) <= 1e-12]
    return "=".join(found) if found else f"none of {'/'.join(NMI_AVERAGES)} (nmi={nmi:.6g})"


def _assignments_row(ref: Mapping[str, Any], port: Mapping[str, Any]) -> Comparison:
    a, b = np.asarray(ref["assignments"], np.int64), np.asarray(port["assignments"], np.int64)
    row = compare_exact("assignments", a, b)
    if row.verdict == "PASS" or a.shape != b.shape:
        return row
    where = np.flatnonzero(a != b)
    i = int(where[0])
    note = f"{row.note}; first at input {i}: reference {int(a[i])}, port {int(b[i])}"
    verdict = "FAIL"
    da, db = ref.get("distances"), port.get("distances")
    if da is not None and db is not None and np.shape(da) == np.shape(db) and np.shape(da)[0] == len(a):
        da, db = np.asarray(da, np.float64), np.asarray(db, np.float64)
        ties = []
        for j in where:
            margin = da[j, b[j]] - da[j, a[j]]  # >= 0: the reference's own preference for its cluster
            spread = float(np.max(np.abs(da[j] - db[j])))  # how far the two sides' distances of this input differ
            resolution = MULTIPLE * FLOAT32_EPS * float(np.max(np.abs(da[j])))
            if margin <= resolution and spread <= resolution:
                ties.append(f"input {j}: {int(a[j])} vs {int(b[j])}, margin {margin:.3g} and distance difference {spread:.3g} "
                            f"<= {resolution:.3g}")
        if len(ties) == len(where):
            verdict, note = "INACCURATE", f"{row.note}, all rounding ties: " + "; ".join(ties)
        elif ties:
            note += f" ({len(ties)} of {len(where)} are rounding ties)"
    return Comparison(row.name, row.shape, row.max_abs, row.max_rel, row.mean_abs, (i,), 0.0, 0.0, 0.0, verdict, note)


def compare_evaluations(ref: Mapping[str, Any], port: Mapping[str, Any], registry: Mapping[str, Any]) -> dict[str, list[Comparison]]:
    assignments = [_assignments_row(ref, port),
                   compare_exact("labels", np.asarray(ref["labels"], np.int64), np.asarray(port["labels"], np.int64))]
    metrics = []
    for name in list(ref["metrics"]) + [k for k in port["metrics"] if k not in ref["metrics"]]:
        if name not in ref["metrics"] or name not in port["metrics"]:
            metrics.append(skipped(name, f"reported by the {'port' if name in port['metrics'] else 'reference'} only"))
            continue
        row = compare_exact(name, np.float64(ref["metrics"][name]), np.float64(port["metrics"][name]))
        if row.verdict != "PASS":
            verdict = "INACCURATE" if assignments[0].verdict == "INACCURATE" else "FAIL"  # follows from rounding ties only
            row = Comparison(row.name, row.shape, row.max_abs, row.max_rel, row.mean_abs, row.worst_index, 0.0, 0.0, 0.0, verdict,
                             f"reference {ref['metrics'][name]:.10g}, port {port['metrics'][name]:.10g}"
                             + ("; same assignments: another formula" if assignments[0].verdict == "PASS" else "; the assignments differ"))
        metrics.append(row)
    executed = []
    for side in (ref, port):
        nmi = side["metrics"].get("nmi")
        measured = (measured_nmi_average(np.asarray(side["labels"]), np.asarray(side["assignments"]), float(nmi))
                    if nmi is not None else "no nmi reported")
        executed.append({"eval.assign_from": side["assign_from"], "eval.nmi_average": measured})
    t0 = diff(*executed, registry)
    for i, r in enumerate(t0):  # the declared averaging beside the measured one, where they disagree
        if r.name == "eval.nmi_average":
            said = [s.get("nmi_average") for s in (ref, port)]
            if any(d != m["eval.nmi_average"] for d, m in zip(said, executed)):
                t0[i] = Comparison(r.name, r.shape, r.max_abs, r.max_rel, r.mean_abs, r.worst_index, r.floor, r.multiple, r.tolerance,
                                   r.verdict, f"{r.note}; declared: reference {said[0]}, port {said[1]}")
    return {ASSIGNMENTS: assignments, METRICS: metrics, T0: t0}


def run(spec: ModelSpec, variant: str, *, seed: int = 0, dataset: str | None = None, make_port: MakePort | None = None,
        overrides: Mapping[str, str] | None = None, registry: str | None = None, reuse: dict | None = None,
        full: bool = False) -> dict[str, list[Comparison]]:
    """The evaluation sections for ``spec``'s ``variant`` (module docstring). ``reuse``: as in
    harness.tier_ownloop.run (the reference's evaluation kept across runs with the same arguments).
    ``full``: the whole evaluation set at the variant's own batch size (``spec.evaluation_data``)
    instead of the reduced run's few batches."""
    make_port = make_port or (lambda c, dtype: spec.make_port(c, dtype))
    cfg = spec.get_config(variant, overrides)
    if full:
        data, _ = spec.evaluation_data(cfg, dataset)
    else:
        cfg = spec.replace_config(cfg, spec.ownloop_overrides(cfg))
        data, _ = spec.ownloop_data(cfg, dataset)
    rng = np.random.Generator(np.random.PCG64(seed))
    key = ("eval", spec.name, variant, seed, dataset, tuple(sorted((overrides or {}).items())), full)
    cached = (reuse or {}).get(key)
    reference = None if cached else spec.make_reference(cfg)  # (its evaluation restores a checkpoint: every variable)
    try:
        weights = cached["weights"] if cached else spec.draw_weights({k: v.shape for k, v in reference.get_weights().items()}, rng)
        noise_seed = cached["noise_seed"] if cached else int(rng.integers(2**63))
        results = {"reference": cached["result"]} if cached else {}
        for label, side in (("reference", reference), ("port", None)):
            if label in results:
                continue
            try:
                side = side if side is not None else make_port(cfg, "float32")
                side.set_weights(weights)
                results[label] = side.evaluate_assignments(data, NoiseStream(noise_seed))
                if label == "reference":  # one side in memory at a time
                    getattr(reference, "close", lambda: None)()
                    side = reference = None
            except Unsupported as err:
                return {ASSIGNMENTS: [skipped("evaluate_assignments", f"{label}: {err}")]}
    finally:
        getattr(reference, "close", lambda: None)()
    if reuse is not None and not cached:
        reuse[key] = {"weights": weights, "noise_seed": noise_seed, "result": results["reference"]}
    return compare_evaluations(results["reference"], results["port"], load_registry(registry or spec.deviations_path()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tier_eval",
                                     description="Evaluation tier: each side's own evaluation on the same weights and noise; "
                                                 "assignments and metrics must be identical. Exits 1 on FAIL.")
    parser.add_argument("--model", default="dpsom", help="model spec name (default: dpsom)")
    parser.add_argument("--variant", default="dense", help="config variant (default: dense)")
    parser.add_argument("--seed", type=int, default=0, help="PCG64 seed of the weights and the noise (default: 0)")
    parser.add_argument("--dataset", default=None, help="data set name (default: the spec's first one found offline)")
    parser.add_argument("--full", action="store_true", help="the whole evaluation set at the variant's batch size "
                                                               "(default: the reduced run's 2 batches)")
    args = parser.parse_args(argv)
    sections = run(get_spec(args.model), args.variant, seed=args.seed, dataset=args.dataset, full=args.full)
    failed = False
    for name, rows in sections.items():
        print(f"\n== {name}\n{format_table(rows)}")
        failed |= any(r.verdict == "FAIL" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
