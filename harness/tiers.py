"""The quick tier (T0–T3) for any model spec and any port: one batch, the same draws on both sides.

One numpy PCG64 stream per run draws the initial weights (the spec's initialisers; ``init="native"``
keeps the reference's own) and then the batch's random quantities (``spec.draw_inputs``); both sides
get the same arrays, and the engine (harness/engine.py) judges, element by element:

* T0 what each side executes (LR schedule probed per phase, optimizer constants, the spec's own
  entries, BatchNorm measured by the detector) against the deviation registry;
* T1 bit-exact weight round trips reference -> port -> reference and port -> reference -> port, and
  a checkpoint the reference's Saver writes under the original names, read into the port; with
  ``original_checkpoint`` (``--original-checkpoint PATH``) also a checkpoint WRITTEN BY THE ORIGINAL
  CODE: the reference restores it by TF's own name matching, the port loads the table reader's
  weights, and the two sides' forward outputs from it are judged as T2's are (:class:`OriginalCheckpoint`);
* T2 every named forward tensor, chained and isolated (each port layer fed the reference's input),
  and again in each of the spec's regime probes; T3 every loss term, the gradients of each phase's
  loss, and weights + optimizer state after one step of each phase (in the spec's order), the
  port's optimizer fed the gradients the reference's train op applied;
* T2/T3 again with both sides in float64.

A port that cannot be built is a FAIL row ``make_port``; a port method that raises (forward,
gradients, apply_gradients ...) is a FAIL row named after the call, with the exception and the
frame it came from, in a section ``<tier> port raised``, and the run stops there (the report keeps
what was judged before). An exception of the reference or the harness still propagates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from harness import engine
from harness.compare import FLOAT32_EPS, Comparison, compare_exact
from harness.engine import FLOAT64_EPS, MULTIPLE, floors, judge, skipped, split_floors, structural
from harness.env import fingerprint
from harness.memory import Spill, for_side, fresh, release, resident_mib, zeros_as_views
from harness.protocols import Batch, PortSide, Unsupported
from harness.spec import ModelSpec

INITS = ("pcg64", "native")  # initial weights: drawn by the harness (numpy PCG64), or the reference's own
LR_PROBE_STEPS = (0, 1, 999, 1000, 1001, 4999, 5000, 10000)
TIERS = ("T0", "T1", "T2", "T3")
REFERENCE, PORT = "tf-reference", "torch-port"  # the sides' labels in the BatchNorm detector's table
# T1's checkpoint sections: where the checkpoint came from is in the name (and every row's note)
SAVER_CHECKPOINT = "T1 checkpoint by the reference's Saver (original names) -> torch"
SAVER_PROVENANCE = ("written by the reference's Saver under the original names (not by the original code; "
                    "--original-checkpoint PATH loads one that is)")
ORIGINAL = "T1 checkpoint by the original code"
ORIGINAL_RESTORE, ORIGINAL_WEIGHTS, ORIGINAL_FORWARD = (f"{ORIGINAL} -> TF (restored by name) vs table reader",
                                                        f"{ORIGINAL} -> torch (table reader): weights", f"{ORIGINAL}: forward")
ORIGINAL_KEY = "forward:original checkpoint"  # the reference-values key of its forward
MakePort = Callable[[Any, str], PortSide]


def shapes(side) -> dict[str, tuple[int, ...]]:
    return {k: np.shape(v) for k, v in side.get_weights().items()}


def draw(spec: ModelSpec, cfg: Any, seed: int, dataset: str | None, weight_shapes: dict[str, tuple[int, ...]]):
    """Everything random of a quick-tier run, from ONE numpy PCG64 stream in a fixed order: initial
    weights, then the batch's random quantities; plus the first training batch. Any side, in any
    environment, that calls this with the same arguments gets the same arrays (harness.dump relies on it)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    weights = spec.draw_weights(weight_shapes, rng)
    x, data_name = spec.load_data(cfg, dataset, cfg.batch_size)
    x = np.array(x)  # a copy: a view of the data set would keep all of it alive
    return weights, spec.draw_inputs(cfg, rng, x), data_name


def values_fn(side, key: str) -> Callable[[Batch], dict]:
    """``batch -> {name: array}`` for ``key``: "forward", "losses" or a loss name (its gradients)."""
    if key == "forward":
        return side.forward
    if key == "losses":
        return side.losses
    return lambda batch: side.gradients(key, batch)


def reduction(spec: ModelSpec, key: str):
    """How ``key``'s values recombine over the batch halves: rows, per loss term, or the loss's own."""
    if key == "forward":
        return "per_sample"
    return spec.reductions if key == "losses" else spec.reductions.get(key, "mean")


def section_of(key: str) -> str:
    return "T2 forward" if key == "forward" else ("T3 losses" if key == "losses" else f"T3 gradients of {key}")


def _name32(key: str) -> str:
    """The float32 section a float64-tier key ("forward", "forward, isolated", "losses", a loss) twins."""
    return "T2 forward, isolated" if key == "forward, isolated" else section_of(key)


def _name64(key: str) -> str:
    return f"{_name32(key)} (float64)"


