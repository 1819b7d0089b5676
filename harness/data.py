"""The one data module of the suite: raw datasets, DPSOM preprocessing, splits and batches.

Both the TensorFlow reference and the PyTorch port read their data from here, so the arrays fed to
the two sides are the same bytes (spec dpsom.md §2). Framework-free: numpy and scikit-learn only.

Datasets (:data:`DATASETS`)
    ``"MNIST"`` and ``"fMNIST"`` (Fashion-MNIST): 60 000 train + 10 000 test uint8 28x28 images.
    ``"digits"``: scikit-learn's bundled 8x8 digits (1 797), bilinearly resized to 28x28 with the
    align-corners grid of ``scipy.ndimage.zoom(order=1)`` but in exact integer arithmetic (float
    code leaves many exact .5 ties to the last bit), pixels 0..16 -> 0..255 rounded half up;
    every 6th image (index % 6 == 5) is the test set: 1 498 pool / 299 test. ``"synthetic"``:
    3 000 pool + 500 test images, 10 classes of stroke templates (ring, bars, diagonals, plus,
    cross, square, T, figure eight) with a +-1 px shift, stroke width, contrast and uniform noise
    from ``PCG64(2020)``, using only IEEE-exact float operations (+ - * / sqrt, floor). Both need
    no network and no data directory, and their content is pinned by SHA-256 like MNIST's, so a
    platform or library change that alters a byte fails loudly instead of splitting the sides.

Where MNIST / fMNIST are looked for (first hit wins; an explicit ``path`` is the only place
searched when given)
    1. ``path`` argument: a Keras-style ``.npz`` file, or a directory that is itself a flat IDX
       directory or a root (the layouts below are tried inside it).
    2. Roots, in this order, each searched for the layouts below:
       ``$PARITY_DATA_DIR``; ``$KERAS_HOME/datasets`` (if set); ``~/.keras/datasets``;
       torchvision-style roots ``./data``, ``~/data``, ``~/.cache/torchvision``; the download
       cache ``~/.cache/dc-parity`` (only when ``PARITY_DATA_DIR`` is unset).
    3. Download (``download=True``): the usual public mirrors (:data:`MIRRORS`), timeout
       :data:`DOWNLOAD_TIMEOUT_S` s per request, into ``$PARITY_DATA_DIR`` or else
       ``~/.cache/dc-parity``, layout ``mnist/`` or ``fashion-mnist/``. All four files are
       downloaded and hash-checked in memory first, then each is written to a temporary file in
       the target directory and renamed into place, so nothing half-written or unverified is
       ever cached.

    Layouts inside a root (MNIST / fMNIST):
      ``mnist/`` / ``fashion-mnist/`` — flat directory with the four IDX files (also the Keras
      cache layout for Fashion-MNIST); ``MNIST/raw/`` / ``FashionMNIST/raw/`` — torchvision;
      ``mnist.npz`` / ``fashion-mnist.npz`` — Keras ``.npz`` (x_train, y_train, x_test, y_test).
    IDX files are named ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each uncompressed or with ``.gz``
    (uncompressed preferred when both exist, as in torchvision's raw folder).

Integrity
    MNIST: SHA-256 of each *decompressed* IDX file (:data:`MNIST_IDX_SHA256`, from
    shared/data/mnist/README.md) and of the decoded uint8 arrays (:data:`ARRAY_SHA256`, computed
    once here from that verified copy; they equal the IDX payload hashes), so an ``.npz`` or any
    other source is checked by content. fMNIST: no content hash is known to us (no copy was
    available offline). We embed the SHA-256 of the four official ``.gz`` downloads
    (:data:`FMNIST_GZ_SHA256`; published by several independent projects next to Zalando's
    official MD5s, not re-computed here): a download must match them, and a local ``.gz`` that
    matches is marked verified. Any other local copy (recompressed ``.gz``, raw IDX, ``.npz``) is
    checked by structure only (magic numbers, counts, shapes, label range) and
    ``RawData.verified`` is False. A mismatch raises :class:`DataIntegrityError` naming the file
    and both hashes; bad magic, wrong length or a bad gzip stream raise it naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

DATASETS = ("MNIST", "fMNIST", "digits", "synthetic")

#: Decompressed IDX files (SHA-256 from shared/data/mnist/README.md).
MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Official Fashion-MNIST ``.gz`` downloads (bytes as distributed, not decompressed content).
FMNIST_GZ_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

#: SHA-256 of the decoded arrays: C-order uint8 bytes of images [N, 28, 28] and labels [N].
#: fMNIST has none (unknown); digits/synthetic pin the generators' output.
ARRAY_SHA256: Mapping[str, Mapping[str, str]] = {
    "MNIST": {
        "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    "digits": {
        "x_train": "8aa48b324163c223bb2168639c5fbc02b67bb1daf3dca3ea3b1dbe47a8b7686c",
        "y_train": "765a2a78cd9f9d1cad18b105e274b82f5798862c5beffeb49d33833211eea933",
        "x_test": "44395a8461ffa7bd1236106a34f250c4eb481b79ed8f231a2eb8929c08c06219",
        "y_test": "02b7c06220a28a6d26380530a0b6c99bfba5893c2a60feec088df066558671dc",
    },
    "synthetic": {
        "x_train": "c1926b1c4a7c39a8942dff325877c53c0dd9c2d90e89e1c194c6fe31467c996f",
        "y_train": "f509ecd2f1645f0312b330460e7913606f46922c367d2e2322d6e658388b73e6",
        "x_test": "a2f8d53bb22c7c24a475ac337f331caffd1d57b8bd683ffc00f6abdae4cb7721",
        "y_test": "950b42026fa3a5eebb6a67fe4169ae6ec32b77cfa43edb4f61770867068a9bf2",
    },
}

#: Download mirrors tried in order (directory URLs; ``<file>.gz`` is appended).
MIRRORS = {
    "MNIST": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fMNIST": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ),
}
DOWNLOAD_TIMEOUT_S = 10.0

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_LAYOUTS = {
    "MNIST": ("mnist", "MNIST/raw", "mnist.npz"),
    "fMNIST": ("fashion-mnist", "FashionMNIST/raw", "fashion-mnist.npz"),
}
_CACHE_SUBDIR = {"MNIST": "mnist", "fMNIST": "fashion-mnist"}
_N_TRAIN, _N_TEST, _SIDE = 60_000, 10_000, 28
_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801

# DPSOM split constants (spec §2.3): the original's train_test_split call.
VAL_FRACTION = 0.15
SPLIT_SEED = 42


class DataNotFoundError(FileNotFoundError):
    """No usable copy of a dataset was found (the message lists every place searched)."""


class DataIntegrityError(ValueError):
    """A data file is corrupt, truncated, or its content hash differs from the known one."""


@dataclass(frozen=True)
class RawData:
    """A dataset as distributed: uint8 images [N, 28, 28] (read-only) and int64 labels [N].

    ``hashes``: SHA-256 of the uint8 bytes of each array (labels as uint8), the content identity
    used to compare sources. ``verified``: True when that content (or the exact distributed file)
    matched a known hash; False means structure-only checks (see the module docstring).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    hashes: Mapping[str, str]
    verified: bool


