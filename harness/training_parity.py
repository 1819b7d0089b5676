"""T4: N training steps of both sides through all three DPSOM phases under injected noise.

Both sides start from the same weights (drawn from the run's numpy PCG64 stream, harness/init.py;
or the reference's native initialisation, transplanted) and consume the same draws: one ε per step, and one ε per training example for the soft
assignments q that give the target distribution p at the start of every joint epoch (each side
computes p from its own q, as real training does). The schedule keeps the original's shape at a
small scale: VAE pretraining, the four SOM-initialisation LR stages (0.9 / 0.3 / 0.1 / 0.01), then
joint epochs; one epoch = ``epoch_steps`` batches of a fixed slice of the training set.

Per step and side: every loss term of the phase, the effective LR, and the norm of every weight.
The band (``_leaves_band``) compares the port-vs-reference distance with each side's own float32
vs float64 distance at the same step (the port beside its float64 twin, the reference beside its
double-precision build, each free-running from the same weights and draws): rounding growing
through training, measured, not assumed. Both are needed: a rounding event of one side (an
activation within rounding of its kink, which flips the sign of that gradient element and so of
Adam's first update) shows up in that side's own float32 vs float64 distance and nowhere else
(measured, conv: TF32 vs torch32 1.94 at step 0, torch32 vs torch64 0.02).
Reported: the first step where port and reference leave their band (and on which aggregate), and
the growth curves of both distances for loss terms and weights — as JSON and as a figure.

Free-running trajectories of float32 arithmetic separate (Adam turns rounding-level gradients into
±lr steps), so after a few dozen steps that band is wide and judges little. The *synced* check keeps
judging every step at T3 precision: before each step a second pair of ports (float32 + its float64
twin) is set to the reference's exact pre-step weights and optimizer state, evaluated on the same
batch, ε and p (every loss term; floor: the largest of each side's own float32 vs float64
distance, the reference's from its double-precision build, and the reference's batch split) and
stepped with the gradients the reference's train op applied (weights, optimizer state, lr and
global_step after it). So the whole schedule — phase changes, LR stages, per-epoch p,
the regimes training moves into — is checked step by step, and the first synced divergence is the
first step where the port computes something else from the same state.
"""

from __future__ import annotations

import math
import time
from typing import Any
from collections.abc import Callable

import numpy as np

from harness.compare import FLOAT32_EPS
from harness.engine import MULTIPLE, floors, judge, split, worst
from harness.env import fingerprint
from harness.spec import ModelSpec, T4Step

# growth curves: (side A, side B) of each distance; the first is judged, the others are its band
PAIRS = {"torch vs TF": ("tf", "torch"), "torch32 vs torch64": ("torch64", "torch"), "TF32 vs TF64": ("tf64", "tf")}


def _norms(weights: dict[str, np.ndarray]) -> dict[str, float]:
    return {f"norm.{k}": float(np.linalg.norm(np.asarray(v, np.float64))) for k, v in weights.items()}


def _max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) / max(float(np.max(np.abs(a[k]))), 1e-30) for k in a if k in b)


