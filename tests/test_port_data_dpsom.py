"""ports.dpsom.data (the port's own data path) against harness.data, its file errors, and the rule
that nothing under ports/ imports harness.

The real-MNIST tests need PARITY_DATA_DIR pointing at a directory with ``mnist/`` holding the four
IDX ``.gz`` files (in this project: /work/shared/data); they skip with one line otherwise. The
error tests build small fake files under ``tmp_path`` and need no data.
"""

from __future__ import annotations

import ast
import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ports.dpsom import data as pdata
from ports.dpsom.data import DataFormatError, DataNotFoundError

REPO = Path(__file__).resolve().parents[1]
STEMS = tuple(pdata.IDX_FILES)


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    root = os.environ.get("PARITY_DATA_DIR")
    d = Path(root) / "mnist" if root else None
    if d is None or not all((d / f"{s}.gz").is_file() for s in STEMS):
        pytest.skip("real MNIST absent: set PARITY_DATA_DIR to a dir with mnist/<4 IDX .gz files> (e.g. /work/shared/data)")
    return d


@pytest.fixture(scope="module")
def port_raw(mnist_dir: Path) -> pdata.RawMNIST:
    return pdata.load_mnist("MNIST")  # found through $PARITY_DATA_DIR/mnist


@pytest.fixture(scope="module")
def harness_raw(mnist_dir: Path):
    from harness.data import load_raw

    return load_raw("MNIST", download=False)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Element for element and bit for bit: dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# --- real MNIST: the port's path equals the harness's ------------------------------------------


def test_raw_mnist_equals_harness(port_raw, harness_raw):
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert _same(getattr(port_raw, key), getattr(harness_raw, key)), key
    assert port_raw.x_train.shape == (60_000, 28, 28) and port_raw.x_test.shape == (10_000, 28, 28)
    assert port_raw.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


@pytest.mark.parametrize("validation", [False, True])
def test_dpsom_splits_equal_harness(port_raw, harness_raw, validation):
    from harness.data import dpsom_splits

    got = pdata.dpsom_data(port_raw, validation)
    want = dpsom_splits(harness_raw, validation)
    for key in ("x_train", "y_train", "x_val", "y_val", "x_eval", "y_eval"):
        assert _same(getattr(got, key), getattr(want, key)), key
    assert (got.val_set, got.eval_set) == (want.val_set, want.eval_set) == (("val",) * 2 if validation else ("test",) * 2)
    assert len(got.x_train) == 51_000 and len(got.x_val) == (9_000 if validation else 10_000)
    assert got.x_train.dtype == np.float32 and got.x_train.shape[1:] == (28, 28, 1)
    assert np.all(got.x_train.reshape(len(got.x_train), -1).max(axis=1) == 1.0)


def test_load_dpsom_data_from_env_matches_dpsom_data(port_raw):
    got = pdata.load_dpsom_data("mnist")  # data_set is case-insensitive, data_dir from the env
    want = pdata.dpsom_data(port_raw)
    assert all(_same(getattr(got, k), getattr(want, k)) for k in ("x_train", "y_train", "x_eval", "y_eval"))
    assert "train-images-idx3-ubyte.gz" in got.source


def test_other_layouts_give_the_same_arrays(port_raw, mnist_dir, tmp_path):
    # raw (decompressed) IDX in a flat dir given directly; torchvision MNIST/raw; a Keras mnist.npz
    flat = tmp_path / "flat"
    tv = tmp_path / "tv" / "MNIST" / "raw"
    for d in (flat, tv):
        d.mkdir(parents=True)
    for stem in STEMS:
        (flat / stem).write_bytes(gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()))
        shutil.copy(mnist_dir / f"{stem}.gz", tv / f"{stem}.gz")
    keras = tmp_path / "keras"
    keras.mkdir()
    np.savez(keras / "mnist.npz", x_train=port_raw.x_train, y_train=port_raw.y_train.astype(np.uint8),
             x_test=port_raw.x_test, y_test=port_raw.y_test.astype(np.uint8))
    for where in (flat, tmp_path / "tv", keras, keras / "mnist.npz", mnist_dir):
        got = pdata.load_mnist("MNIST", where)
        for key in ("x_train", "y_train", "x_test", "y_test"):
            assert _same(getattr(got, key), getattr(port_raw, key)), (where, key)
    # the raw file is preferred over the .gz next to it
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", flat / "t10k-labels-idx1-ubyte.gz")
    assert pdata.load_mnist("MNIST", flat).source.endswith(", t10k-labels-idx1-ubyte)")


