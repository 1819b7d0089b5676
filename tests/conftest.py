"""Suite-wide hooks: tests marked ``tf`` skip with one line where TensorFlow is not installed."""

from __future__ import annotations

import importlib.util

import pytest

import reference_tf  # noqa: F401  pins TF's environment (TF_ENABLE_ONEDNN_OPTS) before any test module loads TF


def _tensorflow_installed() -> bool:
    """Whether ``import tensorflow`` could work, found without importing it (that takes seconds)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a broken install, or a stub module without __spec__
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _tensorflow_installed():
        return
    skip_tf = pytest.mark.skip(reason="TensorFlow not installed: test marked 'tf' skipped")
    for item in items:
        if item.get_closest_marker("tf") is not None:
            item.add_marker(skip_tf)
