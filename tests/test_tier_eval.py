"""Evaluation tier (harness/tier_eval.py): each side's own evaluation on the same weights and noise.

tiny-dense on digits: 2 full batches of 5 test images are evaluated, the 3 leftover ones skipped
(as the original). Planted bugs: the public port's posterior-mean assignment (spec §7/§11) and an
arithmetic NMI (sklearn's default since 0.22) where the original reports the geometric one.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from harness.adapters.dpsom import TorchDPSOM
from harness.models.dpsom import SPEC
from harness.tier_eval import ASSIGNMENTS, METRICS, T0, compare_evaluations, measured_nmi_average, run

REUSE: dict = {}
needs_tf = [pytest.mark.tf, pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                               reason="TensorFlow not installed: the reference's evaluation is skipped")]


def _side(assignments, distances, nmi_average="geometric"):
    y = np.array([0, 0, 1, 1])
    k = np.array(assignments)
    return {"assignments": k, "labels": y, "distances": np.array(distances, np.float64), "assign_from": "z sample",
            "nmi_average": nmi_average,
            "metrics": {"nmi": float(normalized_mutual_info_score(y, k, average_method=nmi_average))}}


def test_a_flip_within_the_sides_distance_difference_is_an_inaccurate_tie():
    # input 2: the reference prefers cluster 1 over 0 by 1e-6, the sides' distances there differ by 2e-6:
    # both within float32 resolution of distances up to 9 (10 x 1.19e-7 x 9 = 1.07e-5)
    ref = _side([0, 0, 1, 1], [[0, 5, 9], [0, 5, 9], [4.000001, 4.0, 9], [9, 0, 5]])
    port = _side([0, 0, 0, 1], [[0, 5, 9], [0, 5, 9], [3.999999, 4.000002, 9], [9, 0, 5]])
    sections = compare_evaluations(ref, port, {})
    row = sections[ASSIGNMENTS][0]
    assert row.verdict == "INACCURATE" and row.worst_index == (2,)
    assert row.note == ("1 of 4 elements differ, all rounding ties: input 2: 1 vs 0, margin 1e-06 and distance difference 2e-06 "
                        "<= 1.07e-05")
    assert sections[METRICS][0].verdict == "INACCURATE"  # the nmi follows from the tie only


def test_a_flip_between_distances_that_differ_beyond_rounding_fails():
    # the sides' distances of input 2 differ by 0.5: another computation, not a tie
    ref = _side([0, 0, 1, 1], [[0, 5, 9], [0, 5, 9], [4.5, 4.0, 9], [9, 0, 5]])
    port = _side([0, 0, 0, 1], [[0, 5, 9], [0, 5, 9], [3.999999, 4.000002, 9], [9, 0, 5]])
    sections = compare_evaluations(ref, port, {})
    assert sections[ASSIGNMENTS][0].verdict == "FAIL"
    assert sections[ASSIGNMENTS][0].note == "1 of 4 elements differ; first at input 2: reference 1, port 0"
    assert sections[METRICS][0].verdict == "FAIL" and sections[METRICS][0].note.endswith("; the assignments differ")


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


@pytest.mark.tf
@needs_tf[1]
def test_faithful_pair_assigns_identically_and_reports_equal_metrics():
    sections = _run()
    for name in (ASSIGNMENTS, METRICS, T0):
        assert all(r.verdict == "PASS" for r in sections[name]), sections[name]
    a = _rows(sections, ASSIGNMENTS)["assignments"]
    assert a.shape == (10,) and a.note == "bit-exact"  # 13 test images: the 3 leftover ones are skipped
    assert set(_rows(sections, METRICS)) == {"nmi", "nmi_arithmetic", "purity", "ami", "acc"}
    t0 = _rows(sections, T0)
    assert (t0["eval.assign_from"].note, t0["eval.nmi_average"].note) == ("z sample", "geometric")


@pytest.mark.tf
@needs_tf[1]
def test_port_assigning_from_the_posterior_mean_fails_assignments_and_t0():
    sections = _run(eval_assignment="mean")
    a = _rows(sections, ASSIGNMENTS)["assignments"]
    assert a.verdict == "FAIL" and " of 10 elements differ; first at input " in a.note
    t0 = _rows(sections, T0)["eval.assign_from"]
    assert t0.verdict == "FAIL" and t0.note == "reference z sample / port mu: not in the deviation registry"
    assert _rows(sections, METRICS)["nmi"].note.endswith("; the assignments differ")


@pytest.mark.tf
@needs_tf[1]
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


@pytest.mark.tf
@needs_tf[1]
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


@pytest.mark.tf
@needs_tf[1]
def test_a_port_without_its_own_evaluation_is_skipped_with_the_reason():
    from harness.adapters.torch import TorchPortAdapter

    class NoEval(TorchDPSOM):
        evaluate_assignments = TorchPortAdapter.evaluate_assignments

    sections = run(SPEC, "tiny-dense", seed=0, dataset="digits", make_port=lambda c, dtype: NoEval(c, dtype), reuse=REUSE)
    (row,) = sections[ASSIGNMENTS]
    assert row.verdict == "SKIPPED" and row.note == "port: NoEval does not run its own evaluation for the harness (evaluate_assignments)"
