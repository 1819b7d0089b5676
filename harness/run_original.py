"""``python -m harness.run_original SOURCE_DIR [sacred arguments]``: the original DPSOM.py, unchanged, offline.

Runs ``SOURCE_DIR/DPSOM.py`` (the ``dpsom/`` folder of a ratschlab/dpsom checkout, not part of this
repository) as ``__main__`` with ``SOURCE_DIR`` as the working directory and sacred's command line
(``with num_epochs=1 ...``), so its ``tf.train.Saver`` writes a genuine original checkpoint
(``modelpath``). Not one line of the original is changed or copied. The only thing replaced is where
MNIST comes from: the original calls ``tf.keras.datasets.mnist.load_data`` (a download of
``mnist.npz``, checked against the file's sha256); here that function (and fMNIST's) returns the same
uint8 arrays from the local copy that :func:`harness.data.load_raw` finds and checks by content hash
(no download; the run stops if the content is not the known one).

The environment is the pinned one (README: tensorflow 2.21 + tf-keras 2.21 + tensorflow-probability
0.25, ``TF_USE_LEGACY_KERAS=1``) plus ``sacred`` on ``PYTHONPATH`` (the original imports it); the
README's "Loading a checkpoint written by the original code" gives the whole recipe.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import numpy as np


def offline_loader(name: str):
    """``load_data()`` for ``name`` as Keras returns it: ``((x_train, y_train), (x_test, y_test))``,
    uint8 arrays (the dtypes of mnist.npz), from the local copy (content hashes checked)."""
    from harness.data import load_raw

    def load_data(*args, **kwargs):
        raw = load_raw(name, download=False)
        if not raw.verified:
            raise SystemExit(f"{name}: the local copy ({raw.source}) is not the known content; refusing to run the original on it")
        print(f"[run_original] {name} from {raw.source} (content sha256 verified), not downloaded", file=sys.stderr)
        return ((np.array(raw.x_train, np.uint8), np.asarray(raw.y_train).astype(np.uint8)),
                (np.array(raw.x_test, np.uint8), np.asarray(raw.y_test).astype(np.uint8)))

    return load_data


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    source = Path(argv.pop(0)).resolve()
    script = source / "DPSOM.py"
    if not script.is_file():
        raise SystemExit(f"{script}: not found (SOURCE_DIR is the dpsom/ folder of a ratschlab/dpsom checkout)")
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise SystemExit("set TF_USE_LEGACY_KERAS=1: the original graph runs unchanged under TF 2.21 with tf-keras only")
    import reference_tf  # noqa: F401  (the reference's TF environment, Eigen kernels, before TF loads)
    import tensorflow.compat.v1 as tf

    datasets = tf.keras.datasets  # the module objects the original's calls resolve through
    datasets.mnist.load_data = offline_loader("MNIST")
    datasets.fashion_mnist.load_data = offline_loader("fMNIST")
    os.chdir(source)
    sys.path.insert(0, str(source))
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
