"""The port's data path, as the original DEKM's ``utils.get_xy`` builds it (specs/dekm.md §2, §5, §7).

1. Raw data, read from local files only (no download); ``data_dir`` is the argument, else
   ``$PARITY_DATA_DIR``:

   * MNIST: a Keras-style ``mnist.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``) given as the
     path itself, or a directory holding the four IDX files (``train-images-idx3-ubyte`` ...,
     raw or ``.gz``) in ``DIR``, ``DIR/mnist`` or ``DIR/MNIST/raw``, or ``DIR/mnist.npz``.
   * USPS: ``USPS.h5`` (groups ``train`` and ``test``, each with ``data`` and ``target``); COIL20:
     ``COIL20.h5`` (``data``, ``labels``); FRGC: ``FRGC.h5`` (``data``, ``labels``) — the file
     itself or ``DIR/<name>``. h5py is imported only for these.
   * REUTERS-10K: ``10k_feature.npy`` and ``10k_target.npy`` in ``DIR`` or ``DIR/reuters``.

   A missing file raises :class:`DataNotFoundError`, a truncated or malformed one
   :class:`DataFormatError`; both name the file and what was expected.
2. Preprocessing (:func:`preprocess`), the original's:

   * MNIST: train and test concatenated (70 000), ``x / 255.`` in float64, a channel axis appended
     (``flatten=True``: [N, 784] for the dense variant, the seed port's example).
   * USPS: train + test, [N, 16, 16] float32 as stored (no /255); the channel axis Keras adds
     implicitly is appended here.
   * COIL20: axes 1 and 2 swapped, ``tf.image.resize`` to 28 x 28 (bilinear, half-pixel centres, no
     antialias) on the 0-255 values, then /255; label 20 -> 0.
   * FRGC: ``swapaxes(1, 3)``, /255; labels mapped to 0..K-1 in sorted order.
   * REUTERS: float32 rows L2-normalised (an all-zero row stays zero).
3. Shuffle (:func:`get_xy`): x and y indexed with one permutation of N. The original draws it with an
   unseeded ``tf.random.shuffle``; the harness injects its own, else the port draws ``rng.permutation``.
4. Pretraining batch order (:func:`windowed_shuffle`, :func:`pretrain_batches`): ``tf.data``'s
   ``shuffle(8000).batch(256)``, reshuffled every epoch, the last batch partial.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IDX_FILES = {  # standard name -> (array key, is labels, expected count)
    "train-images-idx3-ubyte": ("x_train", False, 60_000),
    "train-labels-idx1-ubyte": ("y_train", True, 60_000),
    "t10k-images-idx3-ubyte": ("x_test", False, 10_000),
    "t10k-labels-idx1-ubyte": ("y_test", True, 10_000),
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
H5_FILES = {"USPS": "USPS.h5", "COIL20": "COIL20.h5", "FRGC": "FRGC.h5"}
REUTERS_FILES = ("10k_feature.npy", "10k_target.npy")
DATASETS = ("MNIST", "USPS", "COIL20", "FRGC", "REUTERS")
MNIST_SIDE = 28
COIL20_SIDE = 28
_MAGIC = {False: 0x00000803, True: 0x00000801}  # images (ubyte, 3 dims), labels (ubyte, 1 dim)


class DataNotFoundError(FileNotFoundError):
    """No data directory given, or it holds no (complete) copy of the dataset."""


class DataFormatError(ValueError):
    """A data file is truncated, corrupt or not what its name says."""


@dataclass(frozen=True)
class RawData:
    """A dataset as distributed: ``arrays`` by the file's own names (MNIST/USPS: ``x_train``,
    ``y_train``, ``x_test``, ``y_test``; the others ``x``, ``y``), and where it came from."""

    ds_name: str
    arrays: dict[str, np.ndarray]
    source: str


# --- reading ---------------------------------------------------------------------------------


def _dataset_name(ds_name: str) -> str:
    for name in DATASETS:
        if str(ds_name).lower() == name.lower():
            return name
    raise ValueError(f"ds_name={ds_name!r}: the port reads {', '.join(DATASETS)} from files")


def _root(data_dir: str | os.PathLike[str] | None, what: str) -> Path:
    if data_dir is None:
        data_dir = os.environ.get("PARITY_DATA_DIR") or None
    if data_dir is None:
        raise DataNotFoundError(f"no data directory for {what}: pass data_dir=DIR or set PARITY_DATA_DIR; nothing is downloaded")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataNotFoundError(f"{root}: no such file or directory (data for {what})")
    return root


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
    kind, header = ("labels", 8) if labels else ("images", 16)
    want = (count,) if labels else (count, MNIST_SIDE, MNIST_SIDE)
    if len(data) < header:
        raise DataFormatError(f"{path}: {len(data)} bytes, shorter than the {header}-byte IDX {kind} header")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != _MAGIC[labels]:
        raise DataFormatError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{_MAGIC[labels]:08x} (uint8 {kind})")
    dims = struct.unpack(f">{len(want)}I", data[4:header])
    if dims != want:
        raise DataFormatError(f"{path}: IDX dimensions {dims}, expected {want}")
    if len(data) != header + int(np.prod(dims)):
        raise DataFormatError(f"{path}: {len(data)} bytes (decompressed), expected {header + int(np.prod(dims))}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_mnist_npz(path: Path) -> RawData:
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in NPZ_KEYS if k in npz.files}
    except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: unreadable .npz (truncated, corrupt or a .npy?): {e}") from e
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataFormatError(f"{path}: missing arrays {missing}; expected a Keras-style mnist.npz with {list(NPZ_KEYS)}")
    for key, a in arrays.items():
        n = 60_000 if key.endswith("train") else 10_000
        want = (n,) if key.startswith("y") else (n, MNIST_SIDE, MNIST_SIDE)
        if a.shape != want or a.dtype.kind not in "iu":
            raise DataFormatError(f"{path}: {key} is {a.dtype} {a.shape}, expected integers of shape {want}")
    return RawData("MNIST", {k: arrays[k].astype(np.uint8) for k in NPZ_KEYS}, f"Keras-style npz {path}")


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> RawData:
    """MNIST's 60k + 10k uint8 images and labels from IDX files or ``mnist.npz`` (module docstring)."""
    root = _root(data_dir, "MNIST")
    if root.is_file():
        if root.suffix != ".npz":
            raise DataFormatError(f"{root}: a file but not an .npz; expected a directory or a Keras-style mnist.npz")
        return _read_mnist_npz(root)
    for directory in (root, root / "mnist", root / "MNIST" / "raw"):
        if not (directory.is_dir() and any(_idx_file(directory, s) for s in IDX_FILES)):
            continue
        files = {stem: _idx_file(directory, stem) for stem in IDX_FILES}
        missing = [s for s, p in files.items() if p is None]
        if missing:
            raise DataNotFoundError(f"{directory}: missing {', '.join(f'{m} (or .gz)' for m in missing)}; "
                                    f"expected the four IDX files {', '.join(IDX_FILES)}")
        arrays = {key: _read_idx(files[stem], labels, n) for stem, (key, labels, n) in IDX_FILES.items()}  # type: ignore[arg-type]
        return RawData("MNIST", arrays, f"IDX files in {directory}")
    if (root / "mnist.npz").is_file():
        return _read_mnist_npz(root / "mnist.npz")
    raise DataNotFoundError(f"MNIST not found in {root}: looked for the IDX files ({', '.join(IDX_FILES)}, raw or .gz) "
                            f"in {root}, {root / 'mnist'} and {root / 'MNIST' / 'raw'}, and for {root / 'mnist.npz'}")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading USPS.h5 / COIL20.h5 / FRGC.h5 needs h5py (pip install h5py)") from e
    return h5py