@dataclass(frozen=True)
class DPSOMData:
    """The arrays the original DPSOM feeds: float32 NHWC images in [0, 1], int64 labels.

    ``x_val``/``y_val`` is the stream logged during training, ``x_eval``/``y_eval`` the final
    evaluation set; ``val_set`` and ``eval_set`` say which set each is (``"test"`` or ``"val"``).
    """

    name: str
    validation: bool
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    val_set: str
    eval_set: str


# ---------------------------------------------------------------------------------------------
# Public API


def load_raw(
    name: str, path: str | os.PathLike[str] | None = None, download: bool = True
) -> RawData:
    """Load a dataset by name (see the module docstring for where it is looked for).

    ``path`` and ``download`` only matter for MNIST and fMNIST; the offline sets are generated.
    """
    canonical = _canonical_name(name)
    if canonical == "digits":
        return _digits()
    if canonical == "synthetic":
        return _synthetic()
    searched: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        candidates = [(f"path argument {p}", p)]
        if p.is_dir():
            candidates += [(f"path argument {p}", p / sub) for sub in _LAYOUTS[canonical]]
        for label, cand in candidates:
            found = _try_candidate(canonical, cand, label, searched)
            if found is not None:
                return found
        not_tried = ["not tried: an explicit path was given"]
        raise DataNotFoundError(_not_found_message(canonical, searched, not_tried))
    for label, root in _search_roots():
        for sub in _LAYOUTS[canonical]:
            found = _try_candidate(canonical, root / sub, label, searched)
            if found is not None:
                return found
    attempts: list[str] = []
    if not download:
        attempts.append("disabled (download=False)")
    else:
        dest = _download_root() / _CACHE_SUBDIR[canonical]
        if _download(canonical, dest, attempts):
            found = _try_candidate(canonical, dest, "download", searched)
            if found is not None:
                return found
    raise DataNotFoundError(_not_found_message(canonical, searched, attempts))


