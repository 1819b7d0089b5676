"""Weight-transplant tables: canonical name <-> torch key <-> TF variable <-> original checkpoint.

The canonical layout is TensorFlow's: Dense kernels ``(in, out)``, Conv2D kernels
``(kh, kw, in, out)``, Conv2DTranspose kernels ``(kh, kw, out, in)``, NHWC flatten order at the
conv <-> dense boundary. A table row names the torch state_dict key and its transform: ops from a
closed set joined by ``|`` (transposes, permutations, NHWC<->NCHW rows, slices: a port holding part
of a canonical tensor, e.g. one half of a split head, maps partially). Every copy checks its shape,
and missing / unexpected / mismatched names fail loudly before anything is written. Framework-free.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from collections.abc import Mapping

import numpy as np

TRANSFORMS = ("identity", "transpose", "conv", "conv_transpose", "permute", "slice", "rows_hwc_to_chw")


@dataclass(frozen=True)
class Row:
    canonical: str
    torch_key: str
    torch_transform: str
    tf_variable: str = ""
    original_checkpoint: str = ""

    @property
    def partial(self) -> bool:
        """The port's tensor is only a part of the canonical one (a ``slice``): not invertible."""
        return any(op.startswith("slice") for op in _ops(self.torch_transform))


def _ops(transform: str) -> list[str]:
    return [op.strip() for op in transform.split("|") if op.strip()]


def _parse(op: str) -> tuple[str, list[str]]:
    m = re.fullmatch(r"([a-z_]+)(?:\((.*)\))?", op)
    if not m or m.group(1) not in TRANSFORMS:
        raise ValueError(f"unknown transform {op!r}; expected '|'-joined ops of {TRANSFORMS}, "
                         "e.g. 'transpose', 'permute(3,2,0,1)', 'slice(1,0:7)|transpose', 'rows_hwc_to_chw(7,7,256)'")
    return m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]


def _apply(array: np.ndarray, op: str, inverse: bool) -> np.ndarray:
    kind, args = _parse(op)
    if kind == "identity":
        return array
    if kind == "transpose":  # Dense (in, out) <-> nn.Linear (out, in)
        return array.T
    if kind in ("conv", "conv_transpose"):
        # Conv2D (kh,kw,in,out) <-> (out,in,kh,kw); Conv2DTranspose (kh,kw,out,in) <-> (in,out,kh,kw).
        return np.transpose(array, (2, 3, 1, 0) if inverse else (3, 2, 0, 1))
    if kind == "permute":
        axes = [int(a) for a in args]
        return np.transpose(array, np.argsort(axes) if inverse else axes)
    if kind == "rows_hwc_to_chw":  # rows of a Dense kernel after an NHWC flatten <-> after an NCHW flatten
        h, w, c = (int(a) for a in args)
        rest = array.shape[1:]
        if inverse:
            return array.reshape(c, h, w, *rest).transpose(1, 2, 0, *range(3, 3 + len(rest))).reshape(array.shape)
        return array.reshape(h, w, c, *rest).transpose(2, 0, 1, *range(3, 3 + len(rest))).reshape(array.shape)
    if kind == "slice":
        if inverse:
            raise ValueError(f"{op}: a slice cannot be inverted (the port holds only part of the canonical tensor)")
        axis, (start, stop) = int(args[0]), args[1].split(":")
        index = [slice(None)] * array.ndim
        index[axis] = slice(int(start) if start else None, int(stop) if stop else None)
        return array[tuple(index)]
    raise AssertionError(kind)


def load_table(model: str | Path, variant: str | None = None) -> tuple[Row, ...]:
    """Rows of a mapping table: ``harness/tables/{model}_{variant}.csv``, or a CSV file at a path
    (a user's port: columns ``canonical,torch_key,torch_transform``, the TF columns optional)."""
    if variant is None:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: mapping table not found (a CSV with columns canonical,torch_key,torch_transform)")
        name, text = str(path), path.read_text()
    else:
        name = f"{model}_{variant}.csv"
        text = resources.files("harness").joinpath("tables", name).read_text()
    reader = csv.DictReader(text.splitlines())
    need = {"canonical", "torch_key", "torch_transform"}
    if not need <= set(reader.fieldnames or ()):
        raise ValueError(f"{name}: columns {sorted(need)} expected, got {reader.fieldnames}")
    rows = tuple(Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}) for r in reader)
    for r in rows:
        try:
            for op in _ops(r.torch_transform):
                _parse(op)
        except ValueError as err:
            raise ValueError(f"{name}: row {r.canonical}: {err}") from None
    return rows


def canonical_to_torch(array: np.ndarray, transform: str) -> np.ndarray:
    """Canonical (TF) layout -> torch layout: the ``|``-joined ops left to right. A view of ``array`` where
    the ops allow (transposes, slices): its consumer copies it once, into its own dtype and layout (a conv
    DPSOM head's float32 gradient becoming the float64 twin's: no 246 MB transposed copy on the way)."""
    for op in _ops(transform):
        array = _apply(array, op, inverse=False)
    return array