def _read_h5(ds_name: str, data_dir: str | os.PathLike[str] | None, keys: dict[str, str]) -> RawData:
    """``keys``: output name -> dataset path inside the file."""
    root, fname = _root(data_dir, ds_name), H5_FILES[ds_name]
    path = root if root.is_file() else root / fname
    if not path.is_file():
        raise DataNotFoundError(f"{path}: not found; expected {fname} with datasets {sorted(keys.values())}")
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys.values() if k not in f]
            if missing:
                raise DataFormatError(f"{path}: missing datasets {missing}; expected {sorted(keys.values())}")
            arrays = {name: np.asarray(f[key][()]) for name, key in keys.items()}
    except OSError as e:
        raise DataFormatError(f"{path}: unreadable HDF5 file (truncated or corrupt?): {e}") from e
    for name in [k for k in arrays if k.startswith("x")]:
        y = arrays["y" + name[1:]]
        if len(arrays[name]) != len(y):
            raise DataFormatError(f"{path}: {len(arrays[name])} samples but {len(y)} labels in {keys[name]!r} / {keys['y' + name[1:]]!r}")
    return RawData(ds_name, arrays, f"{path}")


def load_usps(data_dir: str | os.PathLike[str] | None = None) -> RawData:
    return _read_h5("USPS", data_dir, {"x_train": "train/data", "y_train": "train/target",
                                       "x_test": "test/data", "y_test": "test/target"})


