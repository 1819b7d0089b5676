"""Test the tester on DEKM: plant one known porting bug at a time into ports/dekm and require the
harness to flag it at the expected tier, on the expected tensor, with the expected verdict.

Config-level mutants use the port's own declared-deviation switches (ports/dekm/config.py
``DEVIATIONS``); loop-level ones are patched into ``ports.dekm.train`` at run time (nothing in
ports/ is edited). A declared deviation is checked both ways: with the model's registry
(harness/deviations/dekm.csv) T0 reads DECLARED and the numeric tiers still flag its effect; with an
empty registry the same T0 row FAILs. The references are computed once per module: one cached
:class:`QuickTier` per variant (its registry swapped per test), the own-loop tier's ``reuse`` dict.
Data: MNIST from ``PARITY_DATA_DIR`` (the CLI's default), seed 0.

Measured (pytest, this machine, 2 cores): the non-slow part 60 s (14 tests), the slow part (the padding
mutant on the full conv variant, batch 256) 12 s; a quick-tier
mutant 0.3-3 s against the cached reference (its first use builds the reference: 4-9 s), an own-loop
mutant 2-4 s against the cached reference runs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow not installed: DEKM mutation tests skipped")
pytestmark = pytest.mark.tf

from harness.adapters.dekm import TorchDEKM  # noqa: E402
from harness.models.dekm import SPEC  # noqa: E402
from harness.tier_ownloop import SCHEDULE, VALUES  # noqa: E402
from harness.tiers import QuickTier  # noqa: E402
from ports.dekm.train import refit as FAITHFUL_REFIT  # noqa: E402  (kept: the tests patch the module's name)

CONV_KERNELS = ("encoder.conv1.kernel", "encoder.conv2.kernel", "encoder.conv3.kernel", "embedding.kernel", "decoder.fc1.kernel",
                "decoder.deconv1.kernel", "decoder.deconv2.kernel", "decoder.deconv3.kernel")
DENSE_KERNELS = ("encoder.fc1.kernel", "encoder.fc2.kernel", "encoder.fc3.kernel", "embedding.kernel", "decoder.fc1.kernel",
                 "decoder.fc2.kernel", "decoder.fc3.kernel", "decoder.out.kernel")
SAME_LAYERS = {"encoder.conv1", "encoder.conv2", "decoder.deconv2", "decoder.deconv3"}  # 'same' at every geometry
PAD3_LAYERS = {"encoder.conv3", "decoder.deconv1"}  # 'valid' on 28 x 28 (H % 8 != 0), 'same' on 16 x 16
OWNLOOP_VARIANT = "tiny-dense"
OWNLOOP_REUSE: dict = {}


def port_with(**overrides):
    """``make_port`` of the port with ``overrides`` (its declared-deviation switches) on its config only."""
    return lambda config, dtype: TorchDEKM(dataclasses.replace(config, **overrides), dtype)


@pytest.fixture(scope="module")
def tiers():
    cache: dict[tuple, QuickTier] = {}

    def get(variant: str, **overrides: str) -> QuickTier:
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:  # the model's own registry (harness/deviations/dekm.csv); tests swap it per run
            cache[key] = QuickTier(SPEC, variant, seed=0, dataset=None, overrides=overrides or None)
        return cache[key]

    return get


def run(tier: QuickTier, make_port=None, registry: dict | None = None) -> dict:
    """One quick-tier run against the cached reference; ``registry`` replaces the tier's for this run only."""
    with pytest.MonkeyPatch.context() as mp:
        if registry is not None:
            mp.setattr(tier, "registry", registry)
        return tier.run(make_port)


def rows(report: dict, section: str) -> dict[str, dict]:
    return {r["name"]: r for r in report["sections"][section]}


def not_passing(report: dict, section: str) -> set[str]:
    return {r["name"] for r in report["sections"][section] if r["verdict"] != "PASS"}


def first_numeric(report: dict) -> tuple[str, str, str, str]:
    """The first non-PASS row after T0 (where a declared deviation's effect must show): section, name, verdict, note."""
    return next((s, r["name"], r["verdict"], r["note"]) for s, rs in report["sections"].items() if not s.startswith("T0")
                for r in rs if r["verdict"] not in ("PASS", "SKIPPED"))


