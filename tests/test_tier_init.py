"""The native-initialiser tier (harness/tier_init.py): its statistics against closed forms and
simulation (no model), the faithful DPSOM sides PASS, and planted initialiser bugs FAIL at their row
with the mistake named."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from harness import tier_init as ti
from harness.adapters.dpsom import TorchDPSOM
from harness.init import glorot_limit, initialiser
from harness.spec import get_spec

HAS_TF = importlib.util.find_spec("tensorflow") is not None
PHI = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
Z = PHI(2) - PHI(-2)  # mass of N(0, 1) within ±2: 0.9545


# --- the statistics, without any model --------------------------------------------------------------

def test_laws_match_their_closed_forms():
    u, t = ti.null_law("uniform"), ti.null_law("truncated_normal")
    assert u.std() == pytest.approx(1 / math.sqrt(3), rel=1e-12) and u.moment(4) == pytest.approx(1 / 5, rel=1e-12)
    # truncated at ±2: var = 1 - 2·2φ(2)/Z, the 0.8796 factor Keras divides glorot_normal's sd by
    assert t.var() == pytest.approx(1 - 4 * phi(2) / Z, rel=1e-10) and t.std() == pytest.approx(0.87962566103423978, rel=1e-9)
    # clamped normal: an atom Φ(-2) = 0.02275 at each bound, Φ in between
    c = ti.clamped_normal_cdf(np.array([-2.0001, -2.0, 0.0, 1.0, 1.99999, 2.0]))
    assert c[0] == 0 and c[1] == pytest.approx(PHI(-2), rel=1e-9) and c[2] == 0.5 and c[3] == pytest.approx(PHI(1))
    assert c[4] == pytest.approx(PHI(1.99999)) and c[5] == 1.0


def test_window_approach_and_sd_tests_closed_forms():
    assert ti.bound_window_prob("uniform") == pytest.approx(ti.WINDOW, rel=1e-9)  # U(-1, 1): |x| >= 1 - w has probability w
    assert ti.bound_window_prob("truncated_normal") == pytest.approx(2 * (PHI(2) - PHI(2 * (1 - ti.WINDOW))) / Z, rel=1e-9)
    m = 0.999 + ti.RESOLUTION  # the observed max raised by float32 resolution
    assert ti.approach_pvalue("uniform", 0.999, 1000) == pytest.approx(m ** 1000, rel=1e-9)  # P(max |U| <= m) = m^n
    assert ti.approach_pvalue("uniform", 1 - ti.RESOLUTION, 10 ** 12) == 1.0  # within float32 resolution: reached
    tail = 2 * (PHI(2) - PHI(1.9 + 2 * ti.RESOLUTION)) / Z  # truncated normal: P(|x| > t) = 2 (Φ(2) - Φ(t)) / Z
    assert ti.approach_pvalue("truncated_normal", 1.9, 500) == pytest.approx((1 - tail) ** 500, rel=1e-6)
    # an exact-quantile sample of the law: sd ratio 1 within the midpoint rule's O(1/n²), no rejection; 3 % wider: rejected
    law = ti.null_law("truncated_normal")
    x = law.ppf((np.arange(20000) + 0.5) / 20000)
    ratio, p = ti.sd_test(x, "truncated_normal")
    assert abs(ratio - 1) < 1e-4 and p > 0.9
    ratio, p = ti.sd_test(1.03 * x, "truncated_normal")
    assert ratio == pytest.approx(1.03, rel=1e-4) and p < 1e-12


def test_ks_power_bounds_simulated_power():
    """The one-sample bound is a lower bound of the simulated rejection rate; the two-sample normal
    approximation does not overstate it either (60 replicates: 3 standard errors of slack); at the
    tier's sample size both exceed the target."""
    rng = np.random.Generator(np.random.PCG64(5))
    null = ti.null_law("truncated_normal").cdf
    n, reps, alpha = 8000, 60, 1e-3
    one, two = ti.ks_power(null, ti.clamped_normal_cdf, n, alpha), ti.ks_power(null, ti.clamped_normal_cdf, n, alpha, m=n)
    rate_one = np.mean([stats.kstest(np.clip(rng.standard_normal(n), -2, 2), null).pvalue < alpha for _ in range(reps)])
    rate_two = np.mean([stats.ks_2samp(np.clip(rng.standard_normal(n), -2, 2), stats.truncnorm.rvs(-2, 2, size=n, random_state=rng),
                                       method="asymp").pvalue < alpha for _ in range(reps)])
    assert 0.3 < one <= rate_one + 3 * math.sqrt(one * (1 - one) / reps)  # measured: bound 0.71, simulated 0.98
    assert two <= rate_two + 3 * math.sqrt(max(two * (1 - two), 1 / reps) / reps)
    assert ti.ks_power(null, null, n, alpha) <= alpha  # no difference: only the test's size
    level = ti.ALPHA / 50  # the tier's per-test level for ~50 tests
    assert ti.ks_power(null, ti.clamped_normal_cdf, 4 * 8192, level) > ti.POWER_TARGET
    assert ti.ks_power(null, ti.clamped_normal_cdf, 4 * 8192, level, m=4 * 8192) > ti.POWER_TARGET
    assert ti.at_bound_power("truncated_normal", 6400, level) > ti.POWER_TARGET  # 4.55 % at ±2σ in one draw of 8x8x100
    assert ti.at_bound_power("truncated_normal", 6400, level, atom=0.0) <= level


