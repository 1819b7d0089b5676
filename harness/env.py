"""Seeds, determinism switches and the environment fingerprint: set in ONE place and recorded.

Model files never seed anything; entry points and the harness call :func:`seed_all` and store
:func:`fingerprint` next to every result.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

FRAMEWORKS = ("numpy", "scipy", "sklearn", "pandas", "torch", "tensorflow", "tensorflow_probability", "tf_keras")


def seed_all(seed: int, *, deterministic: bool = True) -> dict[str, Any]:
    """Seed python, numpy and torch (if installed) and switch torch to deterministic, TF32-free math.

    TensorFlow's graph-level seed belongs to the reference's own ``tf.Graph`` (set from the config),
    so nothing global is touched on the TF side. Returns the switches as set, for the record.
    """
    random.seed(seed)
    np.random.seed(seed)
    flags: dict[str, Any] = {"seed": seed}
    if importlib.util.find_spec("torch") is not None:  # imported here: switches set after a lazy import would be lost
        import torch

        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(deterministic, warn_only=False)
        # deterministic mode also NaN-fills every torch.empty (a debugging aid: no result depends on it);
        # measured 4.5 % of the CPU time of a dense joint step (its 2000 x 5150 head gradient and [B, D, D] buffers)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        flags.update(torch_deterministic=deterministic, torch_tf32=False, torch_fill_uninitialized_memory=False)
    return flags


def git_commit(root: Path | None = None) -> str | None:
    """HEAD, "+dirty" when tracked code differs from it; results/ and README.md are left out: what the
    suite itself writes there (a timing run written before the next one starts, the README tables it
    regenerates) does not make the code dirty."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results", ":(top,exclude)README.md"], cwd=root or Path(__file__).resolve().parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (commit + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_isa() -> str:
    """The vector ISA torch dispatches to (``AVX512``, ``AVX2``, ...): it picks the port's kernels (the
    Dense backward's library, ports/dpsom/model.py) and MKL's and oneDNN's paths, so results of two
    ISAs are two results, not one measured twice (Zen 1 AVX2 and Zen 5 AVX-512 rank the two frameworks'
    CPU step times the other way round)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def fingerprint() -> dict[str, Any]:
    """Versions of the frameworks already imported (never imports TF just to report it), device, threads."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
    }
    for name in FRAMEWORKS:
        if name in sys.modules or name in ("numpy",):
            mod = importlib.import_module(name)
            info[f"version.{name}"] = getattr(mod, "__version__", "?")
    if "torch" in sys.modules:
        import torch

        info["torch.num_threads"] = torch.get_num_threads()
        info["torch.cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch.tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["torch.tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        info["torch.deterministic"] = torch.are_deterministic_algorithms_enabled()
        info["cpu_isa"] = cpu_isa()
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        info["tf.gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
        info["tf.tf32"] = tf.config.experimental.tensor_float_32_execution_enabled()
        info["tf.legacy_keras"] = os.environ.get("TF_USE_LEGACY_KERAS")
        # reference_tf pins TF_ENABLE_ONEDNN_OPTS=0 (TF would turn oneDNN on by itself on some CPUs:
        # another kernel library, other floats, +3 GiB on conv on Zen 5); a user's explicit 1 still wins
        info["tf.onednn_env"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
        from reference_tf import onednn_enabled

        info["tf.onednn"] = onednn_enabled()
    return info