# --- the faithful port: nothing below can be an always-FAIL ------------------------------------------
@pytest.mark.parametrize("variant", ["tiny-conv", "tiny-dense"])
def test_faithful_port_passes_every_tier_these_tests_run(tiers, variant):
    tier = tiers(variant)
    for registry in (None, {}):  # the faithful port uses no declared deviation: the registry is irrelevant
        report = run(tier, registry=registry)
        assert report["verdict"] == "PASS", report["first_divergence"]
        assert all(r["verdict"] == "PASS" for rs in report["sections"].values() for r in rs)


def test_faithful_port_passes_the_own_loop_and_its_initialisers():
    from harness.tier_init import run as init_tier
    from harness.tier_ownloop import run as ownloop

    sections = ownloop(SPEC, OWNLOOP_VARIANT, seed=0, reuse=OWNLOOP_REUSE)
    assert all(r.verdict == "PASS" for rs in sections.values() for r in rs), sections
    port = init_tier(SPEC, OWNLOOP_VARIANT, sides=("port",))
    assert all(r.verdict == "PASS" for rs in port.values() for r in rs), port


# --- (a) symmetric padding: torch's padding=k//2 instead of TF's SAME ----------------------------------
@pytest.mark.parametrize("variant", ["tiny-conv", pytest.param("conv", marks=pytest.mark.slow)])  # conv: 12 s measured
def test_symmetric_padding_fails_t2_first_at_conv1_and_isolated_pins_the_same_layers(tiers, variant):
    """28 x 28 (the conv / tiny-conv geometry): the grid shifted by a pixel in every 'same' layer; the
    'valid' ones (conv3, deconv1 on 28 x 28) compute the same function of the same input."""
    report = run(tiers(variant), port_with(padding="symmetric"))
    first = report["first_divergence"]
    assert (first["section"], first["name"], first["verdict"]) == ("T2 forward", "encoder.conv1", "FAIL"), first
    assert not_passing(report, "T0 config as executed") == set()  # the padding is not a T0 quantity: T2 names it
    assert not_passing(report, "T2 forward") == set(rows(report, "T2 forward"))  # chained: everything after conv1
    isolated = rows(report, "T2 forward, isolated")
    assert {n for n, r in isolated.items() if r["verdict"] == "FAIL"} == SAME_LAYERS
    assert all(isolated[n]["verdict"] == "PASS" for n in PAD3_LAYERS | {"encoder.flatten", "embedding", "decoder.fc1"})
    assert not_passing(report, "T2 forward, isolated (float64)") == SAME_LAYERS


def test_symmetric_padding_on_16x16_also_pins_the_pad3_layers(tiers):
    """16 x 16 (USPS geometry, H % 8 == 0): conv3 / deconv1 are 'same' too, and are pinned as well.
    (filters 3/5/16: with tiny-conv's 3/5/7 the decoder.fc1 kernel is 6 x 28, whose Glorot bound 0.42 is
    within 3 % of torch's default 1/√6 = 0.41, so T0's one-draw init label cannot tell them apart and
    even the faithful port's draw reads 'torch default' there — measured.)"""
    tier = tiers("tiny-conv", input_shape="16,16,1", filters="3,5,16")
    report = run(tier, port_with(padding="symmetric"))
    first = report["first_divergence"]
    assert (first["section"], first["name"], first["verdict"]) == ("T2 forward", "encoder.conv1", "FAIL"), first
    assert not_passing(report, "T2 forward, isolated") == SAME_LAYERS | PAD3_LAYERS
    assert run(tier)["verdict"] == "PASS"  # the geometry itself is faithful


