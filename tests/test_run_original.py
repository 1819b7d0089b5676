"""harness.run_original: runs the original DPSOM.py as __main__, unchanged, with MNIST served offline.

Here a stand-in script takes the original's place (the original is not part of this repository): it
loads MNIST exactly as DPSOM.py does and records what it got and where it ran."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow not installed")
pytestmark = pytest.mark.tf

from harness.run_original import main  # noqa: E402

STAND_IN = '''
import json, os, sys
import tensorflow.compat.v1 as tf
mnist = tf.keras.datasets.mnist.load_data(path='mnist.npz')
with open("got.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "shapes": [list(a.shape) for pair in mnist for a in pair],
               "dtypes": [str(a.dtype) for pair in mnist for a in pair], "first_labels": mnist[0][1][:10].tolist()}, f)
'''


def test_the_script_runs_as_main_in_its_folder_with_mnist_from_the_local_copy(tmp_path, monkeypatch):
    from harness.data import DataNotFoundError, load_raw

    try:
        raw = load_raw("MNIST", download=False)
    except DataNotFoundError:
        pytest.skip("MNIST not found offline")
    import tensorflow.compat.v1 as tf

    mnist = tf.keras.datasets.mnist
    monkeypatch.setattr(mnist, "load_data", mnist.load_data)  # restored after the test
    monkeypatch.setattr(tf.keras.datasets.fashion_mnist, "load_data", tf.keras.datasets.fashion_mnist.load_data)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    source = tmp_path / "dpsom"
    source.mkdir()
    (source / "DPSOM.py").write_text(STAND_IN)
    main([str(source), "with", "num_epochs=1"])
    got = json.loads((source / "got.json").read_text())
    assert got["argv"] == ["with", "num_epochs=1"] and got["cwd"] == str(source)
    assert got["shapes"] == [[60000, 28, 28], [60000], [10000, 28, 28], [10000]]
    assert got["dtypes"] == ["uint8"] * 4  # as in mnist.npz
    assert got["first_labels"] == np.asarray(raw.y_train[:10]).tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_bad_invocations_are_named(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="python -m harness.run_original SOURCE_DIR"):
        main([])
    with pytest.raises(SystemExit, match="DPSOM.py: not found"):
        main([str(tmp_path)])
    (tmp_path / "DPSOM.py").write_text("")
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    with pytest.raises(SystemExit, match="TF_USE_LEGACY_KERAS=1"):
        main([str(tmp_path)])
