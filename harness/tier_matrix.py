"""The config matrix: the quick tier (T0–T3) again under every non-default config a model spec declares.

Every shipped variant runs with the default hyper-parameters, so a port that hard-codes a value at
its default (a prior std of 1, a Student-t α of 10, a square SOM grid, an even batch) passes the
quick tier. ``spec.config_matrix(variant)`` lists :class:`harness.spec.ConfigCase` entries (key=value
overrides, applied to both sides through the spec's config, as ``--config`` does); each one gets a
full quick tier (:class:`harness.tiers.QuickTier`: the same draws, floors and verdicts as the
default run).

The report: ``M summary``, one row per config (its verdict, the worst |A - B| / tolerance over all
its rows with that row's numbers, the first divergence, and where the original code itself
misbehaves under these values, what it does and which declared correction both sides run), then
``M <config>: <section>`` with the rows of that config that are not PASS (every row with
``full=True``). A port that raises in any call is a FAIL row named after the call (the quick tier
catches it); a config that cannot be built (e.g. a grid the original cannot run, asked for without
its correction) is a FAIL row named ``config`` with the error, and the other configs still run.

    python -m harness.tier_matrix --model dpsom --variant dense
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from collections.abc import Iterable, Mapping

from harness import engine
from harness.compare import Comparison, format_table
from harness.engine import MULTIPLE
from harness.spec import ConfigCase, ModelSpec, get_spec
from harness.tiers import MakePort, QuickTier, worst_row

SUMMARY = "M summary"


def _fail(name: str, note: str) -> Comparison:
    nan = float("nan")
    return Comparison(name, (), nan, nan, nan, (), nan, nan, nan, "FAIL", note)


def summary_row(case: ConfigCase, report: Mapping[str, Any]) -> Comparison:
    """One row for a config's quick-tier report: the worst row's numbers (ratio to its tolerance),
    the report's verdict, its first divergence and, if the original misbehaves here, what it does."""
    sections: Mapping[str, list[Comparison]] = report["_sections"]
    rows = [(name, r) for name, rs in sections.items() for r in rs]
    judged = [r for _, r in rows if r.verdict not in ("STRUCTURAL", "SKIPPED") and r.max_abs == r.max_abs]
    first = engine.first_divergence(sections)
    if first is None:
        worst = worst_row(judged) if judged else None
        where = next(n for n, r in rows if r is worst) if worst is not None else ""
        note = f"{len(rows)} rows" + (f"; worst {engine.ratio(worst):.3g} x tolerance at {where}: {worst.name}" if worst else "")
    else:
        note = f"{len(rows)} rows; first divergence {first[0]}: {first[1].name} ({first[1].verdict}) {first[1].note}".rstrip()
    if case.original:
        note += f" | original misbehaves here: {case.original}"
    base = first[1] if first is not None else (worst_row(judged) if judged else None)
    if base is None:
        return Comparison(case.label, (), 0.0, 0.0, 0.0, (), 0.0, 0.0, 0.0, report["verdict"], note)
    return Comparison(case.label, base.shape, base.max_abs, base.max_rel, base.mean_abs, base.worst_index, base.floor, base.multiple,
                      base.tolerance, report["verdict"], note)


