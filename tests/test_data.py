"""harness.data: the real MNIST (hashes, counts, splits, batches, preprocessing), the file formats
and lookup order, integrity failures, downloads (with a fake fetch: no network), offline sets.

The MNIST tests need PARITY_DATA_DIR pointing at a directory with ``mnist/`` holding the four IDX
``.gz`` files (in this project: /work/shared/data); they skip with one line otherwise. Every file
written goes under ``tmp_path``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from harness import data
from harness.data import DataIntegrityError, DataNotFoundError

# shared/data/mnist/README.md: SHA-256 of the decompressed IDX files.
README_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
STEMS = tuple(README_SHA256)
HEADER = {stem: 8 if "labels" in stem else 16 for stem in STEMS}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    root = os.environ.get("PARITY_DATA_DIR")
    d = Path(root) / "mnist" if root else None
    if d is None or not all((d / f"{s}.gz").is_file() for s in STEMS):
        pytest.skip(
            "real MNIST absent: set PARITY_DATA_DIR to a dir with mnist/<4 IDX .gz files> "
            "(e.g. /work/shared/data)"
        )
    return d


@pytest.fixture(scope="module")
def idx_bytes(mnist_dir: Path) -> dict[str, bytes]:
    """Decompressed IDX content of the shared copy, read independently of harness.data."""
    return {s: gzip.decompress((mnist_dir / f"{s}.gz").read_bytes()) for s in STEMS}


@pytest.fixture(scope="module")
def raw(mnist_dir: Path) -> data.RawData:
    return data.load_raw("MNIST", path=mnist_dir, download=False)


@pytest.fixture(scope="module")
def split_test(raw: data.RawData) -> data.DPSOMData:
    return data.dpsom_splits(raw, validation=False)


@pytest.fixture(scope="module")
def split_val(raw: data.RawData) -> data.DPSOMData:
    return data.dpsom_splits(raw, validation=True)


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data env vars, HOME and cwd inside tmp_path, and a fetch that fails like offline."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.delenv("PARITY_DATA_DIR", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)

    def offline(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(data, "_fetch", offline)
    return home


def write_idx_dir(directory: Path, idx: dict[str, bytes], gz: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, content in idx.items():
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(content, compresslevel=1))
        else:
            (directory / stem).write_bytes(content)
    return directory


def assert_same_content(got: data.RawData, ref: data.RawData) -> None:
    assert got.hashes == ref.hashes
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(got, key), getattr(ref, key))


# ---------------------------------------------------------------------------------------------
# The real MNIST


def test_decompressed_idx_hashes_match_readme(idx_bytes: dict[str, bytes]) -> None:
    for stem, content in idx_bytes.items():
        assert sha(content) == README_SHA256[stem], stem
    assert data.MNIST_IDX_SHA256 == README_SHA256


def test_mnist_counts_labels_and_dtypes(raw: data.RawData) -> None:
    assert raw.name == "MNIST" and raw.verified
    assert raw.x_train.shape == (60_000, 28, 28) and raw.x_test.shape == (10_000, 28, 28)
    assert raw.y_train.shape == (60_000,) and raw.y_test.shape == (10_000,)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    assert np.bincount(raw.y_train).tolist() == TRAIN_CLASS_COUNTS
    assert raw.y_train[:10].tolist() == FIRST_TRAIN_LABELS
    assert round(float(raw.x_train.mean()), 3) == 33.318  # README
    assert not raw.x_train.flags.writeable  # the hashed content cannot be edited in place


def test_array_hashes_are_the_idx_payload_hashes(raw: data.RawData, idx_bytes) -> None:
    keys = {"train-images-idx3-ubyte": "x_train", "train-labels-idx1-ubyte": "y_train",
            "t10k-images-idx3-ubyte": "x_test", "t10k-labels-idx1-ubyte": "y_test"}
    for stem, key in keys.items():
        payload_hash = sha(idx_bytes[stem][HEADER[stem]:])
        assert raw.hashes[key] == payload_hash == data.ARRAY_SHA256["MNIST"][key], key


def test_split_sizes_and_batches_per_epoch(split_test, split_val) -> None:
    assert split_test.x_train.shape == (51_000, 28, 28, 1)
    assert split_val.x_val.shape == (9_000, 28, 28, 1)
    assert split_test.x_val.shape == (10_000, 28, 28, 1)
    assert [data.n_batches(n, 300) for n in (51_000, 9_000, 10_000)] == [170, 30, 33]
    assert sum(1 for _ in data.epoch_batches(split_test.x_train, 300)) == 170
    assert sum(1 for _ in data.epoch_batches(split_val.x_val, 300)) == 30
    test_batches = list(data.epoch_batches(split_test.x_eval, 300, split_test.y_eval))
    assert len(test_batches) == 33  # the last 100 test images are never used
    np.testing.assert_array_equal(test_batches[-1][1], split_test.y_eval[9_600:9_900])


def test_infinite_generator_repeats_passes_in_order(split_test) -> None:
    gen = data.batches(split_test.x_train, 300, split_test.y_train)
    first = [next(gen) for _ in range(170)]
    again = next(gen)  # batch 171 = batch 0 of the second pass: no reshuffle
    np.testing.assert_array_equal(again[0], first[0][0])
    np.testing.assert_array_equal(first[5][1], split_test.y_train[1500:1800])
    assert first[169][0].shape == (300, 28, 28, 1)


def test_split_is_sklearn_shuffle_split_with_seed_42(raw, split_val) -> None:
    # train_test_split(test_size=0.15, random_state=42) = RandomState(42).permutation(60000);
    # the first ceil(0.15 * 60000) = 9000 indices are the val split, the rest is train in order.
    perm = np.random.RandomState(42).permutation(60_000)
    np.testing.assert_array_equal(split_val.y_train, raw.y_train[perm[9_000:]])
    np.testing.assert_array_equal(split_val.y_val, raw.y_train[perm[:9_000]])
    first = raw.x_train[perm[9_000]].astype(np.float64)
    expected_first = (first / first.max()).astype(np.float32)
    np.testing.assert_array_equal(split_val.x_train[0, :, :, 0], expected_first)


def test_validation_flag_semantics(raw, split_test, split_val) -> None:
    assert (split_test.val_set, split_test.eval_set) == ("test", "test")
    assert split_test.validation is False
    np.testing.assert_array_equal(split_test.x_val, data.preprocess_dpsom(raw.x_test))
    np.testing.assert_array_equal(split_test.y_eval, raw.y_test)
    assert split_test.x_eval is split_test.x_val
    assert (split_val.val_set, split_val.eval_set, split_val.validation) == ("val", "val", True)
    assert split_val.x_eval.shape[0] == split_val.y_eval.shape[0] == 9_000
    np.testing.assert_array_equal(split_val.y_eval, split_val.y_val)
    # The train split does not depend on the flag.
    np.testing.assert_array_equal(split_val.x_train, split_test.x_train)


def test_preprocessing_per_image_max_float64_then_cast(raw, split_test) -> None:
    x = split_test.x_train
    assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
    assert np.all(x.reshape(len(x), -1).max(axis=1) == 1.0) and x.min() == 0.0
    # Independent computation of the original's rule on the 10k test set.
    flat = raw.x_test.reshape(10_000, 784)
    maxima = flat.max(axis=1).astype(np.float64)[:, None]
    ref = (flat.astype(np.float64) / maxima).astype(np.float32)
    got = data.preprocess_dpsom(raw.x_test)
    assert got.shape == (10_000, 28, 28, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(10_000, 784), ref)
    assert np.all(got.reshape(10_000, -1).max(axis=1) == 1.0)


def test_float64_then_cast_equals_float32_division_for_all_uint8_pairs() -> None:
    # Spec §2.2 warns float64-then-cast vs direct float32 "can differ by 1 ulp". For a / b with
    # integers 0 <= a <= 255, 1 <= b <= 255 they cannot (float64 has >= 2*24+2 bits, so double
    # rounding is innocuous): checked exhaustively, 0 differences.
    a = np.arange(256, dtype=np.uint8)[None, :]
    b = np.arange(1, 256, dtype=np.uint8)[:, None]
    via64 = (a / b).astype(np.float32)
    direct = a.astype(np.float32) / b.astype(np.float32)
    assert (a / b).dtype == np.float64
    assert int(np.count_nonzero(via64 != direct)) == 0


def test_preprocess_rejects_all_zero_image_and_wrong_dtype() -> None:
    x = np.ones((4, 28, 28), dtype=np.uint8)
    x[2] = 0
    with pytest.raises(ValueError, match="all-zero image.*index 2"):
        data.preprocess_dpsom(x)
    with pytest.raises(TypeError, match="uint8"):
        data.preprocess_dpsom(x.astype(np.float32))


def test_all_images_dekm(raw) -> None:
    x, y = data.all_images_dekm(raw)
    assert x.shape == (70_000, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[60_000:, :, :, 0], (raw.x_test / 255.0).astype(np.float32))
    np.testing.assert_array_equal(x[123, :, :, 0], (raw.x_train[123] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(y, np.concatenate([raw.y_train, raw.y_test]))
    assert x.max() == 1.0


# ---------------------------------------------------------------------------------------------
# Formats and lookup order


def test_same_content_from_gz_raw_npz_and_torchvision_layout(tmp_path, raw, idx_bytes, monkeypatch):
    gz_dir = write_idx_dir(tmp_path / "gz", idx_bytes, gz=True)  # recompressed: other .gz bytes
    raw_dir = write_idx_dir(tmp_path / "raw", idx_bytes, gz=False)
    npz = tmp_path / "keras" / "mnist.npz"
    npz.parent.mkdir()
    np.savez(npz, x_train=raw.x_train, y_train=raw.y_train.astype(np.uint8),
             x_test=raw.x_test, y_test=raw.y_test.astype(np.uint8))
    for p in (gz_dir, raw_dir, npz):
        got = data.load_raw("MNIST", path=p, download=False)
        assert_same_content(got, raw)
        assert got.verified and str(p) in got.source
    # torchvision: <root>/MNIST/raw with both forms; found through PARITY_DATA_DIR=<root>.
    tv = tmp_path / "tv"
    write_idx_dir(tv / "MNIST" / "raw", idx_bytes, gz=False)
    write_idx_dir(tv / "MNIST" / "raw", idx_bytes, gz=True)
    monkeypatch.setenv("PARITY_DATA_DIR", str(tv))
    got = data.load_raw("MNIST", download=False)
    assert_same_content(got, raw)
    assert str(tv / "MNIST" / "raw") in got.source and ".gz" not in got.source  # raw preferred


def test_lookup_env_then_keras_cache(isolated, raw, mnist_dir, monkeypatch) -> None:
    keras = isolated / ".keras" / "datasets"
    keras.mkdir(parents=True)
    np.savez(keras / "mnist.npz", x_train=raw.x_train, y_train=raw.y_train,
             x_test=raw.x_test, y_test=raw.y_test)
    got = data.load_raw("MNIST", download=False)
    assert got.source == f"Keras-style npz {keras / 'mnist.npz'}"
    assert_same_content(got, raw)
    monkeypatch.setenv("PARITY_DATA_DIR", str(mnist_dir.parent))  # env wins over the Keras cache
    got = data.load_raw("MNIST", download=False)
    assert str(mnist_dir) in got.source


def test_not_found_offline_lists_every_place(isolated) -> None:
    with pytest.raises(DataNotFoundError) as err:
        data.load_raw("MNIST", download=False)
    msg = str(err.value)
    cwd = Path.cwd()
    for place in (
        isolated / ".keras" / "datasets" / "mnist.npz",
        isolated / ".keras" / "datasets" / "MNIST" / "raw",
        cwd / "data" / "MNIST" / "raw",
        isolated / "data" / "mnist",
        isolated / ".cache" / "torchvision" / "MNIST" / "raw",
        isolated / ".cache" / "dc-parity" / "mnist",
    ):
        assert str(place) in msg, place
    assert "download=False" in msg and "PARITY_DATA_DIR" in msg and "'synthetic'" in msg
    # With download allowed, the attempted URLs are listed (the fixture's fetch fails offline).
    with pytest.raises(DataNotFoundError) as err:
        data.load_raw("MNIST", download=True)
    for base in data.MIRRORS["MNIST"]:
        assert f"{base}train-images-idx3-ubyte.gz: URLError" in str(err.value)


def test_incomplete_directory_is_reported(isolated, tmp_path) -> None:
    d = tmp_path / "partial"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=r"incomplete: no train-labels-idx1-ubyte"):
        data.load_raw("MNIST", path=d, download=False)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names: MNIST, fMNIST, digits, synthetic"):
        data.load_raw("CIFAR10")


# ---------------------------------------------------------------------------------------------
# Integrity failures


def test_flipped_byte_in_raw_idx_names_file_and_both_hashes(tmp_path, idx_bytes) -> None:
    d = write_idx_dir(tmp_path / "bad", idx_bytes, gz=False)
    target = d / "train-images-idx3-ubyte"
    corrupt = bytearray(idx_bytes["train-images-idx3-ubyte"])
    corrupt[16 + 12_345] ^= 0x01
    target.write_bytes(bytes(corrupt))
    with pytest.raises(DataIntegrityError) as err:
        data.load_raw("MNIST", path=d, download=False)
    msg = str(err.value)
    assert str(target) in msg
    assert README_SHA256["train-images-idx3-ubyte"] in msg and sha(bytes(corrupt)) in msg


def test_truncated_raw_idx_names_file_hashes_and_length(tmp_path, idx_bytes) -> None:
    d = write_idx_dir(tmp_path / "short", idx_bytes, gz=False)
    target = d / "t10k-images-idx3-ubyte"
    short = idx_bytes["t10k-images-idx3-ubyte"][:4_000_000]
    target.write_bytes(short)
    with pytest.raises(DataIntegrityError) as err:
        data.load_raw("MNIST", path=d, download=False)
    msg = str(err.value)
    assert str(target) in msg and "4000000 bytes, the header implies 7840016" in msg
    assert README_SHA256["t10k-images-idx3-ubyte"] in msg and sha(short) in msg


def test_corrupt_and_truncated_gz_name_the_file(tmp_path, mnist_dir) -> None:
    for mode in ("flip", "truncate"):
        d = tmp_path / mode
        shutil.copytree(mnist_dir, d)
        target = d / "train-labels-idx1-ubyte.gz"
        blob = bytearray(target.read_bytes())
        if mode == "flip":
            blob[len(blob) // 2] ^= 0xFF
        else:
            del blob[len(blob) // 2:]
        target.write_bytes(bytes(blob))
        with pytest.raises(DataIntegrityError, match="train-labels-idx1-ubyte.gz") as err:
            data.load_raw("MNIST", path=d, download=False)
        assert str(target) in str(err.value)


def test_npz_checked_by_content(tmp_path, raw) -> None:
    x = np.array(raw.x_train)
    x[7, 14, 14] ^= 0x10
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=x, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)
    with pytest.raises(DataIntegrityError) as err:
        data.load_raw("MNIST", path=npz, download=False)
    msg = str(err.value)
    assert str(npz) in msg and "[x_train]" in msg
    assert data.ARRAY_SHA256["MNIST"]["x_train"] in msg and sha(x.tobytes()) in msg
    npz.write_bytes(npz.read_bytes()[:1000])
    with pytest.raises(DataIntegrityError, match=f"{npz}: unreadable .npz"):
        data.load_raw("MNIST", path=npz, download=False)


def test_fmnist_structure_only_and_bad_magic(tmp_path, idx_bytes) -> None:
    # No Fashion-MNIST here: an MNIST-shaped stand-in exercises the structure-only path.
    d = write_idx_dir(tmp_path / "fashion-mnist", idx_bytes, gz=True)
    got = data.load_raw("fMNIST", path=tmp_path, download=False)
    assert got.name == "fMNIST" and not got.verified and got.x_train.shape == (60_000, 28, 28)
    bad = bytearray(idx_bytes["t10k-labels-idx1-ubyte"])
    bad[3] = 0x03  # labels magic 0x00000801 -> 0x00000803
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    (d / "t10k-labels-idx1-ubyte").write_bytes(bytes(bad))
    expected = "t10k-labels-idx1-ubyte: bad IDX magic number 0x00000803, expected 0x00000801"
    with pytest.raises(DataIntegrityError, match=expected):
        data.load_raw("fMNIST", path=tmp_path, download=False)


# ---------------------------------------------------------------------------------------------
# Download (fake fetch, no network)


def test_download_writes_verified_files_atomically(isolated, mnist_dir, raw, monkeypatch) -> None:
    served: list[str] = []

    def fake_fetch(url: str, timeout: float) -> bytes:
        served.append(url)
        assert timeout == data.DOWNLOAD_TIMEOUT_S
        return (mnist_dir / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    got = data.load_raw("MNIST", download=True)
    assert_same_content(got, raw)
    cache = isolated / ".cache" / "dc-parity" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in STEMS)  # no .part
    assert served == [f"{data.MIRRORS['MNIST'][0]}{s}.gz" for s in STEMS]
    for stem in STEMS:
        assert (cache / f"{stem}.gz").read_bytes() == (mnist_dir / f"{stem}.gz").read_bytes()
    served.clear()
    data.load_raw("MNIST", download=True)  # now cached: no fetch
    assert served == []


def test_corrupt_download_is_never_cached(isolated, mnist_dir, monkeypatch) -> None:
    def bad_fetch(url: str, timeout: float) -> bytes:
        name = url.rsplit("/", 1)[1]
        blob = (mnist_dir / name).read_bytes()
        if not name.startswith("t10k-labels"):
            return blob
        content = gzip.decompress(blob)
        return gzip.compress(content[:-1] + bytes([content[-1] ^ 1]))  # last label flipped

    monkeypatch.setattr(data, "_fetch", bad_fetch)
    with pytest.raises(DataNotFoundError) as err:
        data.load_raw("MNIST", download=True)
    msg = str(err.value)
    for base in data.MIRRORS["MNIST"]:
        assert f"{base}t10k-labels-idx1-ubyte.gz: DataIntegrityError" in msg
    assert README_SHA256["t10k-labels-idx1-ubyte"] in msg
    cache = isolated / ".cache" / "dc-parity" / "mnist"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_fmnist_download_must_match_the_distributed_gz(isolated, mnist_dir, monkeypatch) -> None:
    # MNIST bytes served as Fashion-MNIST: structurally valid, but not the official .gz files.
    def mnist_as_fashion(url: str, timeout: float) -> bytes:
        return (mnist_dir / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(data, "_fetch", mnist_as_fashion)
    with pytest.raises(DataNotFoundError) as err:
        data.load_raw("fMNIST", download=True)
    msg = str(err.value)
    for base in data.MIRRORS["fMNIST"]:
        assert f"{base}train-images-idx3-ubyte.gz: DataIntegrityError" in msg
    served = sha((mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    assert data.FMNIST_GZ_SHA256["train-images-idx3-ubyte"] in msg and served in msg
    assert not (isolated / ".cache" / "dc-parity" / "fashion-mnist").exists()


# ---------------------------------------------------------------------------------------------
# Offline defaults


@pytest.mark.parametrize(
    ("name", "n_pool", "n_test", "n_train", "n_val"),
    [("digits", 1_498, 299, 1_273, 225), ("synthetic", 3_000, 500, 2_550, 450)],
)
def test_offline_defaults(isolated, name, n_pool, n_test, n_train, n_val) -> None:
    got = data.load_raw(name, download=False)
    assert got.verified and got.hashes == dict(data.ARRAY_SHA256[name])
    assert got.x_train.shape == (n_pool, 28, 28) and got.x_test.shape == (n_test, 28, 28)
    assert got.x_train.dtype == np.uint8 and got.y_train.dtype == np.int64
    assert set(np.unique(got.y_train)) == set(range(10)) == set(np.unique(got.y_test))
    assert np.bincount(got.y_train).min() >= 0.08 * n_pool  # every class well represented
    assert got.x_train.reshape(n_pool, -1).max(axis=1).min() > 100  # no blank image
    split = data.dpsom_splits(got, validation=True)
    assert (len(split.x_train), len(split.x_val)) == (n_train, n_val)
    assert data.load_raw(name).hashes == got.hashes  # deterministic


def test_digits_match_scipy_zoom_up_to_exact_ties() -> None:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    images = load_digits().images
    ref = zoom(images, (1, 3.5, 3.5), order=1) * (255 / 16)
    raw_digits = data.load_raw("digits")
    test = np.arange(len(images)) % 6 == 5
    got = np.empty((len(images), 28, 28))
    got[~test], got[test] = raw_digits.x_train, raw_digits.x_test
    rounded = np.floor(ref + 0.5)
    differ = rounded != got
    # Only exact .5 ties (float noise decides scipy's side) may round differently, by one level.
    assert np.all(np.abs(rounded - got)[differ] == 1)
    assert np.all(np.abs(ref[differ] - np.floor(ref[differ]) - 0.5) < 1e-9)
    assert differ.mean() < 0.001


def test_modules_import_no_framework() -> None:
    code = (
        "import sys, harness.data, harness.metrics; "
        "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_argument_errors() -> None:
    with pytest.raises(ValueError, match="batch_size must be positive"):
        data.n_batches(10, 0)
    with pytest.raises(ValueError, match="no full batch: 5 samples < batch_size 6"):
        next(data.batches(np.zeros(5), 6))