# --- (b) U(0, 1) kernels: nn.init.uniform_ -------------------------------------------------------------
@pytest.mark.parametrize("variant, kernels", [("tiny-conv", CONV_KERNELS), ("tiny-dense", DENSE_KERNELS)])
def test_unit_kernel_init_is_declared_in_t0_and_fails_without_the_registry(tiers, variant, kernels):
    tier = tiers(variant)
    declared = run(tier, port_with(kernel_init="unit"))
    undeclared = run(tier, port_with(kernel_init="unit"), registry={})
    want = {f"init.{k}" for k in kernels}
    for report, verdict in ((declared, "DECLARED"), (undeclared, "FAIL")):
        t0 = rows(report, "T0 config as executed")
        assert not_passing(report, "T0 config as executed") == want
        assert {t0[k]["verdict"] for k in want} == {verdict}, {k: t0[k]["note"] for k in want}
        assert all(t0[k]["note"].startswith("reference ") and " / port U(0, 1)" in t0[k]["note"] for k in want)
        first = report["first_divergence"]
        assert (first["section"], first["name"], first["verdict"]) == ("T0 config as executed", f"init.{kernels[0]}", verdict)
        # the harness draws both sides' initial weights: every numeric tier passes (the effect shows in tier I)
        assert all(r["verdict"] == "PASS" for s, rs in report["sections"].items() if not s.startswith("T0") for r in rs)
    # the conv model's Glorot kernels (embedding, decoder.fc1) are declared too, beside the dense model's U(±0.05) rows
    assert rows(declared, "T0 config as executed")["init.embedding.kernel"]["note"].startswith(
        "reference glorot_uniform / port U(0, 1)" if variant == "tiny-conv" else "reference U(-0.05, 0.05) / port U(0, 1)")
    assert declared["verdict"] == "DECLARED" and undeclared["verdict"] == "FAIL"


def test_unit_kernel_init_fails_every_kernel_in_the_native_initialiser_tier():
    from harness.tier_init import SECTIONS, run as init_tier

    sections = init_tier(SPEC, "tiny-dense", make_port=port_with(kernel_init="unit"), sides=("port",))
    port = {r.name: r for r in sections[SECTIONS[1]]}
    assert {n for n, r in port.items() if r.verdict == "FAIL"} == {*DENSE_KERNELS, "[RandomUniform(-0.05, 0.05) ('uniform'), pooled]"}
    assert all(port[k].note.startswith("closest known law: U(0, 1) (nn.init.uniform_ default)") for k in DENSE_KERNELS)
    assert all(port[k].verdict == "PASS" for k in port if k.endswith(".bias"))  # zeros: unchanged


# --- (c) the batch mean instead of the sum in the clustering loss (nn.MSELoss()) -----------------------
def test_mean_cluster_loss_fails_t3_with_ratio_one_over_batch_size(tiers):
    tier = tiers("tiny-dense")
    declared = run(tier, port_with(cluster_reduction="mean"))
    undeclared = run(tier, port_with(cluster_reduction="mean"), registry={})
    for report, verdict in ((declared, "DECLARED"), (undeclared, "FAIL")):
        t0 = rows(report, "T0 config as executed")["reduction.loss.cluster"]
        assert t0["verdict"] == verdict and t0["note"].startswith("reference sum / port mean")
        assert not_passing(report, "T0 config as executed") == {"reduction.loss.cluster"}
        assert report["verdict"] == verdict  # engine.verdict: DECLARED when T0 explains every difference
        section, name, v, note = first_numeric(report)
        assert (section, name, v) == ("T3 losses", "loss.cluster", "FAIL")
        assert tier.config.batch_size == 5 and note.startswith("constant ratio B/A = 0.2 = 1/batch_size")
        losses = rows(report, "T3 losses")
        assert losses["loss.recon"]["verdict"] == "PASS"
        assert not_passing(report, "T3 gradients of loss.cluster") == set(rows(report, "T3 gradients of loss.cluster"))
        assert not_passing(report, "T3 gradients of loss.recon") == set()
    assert declared["first_divergence"]["name"] == "reduction.loss.cluster"


# --- (d) the wrong eigenvector: V sorted descending, or V's first column taken as the last --------------
def _reference_records() -> list[dict]:
    return next(v for k, v in OWNLOOP_REUSE.items() if k[0] == "ownloop")["out"]["reference"][0]


def _ownloop(monkeypatch: pytest.MonkeyPatch, attr: str, replacement) -> dict:
    import ports.dekm.train as train
    from harness.tier_ownloop import run as ownloop

    monkeypatch.setattr(train, attr, replacement)
    return ownloop(SPEC, OWNLOOP_VARIANT, seed=0, reuse=OWNLOOP_REUSE)


