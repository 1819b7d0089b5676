"""harness.engine on planted cases: each diagnosis, the batch split's recombination, judge()'s cap
and partial mappings. TF-free, numbers and strings asserted exactly."""

from __future__ import annotations

import numpy as np
import pytest

from harness import engine
from harness.models.dpsom import SPEC

SLOPE = 0.20000000298023224
CONSTANTS = SPEC.constants(SPEC.get_config("tiny-dense"))


def _leaky(x):
    return np.where(x > 0, x, SLOPE * x)


def test_constants_of_the_spec():
    assert CONSTANTS["n_pixels"] == 784.0 and CONSTANTS["leaky_relu_slope"] == SLOPE
    assert CONSTANTS["adam.beta1"] == float(np.float32(0.9)) == 0.8999999761581421


def test_missing_and_extra_activation():
    x = np.random.default_rng(0).standard_normal((5, 784))
    x[0, 0] = 1.7e-6  # within rounding of the kink
    a, b = _leaky(x), x.copy()
    b[0, 0] += 3e-9  # 1.8e-3 relative there, as float32 rounding leaves it (measured on decoder.logits)
    want = "missing activation: negatives of A are B x leaky_relu_slope (0.2), positives equal (LeakyReLU absent on side B)"
    assert engine.diagnose("decoder.logits", a, b, CONSTANTS) == want
    assert engine.diagnose("decoder.logits", x, _leaky(x), CONSTANTS) == (
        "extra activation: negatives of B are A x leaky_relu_slope (0.2) (LeakyReLU only on side B)")
    # no slope among the constants: nothing to name it by
    assert engine.diagnose("decoder.logits", a, b, {"n_pixels": 784.0}) == ""


def test_full_vs_diagonal_covariance():
    rng = np.random.default_rng(1)
    full = np.tril(rng.standard_normal((5, 7, 7)), -1) + np.eye(7) * 1.3
    diag = np.eye(7) * rng.uniform(0.5, 1.5, (5, 1, 7))
    assert engine.diagnose("posterior.scale_tril", full, diag, CONSTANTS) == "lower triangle zero on side B only: full vs diagonal covariance"
    assert engine.diagnose("posterior.scale_tril", diag, full, CONSTANTS) == "lower triangle zero on side A only: full vs diagonal covariance"


def test_beta1_power_of_an_optimizer_restarted_per_phase():
    b1 = np.float32(0.9)
    a, b = np.float32(b1 ** 3), np.float32(b1 ** 1)  # after 2 shared steps vs a fresh optimizer (TF1 convention: β^(t+1))
    assert engine.diagnose("optim.beta1_power", a, b, CONSTANTS) == (
        "B/A = 1/β1^2: side B's optimizer has taken 2 fewer steps (restarted per phase?)")
    b2 = np.float32(0.999)
    assert engine.diagnose("optim.beta2_power", np.float32(b2 ** 2), b2, CONSTANTS) == (
        "B/A = 1/β2^1: side B's optimizer has taken 1 fewer steps (restarted per phase?)")


def test_learning_rate_python_float_vs_float32():
    assert float(np.float32(0.9)) == 0.8999999761581421
    assert engine.diagnose("lr", np.float32(0.9), 0.9, CONSTANTS) == (
        "B is not a float32 value: a Python float (float64) vs float32 learning rate/constant")
    assert engine.diagnose("lr", 0.9, np.float32(0.9), CONSTANTS) == (
        "A is not a float32 value: a Python float (float64) vs float32 learning rate/constant")


def test_ratio_named_after_a_config_constant():
    a = np.random.default_rng(2).uniform(0.5, 2.0, (5, 784))
    assert engine.diagnose("loss.elbo.nll", a, a / 784, CONSTANTS) == "constant ratio B/A = 0.00127551 = 1/n_pixels"
    assert engine.named_ratio(a, a * 7, CONSTANTS) == "constant ratio B/A = 7 = latent_dim"
    assert engine.named_ratio(a, a * 3, CONSTANTS) == "constant ratio B/A = x3 (a reduction/convention mismatch: sum vs mean?)"
    assert engine.named_ratio(a, a * 1.2345, CONSTANTS) == "constant ratio B/A = 1.2345 (a formula or constant differs)"
    noisy = a * 3 * (1 + np.random.default_rng(3).uniform(-1e-3, 1e-3, a.shape))  # not one ratio: no name
    assert engine.named_ratio(a, noisy, CONSTANTS) == ""


def test_split_recombines_sum_and_mean_to_the_whole_batch():
    batch = {"x": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}  # halves [1, 2] and [3, 4, 5]

    def fn(b):
        return {"s": b["x"].sum(), "m": b["x"].mean()}

    whole = fn(batch)
    out = engine.split(fn, batch, {"s": "sum", "m": "mean"})
    assert out["s"] == whole["s"] == 15.0  # 3 + 12
    assert out["m"] == whole["m"] == 3.0  # (2 x 1.5 + 3 x 4) / 5
    rows = engine.split(lambda b: {"rows": b["x"] * 2}, batch, "per_sample")
    assert rows["rows"].tolist() == [2.0, 4.0, 6.0, 8.0, 10.0]
    wrong = engine.split(lambda b: {"s": b["x"].sum()}, batch, "mean")  # a sum judged as a mean recombines wrongly
    assert wrong["s"] == (2 * 3.0 + 3 * 12.0) / 5 == 8.4
    with pytest.raises(ValueError, match="reduction 'median'"):
        engine.split(fn, batch, "median")


