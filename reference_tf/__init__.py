"""Pinned TF 1.x-style references reproducing the original code's behaviour exactly.

Importing a submodule needs TensorFlow with Keras 2 (``TF_USE_LEGACY_KERAS=1`` + tf-keras on TF >= 2.16);
:func:`reference_tf.require_tensorflow` raises one clear error when it is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # must precede the first TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF >= 2.9 switches its CPU kernels to oneDNN by itself on CPUs with AVX512_VNNI / AMX (a Zen 5 host:
# IsMklEnabled() true; a Zen 1 host: false). The original ran TF 1.x's Eigen kernels. Pinned off, the
# reference runs one kernel library on every host, and the conv quick tier peaks at 3 824 MiB instead of
# 7.0 GiB (Zen 5, oneDNN's primitive caches). ``TF_ENABLE_ONEDNN_OPTS=1`` set by the user still wins;
# every fingerprint records the state (``tf.onednn``).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def onednn_enabled() -> bool | None:
    """Whether the loaded TensorFlow runs its oneDNN CPU kernels (None: TF not loaded, or no such probe)."""
    import sys

    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def require_tensorflow():
    """Import TensorFlow, or fail naming what to install; fail too if TF loaded before the pin above (it
    reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it loads) and so runs oneDNN where the environment says not."""
    try:
        import tensorflow as tf  # noqa: F401
        import tensorflow_probability  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"reference_tf needs TensorFlow + TFP ({err}); install with "
            "`pip install -c constraints.txt tensorflow-cpu tf-keras tensorflow-probability` "
            "or run `nox -s tests` which does it"
        ) from err
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false") and onednn_enabled():
        raise RuntimeError(
            "TensorFlow runs its oneDNN kernels but TF_ENABLE_ONEDNN_OPTS="
            f"{os.environ['TF_ENABLE_ONEDNN_OPTS']!r}: tensorflow was imported before reference_tf pinned it. "
            "Import reference_tf first, or set TF_ENABLE_ONEDNN_OPTS (0: the reference's Eigen kernels) "
            "before anything imports tensorflow"
        )
    return tf
