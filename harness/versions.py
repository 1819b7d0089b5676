"""``python -m harness.versions``: print framework and device versions first, in every session."""

from __future__ import annotations

import importlib
import os


def main() -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("numpy", "scipy", "sklearn", "pandas", "torch", "tensorflow", "tf_keras", "tensorflow_probability"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            print(f"{name:24s} not installed")
            continue
        print(f"{name:24s} {getattr(mod, '__version__', '?')}")
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        print(f"{'torch device':24s} {device} (threads {torch.get_num_threads()})")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
