"""``nox -s parity``: a port against its model's TF reference on the same weights and the same noise.

    nox -s parity                                   # every model's default variants: quick tier (T0-T3), data (D), initialisers (I)
    nox -s parity -- --model dpsom --variant dense --tier 4 --steps 100
    nox -s parity -- --config prior_var=2           # a config override, applied to BOTH sides
    nox -s parity -- --port bn_mode=batch_stats     # a port-only override: a declared deviation
    nox -s parity -- --port-adapter pkg.module:factory [--deviations my.csv]   # your own port
    nox -s parity -- --variant dense --tier quick --original-checkpoint PATH     # a checkpoint the original code wrote

The engine knows a model only through its spec (harness/models/<model>.py) and the two side
protocols (harness/protocols.py); see harness/tiers.py for what each tier compares and
harness/engine.py for how tolerances are set. Reports go to ``--out`` (default ``runs/parity``)
under a name holding model, variant, data, seed and every override or adapter; the stored results
in results/parity are rewritten only with ``--update-stored`` (faithful port, defaults only).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from harness import engine
from harness.compare import format_table
from harness.env import seed_all
from harness.memory import return_freed_blocks
from harness.spec import ModelSpec, get_spec, models
from harness.tiers import INITS, QuickTier, split_by_tier, worst_row

STORED = Path("results/parity")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (what ``/usr/bin/time -v`` reports), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_factory(target: str, option: str = "--port-adapter"):
    """``pkg.module:factory`` -> the callable ``factory(config, dtype) -> PortSide``; a ValueError
    naming ``option`` (where the target came from) when it is malformed or cannot be imported."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{option} {target!r}: expected 'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option} {target!r}: cannot import {module_name!r} ({err})") from None
    if not hasattr(module, attr):
        raise ValueError(f"{option} {target!r}: {module_name} has no {attr!r}")
    return getattr(module, attr)


def run_name(model: str, variant: str, data: str, seed: int, config: dict, port: dict, adapter: str | None) -> str:
    """The file stem of a run: everything that makes it differ from another run."""
    parts = [model, variant, data, f"seed{seed}"]
    parts += [f"{k}={v}" for k, v in sorted(config.items())]
    parts += [f"port.{k}={v}" for k, v in sorted(port.items())]
    if adapter:
        parts.append("adapter=" + adapter.replace(":", "."))
    return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)


def _write(report: dict, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))  # insertion order = tier order
    os.replace(tmp, target)


def _tree(rows: list, first) -> str:
    """One section's tensors as the model's tree (encoder / posterior / decoder / som ...), the first
    divergence marked like a failing assert."""
    lines, last_group = [], None
    for r in rows:
        group, _, leaf = r.name.partition(".")
        if group != last_group:
            lines.append(f"  {group}")
            last_group = group
        mark = ">>" if r is first else ("  " if r.verdict == "PASS" else " !")
        lines.append(f"  {mark}  {leaf or group:24s} {r.verdict:10s} max_abs {r.max_abs:.3g} / tol {r.tolerance:.3g}")
    return "\n".join(lines)


def print_sections(sections: dict) -> None:
    """One line per section (PASS count, worst row), the rows that did not pass as a table."""
    width = max([52, *map(len, sections)])
    for name, rows in sections.items():
        bad = [r for r in rows if r.verdict != "PASS"]
        w = worst_row(rows)
        print(f"{name:{width}s} {len(rows) - len(bad):3d}/{len(rows):3d} PASS   worst: {w.name} max_abs {w.max_abs:.3g} (tol {w.tolerance:.3g})")
        if bad:
            print(format_table(bad))