def offline_raw(dataset: str | None = None) -> RawData:
    """``dataset`` if given (its errors raised), else MNIST when found offline, else the embedded
    ``digits``: what every tier runs on by default. Nothing is downloaded."""
    if dataset:
        return load_raw(dataset, download=False)
    try:
        return load_raw("MNIST", download=False)
    except DataNotFoundError:
        return load_raw("digits", download=False)

def preprocess_dpsom(images: np.ndarray) -> np.ndarray:
    """Per-image max scaling as the original DPSOM (spec §2.2) -> float32 NHWC [N, 28, 28, 1].

    Each image is flattened to 784 values and divided by its own maximum with numpy true division
    of uint8 by a uint8 column (float64), then cast to float32, as the original's feed did. For
    integers 0..255 this equals direct float32 division bit for bit (float64 has > 2*24+2 bits, so
    the double rounding is innocuous), but we keep the original's path. An all-zero image would be
    a division by zero in the original; here it is an error naming the image.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8 as distributed, got {x.dtype}")
    if x.ndim < 2 or x[0].size != _SIDE * _SIDE:
        raise ValueError(f"images must be [N, 28, 28] or [N, 784], got shape {x.shape}")
    flat = x.reshape(len(x), _SIDE * _SIDE)
    maxima = flat.max(axis=1, keepdims=True)
    zero = np.flatnonzero(maxima[:, 0] == 0)
    if zero.size:
        raise ValueError(
            f"{zero.size} all-zero image(s), first at index {zero[0]}: per-image max scaling "
            "would divide by zero (the original DPSOM would produce NaN)"
        )
    out = np.empty(flat.shape, dtype=np.float32)
    step = 8192  # bounded float64 temporaries; the rule is per image, so chunking changes nothing
    for i in range(0, len(flat), step):
        out[i : i + step] = (flat[i : i + step] / maxima[i : i + step]).astype(np.float32)
    return out.reshape(len(x), _SIDE, _SIDE, 1)


def dpsom_splits(raw: RawData, validation: bool = False) -> DPSOMData:
    """The original DPSOM train/val/test arrays (spec §2.3).

    Train pool and test set are preprocessed separately; ``train_test_split(pool, labels,
    test_size=0.15, random_state=42)`` gives 51 000 / 9 000 for MNIST. ``validation=False``: the
    logged stream and the final evaluation are the test set; ``True``: both are the val split.
    """
    pool = preprocess_dpsom(raw.x_train)
    x_train, x_split, y_train, y_split = train_test_split(
        pool, np.array(raw.y_train), test_size=VAL_FRACTION, random_state=SPLIT_SEED
    )
    if validation:
        x_val, y_val, which = x_split, y_split, "val"
    else:
        x_val, y_val, which = preprocess_dpsom(raw.x_test), np.array(raw.y_test), "test"
    return DPSOMData(
        name=raw.name,
        validation=bool(validation),
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_eval=x_val,
        y_eval=y_val,
        val_set=which,
        eval_set=which,
    )


def all_images_dekm(raw: RawData) -> tuple[np.ndarray, np.ndarray]:
    """DEKM's data (dekm.md §2): train then test concatenated, x/255, NHWC float32, and labels.

    The original divides in float64 and Keras casts to float32 at the input layer; we return that
    float32 array (70 000 x 28 x 28 x 1 for MNIST). DEKM's own shuffle is not applied here.
    """
    x = np.concatenate([raw.x_train, raw.x_test])
    y = np.concatenate([raw.y_train, raw.y_test]).astype(np.int64)
    return (x / 255.0).astype(np.float32)[..., None], y


def n_batches(n: int, batch_size: int) -> int:
    """Full batches per pass; the remainder is dropped as in the original (10 000 / 300 -> 33)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return n // batch_size