def run(spec: ModelSpec, variant: str, *, seed: int = 0, dataset: str | None = None, make_port: MakePort | None = None,
        cases: Iterable[ConfigCase] | None = None, full: bool = False, multiple: float = MULTIPLE, registry: dict | None = None,
        tiers: dict[str, QuickTier] | None = None, reports: dict[str, dict] | None = None,
        overrides: Mapping[str, str] | None = None) -> dict[str, list[Comparison]]:
    """The quick tier under each of ``cases`` (default: ``spec.config_matrix(variant)``), judged as
    the default run is; section name -> rows (module docstring). ``make_port(config, dtype)`` builds
    the port (default: the spec's). ``tiers``: a dict that keeps each config's :class:`QuickTier`
    (with its reference values cached) across calls, e.g. to judge several ports cheaply; without
    it every run frees what it held. ``reports``: filled with each config's full report. ``overrides``
    (``--config``): applied under every case (a case's own values win)."""
    cases = tuple(spec.config_matrix(variant) if cases is None else cases)
    sections: dict[str, list[Comparison]] = {SUMMARY: []}
    for case in cases:
        label = case.label
        tier = None if tiers is None else tiers.get(label)
        if tier is None:
            try:
                tier = QuickTier(spec, variant, seed, dataset, multiple=multiple, registry=registry, overrides={**(overrides or {}), **case.overrides},
                                 cache=tiers is not None)
            except Exception as err:  # noqa: BLE001 -- a config that cannot be built is a FAIL row; the others still run
                sections[SUMMARY].append(_fail(label, f"config: {type(err).__name__}: {err}"))
                sections[f"M {label}: config"] = [_fail("config", f"{type(err).__name__}: {err}")]
                continue
            if tiers is not None:
                tiers[label] = tier
        report = tier.run(make_port)
        if reports is not None:
            reports[label] = report
        sections[SUMMARY].append(summary_row(case, report))
        for name, rows in report["_sections"].items():
            keep = list(rows) if full else [r for r in rows if r.verdict not in ("PASS", "SKIPPED")]
            if keep:
                sections[f"M {label}: {name}"] = keep
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.tier_matrix",
        description="The config matrix: the quick tier (T0-T3) on both sides under every non-default config the model spec "
                    "declares (spec.config_matrix): one summary row per config, then the rows that are not PASS. "
                    "Exits 1 when any config FAILs (or is STRUCTURAL).")
    parser.add_argument("--model", default="dpsom", help="model spec name (harness/models/<name>.py); default dpsom")
    parser.add_argument("--variant", default="dense", help="the variant whose matrix runs; default dense")
    parser.add_argument("--seed", type=int, default=0, help="the harness's PCG64 seed (weights and batch draws); default 0")
    parser.add_argument("--data", default=None, help="data set name (default: the spec's, e.g. MNIST if found offline, else digits)")
    parser.add_argument("--case", action="append", default=None, metavar="LABEL",
                        help="run only the config with this label (as the summary prints it, e.g. 'prior_var=2'); repeatable")
    parser.add_argument("--full", action="store_true", help="print every row of every config, not only those that are not PASS")
    parser.add_argument("--list", action="store_true", help="list the declared configs (label, why, the original's behaviour) and exit")
    args = parser.parse_args(argv)
    spec = get_spec(args.model)
    if args.variant not in spec.variants:
        parser.error(f"unknown variant {args.variant!r} of {args.model}; known: {', '.join(spec.variants)}")
    cases = spec.config_matrix(args.variant)
    if args.list:
        for case in cases:
            print(f"{case.label}: {case.why}" + (f"\n    original misbehaves here: {case.original}" if case.original else ""))
        return 0
    if args.case:
        unknown = sorted(set(args.case) - {c.label for c in cases})
        if unknown:
            parser.error(f"--case {unknown}: not in the {args.model}/{args.variant} matrix; declared: {[c.label for c in cases]}")
        cases = tuple(c for c in cases if c.label in args.case)
    if not cases:
        print(f"{args.model}/{args.variant}: no config matrix declared")
        return 0
    sections = run(spec, args.variant, seed=args.seed, dataset=args.data, cases=cases, full=args.full)
    for name, rows in sections.items():
        print(f"\n== {name}\n{format_table(rows)}")
    verdict = engine.worst(r.verdict for r in sections[SUMMARY])  # each row: its config's report verdict
    print(f"\nconfig matrix {args.model}/{args.variant}: {len(cases)} configs, verdict {verdict}")
    return int(verdict in ("FAIL", "STRUCTURAL"))


if __name__ == "__main__":
    sys.exit(main())
