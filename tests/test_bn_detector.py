"""harness/bn_detector.py against expectations taken from the spec, not from the code under test.

specs/dpsom.md: the original's BN is a frozen affine map after LeakyReLU, its Dropout(0.4) never
fires (§1.1, §3.1); Keras BN eps 1e-3 (§3.1) and momentum 0.99, i.e. torch momentum 0.01 (§14.2);
the public port runs Linear -> BN(batch statistics) -> LeakyReLU -> Dropout (§11.2). Tests that
need TensorFlow are marked ``tf`` and skip with one line without it; the rest run torch-only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.adapters.dpsom import TorchDPSOM
from harness.bn_detector import detect, differences, format_table
from ports.dpsom.config import get_config

DENSE_BNS = [f"{part}.bn{i}" for part in ("encoder", "decoder") for i in (1, 2, 3)]
CONV_BNS = [f"encoder.bn{i}" for i in (1, 2, 3, 4)] + [f"decoder.bn{i}" for i in (1, 2, 3)]
KERAS_EPS = 1e-3
TORCH_MOMENTUM = 0.01  # = 1 - Keras' 0.99
# eps is solved from a fitted slope a = gamma / sqrt(var + eps): float32 rounding of the BN output
# (~6e-8 relative) moves it by about 2 (var + eps) 6e-8 <= 1.2e-7 with the probe's var <= 1
# (measured: <= 1e-7, i.e. 1e-4 relative); 1e-6 leaves 8x margin and still rejects torch's 1e-5.
EPS_ATOL = 1e-6
# momentum = change of the moving mean / (batch mean - old mean): float32 rounding of a 0.01-sized
# update leaves ~1e-5 relative (measured <= 3e-7 relative after the median over features).
MOMENTUM_RTOL = 1e-4
DEVIATION = {"bn_mode": "batch_stats", "bn_order": "before_activation", "dropout_active": True}
DEVIATING_PROPERTIES = ("stats", "updated", "momentum", "position", "dropout")
AFTER, BEFORE = "act \u2192 BN", "BN \u2192 act"


def _port(variant: str = "tiny-dense", **overrides) -> TorchDPSOM:
    torch.manual_seed(0)
    return TorchDPSOM(get_config(variant, **overrides))


def _inputs(variant: str = "tiny-dense", batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    cfg, rng = get_config(variant), np.random.default_rng(1)
    return (rng.random((batch, *cfg.image_shape), dtype=np.float32),
            rng.standard_normal((batch, cfg.latent_dim), dtype=np.float32))


def _detect(sides: dict, variant: str = "tiny-dense", batch: int = 16):
    torch.manual_seed(2)  # dropout masks come from torch's global stream: same table every run
    x, eps = _inputs(variant, batch)
    return detect(sides, {"x": x, "eps": eps})


def _assert_original(rows) -> None:
    """What the original's BN measures as: frozen affine after LeakyReLU, inert dropout."""
    assert (rows["stats"] == "moving").all() and (rows["batch_dep"] < 1e-6).all()  # measured <= 1e-7
    assert not rows["updated"].any() and rows["momentum"].isna().all()
    np.testing.assert_allclose(rows["eps"], KERAS_EPS, rtol=0, atol=EPS_ATOL)
    assert (rows["position"] == AFTER).all() and (rows["dropout"] == "never fires").all()


def _assert_public_port(rows) -> None:
    """Linear -> BN(batch stats, updated at 0.01) -> LeakyReLU -> Dropout that fires; eps unchanged."""
    assert (rows["stats"] == "batch").all() and (rows["batch_dep"] > 1e-2).all()  # measured >= 0.1
    assert rows["updated"].all()
    np.testing.assert_allclose(rows["momentum"], TORCH_MOMENTUM, rtol=MOMENTUM_RTOL)
    np.testing.assert_allclose(rows["eps"], KERAS_EPS, rtol=0, atol=EPS_ATOL)
    assert (rows["position"] == BEFORE).all() and (rows["dropout"] == "fires").all()


def _pairs(diff) -> set[tuple[str, str]]:
    return set(zip(diff["layer"], diff["property"]))


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("tensorflow_probability", reason="TensorFlow + TFP not installed (reference_tf needs them)")
    from harness.adapters.dpsom import TFReferenceDPSOM

    return TFReferenceDPSOM(get_config("tiny-dense"))


