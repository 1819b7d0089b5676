"""Own-loop T4 (harness/tier_ownloop.py): each side's own training loop, compared step by step.

The reduced DPSOM schedule (spec.ownloop_overrides on tiny-dense, digits): 3 full batches of 5
images per epoch (+2 dropped images), 1 VAE epoch (steps 0-2), 4 SOM-init stages of 1 epoch (steps
3-14, lr_feed 0.9 / 0.3 / 0.1 / 0.01), 2 joint epochs (steps 15-20, p computed at global steps 15
and 18), LR decay every 2 global steps. Each planted bug is one realistic loop mistake, patched in
at run time (nothing in ports/ is edited); the tier must name the step and field where it happens:
four cadence/schedule bugs (structure rows) and one values bug (p normalised over the batch).
The reference's runs are computed once per module (``reuse``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tensorflow", reason="TensorFlow not installed: own-loop T4 skipped")
pytestmark = pytest.mark.tf

from harness.models.dpsom import SPEC  # noqa: E402
from harness.tier_ownloop import SCHEDULE, VALUES, NoiseStream, run  # noqa: E402

REUSE: dict = {}


def _run():
    return run(SPEC, "tiny-dense", seed=0, dataset="digits", reuse=REUSE)


def _rows(sections, name):
    return {r.name: r for r in sections[name]}


def test_noise_stream_is_row_sequential():
    """A chunked and an unchunked pass over one set draw the same numbers (the two loops chunk their
    q pass differently: the reference in 10 chunks, the port in chunks of 5 100)."""
    a, b = NoiseStream(3), NoiseStream(3)
    whole = a((17, 7))
    parts = np.concatenate([b((n, 7)) for n in (1, 1, 8, 7)])
    assert whole.dtype == np.float32 and np.array_equal(whole, parts)
    assert (a.rows, a.calls, b.rows, b.calls) == (17, 1, 17, 4)


def test_faithful_pair_passes_every_step():
    sections = _run()
    schedule = _rows(sections, SCHEDULE)
    assert all(r.verdict == "PASS" for r in sections[SCHEDULE]), [r for r in sections[SCHEDULE] if r.verdict != "PASS"]
    assert schedule["steps"].note == "21 steps on both sides"
    # 3 VAE + 12 SOM-init + 6 joint steps of 5 rows, and 2 q passes over the 17 training images
    # the same rows; the port draws each epoch's steps at once (7 epochs + 2 q passes), the reference per step
    assert schedule["noise rows drawn"].note == "reference 139 rows in 23 draws, port 139 in 9"
    values = _rows(sections, VALUES)
    assert {"loss.elbo", "loss.som_init", "loss.total", "loss.kl_pq", "loss.som", "p"} <= set(values)
    assert all(r.verdict == "PASS" for r in values.values())
    # measured (this machine): every term within 0.15 x its tolerance at its worst step
    assert max(r.max_abs / r.tolerance for r in values.values()) < 0.5


def _first(sections) -> str:
    head = sections[SCHEDULE][0]
    assert head.name == "first divergence" and head.verdict == "FAIL", head
    return head.note


def test_p_recomputed_every_step_is_named_at_the_second_joint_step(monkeypatch):
    import ports.dpsom.train as train
    from ports.dpsom.losses import target_distribution

    def run_epoch(trainer, epoch, x_train, eps=None, sync_every=1):  # the bug: the target recomputed before every joint step
        bs, D = trainer.config.batch_size, trainer.config.latent_dim
        for ii, xb in train._batches(x_train, bs):
            p = p_step = None
            if epoch.phase == "joint":
                p_step = trainer.global_step
                q = trainer.q_all(x_train, eps=None if eps is None else eps((len(x_train), D)))
                p = target_distribution(torch.from_numpy(q)).numpy()[ii * bs : (ii + 1) * bs]
            yield trainer.step(epoch.phase, xb, epoch.lr_feed, eps=None if eps is None else eps((len(xb), D)), p=p), \
                {"p": p, "p_step": p_step}

    monkeypatch.setattr(train, "run_epoch", run_epoch)
    sections = _run()
    assert _first(sections) == ("step 16 (joint, epoch 5): p_step differs: reference 15, port 16: the port's target was computed "
                                "at global step 16, the reference's at the epoch start (15): the port recomputed p within the epoch")
    rows = _rows(sections, SCHEDULE)
    assert rows["p_step"].verdict == "FAIL" and rows["p_step"].max_abs == 4  # steps 16, 17, 19, 20
    assert rows["noise rows drawn"].verdict == "FAIL"  # 4 extra q passes of 17 rows
    assert rows["noise rows drawn"].note.startswith("reference 139 rows in 23 draws, port 207 in 27")
    assert all(rows[k].verdict == "PASS" for k in ("phase", "epoch", "global_step", "lr_feed", "lr", "steps"))


def test_step_counter_restarted_per_phase_is_named_at_the_first_som_init_step(monkeypatch):
    from ports.dpsom.train import Trainer

    def begin_phase(self, phase):  # the bug: a fresh step counter per phase
        self.optimizer.global_step = 0
        self.phase = phase

    monkeypatch.setattr(Trainer, "begin_phase", begin_phase)
    first = _first(_run())
    assert first == ("step 3 (som_init, epoch 1): global_step differs: reference 4, port 1: the port's step counter restarted "
                     "when som_init began (step 3)")


def test_lr_decay_skipped_in_som_init_is_named_at_its_first_step(monkeypatch):
    import ports.dpsom.train as train

    step = train.Trainer.step_pending  # what the own loop calls

    def undecayed_som_init(self, phase, x, lr_feed, **kw):  # the bug: constant LR in the SOM-init stages
        if phase != "som_init":
            return step(self, phase, x, lr_feed, **kw)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(train, "effective_learning_rate", lambda lr, *args: np.float32(lr))
            return step(self, phase, x, lr_feed, **kw)

    monkeypatch.setattr(train.Trainer, "step_pending", undecayed_som_init)
    sections = _run()
    first = _first(sections)
    # the reference's lr at global step 3: 0.9 x 0.99^floor(3/2) = 0.891 (float32)
    assert first.startswith("step 3 (som_init, epoch 1): lr differs: reference 0.89099997282")
    assert first.endswith(", port 0.8999999761581421: the port feeds lr_feed 0.9 undecayed: no LR decay in som_init")
    assert _rows(sections, SCHEDULE)["lr"].max_abs == 12  # every SOM-init step


def test_extra_som_init_epochs_are_named_where_the_stage_should_end(monkeypatch):
    import ports.dpsom.train as train

    schedule = train.schedule

    def doubled(cfg):  # the bug: the Oct-2019 code's 2 x SOM-init epochs per LR stage (spec §6.3)
        plan = [e for e in schedule(cfg) for _ in range(2 if e.phase == "som_init" else 1)]
        return [train.Epoch(i, e.phase, e.lr_feed) for i, e in enumerate(plan)]

    monkeypatch.setattr(train, "schedule", doubled)
    sections = _run()
    assert _first(sections) == ("step 6 (som_init, epoch 2): lr_feed differs: reference 0.3, port 0.9: som_init at lr_feed 0.9 "
                                "runs 3 steps on the reference, 6 on the port (an extra step/epoch in the port's schedule)")
    rows = _rows(sections, SCHEDULE)
    assert rows["steps"].verdict == "FAIL" and rows["steps"].note == "step 21: the reference runs 21 steps, the port 33"
    # values are compared on the steps before the structure diverges only
    assert _rows(sections, VALUES)["after the structure diverges"].note == "values compared on steps 0..5 only"


def test_p_normalised_over_the_batch_is_named_by_value_at_the_first_joint_step(monkeypatch):
    """A values-level loop bug: DEC's column sums f_j taken over the batch instead of the whole
    training set (same cadence, so every structure row passes; p itself differs)."""
    import ports.dpsom.train as train
    from ports.dpsom.losses import target_distribution

    def run_epoch(trainer, epoch, x_train, eps=None, sync_every=1):
        bs, D = trainer.config.batch_size, trainer.config.latent_dim
        q_all = p_step = None
        if epoch.phase == "joint":
            p_step = trainer.global_step
            q_all = torch.from_numpy(trainer.q_all(x_train, eps=None if eps is None else eps((len(x_train), D))))
        for ii, xb in train._batches(x_train, bs):
            p = None if q_all is None else target_distribution(q_all[ii * bs : (ii + 1) * bs]).numpy()  # the bug
            yield trainer.step(epoch.phase, xb, epoch.lr_feed, eps=None if eps is None else eps((len(xb), D)), p=p), \
                {"p": p, "p_step": p_step}

    monkeypatch.setattr(train, "run_epoch", run_epoch)
    sections = _run()
    assert all(r.verdict == "PASS" for r in sections[SCHEDULE][1:])
    first = _first(sections)
    assert first.startswith("step 15 (joint, epoch 5): p differs beyond its band (|diff| ")
    p = _rows(sections, VALUES)["p"]
    assert p.verdict == "FAIL" and p.note.startswith("first at step 15 (joint, epoch 5)")
    assert p.max_abs > 1e3 * p.tolerance  # measured: far outside a band of ~1.6e-6


def test_a_port_without_its_own_loop_is_skipped_with_the_reason():
    from harness.adapters.dpsom import TorchDPSOM
    from harness.adapters.torch import TorchPortAdapter

    class NoLoop(TorchDPSOM):  # a user's port through the base adapter: no fit_records
        fit_records = TorchPortAdapter.fit_records

    sections = run(SPEC, "tiny-dense", seed=0, dataset="digits", reuse=REUSE, make_port=lambda c, dtype: NoLoop(c, dtype))
    (row,) = sections[SCHEDULE]
    assert row.verdict == "SKIPPED" and row.note == "port: NoLoop does not run its own training loop for the harness (fit_records)"
