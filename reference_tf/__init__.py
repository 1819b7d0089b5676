"""Pinned TF 1.x-style references reproducing the original code's behaviour exactly.

Importing a submodule needs TensorFlow with Keras 2 (``TF_USE_LEGACY_KERAS=1`` + tf-keras on TF >= 2.16);
:func:`reference_tf.require_tensorflow` raises one clear error when it is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # must precede the first TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def require_tensorflow():
    """Import TensorFlow, or fail naming what to install."""
    try:
        import tensorflow as tf  # noqa: F401
        import tensorflow_probability  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"reference_tf needs TensorFlow + TFP ({err}); install with "
            "`pip install -c constraints.txt tensorflow-cpu tf-keras tensorflow-probability` "
            "or run `nox -s tests` which does it"
        ) from err
    return tf