def test_judge_caps_the_floor_and_reports_absent_names():
    ref = {"t": np.ones(4), "gone": np.ones(3)}
    parts = {"float64": {"t": 0.01}}  # 1e-2 of a tensor of 1: not rounding noise
    rows = {r.name: r for r in engine.judge(ref, {"t": np.ones(4) + 0.05}, parts, absent={"gone"})}
    r = rows["t"]
    assert r.verdict == "FAIL" and r.floor == pytest.approx(1.05e-3) and r.tolerance == pytest.approx(1.05e-2)
    assert r.max_abs == pytest.approx(0.05) and "floor capped: measured 0.01" in r.note
    # the uncapped band (10 x 0.01) would have passed it; beyond the capped one but within 100 x it: still FAIL, not INACCURATE
    assert r.max_abs < engine.MULTIPLE * 0.01 and r.max_abs < 100 * r.tolerance
    assert engine.judge(ref, {"t": np.ones(4) + 0.005}, parts, absent={"gone"})[0].verdict == "PASS"
    assert rows["gone"].verdict == "STRUCTURAL" and rows["gone"].note == "absent in the port (partial mapping)"
    # without the absent declaration the same name is a FAIL
    assert {r.name: r.verdict for r in engine.judge(ref, {"t": np.ones(4)}, {})} == {"t": "PASS", "gone": "FAIL"}


def test_judge_attaches_the_diagnosis_to_a_fail():
    x = np.random.default_rng(4).standard_normal((5, 13))
    (row,) = engine.judge({"encoder.fc1": _leaky(x)}, {"encoder.fc1": x}, {}, constants=CONSTANTS)
    assert row.verdict == "FAIL" and row.note.startswith("missing activation: negatives of A are B x leaky_relu_slope (0.2)")


def test_split_floors_with_the_first_half_parked_on_disk_gives_the_same_floors():
    from harness.memory import Spill

    rng = np.random.default_rng(4)
    batch = {"x": rng.standard_normal((7, 600)).astype(np.float32)}  # 600 x 600 float32 outputs: 1.4 MB, spilled to a file
    calls = []

    def fn(b):
        calls.append(len(b["x"]))
        return {"g": (b["x"].T @ b["x"]).astype(np.float32), "loss": np.float32(b["x"].sum())}

    full = fn(batch)
    spill = Spill()
    try:
        def park(values):
            calls.append("parked")
            spill.put("a", values)
            return spill.get("a")

        parked = engine.split_floors(full, fn, batch, {"g": "sum", "loss": "sum"}, park)
        assert calls == [7, 3, "parked", 4]  # the first half is on disk before the second half runs
        assert spill._entries["a"][2]  # noqa: SLF001  (g went to a file, not kept in memory)
    finally:
        spill.close()
    held = engine.split_floors(full, fn, batch, {"g": "sum", "loss": "sum"})
    assert parked == held and held["g"] > 0  # the same numbers; a float32 batch split is not exact
    split = engine.split(fn, batch, {"g": "sum", "loss": "sum"})  # the independent definition: floors(full, split)
    assert held["g"] == float(np.max(np.abs(full["g"].astype(np.float64) - split["g"])))


def test_spill_takes_a_streamed_snapshot_one_array_at_a_time_and_a_guarded_stream_reports_its_port():
    import weakref

    from harness.memory import Spill
    from harness.tiers import _Guarded

    alive = []

    def made(i):
        a = np.full(300_000, float(i))  # 2.4 MB: written to a file
        alive.append(weakref.ref(a))
        return f"w{i}", a

    def items():  # as a side streams its snapshot: nothing kept in the generator's frame
        for i in range(3):
            assert all(r() is None for r in alive), "the previous array is still held while the next is made"
            yield made(i)
        yield "optim.step", np.int64(7)

    spill = Spill()
    try:
        spill.put("s", items())
        got = spill.get("s")
        assert list(got) == ["w0", "w1", "w2", "optim.step"] and got["optim.step"] == 7
        assert [float(got[f"w{i}"][-1]) for i in range(3)] == [0.0, 1.0, 2.0]
        fresh = spill.get("s", copy=True)
        assert fresh.fresh and type(fresh["w1"]) is np.ndarray and fresh["w1"].flags.writeable  # read into memory, not mapped
        assert isinstance(got["w1"], np.memmap) and not got.fresh
        spill.put("small", {"b": np.ones(3)})  # kept in memory: a fresh view hands out copies of it too
        fresh_small = spill.get("small", copy=True)
        fresh_small["b"][:] = 5
        assert fresh_small["b"].tolist() == [1.0, 1.0, 1.0]
    finally:
        spill.close()

    class Port:
        def optimizer_state_items(self, phase=None):
            yield "optim.step", np.int64(1)
            raise ValueError("slot w has no value")

    seen = []
    stream = _Guarded(Port(), lambda name, err: seen.append((name, str(err)))).optimizer_state_items("vae")
    assert next(stream) == ("optim.step", 1) and not seen
    with pytest.raises(ValueError, match="slot w"):
        next(stream)
    assert seen == [("optimizer_state_items", "slot w has no value")]  # reported as the port's call, not the harness's
