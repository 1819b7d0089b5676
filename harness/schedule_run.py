"""A whole training schedule of both sides, each with its OWN loop, from the same injected randomness,
to the final metrics: ``python -m harness.schedule_run --model dekm --variant conv --schedule reduced``.

Both sides start from the same initial weights (``spec.draw_weights`` from the run's PCG64 stream) and
take every random quantity of the schedule from that stream too (``spec.schedule_data``: for DEKM the
pretraining epochs' windowed-shuffle orders and each refit's k-means++ seeds), then run their own
``fit_records`` over the named schedule (``spec.schedules``: ``original`` = the config as executed, or
a reduced one sized for a CPU). Stored per side: the final metrics the side's own evaluation reports
(the last record's), the number of steps, how the loop ended, the wall time, and the per-step loss and
structure trajectory; the predictions as .npz beside the JSON. Both sides are compared on the
assignments (ARI of TF vs torch labels) and metric by metric.

A run is written atomically under ``--out`` (default ``runs/schedule``; ``results/schedule`` only with
``--store``) and a finished side is not recomputed: rerunning resumes at the side that is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.env import fingerprint
from harness.spec import ModelSpec, get_spec

STORED = Path(__file__).resolve().parent.parent / "results" / "schedule"
SIDES = ("reference", "port")


def _atomic_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


def run_side(spec: ModelSpec, cfg: Any, label: str, weights: dict, data: dict, make_port=None) -> dict[str, Any]:
    """One side's own loop over the whole schedule; its records, final metrics and wall time."""
    side = spec.make_reference(cfg) if label == "reference" else (make_port or spec.make_port)(cfg, "float32")
    side.set_weights(weights)
    t0 = time.perf_counter()
    records = side.fit_records(data)
    seconds = time.perf_counter() - t0
    getattr(side, "close", lambda: None)()
    last = records[-1]
    steps = [r for r in records if r["phase"] != "stop"]
    return {"seconds": seconds, "steps": len(steps), "end": last.get("epoch"),
            "metrics": {k: float(v) for k, v in last.items() if k in ("acc", "nmi") and v is not None},
            "labels": np.asarray(last.get("labels")) if last.get("labels") is not None else None,
            "trajectory": [{k: v for k, v in r.items() if k not in ("p", "labels", "lr_feed", "p_step")} for r in steps]}


def run(spec: ModelSpec, variant: str, schedule: str, *, seed: int = 0, dataset: str | None = None, out: Path = Path("runs/schedule"),
        make_port=None, sides: tuple[str, ...] = SIDES) -> dict[str, Any] | None:
    """Both sides (or only ``sides``: e.g. one per process, in parallel) and, once both are done, the
    comparison document (None until then)."""
    from sklearn.metrics import adjusted_rand_score

    cfg = spec.get_config(variant)
    cfg = spec.replace_config(cfg, spec.schedules(cfg)[schedule])
    rng = np.random.Generator(np.random.PCG64(seed))
    data, data_name = spec.schedule_data(cfg, dataset, rng)
    shapes = {k: v.shape for k, v in spec.make_port(cfg).get_weights().items()}
    weights = spec.draw_weights(shapes, np.random.Generator(np.random.PCG64([seed, 2])))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{spec.name}-{variant}-{schedule}-{data_name}-seed{seed}"
    result: dict[str, Any] = {}
    for label in SIDES:
        part = out / f"{stem}.{label}.json"
        if label not in sides and not part.exists():
            continue
        if part.exists():  # resume: a finished side is not recomputed
            result[label] = json.loads(part.read_text())
            with np.load(out / f"{stem}.{label}.npz") as f:
                result[label]["labels"] = f["labels"]
            continue
        print(f"{stem}: {label} ...", file=sys.stderr, flush=True)
        res = run_side(spec, cfg, label, weights, data, make_port)
        np.savez_compressed(out / f"{stem}.{label}.npz", labels=res["labels"])
        _atomic_json(part, {k: v for k, v in res.items() if k != "labels"})
        result[label] = res
    if set(result) != set(SIDES):
        return None
    a, b = result["reference"], result["port"]
    doc = {"model": spec.name, "variant": variant, "schedule": schedule, "data": data_name, "seed": seed,
           "config": spec.config_dict(cfg), "environment": fingerprint(),
           "sides": {k: {kk: vv for kk, vv in result[k].items() if kk not in ("labels", "trajectory")} for k in SIDES},
           "agreement": {"ari_tf_vs_torch": float(adjusted_rand_score(a["labels"], b["labels"])),
                         "labels_identical": bool(np.array_equal(a["labels"], b["labels"])),
                         "same_steps": a["steps"] == b["steps"], "end": [a["end"], b["end"]]}}
    _atomic_json(out / f"{stem}.json", doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.schedule_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dekm")
    parser.add_argument("--variant", default="conv")
    parser.add_argument("--schedule", default="reduced", help="a schedule of the spec (spec.schedules): original, reduced ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="data set (default: MNIST offline, else the embedded digits)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/schedule)")
    parser.add_argument("--store", action="store_true", help="write into results/schedule")
    parser.add_argument("--side", choices=SIDES, default=None, help="run this side only (the comparison is written once both exist)")
    args = parser.parse_args(argv)
    out = STORED if args.store else (args.out or Path("runs/schedule"))
    doc = run(get_spec(args.model), args.variant, args.schedule, seed=args.seed, dataset=args.data, out=out,
              sides=(args.side,) if args.side else SIDES)
    if doc is None:
        print(f"{args.side} done; the comparison is written when the other side is")
        return 0
    for k in SIDES:
        s = doc["sides"][k]
        print(f"{k:9s} {s['metrics']}  {s['steps']} steps, {s['end']}, {s['seconds']:.0f} s")
    print(f"agreement: {doc['agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
