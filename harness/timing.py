"""T6, the timing tier: one training step per phase of any model, timed through its spec and the side protocols.

    python -m harness.timing --model dpsom --variant dense --device cuda --modes exact,fast [--reference] [--profile]
    nox -s timing -- --model dekm --variant conv --device cuda

Why it is built this way:

* **Arms, interleaved.** The arms (two modes of the port, and optionally the TF reference) are each
  warmed up, then stepped in turns A B A B ..., so a drift of the machine (clocks, a competing process,
  thermal state) falls on every arm alike; the median and IQR summarise a distribution with a long
  right tail better than a mean. Every arm starts from the same injected weights and batch
  (``harness.tiers.draw``: the quick tier's PCG64 stream), and steps on with its own optimizer.
* **Settings are the key.** TF32, cuDNN benchmark, deterministic algorithms and torch's thread count
  are set explicitly before each of an arm's steps and read back; ``OMP_WAIT_POLICY`` (read by the
  OpenMP runtime once, at start-up) is set by the CLI before torch is imported. All of them are recorded
  and spelled out in the result's ``key``; torch's global state is restored afterwards.
* **Modes.** ``exact`` is what the parity tiers run (TF32 off, deterministic algorithms, eager). ``fast``
  turns TF32 and cuDNN's benchmark on, deterministic algorithms off, and the port's step compiled
  (``torch.compile``, through the side protocol's optional ``set_compiled``; a port without it runs eager
  and its document says so). Every arm took the same steps from the same weights on the same batch, so
  where a mode's weights and last loss terms end against exact's is its measured drift
  (:func:`drift_from_exact`), stored with it and tabulated.
* **Clocks.** On CUDA a step is timed by CUDA events recorded around it after a synchronize (a host
  timer would measure the launch queue); on CPU by ``time.perf_counter``, with the thread count recorded.
* **FLOPs from the architecture.** ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
  backward of the phase's loss (``loss_tensor``), on a copy of the port built on the ``meta`` device:
  shapes only, nothing computed, the same count on every device and whatever kernel a device picks
  (the DPSOM port's oneDNN GEMMs on CPU are not aten ops the counter would see).
* **Floor.** The device's float32 GEMM peak is measured (a large matmul, TF32 as the mode says); FLOPs /
  peak is the time a step cannot beat, reported as % of the measured median.
* **A shared machine** (``--compete N``): N CPU-bound processes (a pure-Python spin each: no memory
  traffic, no threads of its own) run for the whole measurement, as on a CI runner or a laptop doing other
  work. Each competitor's CPU seconds are read back when it is killed (``os.wait4``) and stored, so a
  result shows the competition really took its share; the load average before the run is stored too,
  so a "quiet" result says how quiet. N is part of the key and of the file name.
* **Profile** (``--profile``): one more step per phase and arm under the arm's own profiler
  (``profile_step`` of the side protocol), its op times attributed to canonical layer names from the
  mapping table. A torch port: ``torch.profiler``, forward as a range around each mapped module,
  backward as the autograd nodes matched to their forward op by sequence number. The TF reference:
  the step's ``session.run`` traced (``RunMetadata``), each op by its name scope, gradient ops as the
  backward, the optimizer's update ops apart. Summed per top-level name too; a traced step runs
  slower than an untimed one, so the profile says where time goes, the timed steps how long.

Results: ``results/timing/<model>-<variant>-<device>-<mode>.json`` (one per arm, written atomically); the
README table is rendered from them by ``harness.readme`` (:func:`markdown`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.env import cpu_isa
from harness.protocols import Unsupported

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "timing"
SCHEMA = "harness.timing/1"
WARMUP, REPEATS = 3, 21  # warm-up steps per arm (kernel selection, allocator, caches); measured steps per arm
GEMM_N = {"cuda": 8192, "cpu": 1024}  # the peak's square float32 matmul: large enough to saturate the device
REFERENCE = "reference"  # the TF reference's arm label (and file-name mode)
# What a mode sets; the mode's name fixes these four, so a file name's mode says them. ``compiled``: the
# port's training step through torch.compile (the side protocol's optional ``set_compiled``).
MODES: dict[str, dict[str, bool]] = {
    "exact": {"tf32": False, "cudnn_benchmark": False, "deterministic": True, "compiled": False},  # parity-exact: what T3/T4 run under
    "fast": {"tf32": True, "cudnn_benchmark": True, "deterministic": False, "compiled": True},
}
EXACT = "exact"  # the mode every other one's drift is measured from
PHASE_FIELDS = ("median_s", "q1_s", "q3_s", "iqr_s", "min_s", "max_s", "n", "flops", "floor_s", "pct_of_floor", "finite")


class NoDevice(RuntimeError):
    """The device asked for is not present (e.g. ``--device cuda`` where torch sees no GPU)."""


# --- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything that changes a torch arm's speed, set before its steps and part of its result key."""

    device: str
    mode: str
    tf32: bool
    cudnn_benchmark: bool
    deterministic: bool
    compiled: bool
    threads: int
    omp_wait_policy: str  # as the environment holds it ("unset": the OpenMP runtime's default)
    competing: int = 0  # CPU-bound processes running beside the measurement (``competing``)

    @classmethod
    def for_mode(cls, mode: str, device: str, threads: int | None = None, competing: int = 0) -> Settings:
        import torch

        if mode not in MODES:
            raise KeyError(f"unknown mode {mode!r}; known: {sorted(MODES)}")
        return cls(device=device, mode=mode, threads=threads or torch.get_num_threads(),
                   omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"), competing=competing, **MODES[mode])

    @property
    def key(self) -> str:
        return (f"{self.device}-{self.mode}-tf32_{int(self.tf32)}-cudnn_benchmark_{int(self.cudnn_benchmark)}-"
                f"deterministic_{int(self.deterministic)}-compiled_{int(self.compiled)}-threads_{self.threads}-omp_{self.omp_wait_policy}{compete_suffix(self.competing)}")


def compete_suffix(n: int) -> str:
    """What N competing processes add to a key and a file name (nothing for a quiet run)."""
    return f"-compete_{n}" if n else ""


COMPETITOR = "while True:\n    pass\n"  # CPU-bound, single-threaded, touches no memory to speak of


@contextlib.contextmanager
def competing(n: int) -> Iterator[list[dict[str, float]]]:
    """``n`` CPU-bound processes running for the duration of the block, then killed. The yielded list is
    filled on exit with each one's wall and CPU seconds (``os.wait4``'s rusage), so the result can show
    the competition really ran."""
    if n < 0:
        raise ValueError(f"--compete {n}: expected a number of processes >= 0")
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR], stdin=subprocess.DEVNULL) for _ in range(n)]
    started = time.perf_counter()
    stats: list[dict[str, float]] = []
    try:
        yield stats
    finally:
        wall = time.perf_counter() - started
        for proc in procs:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9  # reaped here: Popen must not wait for it again
            stats.append({"pid": proc.pid, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime})