def epoch_batches(
    x: np.ndarray, batch_size: int, y: np.ndarray | None = None
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass in order, no shuffling, remainder dropped; yields ``x`` slices or ``(x, y)``."""
    if y is not None and len(y) != len(x):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    for i in range(n_batches(len(x), batch_size)):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        yield x[sl] if y is None else (x[sl], y[sl])


def batches(
    x: np.ndarray, batch_size: int, y: np.ndarray | None = None
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless repetition of :func:`epoch_batches`, like the original's generator.

    Batch ``i`` of any pass is the same slice, so an index taken modulo ``n_batches`` addresses
    per-batch data (the original slices its target distribution ``p`` that way).
    """
    if n_batches(len(x), batch_size) == 0:
        raise ValueError(f"no full batch: {len(x)} samples < batch_size {batch_size}")
    while True:
        yield from epoch_batches(x, batch_size, y)


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's C-order bytes (labels are hashed as uint8, see :func:`_hashes`)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Lookup


def _canonical_name(name: str) -> str:
    for known in DATASETS:
        if isinstance(name, str) and name.lower() == known.lower():
            return known
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def _search_roots() -> list[tuple[str, Path]]:
    home = Path.home()
    roots: list[tuple[str, Path]] = []
    env = os.environ.get("PARITY_DATA_DIR")
    if env:
        roots.append(("$PARITY_DATA_DIR", Path(env).expanduser()))
    keras_home = os.environ.get("KERAS_HOME")
    if keras_home:
        roots.append(("$KERAS_HOME/datasets", Path(keras_home).expanduser() / "datasets"))
    roots.append(("Keras cache", home / ".keras" / "datasets"))
    roots.append(("torchvision root ./data", Path.cwd() / "data"))
    roots.append(("torchvision root ~/data", home / "data"))
    roots.append(("torchvision root ~/.cache/torchvision", home / ".cache" / "torchvision"))
    if not env:
        roots.append(("download cache", home / ".cache" / "dc-parity"))
    return roots


def _download_root() -> Path:
    env = os.environ.get("PARITY_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dc-parity"


def _try_candidate(name: str, cand: Path, label: str, searched: list[str]) -> RawData | None:
    """Load ``cand`` if it is a complete source; otherwise note why not in ``searched``."""
    if cand.is_file():
        if cand.suffix != ".npz":
            searched.append(f"{label}: {cand} (a file, but not an .npz)")
            return None
        return _load_npz(name, cand)
    if cand.is_dir():
        files = {f: _idx_path(cand, f) for f in IDX_FILES}
        missing = [f for f, p in files.items() if p is None]
        if missing:
            searched.append(f"{label}: {cand} (incomplete: no {', '.join(missing)}[.gz])")
            return None
        return _load_idx_dir(name, cand, files)  # type: ignore[arg-type]
    searched.append(f"{label}: {cand} (missing)")
    return None


def _idx_path(directory: Path, stem: str) -> Path | None:
    for cand in (directory / stem, directory / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _not_found_message(name: str, searched: list[str], attempts: list[str]) -> str:
    sub = _LAYOUTS[name]
    lines = [f"{name} not found. Searched, in order:"]
    lines += [f"  - {s}" for s in searched]
    lines.append("Download:")
    lines += [f"  - {a}" for a in attempts]
    lines += [
        "Provide the data in one of these ways:",
        f"  - pass path=... : a directory with the four IDX files ({', '.join(IDX_FILES)}, each "
        "optionally .gz) or a Keras-style .npz (x_train, y_train, x_test, y_test);",
        f"  - set PARITY_DATA_DIR=DIR with DIR/{sub[0]}/<IDX files>, DIR/{sub[1]}/<IDX files> or "
        f"DIR/{sub[2]};",
        "  - or run once with network access and download=True (cached under $PARITY_DATA_DIR or "
        "~/.cache/dc-parity).",
        "The offline datasets 'digits' and 'synthetic' need no data at all.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Readers and checks


def _read_idx_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataIntegrityError(
            f"{path}: not a valid gzip stream (truncated or corrupt): {e}"
        ) from e


def _decode_idx(data: bytes, path: Path, labels: bool, count: int) -> np.ndarray:
    """Parse IDX bytes, checking magic number, dimensions and exact length."""
    magic, ndim, header = (_LABELS_MAGIC, 1, 8) if labels else (_IMAGES_MAGIC, 3, 16)
    if len(data) < header:
        raise DataIntegrityError(
            f"{path}: truncated: {len(data)} bytes, shorter than the IDX header"
        )
    got_magic = struct.unpack(">I", data[:4])[0]
    if got_magic != magic:
        raise DataIntegrityError(
            f"{path}: bad IDX magic number 0x{got_magic:08x}, expected 0x{magic:08x}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    want = (count,) if labels else (count, _SIDE, _SIDE)
    if dims != want:
        raise DataIntegrityError(f"{path}: IDX dimensions {dims}, expected {want}")
    size = int(np.prod(dims))
    if len(data) != header + size:
        raise DataIntegrityError(
            f"{path}: wrong length: {len(data)} bytes, the header implies {header + size}"
            + (" (truncated)" if len(data) < header + size else " (trailing bytes)")
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _hash_mismatch(what: str, expected: str, got: str, extra: str = "") -> DataIntegrityError:
    return DataIntegrityError(
        f"{what}: SHA-256 mismatch{extra}\n  expected {expected}\n  got      {got}\n"
        "The copy is corrupt or not the original data; delete it and provide a fresh one."
    )


def _load_idx_dir(name: str, directory: Path, files: dict[str, Path]) -> RawData:
    arrays: dict[str, np.ndarray] = {}
    verified = True
    for stem, path in files.items():
        data = _read_idx_bytes(path)
        labels, count = "labels" in stem, (_N_TRAIN if stem.startswith("train") else _N_TEST)
        if name == "MNIST":
            got = hashlib.sha256(data).hexdigest()
            if got != MNIST_IDX_SHA256[stem]:
                detail = ""
                try:
                    _decode_idx(data, path, labels, count)
                except DataIntegrityError as e:
                    detail = f" ({str(e).split(': ', 1)[1]})"
                raise _hash_mismatch(
                    f"{path} (decompressed IDX content)", MNIST_IDX_SHA256[stem], got, detail
                )
        elif path.suffix == ".gz":
            verified &= hashlib.sha256(path.read_bytes()).hexdigest() == FMNIST_GZ_SHA256[stem]
        else:
            verified = False
        key = ("y_" if labels else "x_") + ("train" if stem.startswith("train") else "test")
        arrays[key] = _decode_idx(data, path, labels, count)
    source = f"IDX files in {directory} (" + ", ".join(p.name for p in files.values()) + ")"
    return _finish(name, arrays, source, verified, where=str(directory))


def _load_npz(name: str, path: Path) -> RawData:
    try:
        # Our own handle: np.load leaks the file it opened when the zip directory is corrupt.
        with open(path, "rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataIntegrityError(f"{path}: not an .npz archive")
            with loaded as f:
                arrays = {k: f[k] for k in _KEYS if k in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, DataIntegrityError):
            raise
        raise DataIntegrityError(f"{path}: unreadable .npz (truncated or corrupt): {e}") from e
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise DataIntegrityError(f"{path}: not a Keras-style dataset .npz, missing keys {missing}")
    for key, a in arrays.items():
        n = _N_TRAIN if key.endswith("train") else _N_TEST
        want = (n,) if key.startswith("y") else (n, _SIDE, _SIDE)
        if a.shape != want:
            raise DataIntegrityError(f"{path}: {key} has shape {a.shape}, expected {want}")
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 255)):
            raise DataIntegrityError(
                f"{path}: {key} must hold integers 0..255, got dtype {a.dtype}"
            )
        arrays[key] = a.astype(np.uint8)
    return _finish(name, arrays, f"Keras-style npz {path}", False, where=str(path))


def _hashes(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    return {k: array_sha256(arrays[k].astype(np.uint8)) for k in _KEYS}


def _finish(
    name: str, arrays: dict[str, np.ndarray], source: str, verified: bool, where: str
) -> RawData:
    """Check content hashes (where known) and label range, freeze, and wrap."""
    hashes = _hashes(arrays)
    known = ARRAY_SHA256.get(name)
    if known is not None:
        for key in _KEYS:
            if hashes[key] != known[key]:
                what = f"{where} [{key}] (decoded uint8 array)"
                raise _hash_mismatch(what, known[key], hashes[key])
        verified = True
    for key in ("y_train", "y_test"):
        if arrays[key].max() > 9:
            raise DataIntegrityError(f"{where}: {key} has label {arrays[key].max()}, expected 0..9")
    frozen = {}
    for key, a in arrays.items():
        a = np.array(a, dtype=np.int64 if key.startswith("y") else np.uint8)
        a.flags.writeable = False
        frozen[key] = a
    return RawData(name=name, source=source, hashes=hashes, verified=bool(verified), **frozen)


# ---------------------------------------------------------------------------------------------
# Download


def _fetch(url: str, timeout: float) -> bytes:
    """One HTTP GET (a seam for tests, which replace it instead of touching the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed URLs)
        return response.read()


def _check_download(name: str, stem: str, blob: bytes, url: str) -> None:
    try:
        data = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise DataIntegrityError(f"{url}: not a valid gzip stream: {e}") from e
    if name == "MNIST":
        got, want = hashlib.sha256(data).hexdigest(), MNIST_IDX_SHA256[stem]
        if got != want:
            raise _hash_mismatch(f"{url} (decompressed)", want, got)
    else:
        got, want = hashlib.sha256(blob).hexdigest(), FMNIST_GZ_SHA256[stem]
        if got != want:
            raise _hash_mismatch(f"{url} (.gz bytes)", want, got)
    count = _N_TRAIN if stem.startswith("train") else _N_TEST
    _decode_idx(data, Path(url), "labels" in stem, count)


def _download(name: str, dest: Path, attempts: list[str]) -> bool:
    """Fetch and verify all four files from one mirror, then write them atomically into ``dest``."""
    for base in MIRRORS[name]:
        blobs: dict[str, bytes] = {}
        for stem in IDX_FILES:
            url = f"{base}{stem}.gz"
            try:
                blob = _fetch(url, DOWNLOAD_TIMEOUT_S)
                _check_download(name, stem, blob, url)
            except (OSError, HTTPException, DataIntegrityError) as e:
                attempts.append(f"{url}: {type(e).__name__}: {e}")
                break
            blobs[stem] = blob
        else:
            try:
                dest.mkdir(parents=True, exist_ok=True)
                for stem, blob in blobs.items():
                    _atomic_write(dest / f"{stem}.gz", blob)
            except OSError as e:
                attempts.append(f"{base}: verified, but writing to {dest} failed: {e}")
                return False
            attempts.append(f"{base}: downloaded and verified into {dest}")
            return True
    return False


def _atomic_write(target: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Offline datasets (IEEE-exact arithmetic only, so every platform yields the same bytes)


def _resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Integer images [N, h, w] -> bilinear [N, size, size], scaled by ``(size - 1) ** 2``.

    Align-corners grid, like ``scipy.ndimage.zoom(order=1)``: output pixel ``o`` samples input
    coordinate ``o * (h - 1) / (size - 1)``. The weights are multiples of ``1 / (size - 1)``, so
    we return the interpolated values multiplied by ``(size - 1) ** 2`` as exact integers; float
    arithmetic would leave exact .5 ties (common here) to the last bit of rounding.
    """

    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray]:
        num = np.arange(size, dtype=np.int64) * (n_in - 1)  # source coordinate * (size - 1)
        i0 = np.minimum(num // (size - 1), n_in - 2)
        return i0, num - i0 * (size - 1)  # index and weight numerator in 0..size-1

    den = size - 1
    img = images.astype(np.int64)
    r0, fr = weights(img.shape[1])
    c0, fc = weights(img.shape[2])
    rows = img[:, r0, :] * (den - fr)[None, :, None] + img[:, r0 + 1, :] * fr[None, :, None]
    return rows[:, :, c0] * (den - fc)[None, None, :] + rows[:, :, c0 + 1] * fc[None, None, :]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Float in [0, 255] -> uint8, rounding half up."""
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


def _digits() -> RawData:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no network

    d = load_digits()
    scaled = _resize_bilinear(d.images.astype(np.int64), _SIDE)  # value * 27**2, exact
    den = 16 * (_SIDE - 1) ** 2  # pixels 0..16 -> 0..255, rounded half up in integers
    x = ((2 * 255 * scaled + den) // (2 * den)).astype(np.uint8)
    y = d.target.astype(np.int64)
    test = np.arange(len(x)) % 6 == 5
    arrays = {"x_train": x[~test], "y_train": y[~test], "x_test": x[test], "y_test": y[test]}
    source = "scikit-learn load_digits, bilinear 8x8 -> 28x28"
    return _finish("digits", arrays, source, True, "digits")


def _segment_distance(
    py: np.ndarray, px: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    (ay, ax), (by, bx) = a, b
    dy, dx = by - ay, bx - ax
    t = np.clip(((py - ay) * dy + (px - ax) * dx) / (dy * dy + dx * dx), 0.0, 1.0)
    ey, ex = py - (ay + t * dy), px - (ax + t * dx)
    return np.sqrt(ey * ey + ex * ex)


def _ring_distance(py: np.ndarray, px: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return np.abs(np.sqrt((py - cy) ** 2 + (px - cx) ** 2) - r)


def _templates() -> np.ndarray:
    """Distance (pixels) from each pixel to the strokes of 10 class templates, [10, 28, 28]."""
    grid = np.arange(_SIDE, dtype=np.float64)
    py, px = np.meshgrid(grid, grid, indexing="ij")

    def seg(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
        return _segment_distance(py, px, a, b)

    def ring(cy: float, cx: float, r: float) -> np.ndarray:
        return _ring_distance(py, px, cy, cx, r)

    vertical, horizontal = seg((5, 14), (22, 14)), seg((14, 5), (14, 22))
    diag, anti = seg((6, 6), (21, 21)), seg((6, 21), (21, 6))
    corners = ((7, 7), (7, 20), (20, 20), (20, 7))
    square = np.minimum.reduce([seg(corners[i - 1], corners[i]) for i in range(4)])
    return np.stack(
        [
            ring(13.5, 13.5, 8.0),  # 0 ring
            vertical,  # 1 |
            horizontal,  # 2 -
            diag,  # 3 backslash
            anti,  # 4 slash
            np.minimum(vertical, horizontal),  # 5 plus
            np.minimum(diag, anti),  # 6 cross
            square,  # 7 square outline
            np.minimum(seg((6, 6), (6, 21)), seg((6, 13.5), (22, 13.5))),  # 8 T
            np.minimum(ring(8.5, 13.5, 4.5), ring(18.5, 13.5, 4.5)),  # 9 eight
        ]
    )


def _synthetic(n_pool: int = 3000, n_test: int = 500, seed: int = 2020) -> RawData:
    """Seeded 10-class stroke images: template + shift (+-1 px) + width + contrast + noise."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n, pad = n_pool + n_test, 1
    labels = (np.arange(n) % 10)[np.argsort(rng.random(n), kind="stable")].astype(np.int64)
    shift = np.floor(rng.random((n, 2)) * (2 * pad + 1)).astype(np.int64)  # 0..2 -> -1..+1
    width = 1.0 + 0.8 * rng.random(n)  # stroke half-width in pixels
    contrast = 0.6 + 0.4 * rng.random(n)
    noise = rng.random((n, _SIDE, _SIDE)) * 0.2
    dist = np.pad(_templates(), ((0, 0), (pad, pad), (pad, pad)), constant_values=1e3)
    rows = shift[:, 0, None] + np.arange(_SIDE)  # [n, 28] window start 0..2 in the padded grid
    cols = shift[:, 1, None] + np.arange(_SIDE)
    d = dist[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
    stroke = np.clip(width[:, None, None] + 0.5 - d, 0.0, 1.0)
    x = _to_uint8(np.clip(contrast[:, None, None] * stroke + noise, 0.0, 1.0) * 255.0)
    arrays = {
        "x_train": x[:n_pool],
        "y_train": labels[:n_pool],
        "x_test": x[n_pool:],
        "y_test": labels[n_pool:],
    }
    return _finish("synthetic", arrays, f"synthetic strokes, PCG64 seed {seed}", True, "synthetic")
