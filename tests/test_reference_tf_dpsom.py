"""Tests of the DPSOM TF reference (reference_tf/dpsom) against independent expectations.

Every number is checked against something computed here without the reference's code: the
variable list of specs/dpsom.md Appendix B, hand-written numpy formulas (TriL fill, KL closed form,
Student-t q, BCE, torus SOM losses, TF1 Adam), and the gradient-flow table of §5.8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("tensorflow_probability", reason="TensorFlow + TFP not installed (reference_tf needs them)")

from harness.transplant import TransplantError  # noqa: E402
from reference_tf.dpsom.config import get_config  # noqa: E402
from reference_tf.dpsom.evaluate import assign_clusters, evaluate  # noqa: E402
from reference_tf.dpsom.losses import target_distribution  # noqa: E402
from reference_tf.dpsom.model import DPSOM  # noqa: E402
from reference_tf.dpsom.train import NonFiniteLossError, Trainer, main, schedule  # noqa: E402

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf

BN_SCALE = 1.0 / math.sqrt(1.0 + 1e-3)  # frozen Keras BN: moving mean 0, variance 1, eps 1e-3

# --- specs/dpsom.md Appendix B ------------------------------------------------------------------
APPENDIX_B_DENSE = """
embeddings/embeddings [8, 8, 100]
global_step/global_step []
z_e/encoder/dense/kernel [784, 500]
z_e/encoder/dense/bias [500]
z_e/encoder/batch_normalization/gamma [500]
z_e/encoder/batch_normalization/beta [500]
z_e/encoder/batch_normalization/moving_mean [500]
z_e/encoder/batch_normalization/moving_variance [500]
z_e/encoder/dense_1/kernel [500, 500]
z_e/encoder/dense_1/bias [500]
z_e/encoder/batch_normalization_1/gamma [500]
z_e/encoder/batch_normalization_1/beta [500]
z_e/encoder/batch_normalization_1/moving_mean [500]
z_e/encoder/batch_normalization_1/moving_variance [500]
z_e/encoder/dense_2/kernel [500, 2000]
z_e/encoder/dense_2/bias [2000]
z_e/encoder/batch_normalization_2/gamma [2000]
z_e/encoder/batch_normalization_2/beta [2000]
z_e/encoder/batch_normalization_2/moving_mean [2000]
z_e/encoder/batch_normalization_2/moving_variance [2000]
z_e/encoder/dense_3/kernel [2000, 5150]
z_e/encoder/dense_3/bias [5150]
reconstruction_e/decoder/dense_4/kernel [100, 2000]
reconstruction_e/decoder/dense_4/bias [2000]
reconstruction_e/decoder/batch_normalization_3/gamma [2000]
reconstruction_e/decoder/batch_normalization_3/beta [2000]
reconstruction_e/decoder/batch_normalization_3/moving_mean [2000]
reconstruction_e/decoder/batch_normalization_3/moving_variance [2000]
reconstruction_e/decoder/dense_5/kernel [2000, 500]
reconstruction_e/decoder/dense_5/bias [500]
reconstruction_e/decoder/batch_normalization_4/gamma [500]
reconstruction_e/decoder/batch_normalization_4/beta [500]
reconstruction_e/decoder/batch_normalization_4/moving_mean [500]
reconstruction_e/decoder/batch_normalization_4/moving_variance [500]
reconstruction_e/decoder/dense_6/kernel [500, 500]
reconstruction_e/decoder/dense_6/bias [500]
reconstruction_e/decoder/batch_normalization_5/gamma [500]
reconstruction_e/decoder/batch_normalization_5/beta [500]
reconstruction_e/decoder/batch_normalization_5/moving_mean [500]
reconstruction_e/decoder/batch_normalization_5/moving_variance [500]
reconstruction_e/decoder/dense_7/kernel [500, 784]
reconstruction_e/decoder/dense_7/bias [784]
optimize/beta1_power []
optimize/beta2_power []
"""

# Appendix B lists the conv graph without BN moving statistics; they are added below.
APPENDIX_B_CONV = """
embeddings/embeddings [8, 8, 100]
global_step/global_step []
z_e/encoder/conv2d/kernel [3, 3, 1, 32]
z_e/encoder/conv2d/bias [32]
z_e/encoder/batch_normalization/gamma [32]
z_e/encoder/batch_normalization/beta [32]
z_e/encoder/conv2d_1/kernel [3, 3, 32, 64]
z_e/encoder/conv2d_1/bias [64]
z_e/encoder/batch_normalization_1/gamma [64]
z_e/encoder/batch_normalization_1/beta [64]
z_e/encoder/conv2d_2/kernel [3, 3, 64, 128]
z_e/encoder/conv2d_2/bias [128]
z_e/encoder/batch_normalization_2/gamma [128]
z_e/encoder/batch_normalization_2/beta [128]
z_e/encoder/conv2d_3/kernel [3, 3, 128, 256]
z_e/encoder/conv2d_3/bias [256]
z_e/encoder/batch_normalization_3/gamma [256]
z_e/encoder/batch_normalization_3/beta [256]
z_e/encoder/dense/kernel [12544, 5150]
z_e/encoder/dense/bias [5150]
reconstruction_e/decoder/dense_1/kernel [100, 12544]
reconstruction_e/decoder/dense_1/bias [12544]
reconstruction_e/decoder/conv2d_transpose/kernel [3, 3, 128, 256]
reconstruction_e/decoder/conv2d_transpose/bias [128]
reconstruction_e/decoder/batch_normalization_4/gamma [128]
reconstruction_e/decoder/batch_normalization_4/beta [128]
reconstruction_e/decoder/conv2d_transpose_1/kernel [3, 3, 64, 128]
reconstruction_e/decoder/conv2d_transpose_1/bias [64]
reconstruction_e/decoder/batch_normalization_5/gamma [64]
reconstruction_e/decoder/batch_normalization_5/beta [64]
reconstruction_e/decoder/conv2d_transpose_2/kernel [3, 3, 32, 64]
reconstruction_e/decoder/conv2d_transpose_2/bias [32]
reconstruction_e/decoder/batch_normalization_6/gamma [32]
reconstruction_e/decoder/batch_normalization_6/beta [32]
reconstruction_e/decoder/conv2d_4/kernel [3, 3, 32, 1]
reconstruction_e/decoder/conv2d_4/bias [1]
optimize/beta1_power []
optimize/beta2_power []
"""


def _parse(listing: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in listing.strip().splitlines():
        name, shape = line.split(" ", 1)
        out[name] = tuple(json.loads(shape))
    return out


def _expected_variables(listing: str, add_moving_stats: bool) -> dict[str, tuple[int, ...]]:
    names = _parse(listing)
    if add_moving_stats:
        for name, shape in list(names.items()):
            if name.endswith("/gamma"):
                names[name.replace("/gamma", "/moving_mean")] = shape
                names[name.replace("/gamma", "/moving_variance")] = shape
    # TF1 Adam slots of every trainable variable, inside the original's `optimize` variable scope
    trainable = [n for n in names if not re.search(r"moving_|global_step|beta\d_power", n)]
    for name in trainable:
        names[f"optimize/{name}/Adam"] = names[name]
        names[f"optimize/{name}/Adam_1"] = names[name]
    return names


def _trainable_count(names: dict) -> int:
    return sum(
        int(np.prod(s)) for n, s in names.items() if not re.search(r"moving_|global_step|beta\d_power|/Adam", n)
    )


# --- independent numpy formulas ---------------------------------------------------------------
def softplus(x):
    return np.logaddexp(0.0, x)


def np_fill_tril(r, n):
    """Hand-written lower fill for n == 3 (TFP order: rows (r4), (r6, r5), (r3, r2, r1))."""
    assert n == 3 and len(r) == 6
    return np.array([[r[3], 0, 0], [r[5], r[4], 0], [r[2], r[1], r[0]]], dtype=np.float64)


def np_kl(mu, L, s):
    D = mu.shape[-1]
    diag = np.diagonal(L, axis1=-2, axis2=-1)
    return 0.5 * (
        (L**2).sum((-2, -1)) / s**2 + (mu**2).sum(-1) / s**2 - D + 2 * D * np.log(s) - 2 * np.log(diag).sum(-1)
    )


def np_torus_neighbours(R, C):
    """[K, 4] flat indices of (up, down, right, left) with explicit wrap-around branches."""
    out = []
    for r in range(R):
        for c in range(C):
            up = r + 1 if r < R - 1 else 0
            down = r - 1 if r > 0 else R - 1
            right = c + 1 if c < C - 1 else 0
            left = c - 1 if c > 0 else C - 1
            out.append([up * C + c, down * C + c, r * C + right, r * C + left])
    return np.array(out)


def np_losses(cfg, x, fwd, emb, p):
    """Every loss term from the forward tensors, float64 numpy."""
    f = {k: np.asarray(v, np.float64) for k, v in fwd.items()}
    x = x.astype(np.float64).reshape(len(x), -1)
    z, logits = f["z"], f["decoder.logits"].reshape(len(x), -1)
    m = emb.astype(np.float64).reshape(-1, cfg.latent_dim)
    nll = np.mean(np.sum(softplus(logits) - x * logits, axis=1))
    kl = np.mean(np_kl(f["posterior.mu"], f["posterior.scale_tril"], cfg.prior_var))
    elbo = nll + cfg.prior * kl
    d = ((z[:, None, :] - m[None]) ** 2).sum(-1)
    t = (1 + d / cfg.alpha) ** (-(cfg.alpha + 1) / 2) + 1e-7
    q = t / t.sum(1, keepdims=True)
    kl_pq = np.mean(np.sum(p * np.log(p / q), axis=1))
    nb = np_torus_neighbours(*cfg.som_dim)
    som = -np.mean(np.sum(q * np.log(q[:, nb]).sum(-1), axis=1))
    k = d.argmin(1)
    commit = np.mean((z - m[k]) ** 2)
    hood = np.concatenate([k[:, None], nb[k]], axis=1)  # self, up, down, right, left
    som_s = np.mean((z[:, None, :] - m[hood]) ** 2)
    return {
        "loss.elbo.nll": nll, "loss.elbo.kl": kl, "loss.elbo": elbo, "loss.kl_pq": kl_pq, "loss.som": som,
        "loss.total": cfg.theta * elbo + cfg.gamma * kl_pq + cfg.beta * som, "loss.som_init.commit": commit,
        "loss.som_init.som": som_s, "loss.som_init": commit + som_s,
    }, d, q, k


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def _batch(cfg, rng, n=None):
    n = n or cfg.batch_size
    x = rng.random((n, *cfg.image_shape)).astype(np.float32)
    eps = rng.standard_normal((n, cfg.latent_dim)).astype(np.float32)
    p = rng.dirichlet(np.ones(cfg.n_nodes), size=n).astype(np.float32)
    return x, eps, p


class _Fresh:
    """A model plus its initial weights / optimiser state, restored before each use."""

    def __init__(self, variant, **overrides):
        self.cfg = get_config(variant, **overrides)
        self.model = DPSOM(self.cfg)
        self.w0 = self.model.get_weights()
        self.s0 = self.model.get_optimizer_state()

    def reset(self):
        self.model.set_weights(self.w0)
        self.model.set_optimizer_state(self.s0)
        return self.model


@pytest.fixture(scope="module")
def tiny_dense():
    f = _Fresh("tiny-dense")
    yield f
    f.model.close()


@pytest.fixture(scope="module")
def tiny_conv():
    f = _Fresh("tiny-conv")
    yield f
    f.model.close()


@pytest.fixture(params=["tiny-dense", "tiny-conv"])
def tiny(request, tiny_dense, tiny_conv):
    fresh = tiny_dense if request.param == "tiny-dense" else tiny_conv
    fresh.reset()
    return fresh


def _randomise(model, rng, scale=0.3):
    """Random weights (gamma around 1) so that BN and biases are not at their identity init."""
    w = {}
    for name, value in model.get_weights().items():
        if name.endswith("moving_mean") or name.endswith("moving_variance"):
            w[name] = value
        elif name.endswith("gamma"):
            w[name] = (1 + scale * rng.standard_normal(value.shape)).astype(np.float32)
        else:
            w[name] = (scale * rng.standard_normal(value.shape) / math.sqrt(max(1, value.shape[0]))).astype(np.float32)
    model.set_weights(w)
    return w


# --- T1: names, shapes, counts of the full-size graphs -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant,listing,moving,n_trainable_vars", [
    ("dense", APPENDIX_B_DENSE, False, 29),
    ("conv", APPENDIX_B_CONV, True, 35),
])
def test_full_size_variables_match_appendix_b(variant, listing, moving, n_trainable_vars):
    expected = _expected_variables(listing, add_moving_stats=moving)
    model = DPSOM(get_config(variant))
    try:
        assert model.variable_shapes() == expected
        with model.graph.as_default():
            assert len(tf.compat.v1.trainable_variables()) == n_trainable_vars
            assert tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS) == []
        assert model.param_count() == _trainable_count(expected)
    finally:
        model.close()


def test_param_count_formula_dense():
    # hand count of the dense model (§3.1): Dense kernels+biases, 2 per BN feature, embeddings
    dense = lambda i, o: i * o + o  # noqa: E731
    enc = dense(784, 500) + dense(500, 500) + dense(500, 2000) + dense(2000, 5150) + 2 * (500 + 500 + 2000)
    dec = dense(100, 2000) + dense(2000, 500) + dense(500, 500) + dense(500, 784) + 2 * (2000 + 500 + 500)
    assert _trainable_count(_expected_variables(APPENDIX_B_DENSE, False)) == enc + dec + 6400 == 13_814_334


# --- BN and dropout as executed -----------------------------------------------------------------
def test_bn_is_a_frozen_affine_map_and_dropout_inert(tiny, rng):
    model, cfg = tiny.model, tiny.cfg
    w = _randomise(model, rng)
    x, eps, _ = _batch(cfg, rng)
    fwd = model.forward(x, eps)
    pre = "conv" if cfg.convolution else "fc"
    n_enc = len(cfg.conv_channels if cfg.convolution else cfg.dense_enc_dims)
    for i in range(1, n_enc + 1):
        gamma, beta = w[f"encoder.bn{i}.gamma"], w[f"encoder.bn{i}.beta"]
        expect = gamma * fwd[f"encoder.{pre}{i}"] * BN_SCALE + beta  # dropout before BN did nothing
        np.testing.assert_allclose(fwd[f"encoder.bn{i}"], expect, rtol=1e-5, atol=1e-6)
    # no batch statistics: example 0 alone gives the same posterior as inside the batch
    alone = model.forward(x[:1], eps[:1])
    np.testing.assert_allclose(alone["posterior.mu"][0], fwd["posterior.mu"][0], rtol=1e-5, atol=1e-6)
    # dropout never fires: identical outputs for identical eps
    again = model.forward(x, eps)
    for key in fwd:
        np.testing.assert_array_equal(again[key], fwd[key], err_msg=key)


def test_bn_moving_statistics_never_change(tiny, rng):
    model, cfg = tiny.model, tiny.cfg
    assert model.update_ops == []
    trainer = Trainer(cfg, model)
    x, eps, p = _batch(cfg, rng)
    for phase in ("vae", "som_init", "joint"):
        trainer.step(phase, x, 1e-2, eps=eps, p=p)
    w = model.get_weights()
    moving = [k for k in w if "moving_" in k]
    assert moving
    for k in moving:
        np.testing.assert_array_equal(w[k], np.zeros_like(w[k]) if k.endswith("mean") else np.ones_like(w[k]))
    assert trainer.global_step == 3


# --- posterior --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d3():
    f = _Fresh("tiny-dense", latent_dim=3, prior_var=1.5)
    yield f
    f.model.close()


def test_scale_tril_fill_order_and_kl_closed_form(d3, rng):
    model, cfg = d3.reset(), d3.cfg
    w = dict(d3.w0)
    mu = np.array([0.3, -1.2, 2.0], np.float32)
    r = np.arange(1, 7, dtype=np.float32)
    w["posterior.head.kernel"] = np.zeros_like(w["posterior.head.kernel"])
    w["posterior.head.bias"] = np.concatenate([mu, r])
    model.set_weights(w)
    x, eps, _ = _batch(cfg, rng, n=4)
    fwd = model.forward(x, eps)
    M = np_fill_tril(r, 3)
    L = np.tril(M, -1) + np.diag(softplus(np.diag(M)) + 1e-5)
    np.testing.assert_allclose(L, [[softplus(4) + 1e-5, 0, 0], [6, softplus(5) + 1e-5, 0], [3, 2, softplus(1) + 1e-5]])
    for i in range(4):
        np.testing.assert_allclose(fwd["posterior.mu"][i], mu, rtol=1e-6)
        np.testing.assert_allclose(fwd["posterior.scale_tril"][i], L, rtol=1e-6)
    np.testing.assert_allclose(fwd["z"], mu + eps @ L.T, rtol=1e-5, atol=1e-5)
    kl = model.losses(x, eps)["loss.elbo.kl"]
    np.testing.assert_allclose(kl, np_kl(mu.astype(np.float64), L, 1.5), rtol=1e-5)


def test_z_is_mu_plus_scale_tril_eps(tiny, rng):
    model, cfg = tiny.model, tiny.cfg
    _randomise(model, rng)
    x, eps, _ = _batch(cfg, rng)
    fwd = model.forward(x, eps)
    L = fwd["posterior.scale_tril"].astype(np.float64)
    assert np.all(np.triu(L, 1) == 0) and np.all(np.diagonal(L, axis1=1, axis2=2) > 0)
    expect = fwd["posterior.mu"] + np.einsum("bij,bj->bi", L, eps)
    np.testing.assert_allclose(fwd["z"], expect, rtol=1e-5, atol=1e-6)


# --- SOM, q and every loss term ------------------------------------------------------------------
def test_forward_keys_and_every_loss_term_vs_numpy(tiny, rng):
    model, cfg = tiny.model, tiny.cfg
    _randomise(model, rng)
    x, eps, p = _batch(cfg, rng)
    fwd = model.forward(x, eps)
    if cfg.convolution:
        keys = ["encoder.input"]
        for i in (1, 2, 3, 4):
            keys += [f"encoder.conv{i}", f"encoder.bn{i}"] + ([f"encoder.pool{i}"] if i <= 2 else [])
        keys += ["encoder.flatten"]
    else:
        keys = [f"encoder.{s}{i}" for i in (1, 2, 3) for s in ("fc", "bn")]
    keys += ["posterior.head", "posterior.mu", "posterior.scale_tril", "z"]
    if cfg.convolution:
        keys += ["decoder.fc1", "decoder.deconv1", "decoder.bn1", "decoder.deconv2", "decoder.bn2", "decoder.up1",
                 "decoder.deconv3", "decoder.bn3", "decoder.up2"]
    else:
        keys += [f"decoder.{s}{i}" for i in (1, 2, 3) for s in ("fc", "bn")]
    keys += ["decoder.logits", "som.z_dist", "som.q", "som.k"]
    assert list(fwd) == keys
    assert fwd["decoder.logits"].shape == (cfg.batch_size, 28, 28, 1) and fwd["som.k"].dtype == np.int64
    if cfg.convolution:
        np.testing.assert_array_equal(fwd["encoder.input"], x - np.float32(0.5))
    else:  # the dense decoder's logits are LeakyReLU(0.2) outputs: negative values are 0.2 * pre-activation
        w = model.get_weights()
        pre = fwd["decoder.bn3"] @ w["decoder.fc4.kernel"] + w["decoder.fc4.bias"]
        np.testing.assert_allclose(fwd["decoder.logits"].reshape(len(x), -1), np.where(pre > 0, pre, 0.2 * pre),
                                   rtol=1e-4, atol=1e-5)
    emb = model.get_weights()["som.embeddings"]
    expect, d, q, k = np_losses(cfg, x, fwd, emb, p)
    np.testing.assert_allclose(fwd["som.z_dist"], d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fwd["som.q"], q, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(fwd["som.k"], k)
    got = model.losses(x, eps, p)
    assert list(got) == list(expect)
    for key in expect:
        np.testing.assert_allclose(got[key], expect[key], rtol=2e-5, atol=1e-6, err_msg=key)
    # p=None means uniform p
    uniform = np.full_like(p, 1.0 / cfg.n_nodes)
    np.testing.assert_allclose(model.losses(x, eps)["loss.kl_pq"], np_losses(cfg, x, fwd, emb, uniform)[0]["loss.kl_pq"],
                               rtol=1e-4, atol=1e-6)


def test_target_distribution_and_q_all(tiny_dense, rng):
    model, cfg = tiny_dense.reset(), tiny_dense.cfg
    q = rng.dirichlet(np.ones(cfg.n_nodes), size=11)
    expect = np.empty_like(q)
    f = q.sum(0)
    for i in range(len(q)):
        row = [q[i, j] ** 2 / f[j] for j in range(q.shape[1])]
        expect[i] = np.array(row) / sum(row)
    np.testing.assert_allclose(target_distribution(q), expect, rtol=1e-12)
    x, eps, _ = _batch(cfg, rng, n=12)
    q_all = Trainer(cfg, model).q_all(x, chunk=5, eps=eps)
    assert q_all.shape == (12, cfg.n_nodes)
    for s in (0, 5, 10):
        np.testing.assert_array_equal(q_all[s : s + 5], model.forward(x[s : s + 5], eps[s : s + 5])["som.q"])
    # the original's split: 10 chunks of N // 10, the last one taking the remainder
    q10 = Trainer(cfg, model).q_all(x, eps=eps, n_chunks=10)  # 9 chunks of 1, then 3
    np.testing.assert_array_equal(q10[9:], model.forward(x[9:], eps[9:])["som.q"])
    np.testing.assert_allclose(q10, q_all, rtol=1e-5)  # other batch shapes: rounding only


# --- gradient flow (§5.8) ---------------------------------------------------------------------
def test_gradient_flow_table(tiny, rng):
    model, cfg = tiny.model, tiny.cfg
    x, eps, p = _batch(cfg, rng)
    names = set(model.get_weights())
    trainable = {n for n in names if "moving_" not in n}
    encoder = {n for n in trainable if n.startswith(("encoder.", "posterior."))}
    decoder = {n for n in trainable if n.startswith("decoder.")}
    assert encoder | decoder | {"som.embeddings"} == trainable
    table = {
        "loss.elbo": encoder | decoder,
        "loss.kl_pq": encoder | {"som.embeddings"},
        "loss.som": {"som.embeddings"},
        "loss.som_init": {"som.embeddings"},
        "loss.total": trainable,
    }
    for loss, expected in table.items():
        grads = model.gradients(loss, x, eps, p)
        assert set(grads) == expected, loss
        assert np.any(grads["som.embeddings" if "som.embeddings" in expected else "decoder.fc1.kernel"] != 0), loss


# --- optimiser ----------------------------------------------------------------------------------
def test_one_adam_step_matches_tf1_adam_in_numpy(tiny_dense, rng):
    model, cfg = tiny_dense.reset(), tiny_dense.cfg
    _randomise(model, rng)
    x, eps, p = _batch(cfg, rng)
    x[:, 0, 0, 0] = 0.0  # pixel 0 is off: row 0 of encoder.fc1.kernel gets an exactly-zero gradient
    w0 = model.get_weights()
    t = 7  # steps already taken: global step 7, powers b^(t+1) as TF1 keeps them
    state = model.get_optimizer_state()
    state["optim.global_step"] = np.int32(t)
    state["optim.beta1_power"] = np.float32(0.9 ** (t + 1))
    state["optim.beta2_power"] = np.float32(0.999 ** (t + 1))
    for k in state:
        if k.endswith("/adam_m"):
            state[k] = (1e-3 * rng.standard_normal(state[k].shape)).astype(np.float32)
        elif k.endswith("/adam_v"):
            state[k] = (1e-6 * rng.random(state[k].shape)).astype(np.float32)
    # where sqrt(v) ~ epsilon the epsilon-hat placement decides the step (zero gradient, stale slots)
    state["encoder.fc1.kernel/adam_m"][0] = 1e-8
    state["encoder.fc1.kernel/adam_v"][0] = 1e-16
    model.set_optimizer_state(state)
    grads = model.gradients("loss.total", x, eps, p)
    rec = Trainer(cfg, model).step("joint", x, 2e-3, eps=eps, p=p)
    b1p, b2p = np.float64(state["optim.beta1_power"]), np.float64(state["optim.beta2_power"])
    lr = 2e-3 * 0.99 ** math.floor(t / 1000)
    assert rec["lr"] == pytest.approx(lr, rel=1e-6) and rec["global_step"] == t + 1
    lr_t = lr * math.sqrt(1 - b2p) / (1 - b1p)
    w1, s1 = model.get_weights(), model.get_optimizer_state()
    assert set(grads) == {k for k in w0 if "moving_" not in k}
    # TF1 Adam holds beta1/beta2 as float32 tensors: 1 - float32(0.999) = 0.00099998713, not 1e-3
    b1, b2 = float(np.float32(0.9)), float(np.float32(0.999))
    for name, g in grads.items():
        g = g.astype(np.float64)
        m = state[f"{name}/adam_m"] + (g - state[f"{name}/adam_m"]) * (1 - b1)
        v = state[f"{name}/adam_v"] + (g**2 - state[f"{name}/adam_v"]) * (1 - b2)
        # float32 kernels vs float64 here: tolerances relative to each tensor's scale
        np.testing.assert_allclose(s1[f"{name}/adam_m"], m, rtol=1e-5, atol=1e-6 * np.abs(m).max(), err_msg=name)
        np.testing.assert_allclose(s1[f"{name}/adam_v"], v, rtol=1e-5, atol=1e-6 * np.abs(v).max(), err_msg=name)
        update = lr_t * m / (np.sqrt(v) + 1e-8)
        np.testing.assert_allclose(w1[name] - w0[name].astype(np.float64), -update, rtol=1e-4,
                                   atol=1e-7 * max(1.0, np.abs(w0[name]).max()), err_msg=name)
    # row 0: TF1 epsilon-hat gives lr_t * m / (sqrt(v) + eps); eps inside the bias correction
    # (PyTorch's placement) would give a step about 1.8x larger
    assert not np.any(grads["encoder.fc1.kernel"][0])
    m0, v0 = 0.9 * 1e-8, 0.999 * 1e-16
    step_tf1 = lr_t * m0 / (math.sqrt(v0) + 1e-8)
    step_torch = lr * (m0 / (1 - 0.9 ** (t + 1))) / (math.sqrt(v0 / (1 - 0.999 ** (t + 1))) + 1e-8)
    np.testing.assert_allclose(w0["encoder.fc1.kernel"][0] - w1["encoder.fc1.kernel"][0], step_tf1, rtol=1e-3)
    assert abs(step_torch / step_tf1 - 1) > 0.5
    assert s1["optim.beta1_power"] == pytest.approx(0.9 ** (t + 2), rel=1e-6)
    assert s1["optim.beta2_power"] == pytest.approx(0.999 ** (t + 2), rel=1e-6)
    # a VAE step leaves the embeddings and their Adam slots untouched (no gradient, no slot update)
    Trainer(cfg, model).step("vae", x, 2e-3, eps=eps)
    s2 = model.get_optimizer_state()
    np.testing.assert_array_equal(model.get_weights()["som.embeddings"], w1["som.embeddings"])
    for slot in ("adam_m", "adam_v"):
        np.testing.assert_array_equal(s2[f"som.embeddings/{slot}"], s1[f"som.embeddings/{slot}"])


def test_shared_global_step_and_beta_powers_across_phases(tiny_dense, rng):
    model, cfg = tiny_dense.reset(), tiny_dense.cfg
    trainer = Trainer(cfg, model)
    x, eps, p = _batch(cfg, rng)
    steps = [trainer.step("vae", x, 1e-3, eps=eps) for _ in range(3)]
    steps.append(trainer.step("som_init", x, 0.9, eps=eps))
    steps.append(trainer.step("joint", x, 1e-3, eps=eps, p=p))
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4, 5]
    state = model.get_optimizer_state()
    assert int(state["optim.global_step"]) == 5
    assert state["optim.beta1_power"] == pytest.approx(0.9**6, rel=1e-6)
    assert state["optim.beta2_power"] == pytest.approx(0.999**6, rel=1e-6)
    assert steps[3]["lr"] == pytest.approx(0.9, rel=1e-7)
    with pytest.raises(ValueError, match="needs the target distribution"):
        trainer.step("joint", x, 1e-3, eps=eps)


def test_learning_rate_staircase(tiny_dense, rng):
    model, cfg = tiny_dense.reset(), tiny_dense.cfg
    assert cfg.decay_steps == 1000 and cfg.decay_factor == 0.99
    state = model.get_optimizer_state()
    state["optim.global_step"] = np.int32(999)
    model.set_optimizer_state(state)
    trainer = Trainer(cfg, model)
    x, eps, _ = _batch(cfg, rng)
    a = trainer.step("vae", x, 0.5, eps=eps)
    b = trainer.step("vae", x, 0.5, eps=eps)
    assert (a["lr"], a["global_step"]) == (0.5, 1000)
    assert b["lr"] == float(np.float32(0.5) * np.float32(0.99)) and b["global_step"] == 1001


# --- weights and checkpoints ---------------------------------------------------------------------
def test_set_optimizer_state_is_strict(tiny_dense):
    """(Strict set_weights and bit-exact round trips: tests/test_contract.py, for every side.)"""
    model = tiny_dense.reset()
    state = model.get_optimizer_state()
    state["optim.global_step"] = np.zeros(3)
    with pytest.raises(TransplantError, match="optim.global_step"):
        model.set_optimizer_state(state)


def test_checkpoint_round_trip_with_original_names(tiny_dense, rng, tmp_path):
    model, cfg = tiny_dense.reset(), tiny_dense.cfg
    trainer = Trainer(cfg, model)
    x, eps, p = _batch(cfg, rng)
    trainer.step("joint", x, 1e-3, eps=eps, p=p)
    w, s = model.get_weights(), model.get_optimizer_state()
    prefix = model.save(str(tmp_path / "ckpt"))
    assert {n: tuple(shape) for n, shape in tf.train.list_variables(prefix)} == model.variable_shapes()
    trainer.step("joint", x, 1e-1, eps=eps, p=p)
    model.restore(prefix)
    for ref, got in ((w, model.get_weights()), (s, model.get_optimizer_state())):
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # a checkpoint whose Adam slots lack the `optimize/` prefix restores too
    with model.graph.as_default():
        short = {
            (n[len("optimize/"):] if n.endswith(("/Adam", "/Adam_1")) else n): v
            for n, v in model._vars.items()  # noqa: SLF001
        }
        other = tf.compat.v1.train.Saver(short).save(model.session, str(tmp_path / "short"), write_meta_graph=False)
    trainer.step("joint", x, 1e-1, eps=eps, p=p)
    model.restore(other)
    np.testing.assert_array_equal(model.get_weights()["som.embeddings"], w["som.embeddings"])
    conv = DPSOM(get_config("tiny-conv"))
    try:
        with pytest.raises(ValueError, match="missing"):
            conv.restore(prefix)
    finally:
        conv.close()


def test_original_checkpoint_reader_maps_by_the_table_and_lists_what_is_missing(tiny_dense, tmp_path):
    from harness.transplant import TransplantError, read_original_checkpoint

    model = tiny_dense.reset()
    prefix = model.save(str(tmp_path / "ckpt"))
    got = read_original_checkpoint(prefix, "dpsom", "dense")
    w = model.get_weights()
    assert list(got) == list(w)  # table order, canonical names
    for k in w:
        np.testing.assert_array_equal(got[k], w[k], err_msg=k)
    with model.graph.as_default():  # a checkpoint that lacks the SOM and the first encoder kernel
        keep = {n: v for n, v in model._vars.items() if n not in ("embeddings/embeddings", "z_e/encoder/dense/kernel")}  # noqa: SLF001
        partial = tf.compat.v1.train.Saver(keep).save(model.session, str(tmp_path / "partial"), write_meta_graph=False)
    with pytest.raises(TransplantError, match=r"missing variables of the original layout \(dpsom dense\): \['embeddings/embeddings', 'z_e/encoder/dense/kernel'\]"):
        read_original_checkpoint(partial, "dpsom", "dense")
    with pytest.raises(TransplantError, match="not a readable TF checkpoint"):
        read_original_checkpoint(str(tmp_path / "nothing-here"), "dpsom", "dense")


# --- native randomness, evaluation, training loop --------------------------------------------------
def test_native_sampling_seed_and_fresh_sessions(tiny_dense, rng):
    model, cfg = tiny_dense.reset(), tiny_dense.cfg
    x, _, _ = _batch(cfg, rng, n=15)
    a, b = model.forward(x)["z"], model.forward(x)["z"]
    assert not np.array_equal(a, b)  # a fresh ε per session.run
    other = DPSOM(cfg)  # same graph seed -> same initial weights and the same first sample
    try:
        for k, v in other.get_weights().items():
            np.testing.assert_array_equal(v, tiny_dense.w0[k], err_msg=k)
        assert np.all(np.abs(tiny_dense.w0["som.embeddings"]) < 0.1)
    finally:
        other.close()
    # skipping draws advances the native stream exactly as a run on that many images does
    z_of = model.forward_tensors["z"]
    with model.fresh_session() as session:  # same weights as `other`, stream at its start
        session.run(z_of, model._feed(x[:7]))  # noqa: SLF001
        z_run = session.run(z_of, model._feed(x))  # noqa: SLF001
    other = DPSOM(cfg)
    try:
        other.skip_native_eps(7)
        np.testing.assert_array_equal(other.forward(x)["z"], z_run)
    finally:
        other.close()
    k1, k2 = assign_clusters(model, x), assign_clusters(model, x)  # new session each: stream restarts
    np.testing.assert_array_equal(k1, k2)
    assert k1.shape == (15,)
    fwd = model.forward(x[:5])
    emb = model.get_weights()["som.embeddings"].reshape(cfg.n_nodes, -1)
    d = ((fwd["posterior.mu"][:, None, :].astype(np.float64) - emb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assign_clusters(model, x[:5], assignment="mean"), d.argmin(1))
    metrics = evaluate(model, x[:13], np.arange(13) % 3)  # 2 full batches of 5: 10 images
    assert metrics["n_evaluated"] == 10 and 0 <= metrics["nmi"] <= 1 and 0 <= metrics["purity"] <= 1


def test_native_eps_is_tfp_mvn_sample_layout():
    # Unfed, the reference draws eps as transpose(normal([D, B])) with the next graph op seed; TFP's
    # MultivariateNormalTriL.sample() (what the original runs) must give the same numbers.
    import tensorflow_probability as tfp

    B, D = 4, 3
    draws = []
    for build in ("tfp", "reference"):
        g = tf.Graph()
        with g.as_default():
            tf.compat.v1.set_random_seed(2020)
            if build == "tfp":
                dist = tfp.distributions.MultivariateNormalTriL(loc=tf.zeros([B, D]), scale_tril=tf.eye(D, batch_shape=[B]))
                out = dist.sample()
            else:
                out = tf.transpose(tf.random.normal(tf.stack([D, B])))
            with tf.compat.v1.Session() as sess:
                draws.append([sess.run(out) for _ in range(2)])
    np.testing.assert_array_equal(np.array(draws[0]), np.array(draws[1]))
    assert not np.array_equal(draws[0][0], draws[0][1])


def test_schedule_matches_the_original():
    plan = schedule(get_config("dense"))
    assert len(plan) == 15 + 20 + 300
    assert [e.lr_feed for e in plan[15:35:5]] == [0.9, 0.3, 0.1, 0.01]
    assert {e.phase for e in plan[:15]} == {"vae"} and {e.phase for e in plan[35:]} == {"joint"}
    assert len(plan) * (51_000 // 300) == 56_950  # global steps of a full MNIST run


def test_fit_checkpoints_resume_and_nan_guard(tmp_path, rng):
    cfg = get_config("tiny-dense")
    x = rng.random((22, 28, 28, 1)).astype(np.float32)  # 4 full batches of 5, 2 dropped
    data = SimpleNamespace(x_train=x, x_val=x[:12], x_eval=x[:12], y_eval=np.arange(12) % 4)
    first = Trainer(cfg).fit(data, out_dir=tmp_path / "run", progress=False, stop_after=2)
    assert (first["global_step"], first["epochs_done"], first["finished"]) == (8, 2, False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["global_step"] == 8
    second = Trainer(cfg)
    result = second.fit(data, out_dir=tmp_path / "run", resume=True, progress=False, keep_checkpoints=2)
    assert result["global_step"] == 6 * 4 and result["finished"]  # 1 VAE + 4 SOM-init + 1 joint epoch
    assert result["metrics"]["n_evaluated"] == 10
    assert len(list((tmp_path / "run" / "checkpoints").glob("epoch-*.index"))) == 2
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    second.model.close()
    # NaN guard: an absurd SOM-init LR blows the embeddings up in the first SOM epoch
    bad = dataclasses.replace(cfg, som_init_learning_rates=(1e30, 0.3, 0.1, 0.01))
    with pytest.raises(NonFiniteLossError, match=r"loss\.som_init.*phase 'som_init', epoch 2/6.*epoch-0001"):
        Trainer(bad).fit(data, out_dir=tmp_path / "nan", progress=False)


def test_cli_rejects_unknown_keys(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["variant=tiny-dense", "bogus=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.match(r"error: .*bogus.*valid keys.*run-level keys", err), err


# --- the reference's kernel library ----------------------------------------------------------------
def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("env, expected", [({}, "False"), ({"TF_ENABLE_ONEDNN_OPTS": "1"}, "True")], ids=["pinned", "user-on"])
def test_the_reference_runs_eigen_kernels_unless_the_user_asks_for_onednn(env, expected):
    """TF >= 2.9 turns oneDNN on by itself on AVX512_VNNI CPUs (Zen 5: IsMklEnabled() true with the
    variable unset); importing reference_tf first pins it off, and a user's explicit 1 still wins."""
    probe = "import reference_tf.dpsom.model; from harness.env import fingerprint; print(fingerprint()['tf.onednn'])"
    got = _python(probe, **env)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split()[-1] == expected


def test_tensorflow_loaded_before_the_pin_is_named_not_run():
    """TF reads TF_ENABLE_ONEDNN_OPTS once, when it loads: a session that imported it with oneDNN on and
    then asks for the reference with the variable at 0 would silently run the other kernel library."""
    code = ("import os, tensorflow; os.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'\n"
            "from reference_tf import require_tensorflow; require_tensorflow()")
    got = _python(code, TF_ENABLE_ONEDNN_OPTS="1")
    assert got.returncode != 0
    assert "imported before reference_tf pinned it" in got.stderr and "TF_ENABLE_ONEDNN_OPTS='0'" in got.stderr