def torch_to_canonical(array: np.ndarray, transform: str) -> np.ndarray:
    """Inverse of :func:`canonical_to_torch` (ops inverted, right to left; a slice cannot be), C-contiguous
    (``array`` itself where no op moves an element)."""
    return np.ascontiguousarray(_inverse(array, transform))


def canonical_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """The canonical shape of a torch-layout tensor of ``shape``: the inverse ops on a zero-strided
    stand-in, whose transposes and reshapes are all views (nothing of the tensor's size is allocated)."""
    return _inverse(np.broadcast_to(np.float32(0), shape), transform).shape


def _inverse(array: np.ndarray, transform: str) -> np.ndarray:
    for op in reversed(_ops(transform)):
        array = _apply(array, op, inverse=True)
    return array


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


def checkpoint_files(path: str | Path) -> tuple[str, dict[str, str]]:
    """The prefix of the TF checkpoint at ``path`` and ``{file name: sha256}`` of its files.

    ``path``: a checkpoint prefix (``.../model.ckpt``, as ``tf.train.Saver.save`` returns it), one of
    its files (``.index``, ``.data-00000-of-00001``), or a folder with a ``checkpoint`` state file (its
    latest checkpoint). Raises :class:`TransplantError` naming what was looked for when none is there."""
    import hashlib

    p = Path(path).expanduser()
    if p.is_dir():
        state = p / "checkpoint"
        found = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(), re.M) if state.is_file() else None
        if found is None:
            raise TransplantError(f"{p}: a folder without a 'checkpoint' state file; give the checkpoint prefix (PREFIX for PREFIX.index)")
        p = Path(found.group(1)) if Path(found.group(1)).is_absolute() else p / found.group(1)
    prefix = re.sub(r"\.(index|data-\d+-of-\d+|meta)$", "", str(p))
    index = Path(prefix + ".index")
    data = sorted(Path(prefix).parent.glob(Path(prefix).name + ".data-*-of-*")) if Path(prefix).parent.is_dir() else []
    if not index.is_file() or not data:
        raise TransplantError(f"{path}: no TF checkpoint there (looked for {index.name} and {Path(prefix).name}.data-*-of-* in "
                              f"{Path(prefix).parent}); nothing loaded")

    def sha256(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    return prefix, {f.name: sha256(f) for f in (index, *data)}


def _open_original(path: str, model: str, variant: str, shapes: Mapping[str, tuple[int, ...]] | None):
    """TF's reader of the checkpoint at ``path``, the table rows with an original name, and the
    checkpoint's other variables (ignored); every missing or mis-shaped variable raises, all named at once."""
    from reference_tf import require_tensorflow

    tf = require_tensorflow()
    try:
        reader = tf.train.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 -- TF raises several types for a bad prefix
        raise TransplantError(f"{path}: not a readable TF checkpoint ({type(err).__name__}: {err}); nothing loaded") from None
    stored = reader.get_variable_to_shape_map()
    rows = [r for r in load_table(model, variant) if r.original_checkpoint]
    missing = sorted(r.original_checkpoint for r in rows if r.original_checkpoint not in stored)
    misshaped = [f"{r.original_checkpoint} {tuple(stored[r.original_checkpoint])} (expected {tuple(shapes[r.canonical])} for {r.canonical})"
                 for r in rows if shapes is not None and r.canonical in shapes and r.original_checkpoint in stored
                 and tuple(stored[r.original_checkpoint]) != tuple(shapes[r.canonical])]
    problems = ([f"missing variables of the original layout ({model} {variant}): {missing}"] if missing else []) + (
        [f"wrong shape: {misshaped}"] if misshaped else [])
    if problems:
        raise TransplantError(f"{path}: nothing loaded; " + "; ".join(problems))
    ignored = sorted(set(stored) - {r.original_checkpoint for r in rows})
    return reader, rows, ignored


def check_original_checkpoint(path: str, model: str, variant: str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[str]:
    """What :func:`read_original_checkpoint` checks, without reading a tensor: raises
    :class:`TransplantError` naming every missing / mis-shaped variable; returns the checkpoint's
    variables that are not weights of the table (optimizer slots, ``global_step`` ...: ignored)."""
    return _open_original(path, model, variant, shapes)[2]


def read_original_checkpoint(path: str, model: str, variant: str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Canonical weights from a TF checkpoint in the ORIGINAL code's variable names (table column
    ``original_checkpoint``), read with TF's checkpoint reader (TensorFlow needed, no graph built).

    Every table name missing from the checkpoint, or (given the canonical ``shapes``) stored with
    another shape, is listed and nothing is returned; optimizer slots, ``global_step`` and any other
    variable of the checkpoint are ignored.
    """
    reader, rows, _ = _open_original(path, model, variant, shapes)
    return {r.canonical: np.asarray(reader.get_tensor(r.original_checkpoint)) for r in rows}
