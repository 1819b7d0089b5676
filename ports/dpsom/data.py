"""The port's own data path, as the original DPSOM's ``DPSOM.py`` builds it (specs/dpsom.md §2).

1. Raw data: MNIST (``data_set="MNIST"``) or Fashion-MNIST (``"fMNIST"``), 60 000 train + 10 000
   test uint8 28x28 images with their labels, read from local files only (no download):

   * ``data_dir`` is the ``data_dir=`` argument, else ``$PARITY_DATA_DIR``.
   * If it is a file, it must be a Keras-style ``.npz`` (``x_train``, ``y_train``, ``x_test``,
     ``y_test``). If it is a directory, the first of these that exists is used:
     ``DIR`` itself holding the IDX files; ``DIR/mnist/`` (``DIR/fashion-mnist/``);
     ``DIR/MNIST/raw/`` (``DIR/FashionMNIST/raw/``, torchvision); ``DIR/mnist.npz``
     (``DIR/fashion-mnist.npz``).
   * IDX files have the standard names ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
     ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or gzip-compressed (``.gz``;
     the raw file is preferred when both exist).

   A missing, truncated or corrupt file raises an error naming the file and what was expected.
   Content hashes are not checked here (the harness does that).
2. Per-image max scaling: each image flattened to 784 values is divided by its own maximum (numpy
   true division of uint8 by a uint8 column, i.e. float64, as the original), cast to float32 as the
   original's feed into its float32 placeholder does, and reshaped to NHWC ``[N, 28, 28, 1]``. The
   60k train pool and the 10k test set are scaled separately.
3. Split: ``train_test_split(pool, labels, test_size=0.15, random_state=42)`` -> 51 000 train /
   9 000 val. ``validation=False`` (default): the logged stream and the final evaluation are the
   test set; ``True``: both are the val split.
4. Batches (:func:`batches`): the arrays in order, no shuffling, the remainder dropped.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

IDX_FILES = {  # standard name -> (array key, is labels, expected count)
    "train-images-idx3-ubyte": ("x_train", False, 60_000),
    "train-labels-idx1-ubyte": ("y_train", True, 60_000),
    "t10k-images-idx3-ubyte": ("x_test", False, 10_000),
    "t10k-labels-idx1-ubyte": ("y_test", True, 10_000),
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# data_set -> (flat IDX directory, torchvision raw directory, Keras npz) inside a data directory
LAYOUTS = {
    "MNIST": ("mnist", "MNIST/raw", "mnist.npz"),
    "fMNIST": ("fashion-mnist", "FashionMNIST/raw", "fashion-mnist.npz"),
}
SIDE = 28
N_CLASSES = 10
VAL_FRACTION = 0.15  # the original's train_test_split(test_size=0.15, random_state=42)
SPLIT_SEED = 42
_MAGIC = {False: 0x00000803, True: 0x00000801}  # images (ubyte, 3 dims), labels (ubyte, 1 dim)


class DataNotFoundError(FileNotFoundError):
    """No data directory given, or it holds no (complete) copy of the dataset."""


class DataFormatError(ValueError):
    """A data file is truncated, corrupt or not what its name says."""


@dataclass(frozen=True)
class RawMNIST:
    """A dataset as distributed: uint8 images [N, 28, 28], int64 labels [N], and where it came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


@dataclass(frozen=True)
class DPSOMData:
    """What the original feeds: float32 NHWC images in [0, 1] and int64 labels.

    ``x_val``/``y_val`` is the stream the original logs during training, ``x_eval``/``y_eval`` the
    final evaluation set (the same arrays); ``val_set``/``eval_set`` say which set (``"test"`` or
    ``"val"``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    val_set: str
    eval_set: str
    source: str


# --- reading ---------------------------------------------------------------------------------


def _dataset_name(data_set: str) -> str:
    for name in LAYOUTS:
        if str(data_set).lower() == name.lower():
            return name
    raise ValueError(
        f"data_set={data_set!r}: the port reads {' and '.join(LAYOUTS)} from files; other datasets "
        "(e.g. the harness's generated 'digits' / 'synthetic') are not part of the original"
    )


def _idx_file(directory: Path, stem: str) -> Path | None:
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx(path: Path, labels: bool, count: int) -> np.ndarray:
    """One IDX file (raw or .gz) -> uint8 array, checking magic number, dimensions and length."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: unreadable (truncated or corrupt gzip?): {e}") from e
    kind = "labels" if labels else "images"
    header = 8 if labels else 16
    want_dims = (count,) if labels else (count, SIDE, SIDE)
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte IDX {kind} header")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != _MAGIC[labels]:
        raise DataFormatError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{_MAGIC[labels]:08x} (uint8 {kind})")
    dims = struct.unpack(f">{len(want_dims)}I", data[4:header])
    if dims != want_dims:
        raise DataFormatError(f"{path}: IDX dimensions {dims}, expected {want_dims}")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise DataFormatError(f"{path}: {len(data)} bytes (decompressed), expected {expected} ({what})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_dir(directory: Path) -> RawMNIST:
    files = {stem: _idx_file(directory, stem) for stem in IDX_FILES}
    missing = [stem for stem, path in files.items() if path is None]
    if missing:
        raise DataNotFoundError(
            f"{directory}: missing {', '.join(f'{m} (or {m}.gz)' for m in missing)}; expected the four IDX "
            f"files {', '.join(IDX_FILES)}, each raw or .gz"
        )
    arrays = {}
    for stem, (key, labels, count) in IDX_FILES.items():
        arrays[key] = _read_idx(files[stem], labels, count)  # type: ignore[arg-type]
    names = ", ".join(p.name for p in files.values())  # type: ignore[union-attr]
    return _finish(arrays, f"IDX files in {directory} ({names})")


def _read_npz(path: Path) -> RawMNIST:
    try:
        with open(path, "rb") as fh:  # our own handle: np.load leaks its file on a corrupt archive
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataFormatError(f"{path}: a .npy array, not an .npz archive; expected {list(NPZ_KEYS)}")
            with npz:
                arrays = {k: npz[k] for k in NPZ_KEYS if k in npz.files}
    except DataFormatError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: unreadable .npz (truncated or corrupt): {e}") from e
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataFormatError(f"{path}: missing arrays {missing}; expected a Keras-style .npz with {list(NPZ_KEYS)}")
    for key, a in arrays.items():
        n = 60_000 if key.endswith("train") else 10_000
        want = (n,) if key.startswith("y") else (n, SIDE, SIDE)
        if a.shape != want:
            raise DataFormatError(f"{path}: {key} has shape {a.shape}, expected {want}")
        if a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255:
            raise DataFormatError(f"{path}: {key} must hold integers 0..255, got dtype {a.dtype}")
        arrays[key] = a.astype(np.uint8)
    return _finish(arrays, f"Keras-style npz {path}")


def _finish(arrays: dict[str, np.ndarray], source: str) -> RawMNIST:
    for key in ("y_train", "y_test"):
        if arrays[key].max() >= N_CLASSES:
            raise DataFormatError(f"{source}: {key} holds label {arrays[key].max()}, expected 0..{N_CLASSES - 1}")
    return RawMNIST(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.int64),
        source=source,
    )


