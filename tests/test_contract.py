"""The side protocols' contract, tested once for every (model, side) as a mixin (transformers' style).

Each concrete class names a model, a side ("reference" / "port") and a small variant; the mixin
checks what the engine relies on: the protocol is satisfied (runtime_checkable), ``set_weights`` is
strict (every problem listed, nothing written), weights round-trip bit for bit in table order,
every phase's loss reaches the weights its phase trains, and the same call twice gives the same
bytes. A new model gets these by adding two small classes here.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from harness.protocols import PortSide, ReferenceSide
from harness.spec import get_spec
from harness.transplant import TransplantError, load_table
from harness.tiers import draw, shapes

HAS_TF = importlib.util.find_spec("tensorflow") is not None


class SideContract:
    model: str
    side: str  # "reference" | "port"
    variant: str

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls):
        self = cls
        if self.side == "reference" and not HAS_TF:
            pytest.skip("TensorFlow not installed: the reference side's contract is skipped")
        spec = get_spec(self.model)
        cfg = spec.get_config(self.variant)
        side = spec.make_reference(cfg) if self.side == "reference" else spec.make_port(cfg)
        weights, batch, _ = draw(spec, cfg, 0, "digits", shapes(side))
        side.set_weights(weights)
        return spec, cfg, side, weights, batch

    def test_satisfies_the_protocol(self, setup):
        side = setup[2]
        assert isinstance(side, PortSide if self.side == "port" else ReferenceSide)

    def test_weights_round_trip_bit_exact_in_table_order(self, setup):
        spec, cfg, side, weights, _ = setup
        other = spec.draw_weights({k: v.shape for k, v in weights.items()}, np.random.Generator(np.random.PCG64(7)))
        side.set_weights(other)
        got = side.get_weights()
        assert list(got) == [r.canonical for r in load_table(spec.table_path(cfg))]
        for k, v in other.items():
            assert got[k].dtype == np.float32 and got[k].tobytes() == v.tobytes(), k
        side.set_weights(weights)

    def test_set_weights_lists_every_problem_and_writes_nothing(self, setup):
        side, weights = setup[2], setup[3]
        kernel = next(k for k in weights if k.endswith(".kernel"))
        bias = next(k for k in weights if k.endswith(".bias"))
        bad = {k: v.copy() for k, v in weights.items()}
        bad[kernel] = np.zeros((3, 3, 3), np.float32)
        del bad[bias]
        bad["encoder.fc99.kernel"] = np.zeros(2, np.float32)
        valid = next(k for k in weights if k not in (kernel, bias))
        bad[valid] = bad[valid] + 1  # a valid change that must not land
        with pytest.raises(TransplantError) as err:
            side.set_weights(bad)
        for name in (kernel, bias, "encoder.fc99.kernel"):
            assert name in str(err.value)
        after = side.get_weights()
        assert all(after[k].tobytes() == weights[k].tobytes() for k in weights)

    def test_every_phase_loss_reaches_the_weights_of_its_phase(self, setup):
        spec, _, side, weights, batch = setup
        for ph in spec.phases:
            grads = side.gradients(ph.loss, batch)
            assert grads, ph.loss
            assert set(grads) <= set(weights)
            assert all(np.isfinite(g).all() and np.any(g != 0) for g in grads.values()), ph.loss

    def test_same_call_twice_same_bytes(self, setup):
        side, batch = setup[2], setup[4]
        a, b = side.forward(batch), side.forward(batch)
        assert list(a) == list(b) and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)
        assert side.losses(batch) == side.losses(batch)


class TestDPSOMPortDense(SideContract):
    model, side, variant = "dpsom", "port", "tiny-dense"


class TestDPSOMPortConv(SideContract):
    model, side, variant = "dpsom", "port", "tiny-conv"


@pytest.mark.tf
class TestDPSOMReferenceDense(SideContract):
    model, side, variant = "dpsom", "reference", "tiny-dense"


@pytest.mark.tf
class TestDPSOMReferenceConv(SideContract):
    model, side, variant = "dpsom", "reference", "tiny-conv"


class TestDEKMPortDense(SideContract):
    model, side, variant = "dekm", "port", "tiny-dense"


class TestDEKMPortConv(SideContract):
    model, side, variant = "dekm", "port", "tiny-conv"


@pytest.mark.tf
class TestDEKMReferenceDense(SideContract):
    model, side, variant = "dekm", "reference", "tiny-dense"


@pytest.mark.tf
class TestDEKMReferenceConv(SideContract):
    model, side, variant = "dekm", "reference", "tiny-conv"


def test_docs_method_table_is_generated_from_the_protocols():
    from pathlib import Path

    from harness.protocols import table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "interface.md").read_text()
    start, end = doc.index("<!-- protocols:begin -->"), doc.index("<!-- protocols:end -->")
    assert doc[start + len("<!-- protocols:begin -->"):end].strip() == table(), \
        "docs/interface.md is stale: paste `python -m harness.protocols` between the markers"
