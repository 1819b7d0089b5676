"""A user's own port through the suite: the deliberately different port (tests/oddport) driven by its
adapter (tests/oddport/adapter.py) against the TF reference, each of its five differences named at
its tier with its diagnosis. One quick-tier run (~1 min on 2 cores), shared by the tests."""

from __future__ import annotations

import pytest

from oddport.adapter import factory

from harness.tiers import SAVER_CHECKPOINT

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def report():
    from harness.spec import get_spec
    from harness.tiers import QuickTier

    return QuickTier(get_spec("dpsom"), "tiny-dense", seed=0, dataset="digits", registry={}).run(factory)


def rows(report, section):
    return {r.name: r for r in report["_sections"][section]}


def test_first_divergence_and_verdict(report):
    assert report["verdict"] == "FAIL"
    first = report["first_divergence"]
    assert (first["section"], first["name"], first["verdict"]) == ("T0 config as executed", "lr.decay_steps", "FAIL")


def test_t0_names_lr_decay_bn_position_adam_epsilon_and_posterior(report):
    t0 = rows(report, "T0 config as executed")
    assert {k for k, r in t0.items() if r.verdict != "PASS"} == {"lr.decay_steps", "adam.epsilon_placement", "posterior", "batchnorm.position"}
    assert t0["lr.decay_steps"].note == "reference 1000 / port 5000: not in the deviation registry"
    assert t0["batchnorm.position"].note == "reference act → BN / port BN → act: not in the deviation registry"
    assert t0["adam.epsilon_placement"].note == ("reference before bias correction (TF1) / port after bias correction: "
                                                 "not in the deviation registry")
    assert t0["posterior"].note == "reference full covariance (lower-triangular scale) / port diagonal: not in the deviation registry"
    for same in ("adam.beta1", "adam.beta2", "adam.epsilon", "batchnorm.stats", "batchnorm.updated", "batchnorm.dropout"):
        assert t0[same].verdict == "PASS", same
    lr = rows(report, "T0 learning-rate schedule")
    assert [k for k, r in lr.items() if r.verdict == "PASS"] == ["lr@0", "lr@1", "lr@999"]
    assert lr["lr@1000"].verdict == "FAIL" and lr["lr@1000"].max_abs == pytest.approx(0.01, rel=1e-5)  # 1.0 vs 0.99


def test_t1_partial_mapping_is_structural_and_the_rest_transplants(report):
    t1 = rows(report, "T1 weights (transplant)")
    assert {k: r.verdict for k, r in t1.items() if r.verdict != "PASS"} == {"posterior.head.kernel": "STRUCTURAL",
                                                                            "posterior.head.bias": "STRUCTURAL"}
    assert len(t1) == 41 and t1["posterior.head.kernel"].note == "no counterpart in the port (partial mapping)"
    for section in ("T1 torch -> TF -> torch", SAVER_CHECKPOINT):
        assert [r.verdict for r in report["_sections"][section]] == ["PASS"] * 39


def test_t2_bn_before_activation_in_every_block(report):
    """BN (frozen: x / sqrt(1 + 1e-3) at the drawn gamma 1, beta 0) moved before the LeakyReLU: the
    block's activation output is scaled by 1/sqrt(1.001), its BN output lacks the activation."""
    for section in ("T2 forward", "T2 forward, isolated"):
        t2 = rows(report, section)
        for i in (1, 2, 3):
            assert t2[f"encoder.fc{i}"].verdict == "FAIL" and t2[f"encoder.fc{i}"].note.startswith("constant ratio B/A = 0.9995")
            assert t2[f"encoder.bn{i}"].note.startswith("missing activation: negatives of A are B x leaky_relu_slope (0.2)")
        assert 1 / 1.001 ** 0.5 == pytest.approx(0.9995, abs=5e-5)


def test_t2_diagonal_posterior(report):
    for section in ("T2 forward", "T2 forward, isolated", "T2 forward (float64)", "T2 forward, isolated (float64)"):
        t2 = rows(report, section)
        assert t2["posterior.scale_tril"].verdict == "FAIL", section
        assert t2["posterior.scale_tril"].note.startswith("lower triangle zero on side B only: full vs diagonal covariance"), section
        assert t2["posterior.head"].verdict == "STRUCTURAL" and t2["posterior.head"].note == "absent in the port (partial mapping)"


def test_t2_linear_logits_named_where_isolated(report):
    want = "missing activation: negatives of A are B x leaky_relu_slope (0.2), positives equal (LeakyReLU absent on side B)"
    for section in ("T2 forward, isolated", "T2 forward, isolated (float64)"):
        logits = rows(report, section)["decoder.logits"]
        assert logits.verdict == "FAIL" and logits.note.startswith(want), section
    # chained, z already differs (diagonal posterior): the logits fail without that shape
    chained = rows(report, "T2 forward")["decoder.logits"]
    assert chained.verdict == "FAIL" and "missing activation" not in chained.note


def test_t3_losses_fail_downstream(report):
    t3 = rows(report, "T3 losses")
    assert t3["loss.elbo.nll"].verdict == "FAIL" and t3["loss.elbo.kl"].verdict == "FAIL"
    assert rows(report, "T3 losses (float64)")["loss.elbo.nll"].verdict == "FAIL"


def test_t3_adam_per_phase(report):
    vae = rows(report, "T3 step vae: optimizer")
    assert vae["optim.beta1_power"].verdict == "PASS"  # both optimizers have taken one step
    som = rows(report, "T3 step som_init: optimizer")["optim.beta1_power"]
    assert som.verdict == "FAIL" and som.max_abs == pytest.approx(0.81 - 0.729, rel=1e-5)
    assert som.note.startswith("B/A = 1/β1^1: side B's optimizer has taken 1 fewer steps (restarted per phase?)")
    joint = rows(report, "T3 step joint: optimizer")["optim.beta1_power"]
    assert joint.note.startswith("B/A = 1/β1^2: side B's optimizer has taken 2 fewer steps (restarted per phase?)")
    assert rows(report, "T3 step som_init: optimizer")["posterior.head.kernel/adam_m"].verdict == "STRUCTURAL"
    for ph in ("vae", "som_init", "joint"):
        assert [r.verdict for r in report["_sections"][f"T3 step {ph}: lr, global_step"]] == ["PASS", "PASS"]


def test_partial_mapping_transplants_the_slice(report):
    for section in ("T2 forward", "T2 forward, isolated", "T2 forward (float64)"):
        assert rows(report, section)["posterior.mu"].verdict == "PASS", section
