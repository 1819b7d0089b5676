"""Seconds-long pre-flight of a port adapter, before the long tiers; no TensorFlow needed.

    python -m harness.check_port pkg.module:factory [--model dpsom] [--variant tiny-dense] [--data digits] [--seed 0]

``factory(config, dtype) -> PortSide`` is what ``nox -s parity -- --port-adapter`` takes. The port
is built in float32 and float64 and checked against what the tiers will ask of it: the
:class:`harness.protocols.PortSide` protocol, its canonical weight names against the model's
mapping table (``harness/tables/<model>_<kind>.csv``; names it declares ``absent`` are listed: the
tiers report them STRUCTURAL), its shapes against the weights the harness will draw (shapes from
the suite's own port, which is what the reference holds: no TensorFlow), a bit-exact
``set_weights`` / ``get_weights`` round trip, forward tensor names and shapes against the suite's
own port, float32 vs float64 forward within float32 rounding (relative ``FORWARD_RTOL`` of each
tensor's scale), loss names, and two identical runs (forward, losses, every phase's gradients; in
this process's torch settings: a fresh one has deterministic algorithms off, as a user's own run). One line per check; exit code 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np

FORWARD_RTOL = 1e-5  # float32 vs float64 copy of one forward pass, relative to each tensor's max |value|


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    note: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name:22s} {self.note}"


def _names(names: Any, limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit})" if len(names) > limit else "")


def _float(d: dict) -> dict:
    return {k: np.asarray(v) for k, v in d.items() if np.asarray(v).dtype.kind == "f"}


def run(factory: Callable[[Any, str], Any], model: str = "dpsom", variant: str = "tiny-dense", data: str | None = "digits",
        seed: int = 0, out: Callable[[str], None] = print) -> list[Check]:
    """Every check on ``factory``'s port, each printed through ``out`` as it is made."""
    from harness.protocols import PortSide, methods
    from harness.spec import get_spec
    from harness.transplant import load_table

    spec = get_spec(model)
    cfg = spec.get_config(variant)
    checks: list[Check] = []

    def record(name: str, ok: bool, note: str) -> bool:
        checks.append(Check(name, ok, note))
        out(checks[-1].line())
        return ok

    def attempt(name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        try:
            ok, note = fn()
        except Exception as err:  # noqa: BLE001 -- any exception is this check's FAIL
            ok, note = False, f"{type(err).__name__}: {err}"
        return record(name, ok, note)

    t0 = time.perf_counter()
    try:
        port, port64 = factory(cfg, "float32"), factory(cfg, "float64")
    except Exception as err:  # noqa: BLE001
        record("build", False, f"factory(config, dtype) raised {type(err).__name__}: {err}")
        return checks
    record("build", True, f"float32 and float64 copies of {type(port).__name__} ({time.perf_counter() - t0:.1f} s)")

    def protocol() -> tuple[bool, str]:
        members = [*methods(PortSide), *(a for k in PortSide.__mro__ if getattr(k, "_is_protocol", False)
                                         for a in getattr(k, "__annotations__", {}))]
        missing = sorted({m for p in (port, port64) for m in members if not hasattr(p, m)})
        ok = isinstance(port, PortSide) and isinstance(port64, PortSide) and not missing
        return ok, "isinstance(port, PortSide)" if ok else f"missing: {_names(missing)}"

    attempt("protocol PortSide", protocol)

    own = spec.make_port(cfg, "float32")  # the suite's own port: the reference's names and shapes, without TF
    ref_shapes = {k: tuple(np.shape(v)) for k, v in own.get_weights().items()}
    table = [r.canonical for r in load_table(spec.table_path(cfg))]
    absent = frozenset(getattr(port, "absent", ()))
    state: dict[str, Any] = {}

    def keys() -> tuple[bool, str]:
        theirs = state["weights"] = port.get_weights()
        missing = [k for k in table if k not in theirs and k not in absent]
        extra = [k for k in theirs if k not in table]
        partial = [k for k in table if k in absent]
        note = f"{len(table) - len(missing) - len(partial)} of {len(table)} names of {spec.table_path(cfg).name} mapped"
        note += f"; missing: {_names(missing)}" if missing else ""
        note += f"; extra (not in the table): {_names(extra)}" if extra else ""
        note += f"; absent (partial mapping, reported STRUCTURAL): {_names(partial)}" if partial else ""
        return not missing and not extra, note

    attempt("canonical keys", keys)

    weights = spec.draw_weights(ref_shapes, np.random.Generator(np.random.PCG64(seed)))

    def shapes() -> tuple[bool, str]:
        theirs = state["weights"]
        bad = [f"{k} {tuple(np.shape(theirs[k]))} (harness draws {ref_shapes[k]})" for k in theirs
               if k in ref_shapes and tuple(np.shape(theirs[k])) != ref_shapes[k]]
        common = [k for k in theirs if k in ref_shapes]
        return not bad, f"{len(common)} weights as the harness draws them" if not bad else "; ".join(bad)

    attempt("shapes", shapes)

    def round_trip() -> tuple[bool, str]:
        for p in (port, port64):
            p.set_weights(weights)
        bad = []
        for p, dtype in ((port, np.float32), (port64, np.float64)):
            back = p.get_weights()
            for k, v in back.items():
                if k in weights and not (np.asarray(v).shape == weights[k].shape and np.array_equal(np.asarray(v, dtype), weights[k].astype(dtype))):
                    bad.append(f"{k} ({p.dtype})")
            if p is port:
                bad += [f"{k} (dtype {np.asarray(v).dtype})" for k, v in back.items() if np.asarray(v).dtype != np.float32]
        return not bad, f"{len(weights)} weights set, {len(back)} read back bit-exact" if not bad else f"differ: {_names(bad)}"

    if not attempt("set/get_weights", round_trip):
        return checks  # the checks below need the weights in place

    x, data_name = spec.load_data(cfg, data, cfg.batch_size)
    batch = spec.draw_inputs(cfg, np.random.Generator(np.random.PCG64([seed, 1])), x)
    own.set_weights(weights)
    expected = own.forward(batch)

    def forward() -> tuple[bool, str]:
        got = state["f32"] = port.forward(batch)
        missing = [k for k in expected if k not in got and k not in absent]
        extra = [k for k in got if k not in expected]
        bad = [f"{k} {np.shape(got[k])} (expected {np.shape(expected[k])})" for k in got if k in expected and np.shape(got[k]) != np.shape(expected[k])]
        note = f"{len(got)} of {len(expected)} tensors on {data_name}"
        note += f"; missing: {_names(missing)}" if missing else ""
        note += f"; extra (the engine fails them): {_names(extra)}" if extra else ""
        note += f"; shapes: {'; '.join(bad)}" if bad else ""
        note += f"; absent: {_names(set(expected) & absent)}" if set(expected) & absent else ""
        return not (missing or extra or bad), note

    attempt("forward names", forward)

    def float64() -> tuple[bool, str]:
        a32, a64 = state["f32"], port64.forward(batch)
        worst, bad = (0.0, ""), []
        for k, v in a32.items():
            v, w = np.asarray(v), np.asarray(a64[k])
            if v.dtype.kind != "f":
                if not np.array_equal(v, w):
                    bad.append(f"{k} (integers differ)")
                continue
            scale = max(float(np.max(np.abs(w), initial=0.0)), np.finfo(np.float32).tiny)
            rel = float(np.max(np.abs(v.astype(np.float64) - w.astype(np.float64)), initial=0.0)) / scale
            worst = max(worst, (rel, k))
            if not rel <= FORWARD_RTOL:
                bad.append(f"{k} ({rel:.2g})")
        note = f"worst {worst[1]} {worst[0]:.2g} relative (limit {FORWARD_RTOL:g})"
        return not bad, note if not bad else f"beyond {FORWARD_RTOL:g} relative: {_names(bad)} (un-injected randomness or a dtype-dependent path?)"

    attempt("float64 vs float32", float64)

    def losses() -> tuple[bool, str]:
        got, want = port.losses(batch), own.losses(batch)
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        nonfinite = [k for k, v in got.items() if not np.isfinite(v)]
        note = f"{len(got)} terms" + (f"; missing: {_names(missing)}" if missing else "") + (f"; extra: {_names(extra)}" if extra else "")
        return not (missing or extra or nonfinite), note + (f"; non-finite: {_names(nonfinite)}" if nonfinite else "")

    attempt("loss names", losses)

    def deterministic() -> tuple[bool, str]:
        again, l1, l2 = port.forward(batch), port.losses(batch), port.losses(batch)
        bad = [k for k, v in state["f32"].items() if k not in again or np.asarray(v).tobytes() != np.asarray(again[k]).tobytes()]
        bad += [k for k in l1 if l1[k] != l2.get(k)]
        for ph in spec.phases:  # e.g. a gather's gradient summed by threads in any order (CPU index_put_ accumulate)
            g1, g2 = port.gradients(ph.loss, batch), port.gradients(ph.loss, batch)
            bad += [f"d{ph.loss}/d{k}" for k in g1 if k not in g2 or np.asarray(g1[k]).tobytes() != np.asarray(g2[k]).tobytes()]
        what = "forward, losses and every phase's gradients"
        return not bad, f"{what} bit-identical on a second run" if not bad else f"differ between two runs: {_names(bad)}"

    attempt("determinism", deterministic)
    return checks


def load(target: str) -> Callable[[Any, str], Any]:
    """``pkg.module:factory`` -> the callable (the current directory importable, as with ``python -m``)."""
    import importlib
    import os

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"{target!r}: expected 'pkg.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"{target!r}: {type(err).__name__}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.check_port", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("factory", metavar="PKG.MODULE:FACTORY", help="factory(config, dtype) -> PortSide")
    parser.add_argument("--model", default="dpsom")
    parser.add_argument("--variant", default="tiny-dense")
    parser.add_argument("--data", default="digits", help="dataset of the forward batch (default: the embedded 'digits')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    checks = run(load(args.factory), args.model, args.variant, args.data, args.seed)
    failed = [c.name for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks PASS in {time.perf_counter() - t0:.1f} s"
          + (f"; FAIL: {', '.join(failed)}" if failed else "; next: nox -s parity -- --port-adapter " + args.factory))
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
