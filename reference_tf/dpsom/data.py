"""The reference's own data path, as the original DPSOM's ``DPSOM.py`` runs it (specs/dpsom.md §2).

Mirrors ``ports/dpsom/data.py`` name for name; written in the original's numpy form, so that the
data tier (harness/tier_data.py) compares two independent paths, not one path twice.

1. Raw data (:func:`load_mnist`): the original calls ``tf.keras.datasets.mnist.load_data()`` (or
   ``fashion_mnist`` for ``data_set="fMNIST"``): 60 000 train + 10 000 test uint8 28x28 images and
   their labels. Here the raw arrays come from the suite's hash-checked reader
   (``harness.data.load_raw``: IDX or Keras ``.npz`` under ``data_dir`` / ``$PARITY_DATA_DIR`` /
   the Keras cache ...), which holds the same bytes as the Keras loader (SHA-256 pinned). It also
   serves the offline ``digits`` / ``synthetic`` sets, which the original never saw.
2. Per-image max scaling (:func:`scale_per_image`): ``x.reshape(-1, 784) / x.max(axis=1)[:, None]``
   on uint8 is numpy true division, i.e. **float64**, and the original keeps float64 arrays; the
   cast to float32 happens when a batch is fed to the float32 ``x`` placeholder (here:
   ``model._feed``, ``np.asarray(x, float32)``, the same round-to-nearest cast). The 60k train pool
   and the 10k test set are scaled separately.
3. Split (:func:`dpsom_data`): ``train_test_split(pool, labels, test_size=0.15, random_state=42)``
   -> 51 000 train / 9 000 val. ``validation=False`` (the original's default): the stream logged
   during training and the final evaluation are the test set; ``True``: both are the val split.
4. Batches (:func:`batches`): the original's endless generator walks the array in order, no
   shuffling, ``len(x) // batch_size`` full batches per pass and then starts over (the remainder
   is never fed): 170 train batches per epoch, 33 test batches (the last 100 test images unused).

Nothing here needs TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

SIDE = 28
N_CLASSES = 10
VAL_FRACTION = 0.15  # the original's train_test_split(test_size=0.15, random_state=42)
SPLIT_SEED = 42


def _harness_data():
    import harness.data

    return harness.data


class DataNotFoundError(FileNotFoundError):
    """No copy of the dataset was found (the message lists every place searched)."""


class DataFormatError(ValueError):
    """A data file is truncated, corrupt or its content differs from the known dataset."""


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
    """What the original holds before feeding: **float64** NHWC images in [0, 1] (cast to float32 at
    the feed) and the labels as loaded.

    ``x_val``/``y_val`` is the stream the original logs during training, ``x_eval``/``y_eval`` the
    final evaluation set (the same arrays); ``val_set``/``eval_set`` say which (``"test"``/``"val"``).
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


def load_mnist(data_set: str = "MNIST", data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> RawMNIST:
    """The raw arrays of ``data_set`` (``"MNIST"``, ``"fMNIST"``, or the offline ``"digits"`` /
    ``"synthetic"``) from ``data_dir`` or the usual places (``harness.data.load_raw``)."""
    hd = _harness_data()
    try:
        raw = hd.load_raw(data_set, path=data_dir, download=download)
    except hd.DataNotFoundError as err:
        raise DataNotFoundError(str(err)) from err
    except hd.DataIntegrityError as err:
        raise DataFormatError(str(err)) from err
    return RawMNIST(raw.x_train, raw.y_train, raw.x_test, raw.y_test, source=raw.source)


def scale_per_image(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float64 [N, 28, 28, 1]: every image divided by its own maximum pixel.

    The original's expression: numpy true division of the uint8 images (flattened to 784) by the
    uint8 column of their maxima, which numpy computes in float64. An all-zero image (NaN in the
    original) is an error naming its index.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim < 2 or x[0].size != SIDE * SIDE:
        raise ValueError(f"images must be uint8 [N, 28, 28] or [N, 784] as distributed, got {x.dtype} {x.shape}")
    flat = x.reshape(-1, SIDE * SIDE)
    maxima = flat.max(axis=1)
    zero = np.flatnonzero(maxima == 0)
    if zero.size:
        raise ValueError(f"image {int(zero[0])} is all zero: per-image max scaling divides by zero (NaN in the original)")
    return (flat / maxima[:, None]).reshape(-1, SIDE, SIDE, 1)


def dpsom_data(raw: RawMNIST, validation: bool = False) -> DPSOMData:
    """The original's arrays: the scaled train pool split 85/15 with random_state=42, the scaled test set."""
    x_train, x_split, y_train, y_split = train_test_split(
        scale_per_image(raw.x_train), raw.y_train, test_size=VAL_FRACTION, random_state=SPLIT_SEED
    )
    if validation:
        x_val, y_val, which = x_split, y_split, "val"
    else:
        x_val, y_val, which = scale_per_image(raw.x_test), raw.y_test, "test"
    return DPSOMData(x_train, y_train, x_val, y_val, x_val, y_val, which, which, raw.source)


def load_dpsom_data(
    data_set: str = "MNIST", data_dir: str | os.PathLike[str] | None = None, validation: bool = False
) -> DPSOMData:
    """:func:`load_mnist` then :func:`dpsom_data`."""
    return dpsom_data(load_mnist(data_set, data_dir), validation)


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The original's batch generator: in order, ``len(x) // batch_size`` full batches per pass,
    then the next pass from the start, forever (the remainder is never yielded).

    Batch ``i`` of every pass is the same slice, so the training loop's batch index ``ii`` (which
    slices the target distribution p) stays aligned with the data as long as each epoch takes
    exactly one pass.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(x) // batch_size
    if n == 0:
        raise ValueError(f"no full batch: {len(x)} samples < batch_size {batch_size}")
    while True:
        for i in range(n):
            yield x[i * batch_size : (i + 1) * batch_size]