def run(spec: ModelSpec, variant: str, steps: int, seed: int = 0, dataset: str | None = None, multiple: float = MULTIPLE,
        epoch_steps: int = 10, make_port: Callable | None = None, progress: bool = True, init: str = "pcg64",
        synced: bool = True, overrides: dict | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    make_port = make_port or (lambda c, dtype: spec.make_port(c, dtype))
    cfg = spec.get_config(variant, overrides)
    B = cfg.batch_size
    x_train, data_name = spec.load_data(cfg, dataset, epoch_steps * B)
    if len(x_train) < epoch_steps * B:
        raise ValueError(f"{data_name}: {len(x_train)} training inputs < epoch_steps x batch_size = {epoch_steps * B}")
    rng = np.random.Generator(np.random.PCG64(seed))
    sides = {"tf": spec.make_reference(cfg), "tf64": spec.make_reference(cfg, "float64"), "torch": make_port(cfg, "float32"),
             "torch64": make_port(cfg, "float64")}
    if init == "pcg64":
        sides["tf"].set_weights(spec.draw_weights({k: v.shape for k, v in sides["tf"].get_weights().items()}, rng))
    w0 = sides["tf"].get_weights()
    for k in ("tf64", "torch", "torch64"):
        sides[k].set_weights(w0)
    sync = {"torch": make_port(cfg, "float32"), "torch64": make_port(cfg, "float64")} if synced else {}
    # The reference's own float32 rounding, measured: one realisation of the port's (float32 vs
    # float64) alone under-estimates it at some steps (measured: loss.kl_pq, a sum of near-cancelling
    # p log(p/q) terms, 2.7 x a port-only band at one of 100 dense steps).
    ref64 = spec.make_reference(cfg, "float64") if synced else None
    sync_steps: list[dict[str, Any]] = []
    first_sync: dict[str, Any] | None = None
    # The reference's state before the next step = what it was after the last one (fetched once).
    pre = (w0, sides["tf"].optimizer_state()) if synced else None
    constants = spec.constants(cfg)

    t0 = time.perf_counter()
    records: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    growth: dict[str, list[float]] = {f"{c}: {pair}": [] for c in ("losses", "weights") for pair in PAIRS}
    state: dict[str, Any] = {}
    first_exit: dict[str, Any] | None = None
    band_floor: dict[str, float] = {}
    schedule = spec.t4_plan(cfg, steps, epoch_steps)
    between: list[dict[str, Any]] = []
    for st in tqdm(schedule, desc=f"T4 {spec.name} {variant}", disable=not progress):
        batches = spec.t4_batches(cfg, st, rng, x_train, sides, state)
        if "compare" in state:  # what the spec computed from each side between steps (DEKM: a k-means refit)
            between.append(_between(st, state.pop("compare"), multiple, constants))
        ref = sides["tf"]
        if synced and st.index and st.phase != schedule[st.index - 1].phase:  # a model with one optimizer per phase
            pre = pre[0], ref.optimizer_state(st.phase)  # starts the phase from that optimizer's state
        if synced:
            ref64.set_weights(pre[0])
            b = batches["tf"]
            ref_losses = ref.losses(b), split(ref.losses, b, spec.reductions), ref64.losses(b)
        weights, gradients = {}, None
        for k, s in sides.items():
            out = s.step(st.phase, batches[k], st.lr_feed, return_gradients=synced and k == "tf")
            gradients = out.pop("gradients", gradients)
            rec = {key: float(v) for key, v in out.items()}
            weights[k] = s.get_weights()
            records[k].append({**rec, **_norms(weights[k])})
        if synced:
            post = weights["tf"], ref.optimizer_state(st.phase)
            rows = _synced_step(st, sync, pre, ref_losses, batches["tf"], gradients, records["tf"][-1], *post, multiple, constants)
            pre = post
            sync_steps.append(_summary(st, rows))
            if first_sync is None and sync_steps[-1]["first"] is not None:
                first_sync = {**sync_steps[-1]["first"], "rows": {k: [r.to_dict() for r in v] for k, v in rows.items()}}
        for pair, (a, b) in PAIRS.items():
            growth[f"weights: {pair}"].append(_max_rel(weights[a], weights[b]))
            growth[f"losses: {pair}"].append(_loss_rel(records[a][-1], records[b][-1]))
        if first_exit is None:
            first_exit = _leaves_band(st, records, growth, multiple, band_floor)
    return {
        "model": spec.name, "variant": variant, "tier": "T4", "steps": steps, "epoch_steps": epoch_steps,
        "seed": seed, "init": init, "data": data_name, "multiple": multiple, "seconds": time.perf_counter() - t0,
        "config": spec.config_dict(cfg), "environment": fingerprint(),
        "plan": [st.__dict__ for st in schedule],
        "records": records, "growth": growth, "first_exit": first_exit,
        "synced": {"steps": sync_steps, "first_divergence": first_sync} if synced else None,
        "between_steps": between,
        "verdict": _verdict(first_exit, first_sync, between),
    }


def _verdict(first_exit: dict | None, first_sync: dict | None, between: list[dict[str, Any]] = ()) -> str:
    """DIVERGED: the free-running pair left its band; FAIL / INACCURATE: a synced step (or what the
    spec computed between steps) differed."""
    if first_exit is not None:
        return "DIVERGED"
    if first_sync is not None:
        return first_sync["verdict"]
    return worst(r["verdict"] for b in between for r in b["rows"]) if between else "PASS"


def _between(st: T4Step, values: dict[str, dict[str, Any]], multiple: float, constants: dict) -> dict[str, Any]:
    """A spec's per-side quantities computed between steps (``state["compare"]`` left by
    ``t4_batches``, keyed like the sides), judged like the free-running trajectory they come from:
    the torch vs TF distance against ``multiple`` x the larger of each side's own float32 vs float64
    distance at that step (uncapped: free-running float32 trajectories separate by themselves).
    Distance: max |a - b| for floats, the number of differing entries for integers (labels, counts)."""
    from harness.compare import Comparison

    def dist(a: Any, b: Any) -> float:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return math.inf
        if a.dtype.kind in "iub":
            return float(np.count_nonzero(a != b))
        return float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0

    rows = []
    for name in values["tf"]:
        d = dist(values["tf"][name], values["torch"][name])
        floor = max(dist(values["torch"][name], values["torch64"][name]), dist(values["tf"][name], values["tf64"][name]))
        integer = np.asarray(values["tf"][name]).dtype.kind in "iub"
        tol = multiple * floor  # an integer quantity with a zero floor (rounding alone changed none) must be equal
        ok = d <= tol if (tol > 0 or integer) else d <= multiple * FLOAT32_EPS * max(float(np.max(np.abs(values["tf"][name]))), 1e-30)
        note = (f"{int(d)} of {np.size(values['tf'][name])} differ; own float32 vs float64: {int(floor)}" if integer
                else f"own float32 vs float64 {floor:.3g}")
        rows.append(Comparison(name, tuple(np.shape(values["tf"][name])), d, 0.0, 0.0, (), floor, multiple, tol,
                               "PASS" if ok else "FAIL", note).to_dict())
    return {"step": st.index, "phase": st.phase, "rows": rows}


def _synced_step(st: T4Step, sync: dict, pre: tuple[dict, dict], ref_losses: tuple[dict, dict, dict], batch: dict, gradients: dict,
                 ref_rec: dict, ref_weights: dict, ref_optimizer: dict, multiple: float, constants: dict) -> dict[str, list]:
    """One step of the synced ports from the reference's pre-step state (see the module docstring)."""
    out: dict[str, dict[str, dict]] = {}
    for k, s in sync.items():
        s.set_weights(pre[0])
        s.set_optimizer_state(pre[1], st.phase)
        losses = s.losses(batch)
        rec = s.apply_gradients(st.phase, gradients, st.lr_feed)
        out[k] = {"losses": losses, "lr, global_step": rec, "weights": s.get_weights(), "optimizer": s.optimizer_state(st.phase)}
    t32, t64 = out["torch"], out["torch64"]
    full, halves, ref64 = ref_losses
    absent = frozenset(getattr(sync["torch"], "absent", ()))
    rows = {"losses": judge(full, t32["losses"], {"float64": floors(t32["losses"], t64["losses"]), "split_tf": floors(full, halves),
                                                  "float64_tf": floors(full, ref64)}, multiple, absent=absent, constants=constants),
            "lr, global_step": judge({k: ref_rec[k] for k in t32["lr, global_step"]}, t32["lr, global_step"], {}, multiple, constants=constants)}
    for what, ref_values in (("weights", ref_weights), ("optimizer", ref_optimizer)):
        rows[what] = judge(ref_values, t32[what], {"float64": floors(t32[what], t64[what])}, multiple, absent=absent, constants=constants)
    return rows


def _summary(st: T4Step, rows: dict[str, list]) -> dict[str, Any]:
    """Per synced step: the worst |TF - torch| / tolerance of each section and the first non-PASS row."""
    worst = {k: max((r.max_abs / r.tolerance if r.tolerance > 0 else (0.0 if r.max_abs == 0 else math.inf)) for r in v)
             for k, v in rows.items()}
    first = next(((k, r) for k, v in rows.items() for r in v if r.verdict != "PASS"), None)
    return {"step": st.index, "phase": st.phase, "worst_ratio": worst,
            "first": None if first is None else {"step": st.index, "phase": st.phase, "section": first[0], **first[1].to_dict()}}


def _leaves_band(st: T4Step, records: dict[str, list[dict[str, float]]], growth: dict[str, list[float]], multiple: float,
                 floor: dict[str, float]) -> dict[str, Any] | None:
    """Whether the sides left their band at this step, and on what.

    ``global_step`` and ``lr`` must agree exactly. Loss terms and weights are judged as two
    aggregates (the largest relative difference over the phase's terms / over all weights): a
    trajectory of float32 arithmetic is chaotic (Adam turns near-zero gradients into ±lr steps whose
    sign is rounding), so single quantities of two runs drift apart at random rates, while the
    aggregate distance of port and reference must grow no faster than the larger of the two sides'
    own float32 vs float64 distances (its running maximum, x ``multiple``).
    """
    tf, t32 = records["tf"][-1], records["torch"][-1]
    for key in ("global_step", "lr"):
        if tf[key] != t32[key]:
            return {"step": st.index, "phase": st.phase, "quantity": key, "value": abs(tf[key] - t32[key]), "band": 0.0}
    for category in ("losses", "weights"):
        own = max(growth[f"{category}: torch32 vs torch64"][-1], growth[f"{category}: TF32 vs TF64"][-1])
        floor[category] = max(floor.get(category, 0.0), own)
        band = multiple * max(floor[category], FLOAT32_EPS)
        value = growth[f"{category}: torch vs TF"][-1]
        if not math.isfinite(value) or value > band:
            return {"step": st.index, "phase": st.phase, "quantity": category, "value": value, "band": band}
    return None


def _loss_rel(a: dict[str, float], b: dict[str, float]) -> float:
    keys = [k for k in a if k.startswith("loss.")]
    missing = [k for k in keys if k not in b]
    if missing:
        return math.inf
    return max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-30) for k in keys)


