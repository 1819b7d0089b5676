"""Adding a model is new files only (docs/interface.md): a toy second model (tests/toymodel: numpy
reference, torch port, spec) run through the unchanged engine — quick tier, a planted bug, T4 —
without TensorFlow and without touching a file under harness/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import training_parity
from harness.compare import FLOAT32_EPS
from harness.engine import split
from harness.executed import load_registry
from harness.protocols import PortSide, ReferenceSide
from harness.tiers import SAVER_CHECKPOINT, QuickTier
from toymodel.port import ToyPort
from toymodel.spec import TOY

HARNESS = Path(__file__).resolve().parents[1] / "harness"


def planted_mean(cfg, dtype):
    """The port with its clustering loss a batch mean instead of the reference's sum."""
    port = ToyPort(cfg, dtype)
    port.module.cluster_reduction = "mean"
    return port


@pytest.fixture(scope="module")
def tier():
    return QuickTier(TOY, "tiny", registry={}, dataset=None)


@pytest.fixture(scope="module")
def report(tier):
    return tier.run()


def rows(report, section):
    return {r.name: r for r in report["_sections"][section]}


def test_no_engine_file_knows_the_toy():
    """The claim itself: nothing under harness/ names the toy, and the registry does not list it."""
    from harness.spec import models

    hits = [str(p) for p in HARNESS.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and "toy" in p.read_text(errors="ignore").lower()]
    assert hits == []
    assert "toy" not in models() and TOY.name == "toy"
    cfg = TOY.get_config("tiny")
    assert isinstance(TOY.make_reference(cfg), ReferenceSide) and isinstance(TOY.make_port(cfg), PortSide)
    assert load_registry(TOY.deviations_path()) == {}


def test_quick_tier_passes(report):
    assert report["verdict"] == "PASS" and report["first_divergence"] is None
    assert report["model"] == "toy" and report["data"] == "synthetic-blobs"
    for section, n in (("T1 weights (transplant)", 8), ("T1 torch -> TF -> torch", 8), (SAVER_CHECKPOINT, 8),
                       ("T2 forward", 5), ("T2 forward, isolated", 5), ("T3 losses", 2), ("T3 gradients of loss.recon", 8),
                       ("T3 gradients of loss.cluster", 4), ("T3 step pretrain: optimizer", 9), ("T3 step cluster: weights", 8),
                       ("T2 forward (float64)", 5), ("T2 forward, isolated (float64)", 5), ("T3 gradients of loss.cluster (float64)", 4)):
        assert [r.verdict for r in report["_sections"][section]] == ["PASS"] * n, section
    # the clustering loss never reaches the decoder: absent on both sides, not a mismatch
    assert set(rows(report, "T3 gradients of loss.cluster")) == {f"encoder.fc{i}.{k}" for i in (1, 2) for k in ("kernel", "bias")}


def test_t0_says_no_batchnorm(report):
    t0 = rows(report, "T0 config as executed")
    assert (t0["batchnorm"].verdict, t0["batchnorm"].note) == ("PASS", "none")
    assert report["batchnorm"] is None and "T0 BatchNorm detector" not in report["_sections"]
    assert all(r.verdict == "PASS" for r in t0.values())


def test_batch_split_floor_adds_a_sum_loss(tier, report):
    """The reference's batch-split floor recombines each loss by the spec's reduction: the halves of
    loss.cluster (a sum) added reproduce the whole batch to float32 rounding, where averaging them
    (the default "mean") would give half of it, a 'floor' of |loss| / 2 that no rounding explains."""
    ref = TOY.make_reference(tier.config)
    ref.set_weights(tier.weights0)
    full = ref.losses(tier.batch)
    by_spec = split(ref.losses, tier.batch, TOY.reductions)
    for k in ("loss.recon", "loss.cluster"):
        assert abs(by_spec[k] - full[k]) <= 4 * FLOAT32_EPS * abs(full[k]), k
    assert split(ref.losses, tier.batch, "mean")["loss.cluster"] / full["loss.cluster"] == pytest.approx(0.5, rel=1e-5)
    grads = ref.gradients("loss.cluster", tier.batch)
    summed = split(lambda b: ref.gradients("loss.cluster", b), tier.batch, TOY.reductions["loss.cluster"])
    for k, g in grads.items():
        assert np.max(np.abs(summed[k] - g)) <= 1e-5 * np.max(np.abs(g)), k
    # ... and the report's floors are those rounding-level ones (none capped)
    for section in ("T3 losses", "T3 gradients of loss.cluster"):
        assert max(report["floors"][section]["split_tf"].values()) < 1e-4, section
        assert not any("floor capped" in r.note for r in report["_sections"][section]), section


def test_planted_mean_instead_of_sum_fails_at_t3_losses(tier):
    bad = tier.run(planted_mean)
    assert bad["verdict"] == "FAIL"
    first = bad["first_divergence"]
    assert (first["section"], first["name"], first["verdict"]) == ("T3 losses", "loss.cluster", "FAIL")
    assert "constant ratio B/A = 0.125 = 1/batch_size" in first["note"]
    assert rows(bad, "T3 losses")["loss.recon"].verdict == "PASS"
    for r in bad["_sections"]["T3 gradients of loss.cluster"]:
        assert r.verdict == "FAIL" and "constant ratio" in r.note and "1/batch_size" in r.note, r.name
    for section in ("T2 forward", "T2 forward, isolated", "T3 gradients of loss.recon"):
        assert all(r.verdict == "PASS" for r in bad["_sections"][section]), section


def test_t4_synced_passes_and_flags_the_planted_bug():
    good = training_parity.run(TOY, "tiny", steps=12, epoch_steps=4, progress=False)
    assert good["verdict"] == "PASS" and good["first_exit"] is None and good["synced"]["first_divergence"] is None
    assert [s["phase"] for s in good["plan"]] == ["pretrain"] * 6 + ["cluster"] * 6
    assert [r["global_step"] for r in good["records"]["torch"]] == list(range(1, 13))
    assert all(max(s["worst_ratio"].values()) < 1 for s in good["synced"]["steps"])
    bad = training_parity.run(TOY, "tiny", steps=12, epoch_steps=4, progress=False, make_port=planted_mean)
    first = bad["synced"]["first_divergence"]  # every loss term is judged at every synced step, so from step 0 on
    assert (first["step"], first["phase"], first["section"], first["name"]) == (0, "pretrain", "losses", "loss.cluster")
    assert "1/batch_size" in first["note"]