@pytest.mark.tf
def test_faithful_port_and_original_both_measure_frozen_affine_after_activation(reference):
    port = _port()
    port.set_weights(reference.get_weights())
    table = _detect({"tf-reference": reference, "port": port})
    print(format_table(table))
    assert list(table["layer"]) == [bn for bn in DENSE_BNS for _ in range(2)]
    _assert_original(table)
    assert differences(table).empty


@pytest.mark.tf
def test_public_port_ordering_differs_from_original_in_exactly_its_deviations(reference):
    port = _port(**DEVIATION)
    port.set_weights(reference.get_weights())
    table = _detect({"tf-reference": reference, "port": port})
    print(format_table(table))
    _assert_original(table[table["side"] == "tf-reference"])
    _assert_public_port(table[table["side"] == "port"])
    assert _pairs(differences(table)) == {(bn, p) for bn in DENSE_BNS for p in DEVIATING_PROPERTIES}


def test_torch_only_faithful_vs_public_port_ordering():
    faithful, deviating = _port(), _port(**DEVIATION)
    deviating.set_weights(faithful.get_weights())
    before = faithful.get_weights(), deviating.get_weights(), deviating.optimizer_state()["optim.global_step"]
    table = _detect({"faithful": faithful, "public-port": deviating})
    print(format_table(table))
    _assert_original(table[table["side"] == "faithful"])
    _assert_public_port(table[table["side"] == "public-port"])
    assert _pairs(differences(table)) == {(bn, p) for bn in DENSE_BNS for p in DEVIATING_PROPERTIES}
    # the probe (random BN parameters, one step) is undone: weights and optimizer as they were
    for saved, now in ((before[0], faithful.get_weights()), (before[1], deviating.get_weights())):
        assert all(np.array_equal(saved[k], now[k]) for k in saved)
    assert deviating.optimizer_state()["optim.global_step"] == before[2]
    # forward keys unchanged, in execution order: BN output before the activation output
    x, eps = _inputs(batch=3)
    keys = list(deviating.forward({"x": x, "eps": eps}))
    assert sorted(keys) == sorted(faithful.forward({"x": x, "eps": eps})) and keys[:2] == ["encoder.bn1", "encoder.fc1"]


def test_torch_only_each_switch_shows_alone():
    """One switch at a time: the detector attributes each to its own property only."""
    cases = {  # override -> (properties that must differ, check of the deviating rows)
        "bn_epsilon": (1e-5, {"eps"}),
        "bn_order": ("before_activation", {"position"}),
        "dropout_active": (True, {"dropout", "position"}),  # after_activation: the dropped zeros sit before BN
    }
    for key, (value, expected) in cases.items():
        base, other = _port(), _port(**{key: value})
        other.set_weights(base.get_weights())
        table = _detect({"faithful": base, key: other})
        rows = table[table["side"] == key]
        assert {p for _, p in _pairs(differences(table))} == expected, format_table(table)
        if key == "bn_epsilon":
            np.testing.assert_allclose(rows["eps"], 1e-5, rtol=0, atol=EPS_ATOL)
        if key == "dropout_active":  # encoder: Dense+LeakyReLU -> Dropout(0.4) -> BN; the decoder has none
            assert list(rows["position"]) == ["act \u2192 dropout(0.40) \u2192 BN"] * 3 + [AFTER] * 3


def test_torch_only_conv_order_is_measured_without_dropout():
    base, other = _port("tiny-conv"), _port("tiny-conv", bn_mode="batch_stats", bn_order="before_activation")
    other.set_weights(base.get_weights())
    table = _detect({"faithful": base, "reordered": other}, "tiny-conv", batch=6)
    assert list(table["layer"]) == [bn for bn in CONV_BNS for _ in range(2)]
    _assert_original(table[table["side"] == "faithful"])
    rows = table[table["side"] == "reordered"]
    assert (rows["position"] == BEFORE).all() and (rows["dropout"] == "never fires").all()  # conv declares none
    assert _pairs(differences(table)) == {(bn, p) for bn in CONV_BNS for p in ("stats", "updated", "momentum", "position")}


@pytest.mark.parametrize("override, message", [
    ({"bn_order": "pre"}, "bn_order='pre'"),
    ({"dropout_active": True, "dropout": 1.0}, "dropout=1.0"),
])
def test_switches_are_validated(override, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny-dense", **override)