def print_report(report: dict, sections: dict, batchnorm=None) -> None:
    """The console view of a quick-tier report: one line per section, non-PASS rows as a table, the
    first divergence in the model's tree."""
    from harness.bn_detector import format_table as bn_table

    per_tier = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds_per_tier"].items())
    print(f"\n=== {report['model']} / {report['variant']} / quick tier (T0-T3) on {report['data']} "
          f"({report['seconds']:.1f} s: {per_tier}) ===")
    ckpt = report.get("t1_checkpoint") or {}
    if ckpt.get("prefix"):
        print(f"T1 checkpoint written by the original code: {ckpt['prefix']} (" + ", ".join(f"{k} sha256 {v}" for k, v in ckpt["sha256"].items())
              + f"); {ckpt['ignored_variables']} variables besides the weights ignored (optimizer slots, global_step ...)")
    else:
        print("T1 checkpoint: written by the reference's Saver under the original names (--original-checkpoint PATH: one the original code wrote)")
    print_sections(sections)
    first = engine.first_divergence(sections)
    if first is not None:
        print(f"model tree ({first[0]}):\n" + _tree(sections[first[0]], first[1]))
    print(f"verdict: {report['verdict']}" + (f" — first divergence: {first[1].name} in {first[0]} ({first[1].verdict}) {first[1].note}"
                                            if first else ""))
    if batchnorm is not None:
        print("\nBatchNorm behaviour, measured on both sides (harness.bn_detector):\n" + bn_table(batchnorm))


def _quick(args, spec: ModelSpec, variant: str, out_dir: Path, stem, flags: dict, make_port) -> int:
    from harness.executed import load_registry
    from harness.transplant import TransplantError

    registry = load_registry(args.deviations) if args.deviations else None
    return_freed_blocks()  # freed tensors go back to the OS at once: the run's peak is what it holds, not what it held
    try:
        tier = QuickTier(spec, variant, args.seed, args.data, init=args.init, registry=registry, overrides=args.config_overrides, cache=False,
                         progress=True, original_checkpoint=args.original_checkpoint)
    except TransplantError as err:  # the checkpoint does not fit this variant: one message, nothing loaded, no run
        raise SystemExit(f"--original-checkpoint ({spec.name} / {variant}): {err}") from None
    if tier.original is not None:  # its reports apart from the default run's
        stem = lambda data, base=stem, name=Path(tier.original.prefix).name: f"{base(data)}-original_ckpt={name}"  # noqa: E731
    report = tier.run(make_port)
    sections = report.pop("_sections")
    report.update(port_overrides=args.port_overrides, config_overrides=args.config_overrides, port_adapter=args.port_adapter,
                  determinism=flags, peak_rss_mb=peak_rss_mb())
    print_report(report, sections, tier.batchnorm)
    print(f"peak RSS so far: {report['peak_rss_mb']:.0f} MiB")
    name = stem(report["data"])
    for t, part in split_by_tier(report).items():
        _write(part, out_dir / f"{name}-{t}.json")
    print(f"written: {out_dir}/{name}-T[0-3].json")
    return int(report["verdict"] in ("FAIL", "STRUCTURAL"))