@dataclass(frozen=True)
class OriginalCheckpoint:
    """A checkpoint written by the original code (``--original-checkpoint PATH``), checked when the
    tier is made: its prefix, sha256 of each file, and the variables it holds besides the weights
    (optimizer slots, ``global_step`` ...: ignored)."""

    path: str
    prefix: str
    sha256: Mapping[str, str]
    ignored: tuple[str, ...]

    @classmethod
    def open(cls, spec: ModelSpec, path: str, cfg: Any, weight_shapes: Mapping[str, tuple[int, ...]]) -> OriginalCheckpoint:
        """Raises :class:`harness.transplant.TransplantError` (nothing loaded) naming every missing or
        mis-shaped variable, or what was looked for when there is no checkpoint at ``path``."""
        from harness.transplant import checkpoint_files

        prefix, sha = checkpoint_files(path)
        ignored = spec.check_original_checkpoint(prefix, cfg, weight_shapes)
        return cls(str(path), prefix, sha, tuple(ignored))

    @property
    def provenance(self) -> str:
        files = ", ".join(f"{name} {digest[:16]}" for name, digest in self.sha256.items())
        return f"written by the original code: {self.prefix} (sha256 {files})"

    def to_dict(self) -> dict[str, Any]:
        return {"written_by": "the original code", "path": self.path, "prefix": self.prefix, "sha256": dict(self.sha256),
                "ignored_variables": len(self.ignored)}