def test_closest_mistake_names_each_planted_law():
    rng = np.random.Generator(np.random.PCG64(3))
    shape = (500, 400)
    limit = glorot_limit(shape)
    assert initialiser("x.kernel", shape).scale == limit == pytest.approx(math.sqrt(6 / 900))
    draws = {"the expected law": rng.uniform(-limit, limit, 20000),
             "U(0, 1) (nn.init.uniform_ default)": rng.uniform(0, 1, 20000),
             "Glorot normal, untruncated (nn.init.xavier_normal_)": rng.normal(0, limit / math.sqrt(3), 20000),
             "torch default (kaiming_uniform a=sqrt(5))": rng.uniform(-1 / math.sqrt(500), 1 / math.sqrt(500), 20000)}
    for name, w in draws.items():
        assert ti.closest_mistake(w / limit, "uniform", shape, limit)[0] == name
    x = np.clip(rng.standard_normal(20000), -2, 2)
    assert ti.closest_mistake(x, "truncated_normal", (8, 8, 100), 0.05)[0] == "clamped normal at ±2 sd"
    assert ti.closest_mistake(rng.standard_normal(20000), "truncated_normal", (8, 8, 100), 0.05)[0] == "untruncated normal"


def test_the_tier_and_the_harness_draw_read_one_rule_table(monkeypatch):
    import harness.init

    spec, shapes = get_spec("dpsom"), {"encoder.fc1.kernel": (4, 3), "som.embeddings": (2, 2, 3)}
    assert spec.initialisers(shapes)["encoder.fc1.kernel"].keras == "glorot_uniform"
    monkeypatch.setattr(harness.init, "RULES", (("*.kernel", "ones"), *harness.init.RULES))
    assert spec.initialisers(shapes)["encoder.fc1.kernel"].keras == "ones"
    assert (spec.draw_weights(shapes, np.random.Generator(np.random.PCG64(0)))["encoder.fc1.kernel"] == 1).all()


def test_choose_draws_reaches_the_power_target():
    spec = get_spec("dpsom")
    cfg = spec.get_config("dense")
    shapes = {"som.embeddings": (*cfg.som_dim, cfg.latent_dim), "encoder.fc1.kernel": (784, 500), "encoder.fc1.bias": (500,)}
    rules = spec.initialisers(shapes)
    draws = ti.choose_draws(shapes, rules, ti.SAMPLE_CAP, ti.ALPHA / 9)
    assert ti.DRAWS_MIN <= draws < ti.DRAWS_MAX
    assert min(ti._powers(rules["som.embeddings"], shapes["som.embeddings"], ti.SAMPLE_CAP * draws, ti.ALPHA / 9).values()) >= ti.POWER_TARGET


# --- DPSOM: the faithful port, and planted bugs ------------------------------------------------------

