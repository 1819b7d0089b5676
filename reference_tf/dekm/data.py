"""The reference's own data path, as the original DEKM's ``utils.get_xy`` runs it (specs/dekm.md §2).

Reproduces the data loading of github spdj2271/DEKM (HEAD e58f506; paper arXiv 2109.15149),
written from the spec, with the data order injectable:

* MNIST: ``keras.datasets.mnist.load_data()`` train + test **concatenated** (70 000), ``x / 255.``
  as numpy true division, i.e. **float64** (the model casts to float32 at its input), channel
  axis appended (conv) or flattened to 784 (the dense variant on MNIST). The raw arrays come from
  the suite's hash-checked reader (``harness.data.load_raw``: an IDX directory or a Keras
  ``mnist.npz``, given as ``data_dir`` or found in the usual places), the same bytes as the Keras
  loader.
* USPS (``USPS.h5``: train + test, reshaped to (N, 16, 16) float32, no /255, no channel axis: Keras
  adds it), COIL20 (``COIL20.h5``: axes 1 and 2 swapped, ``tf.image.resize`` to 28×28 bilinear on
  the 0–255 values, then /255; labels 20 -> 0), FRGC (``FRGC.h5``: ``swapaxes(1, 3)``, /255, labels
  remapped to 0..19), REUTERS-10K (``10k_feature.npy`` float32, rows L2-normalised,
  ``10k_target.npy``). The key names inside these files are not in the spec [U]: the loaders accept
  the usual ones and list what a file holds when none fits.
* Order: ``permutation`` (an index array of length N) reindexes x and y; ``None`` is the
  original's native way: ``shuffle_seed = np.random.randint(100)`` (numpy's global RNG; 0 is
  redrawn as the original's ``if not shuffle_seed`` guard does) then
  ``tf.random.shuffle(arange(N), seed=shuffle_seed)`` (TensorFlow imported lazily).
* The pretraining batch order (:func:`pretrain_orders`): the original's
  ``Dataset.shuffle(8000)`` (windowed, reshuffled every epoch) run on the indices natively.

Nothing here needs TensorFlow except the native shuffles and the COIL20 resize.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATASETS = ("MNIST", "USPS", "COIL20", "FRGC", "REUTERS")


class DataNotFoundError(FileNotFoundError):
    """No copy of the dataset was found (the message says where it was looked for)."""


class DataFormatError(ValueError):
    """A data file does not hold what the loader expects (the message lists what it holds)."""


# ---------------------------------------------------------------------------------------------
# raw loaders
# ---------------------------------------------------------------------------------------------
def load_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = False):
    """``(x_train, y_train, x_test, y_test)``: uint8 [N, 28, 28] images and labels as distributed,
    from an IDX directory or ``mnist.npz`` (``data_dir``), else the suite's usual places."""
    import harness.data as hd

    try:
        raw = hd.load_raw("MNIST", path=data_dir, download=download)
    except hd.DataNotFoundError as err:
        raise DataNotFoundError(str(err)) from err
    except hd.DataIntegrityError as err:
        raise DataFormatError(str(err)) from err
    return raw.x_train, raw.y_train, raw.x_test, raw.y_test


def _file(dir_path, name: str) -> Path:
    if dir_path is None:
        raise DataNotFoundError(f"{name}: no dir_path given (the original reads datasets/{name})")
    path = Path(dir_path).expanduser()
    path = path if path.is_file() else path / name
    if not path.is_file():
        raise DataNotFoundError(f"{name} not found at {path}")
    return path


def _h5_get(f, path: Path, *candidates: str):
    for key in candidates:
        if key in f:
            return np.asarray(f[key][()])
    found: list[str] = []
    f.visit(found.append)
    raise DataFormatError(f"{path}: none of {list(candidates)} found; the file holds {found}")


def load_usps(dir_path) -> tuple[np.ndarray, np.ndarray]:
    """``USPS.h5``: train + test concatenated, (N, 16, 16) float32 as stored (no /255, no channel)."""
    import h5py

    path = _file(dir_path, "USPS.h5")
    with h5py.File(path, "r") as f:
        x_tr = _h5_get(f, path, "train/data", "train/x", "data")
        y_tr = _h5_get(f, path, "train/target", "train/y", "target", "labels")
        if "test" in f:
            x_te = _h5_get(f, path, "test/data", "test/x")
            y_te = _h5_get(f, path, "test/target", "test/y")
            x_tr, y_tr = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    return x_tr.reshape(-1, 16, 16).astype(np.float32), y_tr.reshape(-1)


def load_coil20(dir_path) -> tuple[np.ndarray, np.ndarray]:
    """``COIL20.h5``: axes 1 and 2 swapped, bilinear ``tf.image.resize`` to 28×28 on 0–255 values,
    then /255; float32 labels with 20 -> 0."""
    import h5py

    path = _file(dir_path, "COIL20.h5")
    with h5py.File(path, "r") as f:
        x = _h5_get(f, path, "data", "x", "X")
        y = _h5_get(f, path, "labels", "label", "y", "target")
    x = np.swapaxes(x, 1, 2)
    if x.ndim == 3:
        x = x[..., None]
    import tensorflow as tf  # the original's resize (bilinear, antialias off)

    x = tf.image.resize(x, [28, 28]).numpy() / 255.0
    y = y.reshape(-1).astype(np.float32)
    y[y == 20] = 0
    return x, y


