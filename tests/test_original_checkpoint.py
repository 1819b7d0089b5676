"""T1 with a checkpoint written by the original code (``--original-checkpoint PATH``).

A genuine one (ratschlab/dpsom run unchanged, README's recipe) is full size (the original's dense
layers are fixed at 500-500-2000: 160 MB with its Adam slots), so it is not stored here; these tests
write their own in the ORIGINAL's variable layout, as ``DPSOM.py``'s Saver does (weights under the
original names, ``<var>/Adam`` / ``<var>/Adam_1`` slots, ``global_step/global_step``,
``optimize/beta1_power`` / ``beta2_power``), with values unlike the quick tier's initial weights
(trained-looking BN statistics included), from a graph that is not the reference's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow not installed: original-checkpoint tests skipped")
pytestmark = pytest.mark.tf

from harness.models.dpsom import SPEC  # noqa: E402
from harness.tiers import (ORIGINAL_FORWARD, ORIGINAL_RESTORE, ORIGINAL_WEIGHTS, SAVER_CHECKPOINT,  # noqa: E402
                           QuickTier)
from harness.transplant import TransplantError, checkpoint_files, load_table  # noqa: E402

VARIANT = "tiny-dense"
EXTRAS = ("global_step/global_step", "optimize/beta1_power", "optimize/beta2_power")


def _shapes(variant: str = VARIANT) -> dict[str, tuple[int, ...]]:
    """Canonical weight shapes of ``variant`` from the port (no TF graph needed)."""
    port = SPEC.make_port(SPEC.get_config(variant))
    return {k: np.shape(v) for k, v in port.get_weights().items()}


def write_original_layout(prefix: Path, seed: int = 7, drop: tuple[str, ...] = (), reshape: dict[str, tuple[int, ...]] | None = None,
                          variant: str = VARIANT) -> tuple[str, dict[str, np.ndarray]]:
    """A TF1 Saver checkpoint in the original's layout for ``variant``: weights (canonical name ->
    value returned) under their original names, Adam slots and the optimizer's scalars beside them.
    ``drop``: original names left out; ``reshape``: original names stored with another shape."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shapes = _shapes(variant)
    rows = [r for r in load_table("dpsom", SPEC.variant_of(SPEC.get_config(variant))) if r.original_checkpoint]
    values = {}
    for r in rows:
        shape = shapes[r.canonical]
        if r.canonical.endswith("moving_variance"):
            v = rng.uniform(0.5, 1.5, shape)
        elif r.canonical.endswith("gamma"):
            v = rng.uniform(0.8, 1.2, shape)
        else:
            v = rng.normal(0.0, 0.2, shape)
        values[r.canonical] = v.astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        var_list = {}
        for r in rows:
            name = r.original_checkpoint
            if name in drop:
                continue
            value = values[r.canonical]
            if reshape and name in reshape:
                value = np.resize(value, reshape[name])
            var_list[name] = tf.compat.v1.Variable(value, name=name.replace("/", "_"))
            if "moving_" not in name:  # the original's Adam slots of the trainable weights
                for slot in ("Adam", "Adam_1"):
                    var_list[f"{name}/{slot}"] = tf.compat.v1.Variable(np.abs(value) * 1e-3, name=f"{name}_{slot}".replace("/", "_"))
        var_list[EXTRAS[0]] = tf.compat.v1.Variable(np.int64(4420), name="global_step")
        for name, v in zip(EXTRAS[1:], (0.9 ** 4420, 0.999 ** 4420)):
            var_list[name] = tf.compat.v1.Variable(np.float32(v), name=name.replace("/", "_"))
        saver = tf.compat.v1.train.Saver(var_list)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            written = saver.save(session, str(prefix), write_meta_graph=False)
    return written, values


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    return write_original_layout(tmp_path_factory.mktemp("original") / "dpsom.ckpt")


@pytest.fixture(scope="module")
def tier(original) -> QuickTier:
    return QuickTier(SPEC, VARIANT, seed=0, dataset="digits", registry={}, original_checkpoint=original[0])


@pytest.fixture(scope="module")
def report(tier):
    return tier.run()


def _rows(report, section):
    return {r.name: r for r in report["_sections"][section]}


