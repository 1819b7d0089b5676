"""Per-step wall time of the port and the TF reference, same machine, same run (pytest-benchmark).

    nox -s bench                      # all; or: nox -s bench -- -k dense
    python -m harness.bench_table results/bench/latest.json

Warm-up: 3 steps (graph/kernel caches, allocator); measured: 15 rounds of 1 step (the median is
stable to ~3 % at 15; at 5 it moved by 10 % between runs). On a GPU the torch
step is synchronised before the timer stops. Batch 300, full-size models, one fixed batch and ε.

``som_init_loop``: a SOM-initialisation step as each side's OWN loop takes it after the phase's first
epoch: the port's takes the batch's posterior head from ``Trainer.frozen_heads`` (the encoder is
frozen in that phase; the same floats, tests/test_port_dpsom.py), the reference's runs the
original's whole graph as every step does.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import reference_tf  # noqa: F401  pins TF's kernel library (TF_ENABLE_ONEDNN_OPTS) before TF loads
from harness.env import cpu_isa, git_commit

WARMUP, ROUNDS = 3, 15
LR = {"vae": 1e-3, "som_init": 0.9, "joint": 1e-3}
# what the run chose, stored with every result (nox -s bench sets OMP_WAIT_POLICY=PASSIVE; torch's threads
# are its default, one per core); TF keeps its own pools, and its kernel library is reference_tf's pin
# (0: Eigen) unless the user set TF_ENABLE_ONEDNN_OPTS
SETTINGS = {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "commit": git_commit(), "cpu_isa": cpu_isa(), "tf_onednn_opts": os.environ["TF_ENABLE_ONEDNN_OPTS"]}


def _side(kind: str, variant: str):
    from harness.adapters.dpsom import TFReferenceDPSOM, TorchDPSOM
    from ports.dpsom.config import get_config

    cfg = get_config(variant)
    if kind == "tf":
        pytest.importorskip("tensorflow", reason="TensorFlow not installed: reference timings skipped")
        return TFReferenceDPSOM(cfg)
    return TorchDPSOM(cfg)


@pytest.fixture(scope="module", params=["dense", "conv"])
def variant(request):
    return request.param


@pytest.mark.parametrize("phase", ["vae", "som_init", "som_init_loop", "joint"])
@pytest.mark.parametrize("kind", ["torch", "tf"])
def test_step(benchmark, kind, variant, phase):
    side = _side(kind, variant)
    cfg = side.config
    rng = np.random.default_rng(0)
    x = rng.random((cfg.batch_size, *cfg.image_shape), dtype=np.float32)
    eps = rng.standard_normal((cfg.batch_size, cfg.latent_dim), dtype=np.float32)
    p = np.full((cfg.batch_size, cfg.n_nodes), 1.0 / cfg.n_nodes, np.float32)
    sync = None  # CPU: nothing to wait for
    if kind == "torch" and torch.cuda.is_available():
        sync = torch.cuda.synchronize

    if phase == "som_init_loop" and kind == "torch":
        trainer, head = side.trainer, side.trainer.frozen_heads(x)

        def step() -> None:
            trainer.step("som_init", x, LR["som_init"], eps=eps, head=head)
    else:
        name = phase.removesuffix("_loop")

        def step() -> None:
            side.step(name, {"x": x, "eps": eps, "p": p}, LR[name])

    def one_step():
        step()
        if sync is not None:
            sync()

    benchmark.extra_info.update(side=kind, variant=variant, phase=phase, batch_size=cfg.batch_size, **SETTINGS)
    benchmark.pedantic(one_step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