class QuickTier:
    """T0–T3 on one batch for one config; the reference is built once and reset before each run, so
    many ports (or planted mutants) can be judged against it cheaply. ``run(make_port)`` takes
    ``make_port(config, dtype) -> PortSide`` (default: the spec's port). ``cache`` keeps the
    reference's values (float32 and float64) between runs (mutation tests); without it (the CLI) a
    run frees everything as it goes, the reference included (a later run builds it again).

    Memory (harness/memory.py): a run holds one side at a time, except in T0 / T1 (which need both
    float32 sides). In order: the float32 reference alone computes everything T2 / T3 take from it
    (values, batch-split floors, its steps); T0 and T1 with the float32 port; the port alone replays
    T2 / T3; the float64 reference (built without optimizer state) computes the float64 tier's
    values; the float64 port replays T2 / T3 once more, and every section is judged, in the
    report's order, as its floor becomes known. What a later stage needs waits in a spill directory
    (``tempfile``, removed at the end of the run); the values are those the single interleaved pass
    gave, bit for bit (each side's calls are in the same order on the same state)."""

    def __init__(self, spec: ModelSpec, variant: str, seed: int = 0, dataset: str | None = None, multiple: float = MULTIPLE,
                 init: str = "pcg64", registry: dict | None = None, overrides: dict | None = None, cache: bool = True,
                 progress: bool = False, original_checkpoint: str | None = None):
        from harness.executed import load_registry

        if init not in INITS:
            raise ValueError(f"init={init!r}; expected one of {INITS}")
        self.spec, self.variant, self.seed, self.multiple, self.init, self.cache = spec, variant, seed, multiple, init, cache
        self.progress, self._bar = progress, None
        self.registry = load_registry(spec.deviations_path()) if registry is None else registry
        self.config = cfg = spec.get_config(variant, overrides)
        self.ref = spec.make_reference(cfg)
        weight_shapes = shapes(self.ref)
        try:  # checked before anything else: a missing or mis-shaped variable stops here, nothing loaded
            self.original = None if original_checkpoint is None else OriginalCheckpoint.open(spec, original_checkpoint, cfg, weight_shapes)
        except BaseException:
            self._release_reference()
            raise
        weights, self.batch, self.data_name = draw(spec, cfg, seed, dataset, weight_shapes)
        if init == "pcg64":
            self.ref.set_weights(weights)
        del weights
        # the optimizer's initial state is all zeros: kept as zero-strided views (no memory)
        self.weights0, self.optimizer0 = self.ref.get_weights(), zeros_as_views(self.ref.optimizer_state())
        self._ref_cache: dict[str, tuple[Mapping, dict]] = {}  # key -> (values, batch-split floor), float32 reference
        self._ref64_cache: dict[str, tuple[Mapping, dict]] = {}  # the same for the float64 reference
        # per phase: the reference's step record, the gradients it applied, its weights and optimizer state
        # after the step, its forward before it (at the previous steps' weights; None for the first phase)
        self._steps: list[tuple] | None = None
        self._checkpoint: Mapping | None = None  # T1: the reference's checkpoint as the spec's reader gives it
        # T1 with original_checkpoint: its weights as the spec's reader gives them, and the reference's rows
        # (restored by name vs the reader), both taken while the reference is alone
        self._original_weights: Mapping | None = None
        self._original_rows: list[Comparison] | None = None
        self._bn_reference: list | Unsupported | None = None  # T0: the reference's rows of the BatchNorm detector
        self.constants = spec.constants(cfg)

    def _ref(self, key: str, spill: Spill | None = None) -> tuple[Mapping, dict]:
        """The reference's values for ``key`` ("forward", "forward:<probe>", "losses" or a loss name,
        computed on first use with the reference's current weights) and their batch-split floor."""
        if key not in self._ref_cache:
            self._ref_cache[key] = self._values_and_floor(self.ref, key, spill, "reference")
        return self._ref_cache[key]

    def _stage(self, what: str) -> None:
        """The progress bar (stderr, ``progress=True``): the stage now running and the resident memory."""
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=f"quick tier {self.spec.name}/{self.variant}", unit=" stage", bar_format="{desc} {n} stages [{elapsed}] {postfix}")
        self._bar.update()
        self._bar.set_postfix_str(f"{what} | RSS {resident_mib():.0f} MiB")

    def _values_and_floor(self, side, key: str, spill: Spill | None, label: str) -> tuple[Mapping, dict]:
        self._stage(f"{label} {key}")
        base = "forward" if key.startswith("forward") else key.split("#")[0]
        fn = values_fn(side, base)
        full = fn(self.batch)
        if spill is None or self.cache:
            return full, split_floors(full, fn, self.batch, reduction(self.spec, base))
        # needed again at judging time only: to disk until then, before the split runs, and the split's
        # first half on disk while its second runs (conv float64 gradients: three 0.53 GB dicts held at once)
        spill.put(f"{label} {key}", full)
        full = spill.get(f"{label} {key}")

        def park(values: Mapping) -> Mapping:
            spill.put(f"{label} {key}: first half", values)
            return spill.get(f"{label} {key}: first half")

        try:
            return full, split_floors(full, fn, self.batch, reduction(self.spec, base), park)
        finally:
            if f"{label} {key}: first half" in spill:
                spill.drop(f"{label} {key}: first half")

    def run(self, make_port: MakePort | None = None) -> dict[str, Any]:
        if self.ref is None:  # released by a run without cache: built again, at the initial weights
            self.ref = self.spec.make_reference(self.config)
        spec, cfg, ref = self.spec, self.config, self.ref
        make_port = make_port or (lambda c, dtype: spec.make_port(c, dtype))
        t0 = time.perf_counter()
        sections: dict[str, list[Comparison]] = {}
        floors_: dict[str, dict[str, dict[str, float]]] = {}
        self.timings: dict[str, float] = {}
        last = [time.perf_counter()]
        batchnorm = getattr(self, "batchnorm", None)

        def lap(tier: str) -> None:
            now = time.perf_counter()
            self.timings[tier] = self.timings.get(tier, 0.0) + now - last[0]  # float64 parts add to T2 / T3
            last[0] = now
            self._tier = _NEXT_TIER[tier]  # where a port that raises is reported (the float64 pass: T2, then T3)

        spill = Spill()
        try:
            self._reference32(spill, lap)
            if self.cache:
                ref.set_weights(self.weights0)
                ref.set_optimizer_state(fresh(self.optimizer0))
            else:  # T0 / T1 never step the reference (its detector rows and checkpoint are taken): one without Adam slots
                self._release_reference()
                self._release()
                self._stage("reference float32: build without optimizer state")
                ref = self.ref = spec.make_evaluation_reference(cfg, "float32")
                ref.set_weights(self.weights0)
            self._release()
            self._stage("port float32: build")
            try:
                port = make_port(cfg, "float32")
            except Exception as err:  # noqa: BLE001 -- a port that cannot be built is a FAIL row, not a crash
                self.timings = {}
                return self._report({"T1 weights (transplant)": [_fail("make_port", f"{type(err).__name__}: {err}")]}, floors_, t0)
            port = self._guard(port)
            absent = frozenset(getattr(port, "absent", ()))
            last[0] = time.perf_counter()
            self._tier = "T0"
            self._stage("T0 config as executed")
            self._t0(port, sections)
            lap("T0")
            self._release()
            self._stage("T1 transplant")
            plan: dict[str, str] = {}  # section -> reference key, of the sections the float64 twin judges
            if not self._t1(port, sections, absent, spill, plan):
                return self._report(sections, floors_, t0)
            lap("T1")
            weights0 = self.weights0
            if not self.cache:  # the float32 reference is done: free it, keep the initial weights on disk
                spill.put("weights0", self.weights0)
                weights0, self.weights0 = spill.get("weights0", copy=True), None
                self._release_reference()
            self._release()
            self._float32(port, weights0, spill, sections, lap, plan)
            del port
            self._release()
            self._reference64(spill, weights0, lap)
            failed = self._twin(make_port, spill, plan, weights0, sections, floors_, lap, absent)
            if failed is not None:  # the float64 twin cannot be built or loaded: reported as if both ports were made up front
                step, sections = failed
                self.timings = {} if step == "make_port" else {"T0": self.timings["T0"]}
                if step == "make_port":
                    self.batchnorm = batchnorm
                return self._report(sections, {}, t0)
        except Exception as err:
            call = self._raised_by_port(err)
            if call is None:  # the reference or the harness: a bug of ours, not a verdict on the port
                raise
            # a port method that raised: a FAIL row named after the call, in the tier that was running;
            # the run stops there (sections still waiting for their float64 floor are left out)
            sections = {k: v for k, v in sections.items() if v is not None}
            sections[f"{self._tier} port raised"] = [_fail(call, _raised_note(err))]
            return self._report(sections, {k: v for k, v in floors_.items() if v is not None}, t0)
        finally:
            self._port_raised = None  # (the exception's traceback holds the port's frames)
            if self.weights0 is None:  # back in memory for a later run (the peak is behind)
                self.weights0 = dict(spill.get("weights0", copy=True))
            spill.close()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if not self.cache:
                self._ref_cache.clear()
                self._ref64_cache.clear()
                self._steps = self._checkpoint = self._bn_reference = self._original_weights = self._original_rows = None
            self._release()
        engine.confirm_kinks_in_float64(sections)
        return self._report(sections, floors_, t0)

    def _release(self) -> None:
        """Give freed memory back to the OS between stages of a run that must stay small (cache=False)."""
        if not self.cache:
            release()

    def _release_reference(self) -> None:
        """Close the float32 reference (a side with ``close()`` frees its session) and drop it."""
        close = getattr(self.ref, "close", None)
        if close is not None:
            close()
        self.ref = None

    def _keep(self, spill: Spill, key: str, values: Mapping) -> Mapping:
        """``values`` kept for later in this run: in memory with ``cache`` (and across runs), else on disk."""
        if self.cache:
            return values
        spill.put(key, values)
        return spill.get(key)

    @staticmethod
    def _loss_key(i: int, phases) -> str:
        """The reference-values key of phase ``i``'s gradients (a loss repeated by a later phase is
        taken again there, from the state the steps before it left)."""
        loss = phases[i].loss
        return loss if all(ph.loss != loss for ph in phases[:i]) else f"{loss}#{i}"

    # --- T2 / T3: the float32 reference alone ---------------------------------------------------------
    def _reference32(self, spill: Spill, lap) -> None:
        """Everything T2 and T3 take from the float32 reference, before any port is built: its values
        for each section with their batch-split floors, and its step of each phase (from the state the
        previous phase left, as the sections see it): the gradients its train op applied, its
        weights and optimizer state after the step. Kept across runs with ``cache``, else on disk."""
        spec, ref = self.spec, self.ref
        if self._steps is not None:
            return
        ref.set_weights(self.weights0)
        ref.set_optimizer_state(fresh(self.optimizer0))
        self._reference_alone(spill)
        self._ref("forward", spill)
        for probe in spec.probes:
            ref.set_weights(probe.weights(self.weights0))
            self._ref(f"forward:{probe.name}", spill)
            ref.set_weights(self.weights0)
        lap("T2")
        self._ref("losses", spill)
        steps = []
        for i, ph in enumerate(spec.phases):
            self._ref(self._loss_key(i, spec.phases), spill)
            # after the previous phases' steps the weights moved: kink flips are looked for again there
            moved = self._keep(spill, f"reference forward {i}", ref.forward(self.batch)) if i else None
            self._stage(f"reference step {ph.name}")
            rec = ref.step(ph.name, self.batch, ph.lr_feed, return_gradients=True)
            applied = self._keep(spill, f"applied {i}", rec.pop("gradients"))
            after = [self._keep(spill, f"reference step {i}: {what}", get(ref))
                     for what, get in (("weights", lambda s: s.get_weights()), ("optimizer", lambda s, phase=ph.name: s.optimizer_state(phase)))]
            steps.append((rec, applied, *after, moved))
            self._release()
        lap("T3")
        self._steps = steps
        if not self.cache:
            self._port_born_weights(spill)

    def _reference_alone(self, spill: Spill) -> None:
        """What T0 and T1 need from the stepping reference, taken before any port exists: its rows of
        the BatchNorm detector (it makes an optimizer step; weights and state are restored) and its
        checkpoint in the original's format, read back through the spec's reader (the port loads it
        in T1). T0 / T1 then run with a reference that cannot step (no optimizer state in memory)."""
        from harness.bn_detector import measure

        spec, ref = self.spec, self.ref
        self._bn_reference = None
        if spec.has_batchnorm:
            self._stage("T0 BatchNorm detector: reference")
            try:
                self._bn_reference = measure(REFERENCE, ref, self._small(), self.weights0)
            except Unsupported as err:
                self._bn_reference = err
        self._stage("T1 checkpoint: reference writes, spec reads")
        with tempfile.TemporaryDirectory() as tmp:
            where = ref.save_checkpoint(f"{tmp}/ckpt")
            self._checkpoint = self._keep(spill, "T1 checkpoint", spec.read_original_checkpoint(where, self.config))
        if self.original is not None:
            self._original_reference(spill)

    def _original_reference(self, spill: Spill) -> None:
        """The original code's checkpoint on the reference, while it is alone: the spec's reader gives
        its weights (kept for the port, on disk without ``cache``); the reference restores it by its
        OWN name matching (``restore_original_checkpoint``; a side without it is given the reader's
        weights), what it then holds is compared bit for bit with the reader's weights (a table row
        naming the wrong original variable shows here), and its forward from those weights is
        computed with its batch-split floor, as for T2. The reference is then back at the initial weights."""
        spec, ref, o = self.spec, self.ref, self.original
        self._stage("T1 original code's checkpoint: reference")
        weights = self._original_weights = self._keep(
            spill, "T1 original weights", spec.read_original_checkpoint(o.prefix, self.config, {k: np.shape(v) for k, v in self.weights0.items()}))
        restore = getattr(ref, "restore_original_checkpoint", None)
        try:
            if restore is None:
                raise Unsupported(f"{type(ref).__name__} has no restore_original_checkpoint()")
            restore(o.prefix)
        except Unsupported as err:  # no name-based restore: the reader's weights, so only the port's side is checked
            ref.set_weights(for_side(weights))
            self._original_rows = [skipped("restore_original_checkpoint", f"{err}; the reference was given the table reader's weights")]
        except Exception as err:  # noqa: BLE001 -- the reader found every weight but the graph's own restore did not: a FAIL row
            ref.set_weights(for_side(weights))
            self._original_rows = [_fail("restore_original_checkpoint", f"{type(err).__name__}: {err}")]
        else:
            held = ref.get_weights()
            self._original_rows = _noted([compare_exact(k, held[k] if k in held else np.zeros(0), weights[k]) for k in weights], o.provenance)
            del held
        self._ref(ORIGINAL_KEY, spill)
        ref.set_weights(self.weights0)

    def _small(self) -> dict[str, np.ndarray]:
        """T0's batch: the first 8 samples."""
        return {k: v[:8] for k, v in self.batch.items()}

    # --- T2 / T3: the float32 port --------------------------------------------------------------------
    def _float32(self, port, weights0: Mapping, spill: Spill, sections: dict, lap, plan: dict[str, str]) -> None:
        """The float32 port's side of T2 and T3 (the same calls, in the same order, as the reference's).
        Each section's port values go to the spill and the section takes its place in the report;
        it is judged in :meth:`_twin`, once the float64 twin has measured its floor. The port's
        optimizer runs in isolation: it applies the gradients the reference's train op itself applied,
        so weights and optimizer state after the step may differ by float32 rounding of the update only
        (floor: the float64 port given the same gradients; cancellation in m amplifies it).
        Adds {section: reference key} to ``plan``."""
        spec, batch = self.spec, self.batch

        def record(name: str, key: str, port_values: Mapping) -> None:
            # No batch split on the port: a port that wrongly couples samples (BN on batch statistics)
            # would widen its own band by exactly its bug. Its float64 twin runs the same code.
            self._stage(f"port float32 {name}")
            spill.put(f"port32 {name}", port_values)
            sections[name] = None
            plan[name] = key

        record("T2 forward", "forward", port.forward(batch))
        try:  # each port layer fed the reference's input to it
            isolated = port.forward_isolated(batch, for_side(self._ref("forward")[0]))
        except Unsupported as err:
            sections["T2 forward, isolated"] = [skipped("forward_isolated", str(err))]
        else:
            record("T2 forward, isolated", "forward", isolated)
            del isolated
        for probe in spec.probes:
            port.set_weights(probe.weights(weights0))
            record(f"T2 forward, {probe.name}", f"forward:{probe.name}", port.forward(batch))
            port.set_weights(dict(weights0))
        lap("T2")
        record("T3 losses", "losses", port.losses(batch))
        for i, ph in enumerate(spec.phases):
            record(f"T3 gradients of {ph.loss}", self._loss_key(i, spec.phases), port.gradients(ph.loss, batch))
            if i:  # the forward at the post-step weights, for the kink flips there
                spill.put(f"port32 forward {i}", port.forward(batch))
            rec, applied = self._steps[i][:2]
            port_rec = port.apply_gradients(ph.name, for_side(applied), ph.lr_feed)
            sections[f"T3 step {ph.name}: lr, global_step"] = judge({k: rec[k] for k in port_rec}, port_rec, {}, self.multiple,
                                                                     constants=self.constants)
            for what, get in (("weights", lambda s: s.get_weights()), ("optimizer", lambda s, phase=ph.name: s.optimizer_state(phase))):
                name = f"T3 step {ph.name}: {what}"
                spill.put(f"port32 {name}", get(port))
                sections[name] = None
            self._release()
        lap("T3")

    # --- float64 reference --------------------------------------------------------------------------
    def _reference64(self, spill: Spill, weights0: Mapping, lap) -> None:
        """The float64 tier's reference values (forward, losses, each phase's gradients) and their
        batch-split floors, from the reference built in double precision; it is then closed. Built
        through ``spec.make_evaluation_reference`` (never stepped: no optimizer state needed)."""
        keys = [k for k in dict.fromkeys(("forward", "losses", *(ph.loss for ph in self.spec.phases))) if k not in self._ref64_cache]
        if not keys:
            return
        self._stage("reference float64: build")
        ref64 = self.spec.make_evaluation_reference(self.config, "float64")
        try:
            ref64.set_weights(dict(weights0))
            for key in keys:
                self._ref64_cache[key] = self._values_and_floor(ref64, key, spill, "reference64")
                lap("T2" if key == "forward" else "T3")
        finally:
            close = getattr(ref64, "close", None)
            if close is not None:
                close()
            del ref64
            self._release()

    # --- the float64 twin: floors, judging, float64 tier -----------------------------------------------
    def _twin(self, make_port: MakePort, spill: Spill, plan: dict[str, str], weights0: Mapping, sections: dict, floors_: dict,
              lap, absent: frozenset) -> tuple[str, dict] | None:
        """The float64 port replays the float32 pass: each section's floor (float32 vs float64 port)
        and verdict; the float64 tier (T2 forward chained and isolated, T3 losses and gradients with
        BOTH sides in float64: rounding all but vanishes, so anything beyond a few float64 ulps x the
        reference's own batch-split floor is a formula, constant or layout difference; measured on
        the faithful pair: 1e-15 relative) from the same calls at the initial weights. Returns
        (failed call, sections to report instead) when the twin cannot be built or loaded, else None."""
        from harness.transplant import TransplantError

        spec, batch = self.spec, self.batch
        keys64 = ("forward", "forward, isolated", "losses", *(ph.loss for ph in spec.phases))
        for name in [n for n, rows in sections.items() if rows is None]:  # the floors in the sections' order
            floors_[name] = None
        for key in keys64:  # the float64 tier's place in the report
            sections[_name64(key)] = floors_[_name64(key)] = None
        self._stage("port float64: build")
        try:
            port64 = make_port(self.config, "float64")
        except Exception as err:  # noqa: BLE001
            return "make_port", {"T1 weights (transplant)": [_fail("make_port", f"{type(err).__name__}: {err}")]}
        port64 = self._guard(port64)
        try:
            port64.set_weights(dict(weights0))
        except TransplantError as err:
            return "set_weights", {**{k: v for k, v in sections.items() if k.startswith("T0")},
                                   "T1 weights (transplant)": [_fail("set_weights", str(err))]}

        def finish(name: str, t64: Mapping) -> None:
            self._stage(f"port float64 {name}")
            full, split_floor = self._ref(plan[name])
            t32 = spill.get(f"port32 {name}")
            floors_[name] = {"float64": floors(t32, t64), "split_tf": split_floor}
            if plan[name] in ("forward", "losses", spec.phases[0].loss):  # the values at the initial weights:
                # the reference's own float32 rounding there, measured (as T4's synced check does); e.g. TF's
                # float32 bias gradient of a 28x28 transposed conv sums 200 704 terms less accurately than
                # torch (DEKM conv: 3.1e-6 of 0.26, 100 x the port's own float32 vs float64 distance)
                floors_[name]["float64_tf"] = floors(full, self._ref64_cache[plan[name]][0])
            sections[name] = judge(full, t32, floors_[name], self.multiple, absent=absent, constants=self.constants)

        def finish64(key: str, values: Mapping) -> None:
            # Two floors: the reference's batch split in float64, and the port's measured float32
            # rounding noise of the same computation scaled by eps64/eps32 (rounding error is
            # proportional to the unit roundoff; a 2000-term GEMM row is not changed by a batch split).
            name32, name = _name32(key), _name64(key)
            self._stage(f"judge {name}")
            full, split64 = self._ref64_cache["forward" if key.startswith("forward") else key]
            parts = {"split_tf64": split64,
                     "float32_scaled": {k: f * FLOAT64_EPS / FLOAT32_EPS for k, f in (floors_.get(name32) or {}).get("float64", {}).items()}}
            floors_[name] = parts
            sections[name] = judge(full, values, parts, self.multiple, FLOAT64_EPS, absent=absent, constants=self.constants)

        def drop64(key: str) -> None:
            del sections[_name64(key)], floors_[_name64(key)]

        values = port64.forward(batch)
        finish("T2 forward", values)
        finish64("forward", values)
        del values
        teacher = self._ref("forward")[0]
        kinks = engine.kink_flips(teacher, spill.get("port32 T2 forward"), sections["T2 forward"], spec.is_activation)
        order = list(teacher)
        if "T2 forward, isolated" in plan:
            try:
                values = port64.forward_isolated(batch, for_side(teacher))
            except Unsupported as err:
                sections["T2 forward, isolated"] = [skipped("forward_isolated", str(err))]
                del floors_["T2 forward, isolated"]
            else:
                finish("T2 forward, isolated", values)
                del values
        try:
            values = port64.forward_isolated(batch, for_side(self._ref64_cache["forward"][0]))
        except Unsupported:
            drop64("forward, isolated")
        else:
            finish64("forward, isolated", values)
            del values
        for probe in spec.probes:
            port64.set_weights(probe.weights(weights0))
            finish(f"T2 forward, {probe.name}", port64.forward(batch))
            port64.set_weights(dict(weights0))
        if ORIGINAL_FORWARD in plan:  # the original code's checkpoint: its forward judged as T2's, at the same kind of floor
            port64.set_weights(for_side(self._original_weights))
            finish(ORIGINAL_FORWARD, port64.forward(batch))
            sections[ORIGINAL_FORWARD] = _noted(sections[ORIGINAL_FORWARD], self.original.provenance)
            port64.set_weights(dict(weights0))
        lap("T2")
        values = port64.losses(batch)
        finish("T3 losses", values)
        finish64("losses", values)
        for loss in dict.fromkeys(ph.loss for ph in spec.phases):  # the float64 tier's gradients: at the initial weights
            spill.put(f"port64 {loss}", port64.gradients(loss, batch))
            self._release()
        phases = spec.phases
        for i, ph in enumerate(phases):
            name = f"T3 gradients of {ph.loss}"
            finish(name, spill.get(f"port64 {ph.loss}") if i == 0 else port64.gradients(ph.loss, batch))
            if i == 0:
                sections[name] = engine.explain_by_kinks(sections[name], kinks, order)
            else:  # after the previous phases' steps the weights moved: the kinks are looked for again there
                # (measured: dense on 'digits', this machine, one float32 flip after the vae + som_init steps
                # gave decoder.fc1.kernel 9.5e-4 of 0.049 in loss.total's gradient; TF agrees with torch64)
                now = engine.kink_flips(self._steps[i][4], spill.get(f"port32 forward {i}"), sections["T2 forward"], spec.is_activation)
                sections[name] = engine.explain_by_kinks(sections[name], now, order, "at the post-step weights")
            self._release()
            self._stage(f"port float64 step {ph.name}")
            if i:
                port64.set_optimizer_state(spill.get(f"port64 optimizer {i}", copy=True), ph.name)  # read slot by slot
            port64.apply_gradients(ph.name, for_side(self._steps[i][1]), ph.lr_feed)
            # The twin's state after the step goes to disk and the twin is dropped: its step is judged
            # from there, and the next phase's twin is built again at those weights (gradients are a
            # function of the mapped weights), its optimizer state loaded only for its own step. No
            # gradient, floor or judgement then runs beside the Adam slots (conv float64: 1 GiB).
            steps = ((f"T3 step {ph.name}: weights", lambda s: s.get_weights()),
                     (f"T3 step {ph.name}: optimizer", lambda s, phase=ph.name: _state_items(s, phase)))
            if i + 1 < len(phases):
                steps += ((f"optimizer {i + 1}", lambda s, phase=phases[i + 1].name: _state_items(s, phase)),)
            for key, get in steps:
                spill.put(f"port64 {key}", get(port64))
                self._release()
            del port64
            self._release()
            for j, key in enumerate(k for k, _ in steps[:2]):
                t32, t64 = spill.get(f"port32 {key}"), spill.get(f"port64 {key}")
                floors_[key] = {"float64": floors(t32, t64)}
                del t64
                sections[key] = judge(self._steps[i][2 + j], t32, floors_[key], self.multiple, absent=absent, constants=self.constants)
                self._release()
            if i + 1 < len(phases):
                self._stage("port float64: build again at the post-step weights")
                port64 = self._guard(make_port(self.config, "float64"))
                port64.set_weights(spill.get(f"port64 T3 step {ph.name}: weights", copy=True))
        for loss in dict.fromkeys(ph.loss for ph in spec.phases):
            finish64(loss, spill.get(f"port64 {loss}"))
        lap("T3")
        return None

    # --- T0 ---------------------------------------------------------------------------------------
    def _t0(self, port, sections: dict) -> None:
        """What each side executes, measured where possible (BatchNorm and dropout by the detector,
        the LR schedule probed per phase), diffed against the deviation registry."""
        from harness.bn_detector import measure, table
        from harness.executed import diff, executed, per_phase

        ref, spec, small = self.ref, self.spec, self._small()
        self.batchnorm = None
        if spec.has_batchnorm:
            try:
                if isinstance(self._bn_reference, Unsupported):
                    raise self._bn_reference
                self.batchnorm = table(self._bn_reference + measure(PORT, port, small, self.weights0), [REFERENCE, PORT])
            except Unsupported as err:
                sections["T0 BatchNorm detector"] = [skipped("trace", str(err))]
        sections["T0 config as executed"] = diff(executed(ref, small, self.batchnorm, REFERENCE, spec),
                                                 executed(port, small, self.batchnorm, PORT, spec), self.registry)
        probe = [{ph.name: {f"lr@{s}": np.float32(side.learning_rate_at(ph.name, 1.0, s)) for s in LR_PROBE_STEPS} for ph in spec.phases}
                 for side in (ref, port)]
        sections["T0 learning-rate schedule"] = judge(*per_phase(*probe), {}, 1.0, constants=self.constants)

    # --- T1 ---------------------------------------------------------------------------------------
    def _t1(self, port, sections: dict, absent: frozenset, spill: Spill, plan: dict[str, str]) -> bool:
        from harness.transplant import TransplantError

        mapped = {k: v for k, v in self.weights0.items() if k not in absent}
        try:  # a partially mapped port takes the part of each tensor it has (its set_weights knows which)
            port.set_weights(self.weights0)  # (the float64 twin is loaded when it is built, after the float32 pass)
        except TransplantError as err:
            sections["T1 weights (transplant)"] = [_fail("set_weights", str(err))]
            return False
        back = port.get_weights()
        sections["T1 weights (transplant)"] = [compare_exact(k, v, back.get(k, np.zeros(0))) for k, v in mapped.items()] + [
            structural(k, "no counterpart in the port (partial mapping)") for k in self.weights0 if k in absent]
        del back, mapped
        sections["T1 torch -> TF -> torch"] = self._round_trip_from_port(port, absent, spill)
        sections[SAVER_CHECKPOINT] = self._saver_checkpoint(port, absent)
        if self.original is not None:
            self._original_port(port, absent, spill, sections, plan)
        return True

    def _original_port(self, port, absent: frozenset, spill: Spill, sections: dict, plan: dict[str, str]) -> None:
        """The original code's checkpoint on the float32 port: the reader's weights loaded
        (``set_weights``) and read back bit for bit, its forward from them recorded for judging at
        the float64 twin's floor (:meth:`_twin`), as T2's; the port is then back at the initial weights."""
        weights, note = self._original_weights, self.original.provenance
        sections[ORIGINAL_RESTORE] = self._original_rows
        port.set_weights(for_side(weights))
        back = port.get_weights()
        sections[ORIGINAL_WEIGHTS] = _noted([compare_exact(k, weights[k], back.get(k, np.zeros(0))) for k in weights if k not in absent] + [
            structural(k, "no counterpart in the port (partial mapping)") for k in weights if k in absent], note)
        del back
        spill.put(f"port32 {ORIGINAL_FORWARD}", port.forward(self.batch))
        sections[ORIGINAL_FORWARD] = None
        plan[ORIGINAL_FORWARD] = ORIGINAL_KEY
        port.set_weights(self.weights0)

    def _port_born_weights(self, spill: Spill) -> Mapping:
        """T1's weights born on the port's side: another PCG64 draw (its own stream, so it can be drawn
        whenever memory is low: the float32 pass draws it before the port exists; on disk till T1)."""
        if "T1 port-born weights" not in spill:
            drawn = self.spec.draw_weights({k: v.shape for k, v in self.weights0.items()}, np.random.Generator(np.random.PCG64([self.seed, 1])))
            if self.cache:
                return drawn
            spill.put("T1 port-born weights", drawn)
        return spill.get("T1 port-born weights", copy=True)

    def _round_trip_from_port(self, port, absent: frozenset, spill: Spill) -> list[Comparison]:
        """Weights born on the port's side (another PCG64 draw) through the reference and back, bit for bit."""
        drawn = self._port_born_weights(spill)

        def other(k: str) -> np.ndarray:  # a partially mapped port's absent names keep the initial weights
            return drawn[k] if k not in absent else self.weights0[k]

        port.set_weights({k: other(k) for k in drawn})
        try:
            mine = port.get_weights()
            given = {k: mine[k] if k in mine else other(k) for k in drawn}  # {**other, **mine}, other read once
            given.update(mine)
            del mine
            self.ref.set_weights(given)
            del given
            port.set_weights(self.ref.get_weights())
            back = port.get_weights()
            return [compare_exact(k, drawn[k], back.get(k, np.zeros(0))) for k in drawn if k not in absent]
        finally:
            self.ref.set_weights(self.weights0)
            port.set_weights(self.weights0)

    def _saver_checkpoint(self, port, absent: frozenset) -> list[Comparison]:
        """A checkpoint in the original code's format and names, but written by the REFERENCE's saver
        (``save_checkpoint``) at the initial weights, read through the spec's reader
        (:meth:`_reference_alone`) and loaded into the port: it shows the reader and the port's
        loading, not that a checkpoint the original code wrote loads (``original_checkpoint`` does)."""
        port.set_weights(self._checkpoint)
        back = port.get_weights()
        return _noted([compare_exact(k, v, back.get(k, np.zeros(0))) for k, v in self.weights0.items() if k not in absent], SAVER_PROVENANCE)

    # --- a port that raises -------------------------------------------------------------------------
    def _guard(self, port: PortSide) -> PortSide:
        """``port`` behind a :class:`_Guarded` proxy that records in this tier which of its methods
        raised what (the tier keeps no reference to the port: freeing it still frees its memory)."""
        def record(name: str, err: BaseException) -> None:
            self._port_raised = (name, err)

        return _Guarded(port, record)  # type: ignore[return-value]

    def _raised_by_port(self, err: BaseException) -> str | None:
        """The port method whose exception ``err`` is (or caused), else None."""
        raised = getattr(self, "_port_raised", None)
        seen: BaseException | None = err
        while seen is not None and raised is not None:
            if seen is raised[1]:
                return raised[0]
            seen = seen.__cause__ or seen.__context__
        return None

    # --- report -----------------------------------------------------------------------------------
    def _report(self, sections: dict[str, list[Comparison]], floors_: dict, t0: float) -> dict[str, Any]:
        first = engine.first_divergence(sections)
        return {
            "model": self.spec.name,
            "variant": self.variant,
            "tier": "quick",
            "data": self.data_name,
            "seed": self.seed,
            "init": self.init,
            "multiple": self.multiple,
            "t1_checkpoint": {"written_by": "the reference's Saver under the original names"} if self.original is None else self.original.to_dict(),
            "config": self.spec.config_dict(self.config),
            "environment": fingerprint(),
            "seconds": time.perf_counter() - t0,
            "seconds_per_tier": dict(getattr(self, "timings", {})),
            "first_divergence": None if first is None else {"section": first[0], **first[1].to_dict()},
            "sections": {k: [r.to_dict() for r in v] for k, v in sections.items()},
            "floors": floors_,
            "verdict": engine.verdict(sections),
            "batchnorm": None if getattr(self, "batchnorm", None) is None else self.batchnorm.to_dict(orient="records"),
            "_sections": sections,
        }