def test_checkpoint_of_the_original_layout_loads_into_both_sides_and_their_forwards_agree(tier, report, original):
    prefix, values = original
    assert report["verdict"] == "PASS", report["first_divergence"]
    names = list(report["_sections"])
    t1 = [n for n in names if n.startswith("T1")]
    assert t1 == ["T1 weights (transplant)", "T1 torch -> TF -> torch", SAVER_CHECKPOINT, ORIGINAL_RESTORE, ORIGINAL_WEIGHTS, ORIGINAL_FORWARD]
    # every weight bit for bit: the reference's restore by name = the table reader = what the port holds
    for section in (ORIGINAL_RESTORE, ORIGINAL_WEIGHTS):
        rows = _rows(report, section)
        assert list(rows) == list(values) and {r.verdict for r in rows.values()} == {"PASS"}
        assert all(r.max_abs == 0 for r in rows.values())
    # the forward rows: every tensor of T2 forward, judged at a measured floor (float64 twin, batch split)
    forward = _rows(report, ORIGINAL_FORWARD)
    assert list(forward) == [r.name for r in report["_sections"]["T2 forward"]]
    assert report["floors"][ORIGINAL_FORWARD]["float64"] and report["floors"][ORIGINAL_FORWARD]["split_tf"]
    assert forward["z"].tolerance > 0 and forward["z"].max_abs <= forward["z"].tolerance
    # ... from the checkpoint's weights, not the initial ones
    at_ckpt, at_init = tier._ref_cache["forward:original checkpoint"][0], tier._ref_cache["forward"][0]  # noqa: SLF001
    assert not np.allclose(at_ckpt["encoder.fc1"], at_init["encoder.fc1"])
    # where each checkpoint came from, in the report and on every row
    sha = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(prefix).parent.glob(Path(prefix).name + ".*"))}
    assert report["t1_checkpoint"] == {"written_by": "the original code", "path": prefix, "prefix": prefix, "sha256": sha,
                                       "ignored_variables": len(EXTRAS) + 2 * sum("moving_" not in k for k in values)}  # + Adam slots
    for section in (ORIGINAL_RESTORE, ORIGINAL_WEIGHTS, ORIGINAL_FORWARD):
        assert all(f"written by the original code: {prefix} (sha256 dpsom.ckpt.index {sha['dpsom.ckpt.index'][:16]}" in r.note
                   for r in report["_sections"][section])
    assert all("written by the reference's Saver under the original names" in r.note for r in report["_sections"][SAVER_CHECKPOINT])


def test_the_cli_path_spills_and_gives_the_same_rows(report, original):
    """``cache=False`` (the CLI: one side at a time, the checkpoint's weights and values on disk in
    between) judges the same rows with the same numbers as the cached run."""
    again = QuickTier(SPEC, VARIANT, seed=0, dataset="digits", registry={}, cache=False, original_checkpoint=original[0]).run()
    for section in (ORIGINAL_RESTORE, ORIGINAL_WEIGHTS, ORIGINAL_FORWARD):
        assert again["sections"][section] == report["sections"][section], section


# --- errors: one message naming every problem, nothing loaded ----------------------------------------------
def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(TransplantError, match=r"no TF checkpoint there \(looked for nothing\.ckpt\.index .*nothing loaded"):
        QuickTier(SPEC, VARIANT, dataset="digits", registry={}, original_checkpoint=str(tmp_path / "nothing.ckpt"))


def test_checkpoint_lacking_variables_names_them_all(tmp_path):
    prefix, _ = write_original_layout(tmp_path / "partial", drop=("embeddings/embeddings", "z_e/encoder/dense_1/bias"))
    with pytest.raises(TransplantError, match=r"nothing loaded; missing variables of the original layout \(dpsom dense\): "
                                              r"\['embeddings/embeddings', 'z_e/encoder/dense_1/bias'\]$"):
        QuickTier(SPEC, VARIANT, dataset="digits", registry={}, original_checkpoint=prefix)


def test_wrong_shapes_are_named_with_both_shapes(tmp_path):
    prefix, _ = write_original_layout(tmp_path / "shapes", reshape={"z_e/encoder/dense_2/kernel": (37, 11)})
    with pytest.raises(TransplantError, match=r"nothing loaded; wrong shape: \['z_e/encoder/dense_2/kernel \(37, 11\) "
                                              r"\(expected \(11, 37\) for encoder.fc3.kernel\)'\]"):
        QuickTier(SPEC, VARIANT, dataset="digits", registry={}, original_checkpoint=prefix)


def test_a_checkpoint_of_another_variant_is_refused(original):
    """The tiny dense checkpoint against the full dense variant: every weight but the BN scalars' counts differs."""
    with pytest.raises(TransplantError, match=r"wrong shape: .*embeddings/embeddings \(3, 3, 7\) \(expected \(8, 8, 100\)"):
        QuickTier(SPEC, "dense", dataset="digits", registry={}, original_checkpoint=original[0])


