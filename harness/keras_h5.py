"""Read a Keras 2 ``save_weights(... .h5)`` file (the original DEKM's checkpoint format) into
canonical names, through a mapping table's ``original_checkpoint`` column (``layer/weight``).

Keras' own ``load_weights`` of an .h5 file matches layers by ORDER (topological), not by name, and
the names it writes depend on how many layers the process had built before (the original builds a
second model for the clustering phase: ``conv2d_3`` ...). So the file's weighted layers are matched
to the table's layers in order, and each weight by its leaf name (``kernel:0`` / ``bias:0``) and its
shape; every mismatch is listed and nothing is returned. Needs h5py only (no TensorFlow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.transplant import TransplantError, load_table


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_keras_h5(path: str | Path, table: str | Path) -> dict[str, np.ndarray]:
    """Canonical weights from the .h5 at ``path`` (see the module docstring); ``table``: the CSV."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError(f"reading {path} needs h5py ({err}); `pip install h5py`") from err
    path = Path(path)
    if not path.is_file():
        raise TransplantError(f"{path}: no such Keras weights file (.h5 written by model.save_weights)")
    rows = [r for r in load_table(table) if r.original_checkpoint]
    layers: dict[str, list] = {}
    for r in rows:
        layers.setdefault(r.original_checkpoint.split("/")[0], []).append(r)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise TransplantError(f"{path}: not an HDF5 file ({err})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f  # model.save(.h5) nests the weights
        if "layer_names" not in root.attrs:
            raise TransplantError(f"{path}: no 'layer_names' attribute: not a Keras save_weights .h5 file")
        stored = [(_text(n), [_text(w) for w in root[_text(n)].attrs.get("weight_names", [])]) for n in root.attrs["layer_names"]]
        stored = [(n, ws) for n, ws in stored if ws]
        problems: list[str] = []
        if len(stored) != len(layers):
            problems.append(f"{len(stored)} layers with weights in the file ({[n for n, _ in stored]}), "
                            f"{len(layers)} in the table ({list(layers)})")
        out: dict[str, np.ndarray] = {}
        for (layer, weights), (want, trows) in zip(stored, layers.items()):
            by_leaf = {w.rsplit("/", 1)[-1]: w for w in weights}
            for r in trows:
                leaf = r.original_checkpoint.rsplit("/", 1)[-1]
                if leaf not in by_leaf:
                    problems.append(f"{r.canonical}: layer {layer} (table: {want}) has no weight {leaf} (it has {weights})")
                    continue
                out[r.canonical] = np.asarray(root[layer][by_leaf[leaf]])
        if problems:
            raise TransplantError(f"{path}: nothing loaded; " + "; ".join(problems))
    return out
