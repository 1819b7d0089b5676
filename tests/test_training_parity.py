"""T4: N training steps through all three phases, both sides under the same injected noise."""

from __future__ import annotations

import dataclasses

import pytest

from harness.models.dpsom import SOM_INIT_LRS, SPEC
from ports.dpsom.config import get_config


def test_plan_walks_the_original_schedule_shape():
    steps = SPEC.t4_plan(get_config("dense"), 50, epoch_steps=10)
    assert len(steps) == 50
    phases = [s.phase for s in steps]
    # VAE first, then SOM init, then joint; each phase one contiguous block
    assert phases == sorted(phases, key=["vae", "som_init", "joint"].index)
    assert [s.lr_feed for s in steps if s.phase == "som_init"][:: 5] == list(SOM_INIT_LRS)  # 5 steps per stage
    joint = [s for s in steps if s.phase == "joint"]
    # p is recomputed at the first joint step and at every epoch boundary (batch index 0)
    assert [s.index for s in joint if s.epoch_start] == [joint[0].index] + [s.index for s in joint[1:] if s.batch == 0]
    assert all(0 <= s.batch < 10 for s in steps)


@pytest.mark.tf
def test_faithful_port_stays_in_band_and_a_mutant_leaves_it():
    pytest.importorskip("tensorflow", reason="TensorFlow not installed: T4 skipped")
    from harness.adapters.dpsom import TorchDPSOM
    from harness.training_parity import run

    good = run(SPEC, "tiny-dense", steps=30, dataset="digits", epoch_steps=5, progress=False)
    assert good["first_exit"] is None, good["first_exit"]
    assert {r["global_step"] for r in good["records"]["torch"][-1:]} == {30}
    # float32 noise grows but stays tiny over 30 steps (measured ~2e-6 relative)
    assert good["growth"]["weights: torch vs TF"][-1] < 1e-4

    # synced: every step from the reference's exact state stays inside the T3 band (measured worst 0.52 x tol)
    assert good["synced"]["first_divergence"] is None
    assert len(good["synced"]["steps"]) == 30
    assert all(0.0 <= v < 1.0 for st in good["synced"]["steps"] for v in st["worst_ratio"].values())

    bad = run(SPEC, "tiny-dense", steps=30, dataset="digits", epoch_steps=5, progress=False,
              make_port=lambda cfg, dtype: TorchDPSOM(dataclasses.replace(cfg, leaky_relu_slope=0.01), dtype))
    assert bad["first_exit"] is not None and bad["first_exit"]["step"] == 0
    assert bad["first_exit"]["quantity"] == "losses"


@pytest.mark.tf
def test_synced_steps_flag_a_regime_bug_before_the_free_run_does():
    """q's epsilon (1e-10 instead of Keras' 1e-7) only matters once t is small; the free-running pair
    first leaves its band at step 26 (measured), the synced check names loss.kl_pq at step 4."""
    pytest.importorskip("tensorflow", reason="TensorFlow not installed: T4 skipped")
    from harness.adapters.dpsom import TorchDPSOM
    from harness.training_parity import run

    bad = run(SPEC, "tiny-dense", steps=30, dataset="digits", epoch_steps=5, progress=False,
              make_port=lambda cfg, dtype: TorchDPSOM(dataclasses.replace(cfg, q_epsilon=1e-10), dtype))
    first = bad["synced"]["first_divergence"]
    assert (first["section"], first["name"]) == ("losses", "loss.kl_pq"), first
    assert bad["first_exit"] is None or first["step"] < bad["first_exit"]["step"]
    assert bad["verdict"] != "PASS"
    assert bad["environment"]["git_commit"] and bad["config"]["q_epsilon"] == 1e-7  # the reference's config, recorded