def torch_state() -> dict[str, Any]:
    """torch's speed-relevant global switches as torch reports them (what a result records as applied)."""
    import torch

    # fp32_precision ("tf32" / "ieee") is the same switch in torch's newer spelling, read back to show both agree;
    # get_float32_matmul_precision() is not read: torch refuses it once both spellings have been used.
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "fp32_precision_matmul": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
            "fp32_precision_conv": getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory, "threads": torch.get_num_threads()}


def _set_torch_state(tf32: bool, cudnn_benchmark: bool, deterministic: bool, threads: int, warn_only: bool = False) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = False  # as harness.env.seed_all: no result depends on it
    if torch.get_num_threads() != threads:  # resizing the pool is not free: only when it changes
        torch.set_num_threads(threads)


def apply(settings: Settings) -> dict[str, Any]:
    """Set ``settings`` in torch; returns :func:`torch_state` read back after setting them."""
    if settings.device.startswith("cuda") and settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs a fixed workspace
    _set_torch_state(settings.tf32, settings.cudnn_benchmark, settings.deterministic, settings.threads)
    return torch_state()


@contextlib.contextmanager
def preserved_torch_state() -> Iterator[None]:
    """Whatever the arms set, torch's switches are as before afterwards (the tier runs inside test suites).
    Restored through the legacy ``allow_tf32`` spelling, as the rest of the suite sets them (torch refuses
    reads once both spellings were used); ``fp32_precision`` may then read "ieee" where it read "none"
    (not set), which is the same arithmetic."""
    before = torch_state()
    try:
        yield
    finally:
        _set_torch_state(before["tf32_matmul"], before["cudnn_benchmark"], before["deterministic"], before["threads"],
                         before["deterministic_warn_only"])
        import torch

        torch.backends.cudnn.allow_tf32 = before["tf32_cudnn"]
        torch.utils.deterministic.fill_uninitialized_memory = before["fill_uninitialized_memory"]


# --- clocks, interleaving, statistics -----------------------------------------------------------------
Clock = Callable[[Callable[[], Any]], float]