SD = 0.05  # ports/dpsom/config.py EMBEDDING_INIT_STDDEV


class PlantedInitPort(TorchDPSOM):
    """Three realistic initialiser mistakes, each in its own weight (the rows are independent):
    the embeddings a normal clamped at ±2σ (``torch.clamp(randn * σ, -2σ, 2σ)``, the public port's),
    ``decoder.fc1`` left to ``nn.init.uniform_``'s default U(0, 1), ``encoder.fc2`` Glorot NORMAL."""

    def fresh_module(self):
        m = super().fresh_module()
        with torch.no_grad():
            m.som.embeddings.copy_(torch.clamp(torch.randn_like(m.som.embeddings) * SD, -2 * SD, 2 * SD))
            torch.nn.init.uniform_(m.decoder.fc1.weight)
            torch.nn.init.xavier_normal_(m.encoder.fc2.weight)
        return m


PLANTED = {"som.embeddings": ("clamped normal at ±2 sd", "at bound"),
           "decoder.fc1.kernel": ("U(0, 1) (nn.init.uniform_ default)", "support"),
           "encoder.fc2.kernel": ("Glorot normal, untruncated (nn.init.xavier_normal_)", "support")}


notes: dict[str, str] = {}


def _port_section(make_port=None) -> list:
    sections = ti.run(get_spec("dpsom"), "dense", sides=("port",), make_port=make_port, notes=notes)
    assert list(sections) == ["I initialisers: port"]
    return sections["I initialisers: port"]


def test_faithful_port_passes_every_row():
    rows = _port_section()
    assert rows and all(r.verdict == "PASS" for r in rows), [(r.name, r.note) for r in rows if r.verdict != "PASS"]
    emb = next(r for r in rows if r.name == "som.embeddings")
    assert emb.tolerance == pytest.approx(2 * SD) and emb.max_abs <= emb.tolerance * (1 + ti.SUPPORT_SLACK)
    assert emb.floor == pytest.approx(SD * 0.8796256610, rel=1e-9)  # the truncated normal's sd
    assert "power at level" in emb.note and "KS vs clamped normal at ±2 sd 1.0000" in emb.note
    assert "least power over the weights" in notes["I initialisers: port"]
    assert "KS vs clamped normal at ±2 sd 1.0000" in notes["I initialisers: port"]


def test_planted_initialiser_bugs_fail_at_their_rows_with_the_mistake_named():
    rows = {r.name: r for r in _port_section(lambda cfg, dtype: PlantedInitPort(cfg, dtype))}
    for name, (mistake, check) in PLANTED.items():
        r = rows[name]
        assert r.verdict == "FAIL", (name, r.note)
        assert r.note.startswith(f"closest known law: {mistake} "), (name, r.note)
        assert check in r.note.split("; ")[1], (name, r.note)  # the first failing check is listed first
    # the clamped normal: ~4.55 % of the elements exactly at ±2σ (expected ~12 of 51200 within 0.1 % of it)
    count = int(re.search(r"at bound \(within [^)]*\): (\d+) of 51200, expected 11\.6", rows["som.embeddings"].note).group(1))
    assert 0.040 < count / 51200 < 0.051, rows["som.embeddings"].note  # 2 Φ(-2) = 0.0455
    others = [r for n, r in rows.items() if n not in PLANTED and not n.startswith("[")]
    assert others and all(r.verdict == "PASS" for r in others), [(r.name, r.note) for r in others if r.verdict != "PASS"]
    assert rows["[glorot_uniform, pooled]"].verdict == "FAIL"  # two of its weights are not Glorot-uniform


def test_port_draws_are_fresh_reproducible_and_leave_torch_alone():
    cfg = get_spec("dpsom").get_config("tiny-dense")
    port = TorchDPSOM(cfg)
    before, state = port.get_weights(), torch.random.get_rng_state()
    a, b = port.initial_weights(), port.initial_weights()
    assert torch.equal(torch.random.get_rng_state(), state)  # torch's global stream untouched
    assert list(a) == list(before) and all(a[k].shape == before[k].shape for k in a)
    assert not np.array_equal(a["som.embeddings"], b["som.embeddings"]) and not np.array_equal(a["encoder.fc1.kernel"], b["encoder.fc1.kernel"])
    assert all(port.get_weights()[k].tobytes() == v.tobytes() for k, v in before.items())
    again = TorchDPSOM(cfg).initial_weights()  # the same noise seed: the same first draw
    assert all(np.array_equal(again[k], a[k]) for k in a)