# --- preprocessing and batches (hand cases, no data needed) ------------------------------------


def test_scale_per_image_hand_case():
    x = np.zeros((2, 28, 28), np.uint8)
    x[0, 0, :3] = (0, 7, 200)
    x[1, 5, 5] = 3
    out = pdata.scale_per_image(x)
    assert out.dtype == np.float32 and out.shape == (2, 28, 28, 1)
    assert out[0, 0, :3, 0].tolist() == [0.0, np.float32(7 / 200), 1.0] and out[1, 5, 5, 0] == 1.0
    assert np.count_nonzero(out) == 3
    x[1] = 0
    with pytest.raises(ValueError, match="image 1 is all zero"):
        pdata.scale_per_image(x)
    with pytest.raises(ValueError, match="uint8"):
        pdata.scale_per_image(x.astype(np.float32))


def test_batches_in_order_remainder_dropped():
    x = np.arange(11)
    assert [b.tolist() for b in pdata.batches(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(pdata.batches(x, 12)) == []


# --- missing / corrupt files: errors name the file ---------------------------------------------


def _idx(stem: str, count: int | None = None) -> bytes:
    """A well-formed IDX file of the right size (zeros, one bright pixel per image)."""
    _, labels, n = pdata.IDX_FILES[stem]
    n = n if count is None else count
    if labels:
        return struct.pack(">II", 0x801, n) + bytes(n)
    pixels = np.zeros((n, 28, 28), np.uint8)
    pixels[:, 0, 0] = 255
    return struct.pack(">IIII", 0x803, n, 28, 28) + pixels.tobytes()


@pytest.fixture()
def fake_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mnist"
    d.mkdir()
    for stem in STEMS:
        (d / f"{stem}.gz").write_bytes(gzip.compress(_idx(stem), compresslevel=1))
    return d


def test_fake_dir_loads(fake_dir):
    raw = pdata.load_mnist("MNIST", fake_dir.parent)
    assert raw.x_train.shape == (60_000, 28, 28) and raw.y_test.dtype == np.int64


def test_missing_file_is_named(fake_dir):
    (fake_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match=r"missing t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte\.gz\)") as err:
        pdata.load_mnist("MNIST", fake_dir.parent)
    assert str(fake_dir) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)  # lists what is expected


@pytest.mark.parametrize("stem", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_truncated_gz_is_named(fake_dir, stem):
    path = fake_dir / f"{stem}.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataFormatError, match="truncated or corrupt") as err:
        pdata.load_mnist("MNIST", fake_dir)
    assert str(err.value).startswith(str(path))


def test_truncated_raw_idx_is_named(fake_dir):
    path = fake_dir / "train-images-idx3-ubyte"  # the raw file wins over the .gz next to it
    path.write_bytes(_idx("train-images-idx3-ubyte")[:-784])
    with pytest.raises(DataFormatError, match=r"47039232 bytes \(decompressed\), expected 47040016 \(truncated\)") as err:
        pdata.load_mnist("MNIST", fake_dir)
    assert str(err.value).startswith(str(path))
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataFormatError, match="shorter than the 16-byte IDX images header"):
        pdata.load_mnist("MNIST", fake_dir)


def test_bad_magic_and_dimensions_are_named(fake_dir):
    path = fake_dir / "train-labels-idx1-ubyte"
    path.write_bytes(_idx("train-images-idx3-ubyte", count=2))  # images where labels belong
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: IDX magic number 0x00000803, expected 0x00000801"):
        pdata.load_mnist("MNIST", fake_dir)
    path.write_bytes(_idx("train-labels-idx1-ubyte", count=59_999))
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: IDX dimensions \(59999,\), expected \(60000,\)"):
        pdata.load_mnist("MNIST", fake_dir)


def test_npz_errors_are_named(tmp_path):
    path = tmp_path / "mnist.npz"
    arrays = {"x_train": np.zeros((60_000, 28, 28), np.uint8), "y_train": np.zeros(60_000, np.uint8),
              "x_test": np.zeros((10_000, 28, 28), np.uint8)}
    np.savez(path, **arrays)
    with pytest.raises(DataFormatError, match=r"mnist\.npz: missing arrays \['y_test'\]"):
        pdata.load_mnist("MNIST", tmp_path)
    np.savez(path, **arrays, y_test=np.zeros(10, np.uint8))
    with pytest.raises(DataFormatError, match=r"mnist\.npz: y_test has shape \(10,\), expected \(10000,\)"):
        pdata.load_mnist("MNIST", path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataFormatError, match="truncated or corrupt") as err:
        pdata.load_mnist("MNIST", path)
    assert str(err.value).startswith(str(path))
    other = tmp_path / "mnist.txt"
    other.write_text("x")
    with pytest.raises(DataFormatError, match=r"mnist\.txt: a file but not an \.npz"):
        pdata.load_mnist("MNIST", other)


def test_no_data_dir_and_nothing_found(tmp_path, monkeypatch):
    monkeypatch.delenv("PARITY_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="pass data_dir=DIR .* or set PARITY_DATA_DIR; nothing is downloaded"):
        pdata.load_mnist("MNIST")
    with pytest.raises(DataNotFoundError, match="no such file or directory"):
        pdata.load_mnist("MNIST", tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match=r"fMNIST not found in .*fashion-mnist\.npz"):
        pdata.load_mnist("fMNIST", tmp_path)
    monkeypatch.setenv("PARITY_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataNotFoundError, match="empty: no such file or directory"):
        pdata.load_mnist("MNIST")
    with pytest.raises(ValueError, match="data_set='digits'"):
        pdata.load_mnist("digits", tmp_path)


# --- ports/ is plain PyTorch: no import of harness ---------------------------------------------


def _harness_imports(path: Path, only_function: str | None = None, root: Path = REPO) -> list[str]:
    """Every ``import harness[.x]`` / ``from harness[.x] import`` (any depth) and every
    ``importlib.import_module("harness...")`` / ``__import__("harness...")`` in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if only_function is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == only_function)
    hits = []
    is_harness = lambda name: name == "harness" or name.startswith("harness.")  # noqa: E731
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        hits += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names if is_harness(n)]
    return hits


def test_import_scanner_finds_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import harness\nimport os, harness.data as d\nfrom harness.metrics import nmi\n"
        "def f():\n    if True:\n        from harness import env\n"
        "import importlib\nimportlib.import_module('harness.transplant')\n"
        "from . import harness_like\nimport harnessing\nfrom .harness import x\n"
    )
    hits = sorted(_harness_imports(src, root=tmp_path), key=lambda h: int(h.split(":")[1]))
    assert hits[0] == "m.py:1: harness"
    hits = [h.split(": ", 1)[1] for h in hits]
    assert hits == ["harness", "harness.data", "harness.metrics", "harness", "harness.transplant"]


def test_rewritten_port_modules_do_not_import_harness():
    hits = _harness_imports(REPO / "ports/dpsom/data.py") + _harness_imports(REPO / "ports/dpsom/evaluate.py")
    hits += _harness_imports(REPO / "ports/dpsom/train.py", only_function="main")
    assert hits == []


def test_port_data_module_alone_loads_no_harness():
    code = "import sys, ports.dpsom.data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'harness'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_under_ports_imports_harness():
    files = sorted((REPO / "ports").rglob("*.py"))
    assert files
    hits = [hit for f in files for hit in _harness_imports(f)]
    assert hits == [], "ports/ must be plain PyTorch; harness imports found:\n" + "\n".join(hits)
