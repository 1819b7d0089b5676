"""Dumps: each side alone writes .npz + manifest; two dumps compare like two live sides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.dump import compare, load, main, run


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="TensorFlow not installed: the TF dump is skipped")
    out = tmp_path_factory.mktemp("dumps")
    return run("tf", "tiny-dense", 0, "digits", out), run("torch", "tiny-dense", 0, "digits", out)


@pytest.mark.tf
def test_two_dumps_made_apart_agree(dumps):
    tf_dump, torch_dump = dumps
    sections, status = compare(tf_dump, torch_dump)
    assert status == 0
    assert all(r.verdict == "PASS" for rows in sections.values() for r in rows)
    assert len(sections["forward"]) == 20 and len(sections["gradients/loss.total"]) == 29
    manifest = json.loads(tf_dump.with_suffix(".json").read_text())
    assert manifest["floor"] == "batch split" and manifest["config_as_executed"]["lr.decay_steps"] == 1000
    assert manifest["environment"]["version.tensorflow"].startswith("2.")


@pytest.mark.tf
def test_a_tampered_dump_fails_naming_the_tensor(dumps, tmp_path, capsys):
    tf_dump, torch_dump = dumps
    arrays, manifest = load(torch_dump)
    arrays["forward/encoder.bn2"] = arrays["forward/encoder.bn2"] * np.float32(1.001)
    bad = tmp_path / torch_dump.name
    np.savez(bad, **arrays)
    bad.with_suffix(".json").write_text(json.dumps(manifest))
    assert main(["compare", str(tf_dump), str(bad)]) == 1
    assert "first divergence encoder.bn2 (FAIL)" in capsys.readouterr().out


def test_missing_manifest_is_named(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(1))
    with pytest.raises(FileNotFoundError, match=r"x\.json"):
        load(tmp_path / "x.npz")