def load_frgc(dir_path) -> tuple[np.ndarray, np.ndarray]:
    """``FRGC.h5``: ``swapaxes(1, 3)``, /255; labels remapped to 0..K-1 in sorted order."""
    import h5py

    path = _file(dir_path, "FRGC.h5")
    with h5py.File(path, "r") as f:
        x = _h5_get(f, path, "data", "x", "X")
        y = _h5_get(f, path, "labels", "label", "y", "target")
    x = np.swapaxes(x, 1, 3) / 255.0
    _, y = np.unique(y.reshape(-1), return_inverse=True)
    return x, y


def load_reuters(dir_path) -> tuple[np.ndarray, np.ndarray]:
    """REUTERS-10K: ``10k_feature.npy`` float32, each row divided by its L2 norm; ``10k_target.npy``."""
    xf, yf = _file(dir_path, "10k_feature.npy"), _file(dir_path, "10k_target.npy")
    x = np.load(xf).astype(np.float32)
    y = np.load(yf).reshape(-1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norm == 0):
        raise DataFormatError(f"{xf}: {int(np.sum(norm == 0))} all-zero rows cannot be L2-normalised")
    return x / norm, y


# ---------------------------------------------------------------------------------------------
# the original's get_xy
# ---------------------------------------------------------------------------------------------
def native_permutation(n: int, shuffle_seed: int | None = None) -> np.ndarray:
    """The original's order: ``shuffle_seed = np.random.randint(100)`` unless a non-zero seed is
    given, then ``tf.random.shuffle(arange(n), seed=shuffle_seed)`` (op-seeded: in a fresh process
    the seed fixes the permutation; a second call in the same process gives another one)."""
    if not shuffle_seed:
        shuffle_seed = np.random.randint(100)
    import tensorflow as tf

    return np.asarray(tf.random.shuffle(np.arange(n), seed=int(shuffle_seed)).numpy(), dtype=np.int64)


def _check_permutation(permutation, n: int) -> np.ndarray:
    p = np.asarray(permutation)
    if p.ndim != 1 or len(p) != n or p.dtype.kind not in "iu":
        raise ValueError(f"permutation must be a 1-D integer array of length {n}, got {p.dtype} {p.shape}")
    if not np.array_equal(np.sort(p), np.arange(n)):
        raise ValueError(f"permutation is not a permutation of 0..{n - 1}")
    return p.astype(np.int64)


def mnist_xy(x_train, y_train, x_test, y_test, flatten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The original's MNIST branch of ``get_xy`` before its shuffle: train then test concatenated,
    ``np.divide(x, 255.)`` in float64, the channel axis appended (or 784 columns, ``flatten``)."""
    x = np.divide(np.concatenate([x_train, x_test]), 255.0)
    y = np.concatenate([y_train, y_test])
    return (x.reshape(-1, 784) if flatten else x.reshape(-1, 28, 28, 1)), y


def get_xy(raw: str = "MNIST", permutation=None, *, data_dir=None, flatten: bool = False,
           shuffle_seed: int | None = None, log_print: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The original's arrays ``(x, y)`` in the original's dtypes (MNIST: float64 [70000, 28, 28, 1],
    or [70000, 784] with ``flatten`` for the dense variant; labels as loaded), reindexed by
    ``permutation`` (None: the native seeded ``tf.random.shuffle``, :func:`native_permutation`,
    with ``shuffle_seed`` if given). ``raw``: the data set's name, read from ``data_dir``."""
    if not isinstance(raw, str):
        raise TypeError(f"raw must be a data set name (one of {DATASETS}), got {type(raw).__name__}")
    ds_name, dir_path = raw, data_dir
    name = ds_name.upper()
    if name == "MNIST":
        x, y = mnist_xy(*load_mnist(dir_path), flatten=flatten)
    elif name == "USPS":
        x, y = load_usps(dir_path)
    elif name in ("COIL20", "COIL-20"):
        x, y = load_coil20(dir_path)
    elif name == "FRGC":
        x, y = load_frgc(dir_path)
    elif name in ("REUTERS", "REUTERS-10K"):
        x, y = load_reuters(dir_path)
    else:
        raise ValueError(f"unknown data set {ds_name!r}; known: {DATASETS}")
    if flatten and x.ndim > 2:
        x = x.reshape(len(x), -1)
    idx = native_permutation(len(x), shuffle_seed) if permutation is None else _check_permutation(permutation, len(x))
    x, y = x[idx], y[idx]
    if log_print:
        print(f"{ds_name}: x {x.shape} {x.dtype}, y {y.shape}, {len(np.unique(y))} classes")
    return x, y


def pretrain_orders(n: int, epochs: int, buffer_size: int = 8000, seed: int | None = None) -> list[np.ndarray]:
    """The pretraining sample order of each epoch, natively: ``Dataset.range(n).shuffle(buffer_size,
    seed=seed)`` iterated ``epochs`` times (reshuffled every epoch, windowed: position p holds an
    index ≤ p + buffer_size − 1). Batch b of epoch e is ``orders[e][b*B:(b+1)*B]``."""
    import tensorflow as tf

    ds = tf.data.Dataset.range(n).shuffle(buffer_size, seed=seed)
    return [np.fromiter(ds.as_numpy_iterator(), dtype=np.int64, count=n) for _ in range(epochs)]