def figure(report: dict[str, Any], path) -> None:
    """Top: growth of the largest relative difference per step (free-running), both curves, log
    scale. Bottom (when synced): each synced step's worst |TF - torch| / tolerance per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synced = (report.get("synced") or {}).get("steps")
    fig, axes = plt.subplots(2 if synced else 1, 1, figsize=(7, 6 if synced else 3.5), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for key, values in report["growth"].items():
        pair = key.split(": ", 1)[1]
        ax.semilogy(np.maximum(values, 1e-12), label=key, ls={"torch vs TF": "-", "torch32 vs torch64": ":"}.get(pair, "--"),
                    color="C0" if key.startswith("weights") else "C1", lw=1.5 if pair == "torch vs TF" else 1.0)
    if report["first_exit"] is not None:
        ax.axvline(report["first_exit"]["step"], color="red", ls="--", lw=1, label=f"leaves band: {report['first_exit']['quantity']}")
    bounds = [i for i, s in enumerate(report["plan"]) if i == 0 or s["phase"] != report["plan"][i - 1]["phase"]]
    for b in bounds:
        for a in axes[:, 0]:
            a.axvline(b, color="grey", lw=0.5)
        ax.text(b, ax.get_ylim()[1], report["plan"][b]["phase"], fontsize=7, va="top")
    ax.set_ylabel("max relative difference")
    ax.set_title(f"{report['model']} {report['variant']}: T4, {report['steps']} steps, seed {report['seed']}")
    ax.legend(fontsize=7)
    if synced:
        ax2 = axes[1, 0]
        for i, section in enumerate(synced[0]["worst_ratio"]):
            ratios = [st["worst_ratio"][section] for st in synced]
            if max(ratios) == 0.0:  # nothing to draw on a log axis: say it in the legend
                ax2.plot([], [], " ", label=f"{section}: exact at every step")
                continue
            ax2.semilogy([max(r, 1e-6) for r in ratios], label=section, color=f"C{i + 2}")
        ax2.axhline(1.0, color="red", lw=1, ls="--", label="tolerance")
        ax2.set_ylabel("synced step: worst diff / tol")
        ax2.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
