"""First cross-framework proof: same weights + same ε -> the port equals the TF reference.

Forward tensors, every loss term, and one optimizer step of each phase (parameters, records and
optimizer state), dense and conv, on the tiny variants. The full-size pair runs the same comparison in
CI's regression gate (``nox -s regress``, part 1: the quick tier of DPSOM dense and conv on MNIST, every
row's verdict against results/parity), in its own process within 4 GB; run here as well it took 579 s
(conv) + 103 s (dense) of the suite's 2544 s (measured 2026-12-04, 2-core Zen-1 host), so it is not
repeated. The tolerance of every tensor is
``harness.engine.MULTIPLE`` x its measured noise floor (port float32 vs float64; reference on the
whole batch vs its two halves). Every tensor must PASS; the one exception is a gradient that the
harness explains by activation-kink flips found in T2 (reported INACCURATE with the flips named).
"""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow not installed: cross-framework tests skipped")
pytestmark = pytest.mark.tf

from harness.parity import run_variant  # noqa: E402


def _failures(report: dict) -> list[str]:
    return [
        f"{section}: {r['name']} max_abs={r['max_abs']:.3g} tol={r['tolerance']:.3g} {r['verdict']} {r['note']}"
        for section, rows in report["sections"].items()
        for r in rows
        if r["verdict"] != "PASS" and not (r["verdict"] == "INACCURATE" and "kink flips" in r["note"])
    ]


@pytest.mark.parametrize("variant", ["tiny-dense", "tiny-conv"])
def test_port_equals_reference(variant):
    report = run_variant(variant, seed=0, dataset="digits")
    assert not _failures(report), "\n".join(_failures(report))
    sections = report["sections"]
    assert len(sections["T2 forward"]) == (20 if "dense" in variant else 29)
    assert {r["name"] for r in sections["T3 losses"]} >= {"loss.elbo.nll", "loss.elbo.kl", "loss.kl_pq", "loss.som", "loss.total", "loss.som_init"}
    # the optimizer state really moved: 3 steps shared by both sides
    opt = {r["name"]: r for r in sections["T3 step joint: optimizer"]}
    assert opt["optim.global_step"]["verdict"] == "PASS" and "encoder.fc1.kernel/adam_m" in opt or "encoder.conv1.kernel/adam_m" in opt
