"""Diff two parity reports (JSON) row by row: what changed in verdicts, differences and tolerances.

    python -m harness.report_diff OLD.json NEW.json [--rtol 0]

For a refactor of the engine (or a new environment) this shows whether the same run judges the same:
sections present on one side only, rows whose verdict changed, and rows whose max_abs or tolerance
moved by more than ``--rtol`` (relative). Exit 1 when any verdict changed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(section, r["name"]): r for section, rows in report["sections"].items() for r in rows}


def _moved(a: float, b: float, rtol: float) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a) and isinstance(b, float) and math.isnan(b)):
        return False
    return abs(a - b) > rtol * max(abs(a), abs(b))


def diff(old: dict, new: dict, rtol: float = 0.0) -> dict[str, list]:
    a, b = _rows(old), _rows(new)
    return {
        "sections only in old": sorted(set(old["sections"]) - set(new["sections"])),
        "sections only in new": sorted(set(new["sections"]) - set(old["sections"])),
        "rows only in old": sorted(f"{s}: {n}" for s, n in set(a) - set(b) if s in new["sections"]),
        "rows only in new": sorted(f"{s}: {n}" for s, n in set(b) - set(a) if s in old["sections"]),
        "verdict changed": [f"{s}: {n} {a[s, n]['verdict']} -> {b[s, n]['verdict']}" for s, n in a if (s, n) in b
                            and a[s, n]["verdict"] != b[s, n]["verdict"]],
        "max_abs or tolerance moved": [f"{s}: {n} max_abs {a[s, n]['max_abs']:.6g} -> {b[s, n]['max_abs']:.6g}, "
                                       f"tol {a[s, n]['tolerance']:.6g} -> {b[s, n]['tolerance']:.6g}"
                                       for s, n in a if (s, n) in b and (_moved(a[s, n]["max_abs"], b[s, n]["max_abs"], rtol)
                                                                         or _moved(a[s, n]["tolerance"], b[s, n]["tolerance"], rtol))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report_diff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0, help="relative change of max_abs / tolerance still counted as equal")
    args = parser.parse_args(argv)
    old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    found = diff(old, new, args.rtol)
    print(f"{args.old} -> {args.new}: verdict {old['verdict']} -> {new['verdict']}")
    for what, items in found.items():
        print(f"  {what}: {len(items)}")
        for item in items:
            print(f"    {item}")
    return int(bool(found["verdict changed"]) or old["verdict"] != new["verdict"])


if __name__ == "__main__":
    sys.exit(main())