def load_coil20(data_dir: str | os.PathLike[str] | None = None) -> RawData:
    return _read_h5("COIL20", data_dir, {"x": "data", "y": "labels"})


def load_frgc(data_dir: str | os.PathLike[str] | None = None) -> RawData:
    return _read_h5("FRGC", data_dir, {"x": "data", "y": "labels"})


def load_reuters(data_dir: str | os.PathLike[str] | None = None) -> RawData:
    root = _root(data_dir, "REUTERS")
    for directory in (root, root / "reuters"):
        paths = [directory / f for f in REUTERS_FILES]
        if all(p.is_file() for p in paths):
            break
    else:
        raise DataNotFoundError(f"REUTERS-10K not found: expected {' and '.join(REUTERS_FILES)} in {root} or {root / 'reuters'}")
    try:
        x, y = (np.load(p, allow_pickle=False) for p in paths)
    except (OSError, ValueError, EOFError) as e:
        raise DataFormatError(f"{paths[0]} / {paths[1]}: unreadable .npy (truncated or corrupt?): {e}") from e
    if x.ndim != 2 or y.reshape(-1).shape[0] != x.shape[0]:
        raise DataFormatError(f"{paths[0]}: features {x.shape} and targets {y.shape}; expected [N, d] and [N]")
    return RawData("REUTERS", {"x": x, "y": y.reshape(-1)}, f"{paths[0]}, {paths[1]}")


LOADERS = {"MNIST": load_mnist, "USPS": load_usps, "COIL20": load_coil20, "FRGC": load_frgc, "REUTERS": load_reuters}


def load_raw(ds_name: str = "MNIST", data_dir: str | os.PathLike[str] | None = None) -> RawData:
    """The raw arrays of ``ds_name`` (one of :data:`DATASETS`) from ``data_dir``."""
    return LOADERS[_dataset_name(ds_name)](data_dir)


# --- preprocessing ---------------------------------------------------------------------------


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(images, (size, size))`` (TF2: bilinear, half-pixel centres, no antialias), float32 NHWC."""
    x = np.asarray(images, dtype=np.float32)

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        lo = np.floor(src)
        frac = (src - lo).astype(np.float32)
        return np.clip(lo, 0, n_in - 1).astype(int), np.clip(lo + 1, 0, n_in - 1).astype(int), frac

    y0, y1, fy = axis(x.shape[1])
    x0, x1, fx = axis(x.shape[2])
    fx = fx[None, None, :, None]
    top = x[:, y0][:, :, x0] + (x[:, y0][:, :, x1] - x[:, y0][:, :, x0]) * fx
    bottom = x[:, y1][:, :, x0] + (x[:, y1][:, :, x1] - x[:, y1][:, :, x0]) * fx
    return top + (bottom - top) * fy[None, :, None, None]


def preprocess(raw: RawData, flatten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The original's ``get_xy`` before its shuffle (module docstring, §2): (x, y) in file order."""
    a, name = raw.arrays, raw.ds_name
    if name == "MNIST":
        x = np.concatenate([a["x_train"], a["x_test"]]) / 255.0  # float64, as the original
        y = np.concatenate([a["y_train"], a["y_test"]])
        x = x.reshape(len(x), -1) if flatten else x[..., None]
    elif name == "USPS":
        x = np.concatenate([a["x_train"], a["x_test"]]).reshape(-1, 16, 16).astype(np.float32)[..., None]
        y = np.concatenate([a["y_train"], a["y_test"]])
    elif name == "COIL20":
        x = np.swapaxes(np.asarray(a["x"], dtype=np.float32), 1, 2)
        x = resize_bilinear(x if x.ndim == 4 else x[..., None], COIL20_SIDE) / np.float32(255.0)
        y = np.asarray(a["y"]).astype(np.int64)
        y[y == 20] = 0
    elif name == "FRGC":
        x = np.swapaxes(np.asarray(a["x"], dtype=np.float32), 1, 3) / np.float32(255.0)
        y = np.unique(np.asarray(a["y"]).reshape(-1), return_inverse=True)[1]
    elif name == "REUTERS":
        x = np.asarray(a["x"], dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms == 0, np.float32(1.0), norms)
        y = a["y"]
    else:
        raise ValueError(f"ds_name={name!r}: no preprocessing known")
    if flatten and x.ndim > 2:
        x = x.reshape(len(x), -1)
    return x, np.asarray(y).reshape(-1).astype(np.int64)


