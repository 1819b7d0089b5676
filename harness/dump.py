"""Run ONE side on its own, dump what it produced, and compare two dumps later (DESIGN.md).

    python -m harness.dump run --side tf --variant dense --out dumps/     # e.g. in a TF-only env
    python -m harness.dump run --side torch --variant dense --out dumps/  # e.g. in a torch-only env
    python -m harness.dump compare dumps/dpsom-dense-tf-seed0.npz dumps/dpsom-dense-torch-seed0.npz

A dump is ``<model>-<variant>-<side>-seed<seed>.npz`` keyed by canonical name (``forward/<tensor>``,
``losses/<term>``, ``gradients/<loss>/<weight>``) plus the side's own noise floor for every entry
(``floor/...``: the float64 twin for the port, the batch split for the reference — the same floors
the live quick tier uses), and a ``.json`` manifest: versions, git commit, determinism flags, seed,
data, config and the config as executed. Both sides draw their inputs with
``harness.tiers.draw`` (the model spec's draws) from the seed, so two dumps made apart see the same weights, ε, p
and batch. ``compare`` judges every entry at ``multiple`` x the larger of the two floors and exits
1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from harness.compare import format_table
from harness.engine import MULTIPLE, first_divergence, floors, judge, split
from harness.spec import ModelSpec, get_spec, models
from harness.tiers import draw, reduction, shapes, values_fn


def sections(spec: ModelSpec) -> tuple[str, ...]:
    return ("forward", "losses", *(f"gradients/{ph.loss}" for ph in spec.phases))


def _key(section: str) -> str:
    return section.split("/", 1)[1] if section.startswith("gradients/") else section


def run(kind: str, variant: str, seed: int, dataset: str | None, out: Path, model: str = "dpsom") -> Path:
    """Dump one side; returns the .npz path (written atomically with its manifest)."""
    from harness.env import fingerprint
    from harness.executed import executed, flat

    if kind not in ("tf", "torch"):
        raise ValueError(f"--side {kind!r}: expected 'tf' or 'torch'")
    spec = get_spec(model)
    cfg = spec.get_config(variant)
    side = spec.make_reference(cfg) if kind == "tf" else spec.make_port(cfg)
    weights, batch, data_name = draw(spec, cfg, seed, dataset, shapes(side))
    side.set_weights(weights)
    twin = None
    if kind == "torch":
        twin = spec.make_port(cfg, "float64")
        twin.set_weights(weights)
    arrays: dict[str, np.ndarray] = {}
    for section in sections(spec):
        key = _key(section)
        values = values_fn(side, key)(batch)
        floor = floors(values, values_fn(twin, key)(batch)) if twin is not None else floors(values, split(values_fn(side, key), batch, reduction(spec, key)))
        for name, value in values.items():
            arrays[f"{section}/{name}"] = np.asarray(value)
            if name in floor:
                arrays[f"floor/{section}/{name}"] = np.asarray(floor[name], np.float64)
    manifest = {
        "model": spec.name, "variant": variant, "side": kind, "seed": seed, "data": data_name,
        "floor": "float64 twin" if kind == "torch" else "batch split",
        "config": spec.config_dict(cfg), "config_as_executed": flat(executed(side, batch, None, kind, spec)),
        "environment": fingerprint(),
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{spec.name}-{variant}-{kind}-seed{seed}"
    tmp = stem.with_name(stem.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    stem.with_suffix(".json").write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, stem.with_suffix(".npz"))
    return stem.with_suffix(".npz")


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    manifest_path = path.with_suffix(".json")
    if not path.exists() or not manifest_path.exists():
        raise FileNotFoundError(f"{path}: a dump is an .npz plus its .json manifest; missing "
                                f"{[str(q) for q in (path, manifest_path) if not q.exists()]}")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(manifest_path.read_text())


def compare(a_path: Path, b_path: Path, multiple: float = MULTIPLE) -> tuple[dict[str, list], int]:
    """Sections of comparisons between two dumps, judged by the engine's ``judge()`` with each dump's
    own floor as one component; the exit status (1 on any FAIL)."""
    (a, ma), (b, mb) = load(a_path), load(b_path)
    same = ("model", "variant", "seed", "data")
    if any(ma[k] != mb[k] for k in same):
        raise ValueError(f"dumps of different runs: {[(k, ma[k], mb[k]) for k in same if ma[k] != mb[k]]}")
    spec = get_spec(ma["model"])
    out = {}
    for section in sections(spec):
        prefix = f"{section}/"
        va = {k[len(prefix):]: v for k, v in a.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
        vb = {k[len(prefix):]: v for k, v in b.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
        parts = {f"{m['side']} ({m['floor']})": {n[len(f"floor/{prefix}"):]: float(v) for n, v in d.items() if n.startswith(f"floor/{prefix}")}
                 for d, m in ((a, ma), (b, mb))}
        out[section] = judge(va, vb, parts, multiple)
    status = int(any(r.verdict in ("FAIL", "STRUCTURAL") for rows in out.values() for r in rows))
    return out, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.dump", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="dump one side")
    r.add_argument("--side", required=True, choices=["tf", "torch"])
    r.add_argument("--model", default="dpsom", choices=sorted(models()))
    r.add_argument("--variant", default="dense")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data", default=None)
    r.add_argument("--out", type=Path, default=Path("dumps"))
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--multiple", type=float, default=MULTIPLE)
    args = parser.parse_args(argv)
    if args.command == "run":
        print(f"written: {run(args.side, args.variant, args.seed, args.data, args.out, args.model)}")
        return 0
    found, status = compare(args.a, args.b, args.multiple)
    for name, rows in found.items():
        bad = [x for x in rows if x.verdict != "PASS"]
        print(f"{name:36s} {len(rows) - len(bad):3d}/{len(rows):3d} PASS")
        if bad:
            print(format_table(bad))
    first = first_divergence(found)
    print("verdict: " + ("PASS" if first is None else f"first divergence {first[1].name} ({first[1].verdict}) in {first[0]}"))
    return status


if __name__ == "__main__":
    sys.exit(main())
