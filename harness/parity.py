"""``nox -s parity``: the PyTorch port against the TF reference on the same weights and the same noise.

Quick tier (the default, minutes on a 2-core CPU, offline): for each variant the TF reference is
built with its native initialisation (graph seed 2020), its weights are transplanted into the port,
one real data batch and one ε draw (numpy PCG64) are fed to both, and the harness compares, element
by element, every named forward tensor, every loss term, and every parameter + the optimizer state
after one step of each phase (VAE, SOM-init, joint, in that order, sharing one optimizer): the
gradients of the phase's loss are compared, then the port's optimizer applies the reference's own
gradients, so that the update is checked in isolation from gradient rounding.

Tolerances: the noise floor of a tensor is how far the port in float32 lands from the port in
float64 on the same inputs (what float32 rounding alone does to that computation); a tensor passes
when |TF - torch| <= MULTIPLE x floor. Both numbers are stored with every verdict.
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

from harness.compare import Comparison, compare_all, first_divergence, format_table
from harness.env import fingerprint, seed_all

# |TF32 - torch32| vs |torch32 - torch64|: two float32 computations of the same function each sit
# about one floor away from the exact value, so their distance is up to ~2 floors; reductions over
# thousands of terms in a different order add a few more. 10 leaves room for that and nothing more.
MULTIPLE = 10.0
PHASE_LR = {"vae": 1e-3, "som_init": 0.9, "joint": 1e-3}


def _data_batch(dataset: str | None, batch_size: int) -> tuple[np.ndarray, str]:
    from harness.data import DataNotFoundError, dpsom_splits, load_raw

    names = [dataset] if dataset else ["MNIST", "digits"]
    for name in names:
        try:
            raw = load_raw(name, download=False)
        except DataNotFoundError:
            if dataset:
                raise
            continue
        data = dpsom_splits(raw, validation=False)
        return data.x_train[:batch_size], raw.name
    raise RuntimeError("no dataset available")  # unreachable: 'digits' is embedded


def _floors(a32: dict[str, Any], a64: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(np.max(np.abs(np.asarray(a32[k], np.float64) - np.asarray(a64[k], np.float64)))) if np.size(a32[k]) else 0.0
        for k in a32
        if k in a64 and np.asarray(a32[k]).dtype.kind == "f"
    }


def run_variant(variant: str, seed: int, dataset: str | None, multiple: float = MULTIPLE) -> dict[str, Any]:
    from harness.adapters.dpsom import TFReferenceDPSOM, TorchDPSOM
    from ports.dpsom.config import get_config

    cfg = get_config(variant)
    rng = np.random.Generator(np.random.PCG64(seed))
    x, data_name = _data_batch(dataset, cfg.batch_size)
    eps = rng.standard_normal((cfg.batch_size, cfg.latent_dim)).astype(np.float32)
    q = rng.dirichlet(np.ones(cfg.n_nodes), size=cfg.batch_size)
    p = ((q**2 / q.sum(0)) / (q**2 / q.sum(0)).sum(1, keepdims=True)).astype(np.float32)

    t0 = time.perf_counter()
    ref = TFReferenceDPSOM(cfg)
    weights = ref.get_weights()
    port, port64 = TorchDPSOM(cfg), TorchDPSOM(cfg, "float64")
    port.set_weights(weights)
    port64.set_weights(weights)
    sections: dict[str, list[Comparison]] = {}

    def section(name: str, tf_vals: dict, t32: dict, t64: dict) -> None:
        sections[name] = compare_all(tf_vals, t32, _floors(t32, t64), multiple)

    section("T1 weights (transplant)", weights, port.get_weights(), port.get_weights())
    section("T2 forward", ref.forward(x, eps), port.forward(x, eps), port64.forward(x, eps))
    section("T3 losses", ref.losses(x, eps, p), port.losses(x, eps, p), port64.losses(x, eps, p))
    for phase, loss_name in (("vae", "loss.elbo"), ("som_init", "loss.som_init"), ("joint", "loss.total")):
        pp = p if phase == "joint" else None
        grads = [s.gradients(loss_name, x, eps, p) for s in (ref, port, port64)]
        section(f"T3 gradients of {loss_name}", *grads)
        # The optimizer in isolation: the port applies the gradients the reference's train op itself
        # applied (fetched in the same session.run), so the weights and optimizer state after the
        # step may differ by float32 rounding of the update only (its floor: the float64 port given
        # the same gradients; cancellation in m amplifies it).
        rec = ref.step(phase, x, PHASE_LR[phase], eps, pp, return_gradients=True)
        port_rec = port.apply_gradients(rec["gradients"], PHASE_LR[phase])
        port64.apply_gradients(rec["gradients"], PHASE_LR[phase])
        section(f"T3 step {phase}: lr, global_step", {k: rec[k] for k in port_rec}, port_rec, port_rec)
        section(f"T3 step {phase}: weights", ref.get_weights(), port.get_weights(), port64.get_weights())
        section(f"T3 step {phase}: optimizer", ref.optimizer_state(), port.optimizer_state(), port64.optimizer_state())
    results = [r for rs in sections.values() for r in rs]
    first = first_divergence(results)
    return {
        "model": "dpsom",
        "variant": variant,
        "tier": "quick",
        "data": data_name,
        "seed": seed,
        "multiple": multiple,
        "config": cfg.to_dict(),
        "environment": fingerprint(),
        "seconds": time.perf_counter() - t0,
        "first_divergence": None if first is None else first.to_dict(),
        "sections": {k: [r.to_dict() for r in v] for k, v in sections.items()},
        "verdict": "PASS" if all(r.verdict == "PASS" for r in results) else ("FAIL" if any(r.verdict == "FAIL" for r in results) else "INACCURATE"),
        "_sections": sections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s parity --", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dpsom", choices=["dpsom"])
    parser.add_argument("--variant", action="append", choices=["dense", "conv", "tiny-dense", "tiny-conv"])
    parser.add_argument("--seed", type=int, default=0, help="numpy PCG64 seed for every injected random quantity")
    parser.add_argument("--data", default=None, help="dataset name (default: MNIST if found offline, else the embedded 'digits')")
    parser.add_argument("--out", default="results/parity", help="directory for the JSON reports")
    args = parser.parse_args(argv)
    flags = seed_all(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for variant in args.variant or ["dense", "conv"]:
        report = run_variant(variant, args.seed, args.data)
        sections = report.pop("_sections")
        report["determinism"] = flags
        print(f"\n=== {args.model} / {variant} / quick tier on {report['data']} ({report['seconds']:.1f} s) ===")
        for name, rows in sections.items():
            bad = [r for r in rows if r.verdict != "PASS"]
            worst = max(rows, key=lambda r: (r.max_abs / r.tolerance) if r.tolerance and r.tolerance == r.tolerance else 0.0)
            print(f"{name:36s} {len(rows) - len(bad):3d}/{len(rows):3d} PASS   worst: {worst.name} "
                  f"max_abs {worst.max_abs:.3g} (tol {worst.tolerance:.3g})")
            if bad:
                print(format_table(bad))
        first = report["first_divergence"]
        print(f"verdict: {report['verdict']}" + (f" — first divergence: {first['name']} ({first['verdict']})" if first else ""))
        target = out_dir / f"{args.model}-{variant}-quick.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
        os.replace(tmp, target)
        status |= report["verdict"] == "FAIL"
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
