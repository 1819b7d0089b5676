"""Evaluation tier (harness/tier_eval.py): each side's own evaluation on the same weights and noise.

tiny-dense on digits: 2 full batches of 5 test images are evaluated, the 3 leftover ones skipped
(as the original). Planted bugs: the public port's posterior-mean assignment (spec §7/§11) and an
arithmetic NMI (sklearn's default since 0.22) where the original reports the geometric one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

pytest.importorskip("tensorflow", reason="TensorFlow not installed: evaluation tier skipped")
pytestmark = pytest.mark.tf

from harness.adapters.dpsom import TorchDPSOM  # noqa: E402
from harness.models.dpsom import SPEC  # noqa: E402
from harness.tier_eval import ASSIGNMENTS, METRICS, T0, measured_nmi_average, run  # noqa: E402

REUSE: dict = {}


def _run(**port_overrides):
    make = (lambda c, dtype: TorchDPSOM(dataclasses.replace(c, **port_overrides), dtype)) if port_overrides else None
    return run(SPEC, "tiny-dense", seed=0, dataset="digits", make_port=make, reuse=REUSE)


def _rows(sections, name):
    return {r.name: r for r in sections[name]}


def test_measured_nmi_average_against_hand_computed_values():
    # y = (0,0,1,1), k = (0,0,0,1): H(Y) = ln 2, H(K) = H(3/4, 1/4), H(Y, K) = H(1/2, 1/4, 1/4)
    y, k = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    hy, hk = np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mi = hy + hk - (-(0.5 * np.log(0.5) + 0.25 * np.log(0.25) * 2))  # H(Y) + H(K) - H(Y, K)
    assert measured_nmi_average(y, k, mi / np.sqrt(hy * hk)) == "geometric"
    assert measured_nmi_average(y, k, 2 * mi / (hy + hk)) == "arithmetic"
    assert measured_nmi_average(y, k, 0.5).startswith("none of geometric/arithmetic/min/max")


def test_faithful_pair_assigns_identically_and_reports_equal_metrics():
    sections = _run()
    for name in (ASSIGNMENTS, METRICS, T0):
        assert all(r.verdict == "PASS" for r in sections[name]), sections[name]
    a = _rows(sections, ASSIGNMENTS)["assignments"]
    assert a.shape == (10,) and a.note == "bit-exact"  # 13 test images: the 3 leftover ones are skipped
    assert set(_rows(sections, METRICS)) == {"nmi", "nmi_arithmetic", "purity", "ami", "acc"}
    t0 = _rows(sections, T0)
    assert (t0["eval.assign_from"].note, t0["eval.nmi_average"].note) == ("z sample", "geometric")


def test_port_assigning_from_the_posterior_mean_fails_assignments_and_t0():
    sections = _run(eval_assignment="mean")
    a = _rows(sections, ASSIGNMENTS)["assignments"]
    assert a.verdict == "FAIL" and " of 10 elements differ; first at input " in a.note
    t0 = _rows(sections, T0)["eval.assign_from"]
    assert t0.verdict == "FAIL" and t0.note == "reference z sample / port mu: not in the deviation registry"
    assert _rows(sections, METRICS)["nmi"].note.endswith("; the assignments differ")


def test_arithmetic_nmi_fails_nmi_only_with_same_assignments():
    sections = _run(nmi_average_method="arithmetic")
    assert _rows(sections, ASSIGNMENTS)["assignments"].verdict == "PASS"
    metrics = _rows(sections, METRICS)
    assert [n for n, r in metrics.items() if r.verdict != "PASS"] == ["nmi"]
    assert metrics["nmi"].note.endswith("; same assignments: another formula")
    # the port's nmi is the arithmetic one: the reference's own nmi_arithmetic, to the printed digits
    ref = next(v for k, v in REUSE.items() if k[0] == "eval")["result"]["metrics"]
    assert ref["nmi"] != ref["nmi_arithmetic"]
    assert metrics["nmi"].note.startswith(f"reference {ref['nmi']:.10g}, port {ref['nmi_arithmetic']:.10g}")
    t0 = _rows(sections, T0)["eval.nmi_average"]
    assert t0.verdict == "FAIL" and t0.note == "reference geometric / port arithmetic: not in the deviation registry"


def test_sklearn_agrees_with_the_rows_on_the_faithful_assignments():
    """Independent check of the metrics row values: recompute NMI from the reference side directly."""
    cfg = SPEC.replace_config(SPEC.get_config("tiny-dense"), SPEC.ownloop_overrides(SPEC.get_config("tiny-dense")))
    data, _ = SPEC.ownloop_data(cfg, "digits")
    from harness.tier_ownloop import NoiseStream

    ref = SPEC.make_reference(cfg)
    try:
        rng = np.random.Generator(np.random.PCG64(0))
        ref.set_weights(SPEC.draw_weights({k: v.shape for k, v in ref.get_weights().items()}, rng))
        out = ref.evaluate_assignments(data, NoiseStream(int(rng.integers(2**63))))
    finally:
        ref.close()
    assert np.array_equal(out["labels"], data["y_eval"][:10])
    assert out["metrics"]["nmi"] == normalized_mutual_info_score(out["labels"], out["assignments"], average_method="geometric")
    cached = next(v for k, v in REUSE.items() if k[0] == "eval") if REUSE else None
    if cached is not None:  # the tier's run drew the same weights and noise
        assert np.array_equal(cached["result"]["assignments"], out["assignments"])