_NEXT_TIER = {"T0": "T1", "T1": "T2", "T2": "T3", "T3": "T2"}


def _state_items(side: Any, phase: str) -> Iterator[tuple[str, Any]]:
    """The side's optimizer state one entry at a time where it streams it (``optimizer_state_items``)."""
    items = getattr(side, "optimizer_state_items", None)
    return items(phase) if items is not None else iter(side.optimizer_state(phase).items())


class _Guarded:
    """A port seen through a proxy that reports (``record(name, exception)``) each method that
    raises (:class:`Unsupported` excepted: that is a capability answer, handled where it is asked), so the
    quick tier reports a port that raises as a FAIL row named after the call instead of crashing.
    Attributes that are not methods (``absent``, ``dtype``, ``config``) pass through unchanged."""

    def __init__(self, port: Any, record: Callable[[str, BaseException], None]):
        self.__dict__.update(_port=port, _record=record)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._port, name)
        if name.startswith("_") or not callable(value):
            return value

        def call(*args, **kwargs):
            with _recorded(name, self._record):
                out = value(*args, **kwargs)
            return _guarded_items(out, name, self._record) if inspect.isgenerator(out) else out

        return call


@contextlib.contextmanager
def _recorded(name: str, record: Callable[[str, BaseException], None]) -> Iterator[None]:
    """An exception of the port's call ``name`` recorded, then raised on (:class:`Unsupported` only raised)."""
    try:
        yield
    except Unsupported:
        raise
    except Exception as err:
        record(name, err)
        raise


