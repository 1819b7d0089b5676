"""Run ONE side on its own, dump what it produced, and compare two dumps later (DESIGN.md).

    python -m harness.dump run --side tf --variant dense --out dumps/     # e.g. in a TF-only env
    python -m harness.dump run --side torch --variant dense --out dumps/  # e.g. in a torch-only env
    python -m harness.dump compare dumps/dpsom-dense-tf-seed0.npz dumps/dpsom-dense-torch-seed0.npz

A dump is ``<model>-<variant>-<side>-seed<seed>.npz`` keyed by canonical name (``forward/<tensor>``,
``losses/<term>``, ``gradients/<loss>/<weight>``) plus the side's own noise floor for every entry
(``floor/...``: the float64 twin for the port, the batch split for the reference — the same floors
the live quick tier uses), and a ``.json`` manifest: versions, git commit, determinism flags, seed,
data, config and the config as executed. Both sides draw their inputs with
``harness.parity.draw_inputs`` from the seed, so two dumps made apart see the same weights, ε, p
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

from harness.compare import compare_all, first_divergence, format_table
from harness.parity import MULTIPLE, PHASE_LOSSES, _floors, _split, _shapes, draw_inputs

SECTIONS = ("forward", "losses", *(f"gradients/{loss}" for _, loss in PHASE_LOSSES))


def _side(kind: str, cfg, dtype: str = "float32"):
    from harness.adapters.dpsom import TFReferenceDPSOM, TorchDPSOM

    return TFReferenceDPSOM(cfg) if kind == "tf" else TorchDPSOM(cfg, dtype)


def _values(side, key: str, x, eps, p) -> dict[str, Any]:
    if key == "forward":
        return side.forward(x, eps)
    if key == "losses":
        return side.losses(x, eps, p)
    return side.gradients(key.split("/", 1)[1], x, eps, p)


def run(kind: str, variant: str, seed: int, dataset: str | None, out: Path) -> Path:
    """Dump one side; returns the .npz path (written atomically with its manifest)."""
    from harness.env import fingerprint
    from harness.executed import executed
    from ports.dpsom.config import get_config

    if kind not in ("tf", "torch"):
        raise ValueError(f"--side {kind!r}: expected 'tf' or 'torch'")
    cfg = get_config(variant)
    side = _side(kind, cfg)
    weights, x, eps, p, data_name = draw_inputs(cfg, seed, dataset, _shapes(side))
    side.set_weights(weights)
    twin = None
    if kind == "torch":
        twin = _side(kind, cfg, "float64")
        twin.set_weights(weights)
    arrays: dict[str, np.ndarray] = {}
    for key in SECTIONS:
        values = _values(side, key, x, eps, p)
        if twin is not None:
            floor = _floors(values, _values(twin, key, x, eps, p))
        else:
            floor = _floors(values, _split(lambda a, b, c: _values(side, key, a, b, c), x, eps, p, per_sample=key == "forward"))
        for name, value in values.items():
            arrays[f"{key}/{name}"] = np.asarray(value)
            if name in floor:
                arrays[f"floor/{key}/{name}"] = np.asarray(floor[name], np.float64)
    manifest = {
        "model": "dpsom", "variant": variant, "side": kind, "seed": seed, "data": data_name,
        "floor": "float64 twin" if kind == "torch" else "batch split",
        "config": cfg.to_dict(), "config_as_executed": executed(side, x, eps, None, kind),
        "environment": fingerprint(),
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"dpsom-{variant}-{kind}-seed{seed}"
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
    """Sections of comparisons between two dumps; the exit status (1 on any FAIL)."""
    (a, ma), (b, mb) = load(a_path), load(b_path)
    same = ("model", "variant", "seed", "data")
    if any(ma[k] != mb[k] for k in same):
        raise ValueError(f"dumps of different runs: {[(k, ma[k], mb[k]) for k in same if ma[k] != mb[k]]}")
    sections = {}
    for key in SECTIONS:
        prefix = f"{key}/"
        va = {k[len(prefix):]: v for k, v in a.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
        vb = {k[len(prefix):]: v for k, v in b.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
        floor = {n: max(float(a.get(f"floor/{key}/{n}", 0.0)), float(b.get(f"floor/{key}/{n}", 0.0))) for n in va}
        sections[key] = compare_all(va, vb, floor, multiple)
    status = int(any(r.verdict == "FAIL" for rows in sections.values() for r in rows))
    return sections, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.dump", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="dump one side")
    r.add_argument("--side", required=True, choices=["tf", "torch"])
    r.add_argument("--variant", default="dense", choices=["dense", "conv", "tiny-dense", "tiny-conv"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data", default=None)
    r.add_argument("--out", type=Path, default=Path("dumps"))
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--multiple", type=float, default=MULTIPLE)
    args = parser.parse_args(argv)
    if args.command == "run":
        print(f"written: {run(args.side, args.variant, args.seed, args.data, args.out)}")
        return 0
    sections, status = compare(args.a, args.b, args.multiple)
    for name, rows in sections.items():
        bad = [x for x in rows if x.verdict != "PASS"]
        print(f"{name:36s} {len(rows) - len(bad):3d}/{len(rows):3d} PASS")
        if bad:
            print(format_table(bad))
    first = first_divergence([x for rows in sections.values() for x in rows])
    print("verdict: " + ("PASS" if first is None else f"first divergence {first.name} ({first.verdict})"))
    return status


if __name__ == "__main__":
    sys.exit(main())
