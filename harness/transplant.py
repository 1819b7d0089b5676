"""Weight-transplant tables: canonical name <-> torch key <-> TF variable <-> original checkpoint.

The canonical layout is TensorFlow's: Dense kernels ``(in, out)``, Conv2D kernels
``(kh, kw, in, out)``, Conv2DTranspose kernels ``(kh, kw, out, in)``, NHWC flatten order at the
conv <-> dense boundary. A table row names the torch state_dict key and one transform from a
closed set; every copy checks its shape, and missing / unexpected / mismatched names fail loudly
before anything is written. Framework-free: both sides and the harness use it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from typing import Mapping

import numpy as np

TRANSFORMS = ("identity", "transpose", "conv", "conv_transpose")


@dataclass(frozen=True)
class Row:
    canonical: str
    torch_key: str
    torch_transform: str
    tf_variable: str
    original_checkpoint: str


def load_table(model: str, variant: str) -> tuple[Row, ...]:
    """Rows of ``harness/tables/{model}_{variant}.csv`` (variant 'dense' or 'conv')."""
    name = f"{model}_{variant}.csv"
    text = resources.files("harness").joinpath("tables", name).read_text()
    rows = tuple(Row(**r) for r in csv.DictReader(text.splitlines()))
    bad = [r.canonical for r in rows if r.torch_transform not in TRANSFORMS]
    if bad:
        raise ValueError(f"{name}: unknown torch_transform for {bad}; expected one of {TRANSFORMS}")
    return rows


def canonical_to_torch(array: np.ndarray, transform: str) -> np.ndarray:
    """Canonical (TF) layout -> torch layout."""
    if transform == "identity":
        return array
    if transform == "transpose":  # Dense (in, out) -> nn.Linear (out, in)
        return np.ascontiguousarray(array.T)
    if transform in ("conv", "conv_transpose"):
        # Conv2D (kh,kw,in,out) -> (out,in,kh,kw); Conv2DTranspose (kh,kw,out,in) -> (in,out,kh,kw).
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def torch_to_canonical(array: np.ndarray, transform: str) -> np.ndarray:
    """Inverse of :func:`canonical_to_torch`."""
    if transform == "identity":
        return array
    if transform == "transpose":
        return np.ascontiguousarray(array.T)
    if transform in ("conv", "conv_transpose"):
        return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
    raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


class TransplantError(ValueError):
    """Raised with every problem listed; nothing has been written when it is raised."""


def check_weights(
    given: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    where: str,
) -> None:
    """Fail, listing every missing, unexpected and shape-mismatched name at once."""
    problems = []
    missing = sorted(set(expected_shapes) - set(given))
    unexpected = sorted(set(given) - set(expected_shapes))
    if missing:
        problems.append(f"missing: {missing}")
    if unexpected:
        problems.append(f"unexpected: {unexpected}")
    for name in sorted(set(given) & set(expected_shapes)):
        shape = tuple(np.shape(given[name]))
        if shape != tuple(expected_shapes[name]):
            problems.append(f"shape mismatch for {name}: got {shape}, expected {tuple(expected_shapes[name])}")
        elif not np.all(np.isfinite(given[name])):
            problems.append(f"non-finite values in {name}")
    if problems:
        raise TransplantError(f"{where}: nothing loaded; " + "; ".join(problems))


def read_original_checkpoint(path: str, model: str, variant: str) -> dict[str, np.ndarray]:
    """Canonical weights from a TF checkpoint in the ORIGINAL code's variable names (table column
    ``original_checkpoint``), read with TF's checkpoint reader (TensorFlow needed, no graph built).

    Every table name missing from the checkpoint, or stored with a different rank, is listed and
    nothing is returned; optimizer slots and ``global_step`` in the checkpoint are ignored.
    """
    from reference_tf import require_tensorflow

    tf = require_tensorflow()
    try:
        reader = tf.train.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 -- TF raises several types for a bad prefix
        raise TransplantError(f"{path}: not a readable TF checkpoint ({type(err).__name__}: {err})") from None
    stored = reader.get_variable_to_shape_map()
    rows = load_table(model, variant)
    missing = sorted(r.original_checkpoint for r in rows if r.original_checkpoint not in stored)
    if missing:
        raise TransplantError(f"{path}: nothing loaded; missing variables of the original layout: {missing}")
    return {r.canonical: np.asarray(reader.get_tensor(r.original_checkpoint)) for r in rows}