def load_mnist(data_set: str = "MNIST", data_dir: str | os.PathLike[str] | None = None) -> RawMNIST:
    """Read MNIST / Fashion-MNIST from ``data_dir`` (else ``$PARITY_DATA_DIR``); see the module docstring."""
    name = _dataset_name(data_set)
    if data_dir is None:
        data_dir = os.environ.get("PARITY_DATA_DIR") or None
        if data_dir is None:
            raise DataNotFoundError(
                f"no data directory for {name}: pass data_dir=DIR (a directory or a Keras .npz) or set "
                "PARITY_DATA_DIR; nothing is downloaded"
            )
    root = Path(data_dir).expanduser()
    if root.is_file():
        if root.suffix != ".npz":
            raise DataFormatError(f"{root}: a file but not an .npz; expected a directory or a Keras-style .npz")
        return _read_npz(root)
    if not root.is_dir():
        raise DataNotFoundError(f"{root}: no such file or directory (data directory for {name})")
    flat, torchvision, npz = LAYOUTS[name]
    for directory in (root, root / flat, root / torchvision):
        if directory.is_dir() and any(_idx_file(directory, stem) for stem in IDX_FILES):
            return _read_idx_dir(directory)  # incomplete -> error naming the missing files
    if (root / npz).is_file():
        return _read_npz(root / npz)
    raise DataNotFoundError(
        f"{name} not found in {root}: looked for the IDX files ({', '.join(IDX_FILES)}, raw or .gz) in "
        f"{root}, {root / flat} and {root / torchvision}, and for {root / npz}"
    )


# --- preprocessing, split, batches --------------------------------------------------------


def scale_per_image(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 28, 28, 1], each image divided by its own maximum.

    As the original: ``x.reshape(-1, 784) / x.max(-1)[:, None]`` in float64, then float32. An
    all-zero image (NaN in the original) is an error naming its index.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim < 2 or x[0].size != SIDE * SIDE:
        raise ValueError(f"images must be uint8 [N, 28, 28] or [N, 784], got {x.dtype} {x.shape}")
    flat = x.reshape(len(x), SIDE * SIDE)
    maxima = flat.max(axis=1, keepdims=True)
    if (maxima == 0).any():
        raise ValueError(f"image {int(np.flatnonzero(maxima == 0)[0])} is all zero: per-image max scaling divides by zero")
    out = np.empty(flat.shape, dtype=np.float32)
    for i in range(0, len(flat), 10_000):  # the same per-image rule, in float64 chunks
        out[i : i + 10_000] = flat[i : i + 10_000] / maxima[i : i + 10_000]
    return out.reshape(len(x), SIDE, SIDE, 1)


def dpsom_data(raw: RawMNIST, validation: bool = False) -> DPSOMData:
    """The original's arrays: scaled train pool split 85/15 with random_state=42, scaled test set."""
    x_train, x_val, y_train, y_val = train_test_split(
        scale_per_image(raw.x_train), raw.y_train, test_size=VAL_FRACTION, random_state=SPLIT_SEED
    )
    which = "val" if validation else "test"
    if not validation:
        x_val, y_val = scale_per_image(raw.x_test), raw.y_test
    return DPSOMData(x_train, y_train, x_val, y_val, x_val, y_val, which, which, raw.source)


def load_dpsom_data(
    data_set: str = "MNIST", data_dir: str | os.PathLike[str] | None = None, validation: bool = False
) -> DPSOMData:
    """:func:`load_mnist` then :func:`dpsom_data`."""
    return dpsom_data(load_mnist(data_set, data_dir), validation)


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """One pass in order, no shuffling, the remainder dropped (``len(x) // batch_size`` batches)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for i in range(len(x) // batch_size):
        yield x[i * batch_size : (i + 1) * batch_size]