def _descending(H, old, n_clusters, n_init, inits=None):  # the bug: eigenpairs sorted largest first
    r = FAITHFUL_REFIT(H, old, n_clusters, n_init, inits)
    V = np.ascontiguousarray(r.V[:, ::-1])
    targets = H @ V
    targets[:, -1] = (r.centres @ V)[r.labels, -1]
    return dataclasses.replace(r, eigvals=r.eigvals[::-1], V=V, targets=targets)


def _first_column_as_last(H, old, n_clusters, n_init, inits=None):  # the bug: V[:, 0] (the smallest) taken as "the last"
    r = FAITHFUL_REFIT(H, old, n_clusters, n_init, inits)
    targets = H @ r.V
    targets[:, -1] = (r.centres @ r.V)[r.labels, 0]
    return dataclasses.replace(r, targets=targets)


@pytest.mark.parametrize("bug", [_descending, _first_column_as_last], ids=["eigenvalues descending", "first column as the last"])
def test_wrong_eigenvector_fails_the_cluster_loss_at_the_first_clustering_step(monkeypatch, bug):
    _ownloop_faithful_once()
    sections = _ownloop(monkeypatch, "refit", bug)
    ref = _reference_records()
    c0 = next(i for i, r in enumerate(ref) if r["phase"] == "cluster")
    head = sections[SCHEDULE][0]
    assert head.verdict == "FAIL" and head.note.startswith(
        f"step {c0} (cluster, epoch {ref[c0]['epoch']}): loss.cluster differs beyond its band"), head.note
    values = {r.name: r for r in sections[VALUES]}
    assert values["loss.cluster"].verdict == "FAIL" and values["loss.cluster"].note.startswith(f"first at step {c0} (cluster")
    assert values["loss.cluster"].max_abs > 1e3 * values["loss.cluster"].tolerance
    assert values["loss.recon"].verdict == "PASS"  # pretraining untouched


def _ownloop_faithful_once() -> None:
    if not any(k[0] == "ownloop" for k in OWNLOOP_REUSE):
        from harness.tier_ownloop import run as ownloop

        ownloop(SPEC, OWNLOOP_VARIANT, seed=0, reuse=OWNLOOP_REUSE)


# --- (e) a refit every epoch instead of every update_interval steps --------------------------------------
def test_refit_every_epoch_fails_the_structure_on_epoch_where_the_cadence_first_differs(monkeypatch):
    import ports.dekm.train as train

    _ownloop_faithful_once()
    fit = train.fit

    def per_epoch(trainer, x, *args, **kwargs):  # the bug: the k-means refit at every pass over the data
        cfg = trainer.config
        trainer.config = dataclasses.replace(cfg, update_interval=math.ceil(len(x) / cfg.batch_size))
        return fit(trainer, x, *args, **kwargs)

    sections = _ownloop(monkeypatch, "fit", per_epoch)
    ref = _reference_records()
    c0 = next(i for i, r in enumerate(ref) if r["phase"] == "cluster")
    cfg = SPEC.replace_config(SPEC.get_config(OWNLOOP_VARIANT), SPEC.ownloop_overrides(SPEC.get_config(OWNLOOP_VARIANT)))
    n = len(SPEC.ownloop_data(cfg, None)[0]["x"])
    assert math.ceil(n / cfg.batch_size) != cfg.update_interval  # the two cadences differ on this data
    at = c0 + cfg.update_interval  # the reference's second refit; the mutant is still on its first
    head = sections[SCHEDULE][0]
    assert head.verdict == "FAIL" and head.note.startswith(
        f"step {at} (cluster, epoch refit 1 (n_changed "), head.note
    assert ": epoch differs: reference refit 1 (n_changed " in head.note and ", port refit 0 (n_changed " in head.note
    structure = {r.name: r for r in sections[SCHEDULE]}
    assert structure["epoch"].verdict == "FAIL" and structure["epoch"].note.startswith(f"first at step {at} ")
    assert all(structure[k].verdict == "PASS" for k in ("p_step", "noise rows drawn"))
    values = {r.name: r for r in sections[VALUES]}  # same computation until the cadence differs
    assert values["loss.cluster"].verdict == "PASS" and values["loss.recon"].verdict == "PASS"
    assert values["after the structure diverges"].note == f"values compared on steps 0..{at - 1} only"


