"""The port's own-loop hooks (ports/dpsom/train.py ``fit(eps=, on_step=)``), torch only.

Expectations are the original's schedule written out by hand (specs/dpsom.md §6.2-6.4): with
1 VAE epoch, 4 SOM-init stages of 1 epoch, 2 joint epochs, 3 batches of 5 per epoch (17 images, 2
dropped) and decay every 2 global steps.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.tier_ownloop import NoiseStream
from ports.dpsom.config import get_config
from ports.dpsom.model import DPSOM
from ports.dpsom.train import Trainer, fit

CFG = get_config("tiny-dense", epochs_pretrain=1, som_init_epochs_per_stage=1, num_epochs=2, decay_steps=2)
X = np.random.default_rng(0).random((17, 28, 28, 1), dtype=np.float32)


def _trainer(dtype=torch.float32) -> Trainer:
    torch.manual_seed(4)
    return Trainer(CFG, model=DPSOM(CFG).to(dtype))


def test_records_follow_the_original_schedule():
    records, noise = [], NoiseStream(5)
    fit(_trainer(), X, None, eps=noise, on_step=records.append, progress=False)
    assert [r["phase"] for r in records] == ["vae"] * 3 + ["som_init"] * 12 + ["joint"] * 6
    assert [r["epoch"] for r in records] == [i for i in range(7) for _ in range(3)]
    assert [r["global_step"] for r in records] == list(range(1, 22))
    feeds = [1e-3] * 3 + [0.9] * 3 + [0.3] * 3 + [0.1] * 3 + [0.01] * 3 + [1e-3] * 6
    # staircase decay on the pre-step global step i: lr_feed x 0.99^floor(i / 2), in float32
    assert [np.float32(r["lr"]) for r in records] == [np.float32(f) * np.float32(0.99) ** np.float32(i // 2) for i, f in enumerate(feeds)]
    assert [r["p_step"] for r in records] == [None] * 15 + [15] * 3 + [18] * 3  # p once per joint epoch, at its start
    assert all(r["p"] is None for r in records[:15])
    for r in records[15:]:
        assert r["p"].shape == (5, 9) and np.allclose(r["p"].sum(1), 1.0, atol=1e-6)
        assert {"loss.elbo", "loss.kl_pq", "loss.som", "loss.total"} <= set(r)
    # one ε per step, drawn an epoch at a time (7 epochs), and one per image per q pass
    assert (noise.rows, noise.calls) == (21 * 5 + 2 * 17, 7 + 2)


def test_hooks_leave_the_default_run_unchanged_and_follow_a_float64_model():
    plain = fit(_trainer(), X, None, progress=False)
    seen: list = []
    hooked = fit(_trainer(), X, None, on_step=seen.append, progress=False)
    assert plain == hooked and len(seen) == 21  # on_step observes, native ε from the trainer's generator as before
    r32, r64 = [], []
    fit(_trainer(), X, None, eps=NoiseStream(5), on_step=r32.append, progress=False)
    fit(_trainer(torch.float64), X, None, eps=NoiseStream(5), on_step=r64.append, progress=False)
    # the float64 twin takes float32 data and noise (cast to the model's dtype): same run up to rounding
    loss = {"vae": "loss.elbo", "som_init": "loss.som_init", "joint": "loss.total"}
    assert [a["phase"] for a in r32] == [b["phase"] for b in r64]
    # measured: relative float32 vs float64 distance of the minimised loss 2.2e-7 at worst over these 21 steps
    assert max(abs(a[loss[a["phase"]]] - b[loss[b["phase"]]]) / abs(b[loss[b["phase"]]]) for a, b in zip(r32, r64)) < 1e-5