def _t4(args, spec: ModelSpec, variant: str, out_dir: Path, stem, flags: dict, make_port) -> int:
    from harness.training_parity import figure, run

    report = run(spec, variant, args.steps, args.seed, args.data, epoch_steps=args.epoch_steps, init=args.init,
                 synced=not args.no_sync, overrides=args.config_overrides, make_port=make_port)
    report.update(determinism=flags, peak_rss_mb=peak_rss_mb(), port_overrides=args.port_overrides, port_adapter=args.port_adapter)
    stem_path = out_dir / f"{stem(report['data'])}-T4-{args.steps}steps"
    figure(report, stem_path.with_suffix(".png"))
    _write(report, stem_path.with_suffix(".json"))
    g = report["growth"]
    print(f"\n=== {spec.name} / {variant} / T4: {args.steps} steps on {report['data']} ({report['seconds']:.1f} s) ===")
    print("at the last step: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in g.items()))
    ex = report["first_exit"]
    print("free-running: " + ("inside the band at every step" if ex is None else
                              f"leaves the band at step {ex['step']} ({ex['phase']}) on {ex['quantity']}: {ex['value']:.3g} > band {ex['band']:.3g}"))
    synced = report["synced"]
    if synced is not None:
        worst = {k: max(st["worst_ratio"][k] for st in synced["steps"]) for k in synced["steps"][0]["worst_ratio"]}
        f = synced["first_divergence"]
        print("synced (each step from the reference's state): worst diff / tol over all steps: "
              + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
        if f is not None:
            print(f"  first synced divergence: step {f['step']} ({f['phase']}) {f['section']}: {f['name']} {f['verdict']} "
                  f"max_abs {f['max_abs']:.3g} / tol {f['tolerance']:.3g} {f['note']}".rstrip())
    print(f"verdict: {report['verdict']}")
    print(f"written: {stem_path.with_suffix('.json')}, {stem_path.with_suffix('.png')}")
    return int(report["verdict"] in ("DIVERGED", "FAIL"))


# The tiers around one step (issue: each side's own pipeline), each a module with ``run(spec, variant, *, seed,
# dataset, make_port, overrides) -> {section: rows}``; the letter names the report file.
PIPELINE: dict[str, tuple[str, str]] = {
    "D": ("harness.tier_data", "data: each side's own data path on the raw data, bit for bit and against the original's rule"),
    "I": ("harness.tier_init", "initialisers: each side's own, drawn many times, against the distributions the original defines"),
    "E": ("harness.tier_eval", "evaluation: each side's own cluster assignment and metrics on the same weights and noise"),
    "L": ("harness.tier_ownloop", "own loop: each side's own training loop on a reduced schedule, compared step by step"),
    "M": ("harness.tier_matrix", "config matrix: the quick tier again under the spec's non-default configs"),
}
# the laptop job (< 4 GiB, minutes). By name: E (conv: its reference evaluates in a second session, as the
# original does: 3.7 GiB alone, 4.2 GiB after the quick tier), L (conv: 4.3 GB), M (the quick tier once per config)
DEFAULT_TIERS = ("quick", "D", "I")


def parse_tiers(value: str) -> tuple[str, ...]:
    """``--tier``: comma-separated tier names, ``all`` for every one."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    known = ("quick", "4", *PIPELINE)
    if "all" in names:
        return known
    bad = [t for t in names if t not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: unknown tier {bad}; known: {', '.join(known)}, all")
    return tuple(names)


def _pipeline(args, spec: ModelSpec, variant: str, out_dir: Path, stem, flags: dict, make_port, letter: str) -> int:
    """One tier of :data:`PIPELINE` on ``variant``: printed section by section, written as ``<stem>-<letter>.json``."""
    from harness.env import fingerprint
    from harness.data import offline_raw

    module = importlib.import_module(PIPELINE[letter][0])
    t0 = time.perf_counter()
    print(f"\n=== {spec.name} / {variant} / tier {letter} ({PIPELINE[letter][1]}) ===", flush=True)
    sections = module.run(spec, variant, seed=args.seed, dataset=args.data, make_port=make_port, overrides=args.config_overrides)
    first = engine.first_divergence(sections)
    report = {
        "model": spec.name, "variant": variant, "tier": letter, "data": offline_raw(args.data).name, "seed": args.seed,
        "config": spec.config_dict(spec.get_config(variant, args.config_overrides)), "environment": fingerprint(),
        "seconds": time.perf_counter() - t0,
        "first_divergence": None if first is None else {"section": first[0], **first[1].to_dict()},
        "verdict": engine.verdict(sections),
        "sections": {k: [r.to_dict() for r in v] for k, v in sections.items()},
        "port_overrides": args.port_overrides, "config_overrides": args.config_overrides, "port_adapter": args.port_adapter,
        "determinism": flags, "peak_rss_mb": peak_rss_mb(),
    }
    print_sections(sections)
    print(f"verdict: {report['verdict']}" + (f" — first divergence: {first[1].name} in {first[0]} ({first[1].verdict}) {first[1].note}"
                                            if first else "") + f" ({report['seconds']:.0f} s)")
    target = out_dir / f"{stem(report['data'])}-{letter}.json"
    _write(report, target)
    print(f"written: {target}")
    return int(report["verdict"] in ("FAIL", "STRUCTURAL"))


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} {item!r}: not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    known = models()
    parser = argparse.ArgumentParser(prog="nox -s parity --", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=sorted(known), help="model (repeatable; default: every registered model)")
    parser.add_argument("--variant", action="append", help="variant of the model (repeatable; default: the model's default variants)")
    parser.add_argument("--tier", default=",".join(DEFAULT_TIERS), type=parse_tiers, metavar="TIER[,TIER...]",
                        help="quick = T0-T3 + BatchNorm detector; 4 = N-step training; "
                             + "; ".join(f"{k} = {v[1]}" for k, v in PIPELINE.items())
                             + f"; all = every tier (default: {','.join(DEFAULT_TIERS)})")
    parser.add_argument("--steps", type=int, default=50, help="T4: training steps through the phases")
    parser.add_argument("--no-sync", action="store_true", help="T4: skip the synced per-step check (free-running trajectories only)")
    parser.add_argument("--epoch-steps", type=int, default=10, help="T4: steps per epoch")
    parser.add_argument("--seed", type=int, default=0, help="numpy PCG64 seed for every injected random quantity")
    parser.add_argument("--config", action="append", metavar="KEY=VALUE", help="config override applied to BOTH sides")
    parser.add_argument("--port", action="append", metavar="KEY=VALUE",
                        help="config override of the port only (a declared deviation, e.g. bn_mode=batch_stats)")
    parser.add_argument("--port-adapter", metavar="PKG.MODULE:FACTORY", help="your own port: factory(config, dtype) -> PortSide")
    parser.add_argument("--deviations", metavar="CSV", help="deviation registry of the port (default: the model's own)")
    parser.add_argument("--init", default="pcg64", choices=INITS, help="initial weights: drawn by the harness from the seed (default) or the reference's native init")
    parser.add_argument("--original-checkpoint", metavar="PATH",
                        help="quick tier, T1: a TF checkpoint written by the ORIGINAL code (its prefix, one of its files, or its folder; "
                             "README: 'Loading a checkpoint written by the original code'), loaded into both sides and their forward "
                             "outputs from it compared; optimizer slots and global_step are ignored")
    parser.add_argument("--data", default=None, help="dataset name (default: MNIST if found offline, else the embedded 'digits')")
    parser.add_argument("--out", default="runs/parity", help="directory for the reports (default runs/parity)")
    parser.add_argument("--update-stored", action="store_true", help="write the faithful default run over the stored results/parity reports")
    args = parser.parse_args(argv)
    args.config_overrides = parse_pairs(args.config, "--config")
    args.port_overrides = parse_pairs(args.port, "--port")
    flags = seed_all(args.seed)
    if args.update_stored and (args.config_overrides or args.port_overrides or args.port_adapter or args.deviations or args.init != "pcg64"
                               or args.original_checkpoint):
        raise SystemExit("--update-stored: the stored results are the faithful port's default run; "
                         "drop --config/--port/--port-adapter/--deviations/--init/--original-checkpoint")
    if args.original_checkpoint and "quick" not in args.tier:
        raise SystemExit("--original-checkpoint is loaded by the quick tier: add quick to --tier")
    status, t0 = 0, time.perf_counter()
    for model in args.model or sorted(known):
        spec = known[model]
        bad = [v for v in args.variant or [] if v not in spec.variants]
        if bad:
            raise SystemExit(f"--variant {bad}: not a variant of {model}; known: {list(spec.variants)}")
        try:
            make_port = load_factory(args.port_adapter) if args.port_adapter else None
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if args.port_overrides:
            base = make_port or (lambda c, dtype, spec=spec: spec.make_port(c, dtype))
            make_port = lambda c, dtype, base=base, spec=spec: base(spec.replace_config(c, args.port_overrides), dtype)  # noqa: E731
        for variant in args.variant or spec.default_variants:
            def stem(data: str, model=model, variant=variant) -> str:
                if args.update_stored:
                    return f"{model}-{variant}"
                return run_name(model, variant, data, args.seed, args.config_overrides, args.port_overrides, args.port_adapter)

            out_dir = STORED if args.update_stored else Path(args.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            if "quick" in args.tier:
                status |= _quick(args, spec, variant, out_dir, stem, flags, make_port)
            for letter in (t for t in PIPELINE if t in args.tier):
                status |= _pipeline(args, spec, variant, out_dir, stem, flags, make_port, letter)
            if "4" in args.tier:
                status |= _t4(args, spec, variant, out_dir, stem, flags, make_port)
    print(f"\nparity job: {time.perf_counter() - t0:.0f} s wall, peak RSS {peak_rss_mb():.0f} MiB, exit {status}")
    return int(status)


def run_variant(variant: str, seed: int = 0, dataset: str | None = None, model: str = "dpsom", **kwargs: Any) -> dict[str, Any]:
    """The quick tier of a model's own port for one variant (tests, notebooks)."""
    return QuickTier(get_spec(model), variant, seed, dataset, **kwargs).run()


if __name__ == "__main__":
    sys.exit(main())