# --- (f) torch's Adam ε convention ---------------------------------------------------------------------
def test_torch_adam_epsilon_is_declared_in_t0_and_fails_the_pretraining_step(tiers):
    tier = tiers("tiny-dense")
    declared = run(tier, port_with(adam_epsilon="torch"))
    undeclared = run(tier, port_with(adam_epsilon="torch"), registry={})
    for report, verdict in ((declared, "DECLARED"), (undeclared, "FAIL")):
        assert not_passing(report, "T0 config as executed") == {"adam.epsilon_update"}
        t0 = rows(report, "T0 config as executed")["adam.epsilon_update"]
        assert t0["verdict"] == verdict, t0["note"]
        assert t0["note"].startswith("reference first update at g=1e-6, lr=1: 0.240251 / port first update at g=1e-6, lr=1: 0.990099")
        section, name, v, _ = first_numeric(report)
        assert (section, name, v) == ("T3 step pretrain: weights", "encoder.fc1.kernel", "FAIL")
        assert not_passing(report, "T3 step pretrain: weights")  # the update itself differs
        # the values before any update are the port's own: forward, losses, first gradients pass
        assert all(not not_passing(report, s) for s in ("T2 forward", "T3 losses", "T3 gradients of loss.recon"))
        assert report["verdict"] == verdict  # DECLARED: the numeric FAILs are the declared deviation's effect


# --- (g) one Adam for both phases ----------------------------------------------------------------------
def test_shared_optimizer_is_declared_in_t0_and_fails_the_cluster_step_iterations(tiers):
    tier = tiers("tiny-dense")
    declared = run(tier, port_with(shared_optimizer=True))
    undeclared = run(tier, port_with(shared_optimizer=True), registry={})
    for report, verdict in ((declared, "DECLARED"), (undeclared, "FAIL")):
        assert not_passing(report, "T0 config as executed") == {"adam.shared_between_phases"}
        t0 = rows(report, "T0 config as executed")["adam.shared_between_phases"]
        assert t0["verdict"] == verdict and t0["note"].startswith("reference False / port True")
        assert first_numeric(report)[:3] == ("T3 step cluster: lr, global_step", "global_step", "FAIL")
        optimizer = rows(report, "T3 step cluster: optimizer")["optim.iterations"]
        assert optimizer["verdict"] == "FAIL" and optimizer["max_abs"] == 1  # the shared Adam's 2nd step vs a fresh one's 1st
        assert all(not not_passing(report, s) for s in report["sections"] if s.startswith("T3 step pretrain"))
        assert report["verdict"] == verdict  # DECLARED: the numeric FAILs are the declared deviation's effect


def test_data_tier_passes_and_flags_a_dropped_partial_batch(monkeypatch):
    """D: both sides' own data paths equal the original's rule on the digits set; a port whose
    clustering pointer drops the partial last batch (wraps to 0 at the last full one) is flagged on
    ``data.train_batches`` against the rule and the reference, nowhere else."""
    from harness.spec import get_spec
    from harness.tier_data import run as data_run
    import ports.dekm.train as ptrain

    spec = get_spec("dekm")
    ok = data_run(spec, "tiny-conv", dataset="digits")
    assert all(r.verdict == "PASS" for rows in ok.values() for r in rows), ok

    def dropping(index, n, batch_size):
        nxt = index + 1 if (index + 2) * batch_size <= n else 0
        return np.arange(index * batch_size, (index + 1) * batch_size), nxt

    monkeypatch.setattr(ptrain, "cluster_batch", dropping)
    bad = data_run(spec, "tiny-conv", dataset="digits")
    failed = {(sec, r.name) for sec, rows in bad.items() for r in rows if r.verdict == "FAIL"}
    assert failed == {("D data: port vs original rule", "data.train_batches"), ("D data: reference vs port", "data.train_batches"),
                      ("D data: port vs original rule (validation=True)", "data.train_batches"),
                      ("D data: reference vs port (validation=True)", "data.train_batches")}, failed