def clock(device: str) -> Clock:
    """``timed(fn) -> seconds`` of one call on ``device``'s clock: CUDA events around the call after a
    synchronize (the event pair brackets the GPU work, not the launches), else ``perf_counter``."""
    if device.startswith("cuda"):
        import torch

        def timed_cuda(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed_cuda

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def interleave(labels: Sequence[str], repeats: int) -> list[str]:
    """The measured order: ``repeats`` rounds of every arm in turn (A B A B ...)."""
    return [label for _ in range(repeats) for label in labels]


def run_interleaved(labels: Sequence[str], repeats: int, warmup: int, run_one: Callable[[str], float]) -> tuple[list[str], dict[str, list[float]]]:
    """Warm up each arm (``warmup`` calls, discarded), then time them in :func:`interleave` order.
    ``run_one(label)`` runs one step of that arm and returns its seconds. Returns (order, seconds per arm)."""
    for label in labels:
        for _ in range(warmup):
            run_one(label)
    order = interleave(labels, repeats)
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for label in order:
        seconds[label].append(run_one(label))
    return order, seconds


def summarise(seconds: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles (numpy's linear interpolation), IQR, extremes and count of step times."""
    a = np.asarray(seconds, np.float64)
    q1, median, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": float(a.min()), "max_s": float(a.max()), "n": int(a.size)}


def paired_ratio(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Arm A over arm B round by round: the median of ``a_i / b_i`` (the i-th timed step of each arm ran in
    the same round of the interleaving, one after the other, so a drift of the machine between rounds, which
    moves both medians, cancels in each ratio) with its bootstrap confidence interval (scipy.stats.bootstrap,
    percentile method, seeded). Rounds where either arm failed (NaN) are left out."""
    from scipy.stats import bootstrap

    r = np.asarray(a, np.float64) / np.asarray(b, np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2:
        return {"median": float(np.median(r)) if r.size else math.nan, "ci": [math.nan, math.nan], "confidence": confidence, "n": int(r.size)}
    ci = bootstrap((r,), np.median, confidence_level=confidence, method="percentile", n_resamples=2000,
                   random_state=np.random.default_rng(seed)).confidence_interval
    return {"median": float(np.median(r)), "ci": [float(ci.low), float(ci.high)], "confidence": confidence, "n": int(r.size)}


# --- FLOPs and the floor --------------------------------------------------------------------------------
def count_flops(port: Any, loss: str, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """FLOPs of one forward + backward of ``loss`` on ``port`` (build it on the ``meta`` device: shapes
    only), as ``FlopCounterMode`` counts them: 2·m·n·k per matmul / addmm / bmm (and its convolution
    rule), per gradient it actually computes (none for an input that needs none); elementwise ops 0."""
    from torch.utils.flop_counter import FlopCounterMode

    for p in port.module.parameters():
        p.grad = None
    with FlopCounterMode(display=False) as counter:
        port.loss_tensor(loss, batch).backward()
    for p in port.module.parameters():
        p.grad = None
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "by_op": dict(sorted(by_op.items()))}


def gemm_peak(device: str, tf32: bool, n: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """The device's measured float32 GEMM rate (best of ``repeats`` n x n matmuls, TF32 as given): the
    rate no step can beat, so FLOPs / peak is the floor under its time. On CPU the best of the two GEMM
    libraries torch carries, MKL (``torch.mm``) and oneDNN (which the DPSOM port's Dense layers and TF's
    MatMul run): on a Zen-1 host MKL's square GEMM ran at 27 GFLOP/s where oneDNN's reached 43 and the
    steps' own GEMMs beat the MKL-only "peak" (a floor above 100 %)."""
    import torch

    n = n or GEMM_N["cuda" if device.startswith("cuda") else "cpu"]
    with preserved_torch_state():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
        out = torch.empty(n, n, device=device)
        libraries: dict[str, Callable[[], Any]] = {"torch.mm": lambda: torch.mm(a, b, out=out)}
        if device == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            libraries["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # a @ b^T
        timed = clock(device)
        best: dict[str, float] = {}
        for name, gemm in libraries.items():
            for _ in range(2):  # warm-up: library handles, kernel choice
                gemm()
            best[name] = min(timed(gemm) for _ in range(repeats))
    library = min(best, key=best.__getitem__)
    return {"flops_per_s": 2.0 * n**3 / best[library], "n": n, "best_s": best[library], "library": library,
            "best_s_by_library": best, "repeats": repeats, "dtype": "float32", "tf32": tf32, "threads": torch.get_num_threads()}


# --- profile per canonical layer ------------------------------------------------------------------------
LAYER = "layer:"  # prefix of the profiler ranges opened around each mapped module
BACKWARD = "autograd::engine::evaluate_function: "


def layer_modules(side: Any) -> dict[str, Any]:
    """Canonical layer name -> the torch module holding its weights, from the side's mapping table
    (``encoder.fc1.kernel`` -> ``encoder.fc1.weight`` gives ``encoder.fc1`` -> module ``encoder.fc1``)."""
    modules = dict(side.module.named_modules())
    out: dict[str, Any] = {}
    for row in side.table:
        if row.torch_key and "." in row.canonical:
            path = row.torch_key.rsplit(".", 1)[0] if "." in row.torch_key else ""
            if path in modules:
                out.setdefault(row.canonical.rsplit(".", 1)[0], modules[path])
    return out


def _zero() -> dict[str, float]:
    """A layer's profile row before any op is added to it."""
    return {"forward_cpu_ms": 0.0, "forward_device_ms": 0.0, "backward_cpu_ms": 0.0, "backward_device_ms": 0.0}


def _top_level(layers: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-layer rows summed per top-level name (``encoder.fc1`` -> ``encoder``)."""
    top: dict[str, dict[str, float]] = {}
    for name, row in layers.items():
        agg = top.setdefault(name.split(".", 1)[0], _zero())
        for k, v in row.items():
            agg[k] += v
    return top


def attribute(events: Sequence[Any], to_ms: float = 1e-3) -> dict[str, Any]:
    """Profiler events -> CPU and device milliseconds per canonical layer, forward and backward, and per
    top-level name. A forward op belongs to its innermost ``layer:`` range; a backward node to the layer
    of the forward op with its sequence number; the rest is ``unattributed``."""

    def layer_of(e: Any) -> str | None:
        while e is not None:
            if e.name.startswith(LAYER):
                return e.name[len(LAYER):]
            e = e.cpu_parent
        return None

    def device_time(e: Any) -> float:
        return float(getattr(e, "device_time_total", 0.0) or 0.0)

    layers: dict[str, dict[str, float]] = {}
    seq_layer: dict[int, str] = {}
    for e in events:
        if e.name.startswith(LAYER):
            row = layers.setdefault(e.name[len(LAYER):], _zero())
            row["forward_cpu_ms"] += e.cpu_time_total * to_ms
            row["forward_device_ms"] += device_time(e) * to_ms
        elif e.sequence_nr >= 0 and not e.name.startswith(BACKWARD) and (name := layer_of(e)) is not None:
            seq_layer.setdefault(e.sequence_nr, name)
    total = {"cpu_ms": 0.0, "device_ms": 0.0}
    attributed = {"cpu_ms": 0.0, "device_ms": 0.0}
    for e in events:
        if e.cpu_parent is not None:
            continue
        total["cpu_ms"] += e.cpu_time_total * to_ms
        total["device_ms"] += device_time(e) * to_ms
        if e.name.startswith(LAYER):
            attributed["cpu_ms"] += e.cpu_time_total * to_ms
            attributed["device_ms"] += device_time(e) * to_ms
        elif e.name.startswith(BACKWARD) and e.sequence_nr in seq_layer:
            row = layers.setdefault(seq_layer[e.sequence_nr], _zero())
            row["backward_cpu_ms"] += e.cpu_time_total * to_ms
            row["backward_device_ms"] += device_time(e) * to_ms
            attributed["cpu_ms"] += e.cpu_time_total * to_ms
            attributed["device_ms"] += device_time(e) * to_ms
    top = _top_level(layers)
    return {"layers": dict(sorted(layers.items())), "top_level": dict(sorted(top.items())), "total": total,
            "unattributed": {k: total[k] - attributed[k] for k in total}}


def graph_scopes(table: Sequence[Any]) -> dict[str, str]:
    """TF name scope -> canonical layer, from a mapping table's ``tf_variable`` column
    (``z_e/encoder/dense_1/kernel`` -> ``z_e/encoder/dense_1`` -> ``encoder.fc2``)."""
    return {row.tf_variable.rsplit("/", 1)[0]: row.canonical.rsplit(".", 1)[0]
            for row in table if row.tf_variable and "/" in row.tf_variable and "." in row.canonical}


GRADIENT_SCOPE = re.compile(r"^(?:[^/]+/)?gradients(?:_\d+)?/")  # tf.gradients' scope (``optimize/gradients_1/...``)
APPLY_SCOPE = re.compile(r"^(?:[^/]+/)?Adam(?:_\d+)?/update_")  # the optimizer's per-variable update ops


def attribute_graph_ops(ops: Iterable[tuple[str, str, float]], scopes: Mapping[str, str]) -> dict[str, Any]:
    """A TF graph step's op times (``(device, node name, microseconds)``, from its ``RunMetadata``) in
    :func:`attribute`'s layout. A node belongs to the layer whose name scope it is in (the longest
    scope that prefixes it); under the gradient scope it is that layer's backward; an optimizer update
    op is summed in ``optimizer`` (the torch profile leaves its optimizer unattributed). An op on a
    GPU counts as device time, on a CPU as CPU time; times of ops that ran at once add up."""

    ordered = sorted(scopes, key=len, reverse=True)
    layers: dict[str, dict[str, float]] = {}
    total = {"cpu_ms": 0.0, "device_ms": 0.0}
    attributed = {"cpu_ms": 0.0, "device_ms": 0.0}
    optimizer = {"cpu_ms": 0.0, "device_ms": 0.0}
    for device, name, micros in ops:
        where = "device" if "GPU" in device.upper() else "cpu"
        ms = micros * 1e-3
        total[f"{where}_ms"] += ms
        if APPLY_SCOPE.match(name):
            optimizer[f"{where}_ms"] += ms
            attributed[f"{where}_ms"] += ms
            continue
        backward = GRADIENT_SCOPE.match(name)
        bare = name[backward.end():] if backward else name
        scope = next((sc for sc in ordered if bare.startswith(sc + "/")), None)
        if scope is None:
            continue
        layers.setdefault(scopes[scope], _zero())[f"{'backward' if backward else 'forward'}_{where}_ms"] += ms
        attributed[f"{where}_ms"] += ms
    top = _top_level(layers)
    return {"layers": dict(sorted(layers.items())), "top_level": dict(sorted(top.items())), "total": total,
            "unattributed": {k: total[k] - attributed[k] for k in total}, "optimizer": optimizer}


def profile_step(side: Any, step: Callable[[], Any], device: str) -> dict[str, Any]:
    """One ``step()`` of a torch side under ``torch.profiler``, attributed to canonical layers (:func:`attribute`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    open_ranges: dict[str, list[Any]] = {}

    def enter(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            rf = record_function(f"{LAYER}{name}")
            rf.__enter__()
            open_ranges.setdefault(name, []).append(rf)
        return hook

    def leave(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            open_ranges[name].pop().__exit__(None, None, None)
        return hook

    handles = []
    for name, module in layer_modules(side).items():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name))]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with profile(activities=activities) as prof:
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    return attribute(prof.events())


# --- environment -------------------------------------------------------------------------------------
def require_device(device: str) -> None:
    """Refuse, in one line, a device torch cannot use here."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        raise NoDevice(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} (built with {built}); "
                       "run on a machine with a GPU, or use --device cpu")
    if device not in ("cpu", "meta") and not device.startswith("cuda"):
        raise NoDevice(f"--device {device}: not supported by the timing tier (cpu or cuda[:N])")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_family_model() -> str:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:12] if ":" in line)
        return f"family {fields['cpu family'].strip()} model {fields['model'].strip()}"
    except (OSError, KeyError):
        return "?"


def host_tag(device: str) -> str:
    """The device part of a result's file name: ``cpu-avx512`` on CPU (:func:`cpu_isa`), ``cuda0`` on a GPU."""
    return f"cpu-{cpu_isa().lower()}" if device == "cpu" else device.replace(":", "")


def device_label(doc: Mapping[str, Any]) -> str:
    """The device column of the tables: ``cpu AVX512``; plain ``cpu`` for results stored before the ISA was."""
    isa = doc["environment"].get("cpu_isa") if doc["device"] == "cpu" else None
    return f"{doc['device']} {isa}" if isa else doc["device"]


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: str) -> dict[str, Any]:
    """Where the timings were taken: versions and git commit (harness.env), the device, driver and CUDA."""
    import torch

    from harness.env import fingerprint

    env = {**fingerprint(), "cpu": _cpu_name(), "device": device}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        env.update({"device_name": torch.cuda.get_device_name(index), "cuda_runtime": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "driver": _nvidia_driver(),
                    "device_memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)})
    else:
        env.update({"device_name": f"{env['cpu']} ({_cpu_family_model()}, {env['cpu_isa']})", "cuda_runtime": None, "cudnn": None,
                    "driver": None})
    return env


# --- the tier ------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One timed side: the port in one mode (torch settings applied before each of its steps), or the
    reference (its framework's own settings; ``settings`` None)."""

    label: str
    side: Any
    framework: str
    device: str
    settings: Settings | None = None


def _finite(record: Mapping[str, Any]) -> bool:
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def _reference_settings(device: str) -> dict[str, Any]:
    """The TF reference's own speed settings, as TensorFlow reports them (0 threads: TF's default, one per core)."""
    tf = sys.modules.get("tensorflow")
    from reference_tf import onednn_enabled

    out: dict[str, Any] = {"device": device, "mode": REFERENCE, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                           "tf32": None, "intra_op_threads": None, "inter_op_threads": None, "onednn": onednn_enabled()}
    if tf is not None:
        out.update(tf32=bool(tf.config.experimental.tensor_float_32_execution_enabled()),
                   intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
                   inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads())
    return out


def result_path(out: Path, doc: Mapping[str, Any]) -> Path:
    """``<model>-<variant>-<host>-<arm>[-competeN][-tfonednn].json``: every arm of a run whose TF ran its
    oneDNN kernels (``TF_ENABLE_ONEDNN_OPTS=1``, not the reference's pinned Eigen ones) is stored apart."""
    tag = compete_suffix(doc["settings"].get("competing", 0)).replace("_", "") + ("-tfonednn" if doc["environment"].get("tf.onednn") else "")
    return Path(out) / f"{doc['model']}-{doc['variant']}-{host_tag(doc['device'])}-{doc['mode']}{tag}.json"


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Atomic: the file is the old document or the new one, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _time_phases(spec: Any, arms: Sequence[Arm], batch: Mapping[str, np.ndarray], meta: Any, repeats: int, warmup: int,
                 profile: bool, phases: dict[str, dict[str, Any]], profiles: dict[str, dict[str, Any]],
                 applied: dict[str, dict[str, Any]], peaks: Mapping[tuple[str, bool], dict[str, Any]]) -> None:
    """Every phase of ``spec``, its arms interleaved; fills ``phases`` / ``profiles`` / ``applied`` per arm label."""
    by_label = {arm.label: arm for arm in arms}
    for phase in spec.phases:
        flops = count_flops(meta, phase.loss, batch)
        finite = {arm.label: True for arm in arms}
        failed: dict[str, str] = {}
        last: dict[str, dict[str, Any]] = {}

        def run_one(label: str, phase=phase, finite=finite, failed=failed, last=last) -> float:
            arm = by_label[label]
            if label in failed:  # out of the rotation for this phase
                return math.nan
            if arm.settings is not None:
                applied[label] = apply(arm.settings)
            record: dict[str, Any] = {}
            try:
                seconds = clock(arm.device if arm.framework == "torch" else "cpu")(
                    lambda: record.update(arm.side.step(phase.name, batch, phase.lr_feed)))
            except (RuntimeError, MemoryError) as err:  # out of memory, a kernel exact mode refuses: recorded, not retried
                failed[label] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                return math.nan
            finite[label] &= _finite(record)
            last[label] = record
            return seconds

        _, seconds = run_interleaved([arm.label for arm in arms], repeats, warmup, run_one)
        medians = {label: float(np.median(s)) for label, s in seconds.items() if label not in failed}
        for arm in arms:
            if arm.label in failed:
                phases[arm.label][phase.name] = {"error": failed[arm.label], "n": 0, "flops": flops["flops"], "loss": phase.loss,
                                                 "lr_feed": phase.lr_feed}
                continue
            stats = summarise(seconds[arm.label])
            peak = peaks[(arm.device, bool(arm.settings and arm.settings.tf32))]
            floor = flops["flops"] / peak["flops_per_s"]
            phases[arm.label][phase.name] = {
                **stats, "flops": flops["flops"], "flops_by_op": flops["by_op"], "floor_s": floor,
                "pct_of_floor": 100.0 * floor / stats["median_s"], "finite": finite[arm.label], "loss": phase.loss,
                "lr_feed": phase.lr_feed, "seconds": seconds[arm.label], "last_record": last[arm.label],
                "steps_taken": warmup + repeats,
                "ratio_to": {o: stats["median_s"] / m for o, m in medians.items() if o != arm.label}}
            if profile:
                if arm.settings is not None:
                    apply(arm.settings)
                try:
                    profiles[arm.label][phase.name] = arm.side.profile_step(phase.name, batch, phase.lr_feed)
                    phases[arm.label][phase.name]["steps_taken"] += 1  # the profiled step is a step too
                except Unsupported as err:
                    profiles[arm.label][phase.name] = {"unsupported": str(err)}
        exact = by_label.get(EXACT)
        others = [arm for arm in arms if arm.settings is not None and arm is not exact and arm.label not in failed]
        if exact is not None and EXACT not in failed and others:  # each other mode's weights after the phase (drift_from_exact)
            base = exact.side.get_weights()
            for arm in others:
                phases[arm.label][phase.name]["weights_vs_exact"] = weight_drift(base, arm.side.get_weights())
            del base


def set_compiled(side: Any, on: bool) -> bool | str:
    """Switch a port side's training step to compiled or eager (the protocol's optional ``set_compiled``):
    what the arm runs, or why it cannot compile (it then runs eager, and its document says so)."""
    try:
        side.set_compiled(on)
    except (Unsupported, AttributeError) as err:
        return f"unsupported: {err}" if on else False
    return on


def weight_drift(exact: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Where ``other``'s weights are against ``exact``'s: the largest absolute and scale-relative
    difference (|Δ| / max |w| of the tensor), in which tensor, and how many tensors are bit-identical."""
    worst_abs, worst_rel, identical = ("", 0.0), ("", 0.0), 0
    for name, w in exact.items():
        diff = float(np.max(np.abs(np.asarray(other[name], np.float64) - w), initial=0.0))
        rel = diff / max(float(np.max(np.abs(w), initial=0.0)), np.finfo(np.float32).tiny)
        identical += int(np.array_equal(other[name], w))
        worst_abs, worst_rel = max(worst_abs, (name, diff), key=lambda t: t[1]), max(worst_rel, (name, rel), key=lambda t: t[1])
    return {"tensors": len(exact), "bit_identical": identical, "max_abs": worst_abs[1], "max_abs_tensor": worst_abs[0],
            "max_rel": worst_rel[1], "max_rel_tensor": worst_rel[0]}


def drift_from_exact(labels: Sequence[str], phases: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """How far each port mode in ``labels`` went from the exact arm: every arm started from the same
    weights and took the same steps on the same batch (warm-up, timed and profiled, phase by phase), so
    its weights after each phase (``weights_vs_exact``, :func:`weight_drift`) and each phase's last loss
    terms (mode − exact) differ only by the modes' arithmetic (TF32, the compiler's kernels and fusions),
    compounded by the steps. Not measured (a reason instead) where an arm failed a phase."""
    out: dict[str, dict[str, Any]] = {}
    if EXACT not in phases:
        return out
    base = phases[EXACT]
    for label in labels:
        if label == EXACT:
            continue
        failed = [f"{arm} {name}" for arm in (EXACT, label) for name, p in phases[arm].items() if "error" in p]
        steps = {name: p["steps_taken"] for name, p in phases[label].items() if "error" not in p}
        if failed or steps != {name: p["steps_taken"] for name, p in base.items() if "error" not in p}:
            why = f"failed in {', '.join(failed)}" if failed else "a different number of steps (a profiled step one of them could not take)"
            out[label] = {"not_measured": f"the arms did not take the same steps: {why}"}
            continue
        out[label] = {"weights_after": {name: p["weights_vs_exact"] for name, p in phases[label].items()},
                      "last_losses": {name: {k: v - base[name]["last_record"][k] for k, v in p["last_record"].items()
                                             if k not in ("lr", "global_step") and k in base[name]["last_record"]}
                                      for name, p in phases[label].items()},
                      "steps_per_phase": steps}
    return out


def run(model: str, variant: str, device: str = "cpu", modes: Sequence[str] = ("exact",), reference: bool = False,
        repeats: int = REPEATS, warmup: int = WARMUP, threads: int | None = None, seed: int = 0, dataset: str | None = None,
        profile: bool = False, gemm_n: int | None = None, out: Path | None = RESULTS, compete: int = 0) -> list[dict[str, Any]]:
    """Time every phase of ``model``/``variant`` for each arm; one document per arm, written to ``out``
    (None: not written). See the module docstring for what is measured and why."""
    import torch

    from harness.spec import get_spec
    from harness.tiers import draw, shapes

    require_device(device)
    if not modes and not reference:
        raise ValueError("nothing to time: give at least one mode (--modes) or --reference")
    spec = get_spec(model)
    cfg = spec.get_config(variant)
    threads = threads or torch.get_num_threads()
    arms = [Arm(mode, spec.make_port(cfg, "float32", device), "torch", device, Settings.for_mode(mode, device, threads, compete))
            for mode in modes]
    compiled = {arm.label: set_compiled(arm.side, arm.settings.compiled) for arm in arms if arm.settings is not None}
    if reference:
        ref = spec.make_reference(cfg, "float32")
        tf = sys.modules.get("tensorflow")
        ref_device = "cuda" if tf is not None and tf.config.list_physical_devices("GPU") else "cpu"
        arms.append(Arm(REFERENCE, ref, "tensorflow", ref_device))
    weights, batch, data_name = draw(spec, cfg, seed, dataset, shapes(arms[0].side))
    for arm in arms:
        arm.side.set_weights(weights)
    meta = spec.make_port(cfg, "float32", "meta")  # FLOPs: shapes only
    phases: dict[str, dict[str, dict[str, Any]]] = {arm.label: {} for arm in arms}
    profiles: dict[str, dict[str, Any]] = {arm.label: {} for arm in arms}
    applied: dict[str, dict[str, Any]] = {}
    peaks: dict[tuple[str, bool], dict[str, Any]] = {}
    load_before = os.getloadavg()
    with preserved_torch_state():
        for arm in arms:  # the device's peak: measured before any competitor starts
            key = (arm.device, bool(arm.settings and arm.settings.tf32))
            if key not in peaks:
                if arm.settings is not None:
                    apply(arm.settings)
                peaks[key] = gemm_peak(arm.device, key[1], gemm_n)
        with competing(compete) as competitors:
            _time_phases(spec, arms, batch, meta, repeats, warmup, profile, phases, profiles, applied, peaks)
    drifts = drift_from_exact([arm.label for arm in arms if arm.settings is not None], phases)
    env = environment(device)
    docs = []
    for arm in arms:
        settings = asdict(arm.settings) if arm.settings else {**_reference_settings(arm.device), "competing": compete}
        doc = {
            "schema": SCHEMA, "model": model, "variant": variant, "device": arm.device, "mode": arm.label, "framework": arm.framework,
            "key": arm.settings.key if arm.settings else (f"{arm.device}-{REFERENCE}-tf32_{int(settings['tf32'])}-intra_"
                                                          f"{settings['intra_op_threads']}-inter_{settings['inter_op_threads']}-onednn_{int(bool(settings['onednn']))}"
                                                          f"-omp_{settings['omp_wait_policy']}{compete_suffix(compete)}"),
            "settings": settings, "applied": applied.get(arm.label), "compiled": compiled.get(arm.label),
            "environment": {**env, "device": arm.device},
            "peak": peaks[(arm.device, bool(arm.settings and arm.settings.tf32))], "arms": [a.label for a in arms],
            "order": "interleaved round robin (A B A B ...) after per-arm warm-up", "warmup": warmup, "repeats": repeats,
            "batch_size": int(len(next(iter(batch.values())))), "data": data_name, "seed": seed,
            "flops_method": "torch.utils.flop_counter.FlopCounterMode over one forward + backward of the phase's loss, port on the meta device",
            "clock": "cuda events" if arm.device.startswith("cuda") and arm.framework == "torch" else "time.perf_counter",
            "phase_order": [p.name for p in spec.phases], "phases": phases[arm.label],
            "load_average_before": list(load_before), "competitors": competitors,
        }
        if profile and profiles[arm.label]:
            doc["profile"] = profiles[arm.label]
        if arm.label in drifts:
            doc["drift_from_exact"] = drifts[arm.label]
        if out is not None:
            write_json(result_path(out, doc), doc)
        docs.append(doc)
    return docs


# --- README table ------------------------------------------------------------------------------------
def tf_kernels(env: Mapping[str, Any]) -> str:
    """TF's CPU kernel library in a run's environment (``tf.onednn``; runs stored before it was recorded: not recorded)."""
    return {True: "oneDNN", False: "Eigen"}.get(env.get("tf.onednn"), "not recorded")


def _ratio_summary(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Port arms against the TF reference timed in the same run: one row per phase, quiet and under
    competition side by side (issue 11's target: port / TF <= 0.9 in every phase, both conditions): the
    ratio of the two medians, and the round-by-round ratio with its 95 % interval (:func:`paired_ratio`,
    from the two arms' stored step times)."""
    def run_of(d: Mapping[str, Any]) -> tuple:
        return d["model"], d["variant"], device_label(d), d["settings"].get("competing", 0), tuple(d["arms"]), tf_kernels(d["environment"])

    references = {run_of(d): d for d in docs if d["mode"] == REFERENCE}
    rows = []
    for d in docs:
        run = run_of(d)
        ref = references.get(run)
        if d["framework"] != "torch" or ref is None:
            continue
        for phase in d["phase_order"]:
            p, r = d["phases"][phase], ref["phases"][phase]
            if "error" in p or "error" in r:
                continue
            paired = paired_ratio(p["seconds"], r["seconds"])
            rows.append(f"| {d['model']} / {d['variant']} | {device_label(d)} | {d['mode']} | {run[3]} | {run[5]} | {phase} | {1e3 * r['median_s']:.4g} | "
                        f"{1e3 * p['median_s']:.4g} | **{p['median_s'] / r['median_s']:.2f}** | {paired['median']:.2f} "
                        f"[{paired['ci'][0]:.2f}, {paired['ci'][1]:.2f}] |")
    if not rows:
        return []
    return ["Port / TF reference, same run, interleaved (medians; paired: the median of the per-round ratios, "
            "95 % bootstrap interval):", "",
            "| model / variant | device | port mode | competing processes | TF kernels | phase | TF reference (ms) | port (ms) | port / TF "
            "| paired port / TF [95 % CI] |", "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _loss_drift(phase: Mapping[str, Any], deltas: Mapping[str, float]) -> str:
    """The phase's minimised loss at its last step, mode − exact, and that over exact's value."""
    loss = phase["loss"]
    if loss not in deltas:
        return "–"
    exact = phase["last_record"][loss] - deltas[loss]
    return f"{loss} {deltas[loss]:+.2g} ({deltas[loss] / exact:+.1e} of it)" if exact else f"{loss} {deltas[loss]:+.2g}"


def _drift_summary(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each non-exact port arm against the exact arm of its run: where its weights ended after the same
    steps (:func:`drift_from_exact`), its last loss terms, and its step time over the exact arm's."""
    rows = []
    for d in docs:
        drift = d.get("drift_from_exact")
        if not drift:
            continue
        head = f"| {d['model']} / {d['variant']} | {device_label(d)} | {d['mode']} | {d.get('compiled')} | {d['settings'].get('competing', 0)} |"
        if "not_measured" in drift:
            rows.append(f"{head} not measured: {drift['not_measured']} | | | |")
            continue
        order = [phase for phase in d["phase_order"] if phase in drift["weights_after"]]
        after = drift["weights_after"]
        rel = ", ".join(f"{phase} {after[phase]['max_rel']:.2g} (`{after[phase]['max_rel_tensor']}`)" for phase in order)
        same = ", ".join(f"{after[phase]['bit_identical']}" for phase in order)
        losses = ", ".join(_loss_drift(d["phases"][phase], drift["last_losses"][phase]) for phase in order)
        times = ", ".join(f"{phase} {d['phases'][phase]['ratio_to'][EXACT]:.2f}" for phase in order)
        steps = ", ".join(f"{drift['steps_per_phase'][phase]}" for phase in order)
        rows.append(f"{head} {steps} | {same} of {after[order[-1]]['tensors']} | {rel} | {losses} | {times} |")
    if not rows:
        return []
    return ["Port modes against the parity-exact one, same run: every arm started from the same weights and took the same "
            "steps on the same batch, phase after phase (steps per phase); after each phase, how many weight tensors are "
            "bit-identical to exact's and the largest |Δ| / max |w| of a tensor (which), the loss the phase minimises at its last step "
            "(mode − exact; the document holds every term), and the median step time over exact's:", "",
            "| model / variant | device | mode | compiled | competing processes | steps per phase | tensors bit-identical "
            "| max Δ / max abs weight | last step's loss, Δ | step time / exact |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _load_words(doc: Mapping[str, Any]) -> str:
    """How loaded the machine was: the load average before, and what each competing process got."""
    load = doc.get("load_average_before")
    words = f"load average before {load[0]:.2f}" if load else "load not recorded"
    shares = [c["cpu_s"] / c["wall_s"] for c in doc.get("competitors") or [] if c["wall_s"] > 0]
    if shares:
        words += f", {len(shares)} competing CPU-bound process(es) running throughout, using {', '.join(f'{100 * x:.0f} %' for x in shares)} of a core"
    return words


def markdown(folder: Path) -> str:
    """The README timing table from the stored documents in ``folder`` (results/timing)."""
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        return ("No T6 timings stored (results/timing/ is empty). Produce them on a quiet machine, GPU preferred: "
                "`nox -s timing -- --model dpsom --variant dense --device cuda --modes exact,fast` "
                "(or `python -m harness.timing ...`), then `python -m harness.readme`.")
    docs = [json.loads(p.read_text()) for p in paths]
    lines = _ratio_summary(docs) + _drift_summary(docs)
    lines += ["Every arm:", ""] if lines else []
    lines += ["| model / variant | device | arm (settings key) | phase | median (ms) | IQR (ms) | n | GFLOP / step | GEMM peak (TFLOP/s) "
             "| % of floor | median vs other arms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for path, d in zip(paths, docs, strict=True):
        env, peak = d["environment"], d["peak"]
        notes.append(f"`{path.name}`: {env.get('device_name')}"
                     + (f", driver {env['driver']}, CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else "")
                     + f", torch {env.get('version.torch', '?')}, TF {env.get('version.tensorflow', 'not loaded')}"
                     + (f" (kernels: {tf_kernels(env)})" if d["framework"] == "tensorflow" else "")
                     + ", commit "
                     f"{str(env.get('git_commit'))[:12]}; {d['repeats']} interleaved steps per arm ({', '.join(d['arms'])}), warm-up {d['warmup']}, "
                     f"batch {d['batch_size']}; {_load_words(d)}")
        for phase in d["phase_order"]:
            p = d["phases"][phase]
            if "error" in p:
                lines.append(f"| {d['model']} / {d['variant']} | {device_label(d)} | {d['mode']} (`{d['key']}`) | {phase} | failed: "
                             f"{p['error'][:120]} | | 0 | {p['flops'] / 1e9:.3g} | | | |")
                continue
            ratios = ", ".join(f"{v:.2f}× {k}" for k, v in sorted(p["ratio_to"].items())) or "–"
            lines.append(f"| {d['model']} / {d['variant']} | {device_label(d)} | {d['mode']} (`{d['key']}`) | {phase} | {1e3 * p['median_s']:.3g} | "
                         f"{1e3 * p['iqr_s']:.2g} | {p['n']} | {p['flops'] / 1e9:.3g} | {peak['flops_per_s'] / 1e12:.3g} | "
                         f"{p['pct_of_floor']:.2g} | {ratios} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


# --- CLI -------------------------------------------------------------------------------------------
USER_ERRORS = (NoDevice, KeyError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.timing", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--modes", default="exact", help=f"comma-separated port modes, interleaved ({', '.join(MODES)}; default exact)")
    parser.add_argument("--reference", action="store_true", help="also time the TF reference, interleaved with the port's modes")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"measured steps per arm and phase (default {REPEATS})")
    parser.add_argument("--warmup", type=int, default=WARMUP, help=f"warm-up steps per arm and phase (default {WARMUP})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count, recorded)")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                        help="set OMP_WAIT_POLICY before torch starts (default: the environment's, recorded)")
    parser.add_argument("--profile", action="store_true", help="each arm's own profiler (torch.profiler, TF's RunMetadata trace): times per canonical layer, one step per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--gemm-n", type=int, default=None, help="size of the peak's square matmul (default 8192 CUDA, 1024 CPU)")
    parser.add_argument("--compete", type=int, default=0, metavar="N",
                        help="run N CPU-bound processes beside the measurement (a shared machine; default 0, recorded)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        if args.omp_wait_policy is not None:
            if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY") != args.omp_wait_policy:
                raise ValueError(f"--omp-wait-policy {args.omp_wait_policy}: torch's OpenMP runtime has already started with "
                                 f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; set it in the environment instead")
            os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch is imported: the runtime reads it once
        require_device(args.device)
        modes = [m for m in args.modes.split(",") if m]
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"--modes: unknown {unknown}; known: {sorted(MODES)}")
        docs = run(args.model, args.variant, args.device, modes, args.reference, args.repeats, args.warmup, args.threads, args.seed,
                   args.dataset, args.profile, args.gemm_n, args.out, args.compete)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    for d in docs:
        for phase in d["phase_order"]:
            p = d["phases"][phase]
            if "error" in p:
                print(f"{d['model']}-{d['variant']} {d['mode']:9s} {phase:10s} failed: {p['error']}")
                continue
            print(f"{d['model']}-{d['variant']} {d['mode']:9s} {phase:10s} median {1e3 * p['median_s']:9.3f} ms  IQR {1e3 * p['iqr_s']:8.3f} ms  "
                  f"{p['flops'] / 1e9:8.3f} GFLOP  {p['pct_of_floor']:6.2f} % of floor")
            if p["pct_of_floor"] > 100:  # seen on a VM: 148-162 % in one run, 71-76 % in the next
                print(f"warning: {d['mode']} {phase} ran above the measured GEMM peak ({d['peak']['flops_per_s'] / 1e9:.0f} GFLOP/s): "
                      "the peak was measured while the machine was busy; rerun when it is quiet", file=sys.stderr)
    if args.out is not None:
        print(f"written: {', '.join(str(result_path(args.out, d)) for d in docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