def _guarded_items(items: Iterator, name: str, record: Callable[[str, BaseException], None]) -> Iterator:
    """A port's generator (``optimizer_state_items``), its exceptions recorded as the call's."""
    with _recorded(name, record):
        yield from items


def _raised_note(err: BaseException) -> str:
    """``Type: message [raised in <function>, <file>:<line>]``: the exception and the innermost frame it came from."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" [raised in {frames[-1].name}, {Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def _fail(name: str, note: str) -> Comparison:
    return Comparison(name, (), *[float("nan")] * 3, (), 0.0, 0.0, 0.0, "FAIL", note)


def _noted(rows: list[Comparison], note: str) -> list[Comparison]:
    """``rows`` with ``note`` (where a section's checkpoint came from) appended to each row's note."""
    return [dataclasses.replace(r, note=f"{r.note}; {note}" if r.note else note) for r in rows]


def split_by_tier(report: dict) -> dict[str, dict]:
    """One report per tier (DESIGN.md: one JSON per model, variant and tier): the shared header,
    that tier's sections and floors, its own first divergence and verdict."""
    out = {}
    for tier in TIERS:
        names = [n for n in report["sections"] if n.split(" ", 1)[0] == tier]
        rows = [(n, r) for n in names for r in report["sections"][n]]
        first = next(((n, r) for n, r in rows if r["verdict"] not in ("PASS", "SKIPPED")), None)
        part = {k: v for k, v in report.items() if k not in ("sections", "floors", "first_divergence", "verdict", "batchnorm")}
        part.update(
            tier=tier,
            sections={n: report["sections"][n] for n in names},
            floors={n: f for n, f in report["floors"].items() if n in names},
            first_divergence=None if first is None else {"section": first[0], **first[1]},
            verdict=engine.worst(r["verdict"] for _, r in rows),
            seconds=report["seconds_per_tier"].get(tier),
        )
        if tier == "T0":
            part["batchnorm"] = report.get("batchnorm")
        out[tier] = part
    return out


def worst_row(rows: list[Comparison]) -> Comparison:
    return max(rows, key=lambda r: engine.ratio(r) if r.verdict not in ("STRUCTURAL", "SKIPPED") and r.max_abs == r.max_abs else -1.0)