def get_xy(raw: RawData | str = "MNIST", permutation: np.ndarray | None = None, *, data_dir: str | os.PathLike[str] | None = None,
           flatten: bool = False, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as the original feeds them: :func:`preprocess`, then both indexed with ``permutation``.

    ``raw``: a :class:`RawData` or a dataset name (read from ``data_dir``). ``permutation``: the
    harness's (any permutation of N); None: the port's own ``rng.permutation(N)`` (``rng`` None: unseeded,
    like the original).
    """
    if isinstance(raw, str):
        raw = load_raw(raw, data_dir)
    x, y = preprocess(raw, flatten=flatten)
    n = len(x)
    if permutation is None:
        permutation = (rng if rng is not None else np.random.default_rng()).permutation(n)
    perm = np.asarray(permutation)
    if perm.shape != (n,) or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(n)):
        raise ValueError(f"permutation must be a permutation of range({n}) (the dataset's size), got {perm.dtype} {perm.shape}")
    return x[perm], y[perm]


# --- pretraining batch order ------------------------------------------------------------------


def windowed_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's index order from ``tf.data.Dataset.range(n).shuffle(buffer_size)`` (emulated).

    A buffer holds the first ``buffer_size`` indices; each output picks a uniform slot, emits it and
    refills the slot with the next input index; once the input is exhausted the buffer drains in
    random order. So the index at output position p is at most p + buffer_size - 1.
    """
    if n < 0 or buffer_size < 1:
        raise ValueError(f"n={n}, buffer_size={buffer_size}: need n >= 0 and buffer_size >= 1")
    m = min(buffer_size, n)
    # buffer size at each output: m while the input lasts (n - m + 1 outputs), then m-1, m-2, ..., 1
    sizes = np.concatenate([np.full(n - m + 1, m), np.arange(m - 1, 0, -1)]) if n else np.zeros(0, int)
    picks = rng.integers(0, sizes) if n else np.zeros(0, int)
    buf = list(range(m))
    out = np.empty(n, dtype=np.int64)
    nxt = m
    for p, j in enumerate(picks.tolist()):
        out[p] = buf[j]
        if nxt < n:
            buf[j] = nxt
            nxt += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


def epoch_order(n: int, buffer_size: int, rng: np.random.Generator, shuffle: str = "window") -> np.ndarray:
    """The port's own order for one pretraining epoch: ``"window"`` (the original's buffer) or
    ``"full"`` (the declared deviation ``pretrain_shuffle="full"``: a uniform permutation)."""
    if shuffle == "window":
        return windowed_shuffle(n, buffer_size, rng)
    if shuffle == "full":
        return rng.permutation(n)
    raise ValueError(f"pretrain_shuffle={shuffle!r}; expected 'window' or 'full'")


def pretrain_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` cut into consecutive batches of ``batch_size``, the last one partial (``.batch()`` keeps it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = np.asarray(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