def test_a_side_without_the_capability_is_skipped():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toymodel.spec import TOY

    sections = ti.run(TOY, "tiny")
    assert [r.verdict for rs in sections.values() for r in rs] == ["SKIPPED"] * 3
    assert "not redrawn" in sections["I initialisers: reference"][0].note
    assert "fresh_module" in sections["I initialisers: port"][0].note


# --- both sides (TF) -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    if not HAS_TF:
        pytest.skip("TensorFlow not installed")
    spec = get_spec("dpsom")
    ref = spec.make_reference(spec.get_config("dense"))
    yield ref
    ref.close()


@pytest.mark.tf
def test_reference_draws_are_fresh_and_leave_its_weights_alone(reference):
    before = reference.get_weights()
    a, b = reference.initial_weights(), reference.initial_weights()
    assert list(a) == list(before)
    assert not np.array_equal(a["som.embeddings"], b["som.embeddings"]) and not np.array_equal(a["som.embeddings"], before["som.embeddings"])
    assert all(reference.get_weights()[k].tobytes() == v.tobytes() for k, v in before.items())


@pytest.mark.tf
def test_faithful_pair_passes_and_a_clamped_port_fails_the_two_sample_row(reference):
    spec = get_spec("dpsom")
    sections = ti.run(spec, "dense", make_reference=lambda cfg, dtype: reference)
    assert list(sections) == list(ti.SECTIONS)
    bad = [(s, r.name, r.note) for s, rs in sections.items() for r in rs if r.verdict != "PASS"]
    assert not bad, bad
    pair = {r.name: r for r in sections[ti.SECTIONS[2]]}
    assert pair["encoder.fc1.bias"].note == "zeros, first draws" and pair["som.embeddings"].max_abs < pair["som.embeddings"].tolerance

    sections = ti.run(spec, "dense", make_reference=lambda cfg, dtype: reference, make_port=lambda cfg, dtype: PlantedInitPort(cfg, dtype))
    pair = {r.name: r for r in sections[ti.SECTIONS[2]]}
    assert {n for n, r in pair.items() if r.verdict == "FAIL"} == set(PLANTED) | {"[glorot_uniform, pooled]"}
    assert all(r.verdict == "PASS" for r in sections[ti.SECTIONS[0]])
    emb = pair["som.embeddings"]
    assert "vs a port drawing clamped normal at ±2 sd: 1.0000" in emb.note and emb.max_abs > emb.tolerance


@pytest.mark.slow
@pytest.mark.tf
def test_conv_pair_passes():
    if not HAS_TF:
        pytest.skip("TensorFlow not installed")
    sections = ti.run(get_spec("dpsom"), "conv")
    bad = [(s, r.name, r.note) for s, rs in sections.items() for r in rs if r.verdict != "PASS"]
    assert not bad, bad
    assert {r.name for r in sections[ti.SECTIONS[2]]} >= {"decoder.deconv1.kernel", "posterior.head.kernel", "som.embeddings"}


def test_cli_help_and_exit_status(capsys, monkeypatch):
    with pytest.raises(SystemExit) as ex:
        ti.main(["--help"])
    assert ex.value.code == 0 and "two-sample KS" in capsys.readouterr().out
    from harness.engine import skipped

    fail = ti.Comparison("som.embeddings", (8, 8, 100), 0.1, 1.0, 0.05, (), 0.044, 2.27, 0.1, "FAIL", "planted")
    for rows, code in (([skipped("initial_weights", "none")], 0), ([fail], 1)):
        monkeypatch.setattr(ti, "run", lambda *a, rows=rows, **k: {ti.SECTIONS[1]: rows})
        assert ti.main(["--side", "port"]) == code
    assert "verdict: FAIL" in capsys.readouterr().out