def test_checkpoint_is_found_from_its_prefix_a_file_or_its_folder(original, tmp_path):
    prefix = original[0]
    assert checkpoint_files(prefix)[0] == prefix
    assert checkpoint_files(prefix + ".index")[0] == prefix
    assert checkpoint_files(prefix + ".data-00000-of-00001")[0] == prefix
    (Path(prefix).parent / "checkpoint").write_text(f'model_checkpoint_path: "{Path(prefix).name}"\n')
    assert checkpoint_files(Path(prefix).parent)[0] == prefix
    with pytest.raises(TransplantError, match="without a 'checkpoint' state file"):
        checkpoint_files(tmp_path)


def test_cli_refuses_a_bad_checkpoint_with_one_message(tmp_path):
    from harness.parity import main

    with pytest.raises(SystemExit, match=r"--original-checkpoint \(dpsom / tiny-dense\): .*no TF checkpoint there"):
        main(["--model", "dpsom", "--variant", "tiny-dense", "--tier", "quick", "--data", "digits", "--out", str(tmp_path),
              "--original-checkpoint", str(tmp_path / "absent.ckpt")])
    with pytest.raises(SystemExit, match="--original-checkpoint is loaded by the quick tier"):
        main(["--model", "dpsom", "--variant", "tiny-dense", "--tier", "D", "--original-checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit, match="drop .*--original-checkpoint"):
        main(["--update-stored", "--original-checkpoint", str(tmp_path)])


# --- planted bugs: flagged by the new rows ------------------------------------------------------------------
def test_table_row_naming_the_wrong_original_variable_is_flagged(original, monkeypatch):
    """encoder.bn1's gamma and beta read from each other's original variable (same shape): the
    reference's restore by name disagrees with the reader on exactly those two, and the port, loaded
    from the reader, computes another forward from encoder.bn1 on."""
    import harness.transplant as transplant

    load = transplant.load_table
    swap = {"z_e/encoder/batch_normalization/gamma": "z_e/encoder/batch_normalization/beta",
            "z_e/encoder/batch_normalization/beta": "z_e/encoder/batch_normalization/gamma"}

    def swapped(model, variant=None):
        rows = load(model, variant)
        return tuple(type(r)(r.canonical, r.torch_key, r.torch_transform, r.tf_variable, swap.get(r.original_checkpoint, r.original_checkpoint))
                     for r in rows)

    monkeypatch.setattr(transplant, "load_table", swapped)
    report = QuickTier(SPEC, VARIANT, seed=0, dataset="digits", registry={}, original_checkpoint=original[0]).run()
    failed = lambda section: [r.name for r in report["_sections"][section] if r.verdict != "PASS"]  # noqa: E731
    assert failed(ORIGINAL_RESTORE) == ["encoder.bn1.gamma", "encoder.bn1.beta"]
    assert failed(ORIGINAL_WEIGHTS) == []  # the port holds what the reader gave it: the round trip alone is blind
    forward = failed(ORIGINAL_FORWARD)
    assert forward[0] == "encoder.bn1" and {"posterior.head", "z", "som.q"} <= set(forward)
    assert all(_rows(report, ORIGINAL_FORWARD)[n].verdict == "FAIL" for n in forward)


def test_kernels_reshaped_not_transposed_on_load_are_flagged_by_the_forward_rows(tier, monkeypatch):
    """The port loads every Dense kernel reshaped instead of transposed, and saves it back the same
    way: every weight round trip passes, the forward from the original code's checkpoint does not."""
    import harness.adapters.torch as adapter

    to_torch, to_canonical = adapter.canonical_to_torch, adapter.torch_to_canonical
    monkeypatch.setattr(adapter, "canonical_to_torch", lambda a, t: a.reshape(a.shape[::-1]) if t == "transpose" else to_torch(a, t))
    monkeypatch.setattr(adapter, "torch_to_canonical", lambda a, t: a.reshape(a.shape[::-1]) if t == "transpose" else to_canonical(a, t))
    report = tier.run()
    first = report["first_divergence"]
    assert (first["section"], first["name"], first["verdict"]) == (ORIGINAL_FORWARD, "encoder.fc1", "FAIL"), first
    assert {r.verdict for r in report["_sections"][ORIGINAL_WEIGHTS]} == {"PASS"}
