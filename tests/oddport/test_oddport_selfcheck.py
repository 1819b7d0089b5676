"""Self-checks of the deliberately different port (tests/oddport) on its own: no harness, no ports.dpsom."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from .model import OddConfig, OddDPSOM, neighbour_table
from .train import OddTrainer, learning_rate_at

TINY = OddConfig(latent_dim=7, som_dim=(3, 3), enc_dims=(13, 11, 37), prior_var=1.7, beta=0.4, gamma=3.0, theta=0.9, prior=0.6)
B, D, K = 5, 7, 9
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _model(dtype: torch.dtype, seed: int = 0) -> OddDPSOM:
    torch.manual_seed(seed)
    model = OddDPSOM(TINY).to(dtype)
    with torch.no_grad():  # non-trivial BN affine parameters, so that BN is visible
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _inputs(dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 28, 28, 1, generator=g, dtype=dtype)
    eps = torch.randn(B, D, generator=g, dtype=dtype)
    p = torch.rand(B, K, generator=g, dtype=dtype) + 0.05
    return x, eps, p / p.sum(1, keepdim=True)


def test_parameter_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in _model(torch.float32).named_parameters()}
    assert shapes == {
        "enc.0.weight": (13, 784), "enc.0.bias": (13,), "enc.1.weight": (13,), "enc.1.bias": (13,),
        "enc.3.weight": (11, 13), "enc.3.bias": (11,), "enc.4.weight": (11,), "enc.4.bias": (11,),
        "enc.6.weight": (37, 11), "enc.6.bias": (37,), "enc.7.weight": (37,), "enc.7.bias": (37,),
        "fc_mu.weight": (7, 37), "fc_mu.bias": (7,), "fc_logvar.weight": (7, 37), "fc_logvar.bias": (7,),
        "dec.0.weight": (37, 7), "dec.0.bias": (37,), "dec.1.weight": (37,), "dec.1.bias": (37,),
        "dec.3.weight": (11, 37), "dec.3.bias": (11,), "dec.4.weight": (11,), "dec.4.bias": (11,),
        "dec.6.weight": (13, 11), "dec.6.bias": (13,), "dec.7.weight": (13,), "dec.7.bias": (13,),
        "dec.9.weight": (784, 13), "dec.9.bias": (784,),
        "som_embeddings": (3, 3, 7),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_keys_shapes_and_blocks(dtype):
    model = _model(dtype)
    x, eps, _ = _inputs(dtype)
    with torch.no_grad():
        out = model(x, eps)
    widths = {"enc": (13, 11, 37), "dec": (37, 11, 13)}
    expected = [f"enc.{kind}{i}" for i in (1, 2, 3) for kind in ("bn", "act")] + ["mu", "logvar", "z"]
    expected += [f"dec.{kind}{i}" for i in (1, 2, 3) for kind in ("bn", "act")] + ["logits", "z_dist", "q", "bmu"]
    assert list(out) == expected
    for side, dims in widths.items():
        for i, w in enumerate(dims, 1):
            assert out[f"{side}.bn{i}"].shape == out[f"{side}.act{i}"].shape == (B, w)
    for key, shape in {"mu": (B, D), "logvar": (B, D), "z": (B, D), "logits": (B, 784), "z_dist": (B, K), "q": (B, K), "bmu": (B,)}.items():
        assert out[key].shape == shape, key
    assert all(v.dtype == dtype for k, v in out.items() if k != "bmu") and out["bmu"].dtype == torch.int64

    tol = TOL[dtype]
    # Linear -> BN (frozen affine, eps 1e-3) -> LeakyReLU(0.2f), in every block
    pre = model.enc[0](x.reshape(B, -1))
    bn = model.enc[1]
    torch.testing.assert_close(out["enc.bn1"], bn.weight * pre / math.sqrt(1.0 + 1e-3) + bn.bias, **tol)
    torch.testing.assert_close(out["enc.act1"], F.leaky_relu(out["enc.bn1"], 0.20000000298023224), rtol=0, atol=0)
    torch.testing.assert_close(out["dec.act3"], F.leaky_relu(out["dec.bn3"], 0.20000000298023224), rtol=0, atol=0)
    # diagonal reparameterisation and linear logits
    torch.testing.assert_close(out["z"], out["mu"] + torch.exp(0.5 * out["logvar"]) * eps, **tol)
    torch.testing.assert_close(out["logits"], model.dec[9](out["dec.act3"]), rtol=0, atol=0)
    # SOM
    m = model.som_embeddings.reshape(K, D)
    torch.testing.assert_close(out["z_dist"], ((out["z"][:, None] - m[None]) ** 2).sum(-1), **tol)
    t = 1e-7 + 1.0 / (1.0 + out["z_dist"] / 10.0) ** 5.5
    torch.testing.assert_close(out["q"], t / t.sum(1, keepdim=True), **tol)
    torch.testing.assert_close(out["q"].sum(1), torch.ones(B, dtype=dtype), **tol)
    assert torch.equal(out["bmu"], out["z_dist"].argmin(1))


def test_batchnorm_stays_frozen_in_train_mode():
    model = _model(torch.float32)
    model.train()
    assert model.training
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    x, eps, p = _inputs(torch.float32)
    OddTrainer(model=model).step("joint", x, 1e-3, eps, p)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    # one example alone gives the same mu as in the batch: no batch statistics
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1], eps[:1])["mu"], model(x, eps)["mu"][:1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_kl_matches_torch_distributions(dtype):
    model = _model(dtype)
    x, eps, p = _inputs(dtype)
    with torch.no_grad():
        out = model(x, eps)
        terms = model.loss_terms("all", x, eps, p)
    posterior = Independent(Normal(out["mu"], torch.exp(0.5 * out["logvar"])), 1)
    prior = Independent(Normal(torch.zeros_like(out["mu"]), torch.full_like(out["mu"], TINY.prior_var)), 1)
    torch.testing.assert_close(terms["kl"], kl_divergence(posterior, prior).mean(), **TOL[dtype])
    nll = F.binary_cross_entropy_with_logits(out["logits"], x.reshape(B, -1), reduction="none").sum(1).mean()
    torch.testing.assert_close(terms["nll"], nll, **TOL[dtype])
    torch.testing.assert_close(terms["elbo"], terms["nll"] + TINY.prior * terms["kl"], **TOL[dtype])


def test_neighbour_table_torus():
    nbr = neighbour_table((3, 3), with_self=True)
    assert nbr[0].tolist() == [0, 3, 6, 1, 2]  # self, up (r+1), down (r-1), right (c+1), left (c-1)
    assert nbr[8].tolist() == [8, 2, 5, 6, 7]
    assert torch.equal(neighbour_table((3, 3), with_self=False), nbr[:, 1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_som_losses_against_loops(dtype):
    model = _model(dtype)
    x, eps, p = _inputs(dtype)
    with torch.no_grad():
        out = model(x, eps)
        terms = model.loss_terms("all", x, eps, p)
    q, rows, cols = out["q"], 3, 3
    m = model.som_embeddings.detach().reshape(K, D)
    som, commit, som_s = 0.0, 0.0, 0.0
    for i in range(B):
        for j in range(K):
            r, c = divmod(j, cols)
            nbrs = [((r + 1) % rows) * cols + c, ((r - 1) % rows) * cols + c, r * cols + (c + 1) % cols, r * cols + (c - 1) % cols]
            som -= float(q[i, j]) * sum(math.log(float(q[i, e])) for e in nbrs)
        k = int(out["bmu"][i])
        r, c = divmod(k, cols)
        five = [k, ((r + 1) % rows) * cols + c, ((r - 1) % rows) * cols + c, r * cols + (c + 1) % cols, r * cols + (c - 1) % cols]
        commit += float(((out["z"][i] - m[k]) ** 2).sum())
        som_s += sum(float(((out["z"][i] - m[n]) ** 2).sum()) for n in five)
    tol = TOL[dtype]
    torch.testing.assert_close(terms["som"], torch.tensor(som / B, dtype=dtype), **tol)
    torch.testing.assert_close(terms["som_init_commit"], torch.tensor(commit / (B * D), dtype=dtype), **tol)
    torch.testing.assert_close(terms["som_init_som"], torch.tensor(som_s / (B * 5 * D), dtype=dtype), **tol)
    torch.testing.assert_close(terms["som_init"], terms["som_init_som"] + terms["som_init_commit"], rtol=0, atol=0)
    kl_pq = (p * torch.log(p / q)).sum(1).mean()
    torch.testing.assert_close(terms["kl_pq"], kl_pq, **tol)
    torch.testing.assert_close(terms["total"], TINY.theta * terms["elbo"] + TINY.gamma * terms["kl_pq"] + TINY.beta * terms["som"], **tol)


def _grad_names(model: OddDPSOM, loss: torch.Tensor) -> set[str]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, prm in model.named_parameters() if prm.grad is not None and bool(prm.grad.abs().sum() > 0)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_flow(dtype):
    model = _model(dtype)
    x, eps, p = _inputs(dtype)
    params = {n for n, _ in model.named_parameters()}
    enc = {n for n in params if n.startswith(("enc.", "fc_"))}
    dec = {n for n in params if n.startswith("dec.")}
    assert _grad_names(model, model.loss_terms("all", x, eps, p)["som_init"]) == {"som_embeddings"}
    assert _grad_names(model, model.loss_terms("all", x, eps, p)["som"]) == {"som_embeddings"}
    assert _grad_names(model, model.loss_terms("all", x, eps, p)["elbo"]) == enc | dec
    assert _grad_names(model, model.loss_terms("all", x, eps, p)["kl_pq"]) == enc | {"som_embeddings"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_som_init_step_updates_only_embeddings(dtype):
    trainer = OddTrainer(model=_model(dtype))
    x, eps, _ = _inputs(dtype)
    before = {n: prm.detach().clone() for n, prm in trainer.model.named_parameters()}
    record = trainer.step("som_init", x, 0.9, eps)
    assert set(record) == {"som_init_commit", "som_init_som", "som_init", "lr", "global_step"}
    named = dict(trainer.model.named_parameters())
    assert {n for n, prm in named.items() if prm.grad is not None} == {"som_embeddings"}
    changed = {n for n, prm in named.items() if not torch.equal(prm.detach(), before[n])}
    assert changed == {"som_embeddings"}
    state = trainer.optimizers["som_init"].state
    assert list(state) == [named["som_embeddings"]]


def test_learning_rate_staircase_5000():
    assert learning_rate_at(1e-3, 0) == 1e-3
    assert learning_rate_at(1e-3, 4999) == 1e-3
    assert learning_rate_at(1e-3, 5000) == pytest.approx(0.99e-3, rel=1e-15)
    assert learning_rate_at(1e-3, 9999) == pytest.approx(0.99e-3, rel=1e-15)
    assert learning_rate_at(1e-3, 10000) == pytest.approx(0.99**2 * 1e-3, rel=1e-15)
    trainer = OddTrainer(model=_model(torch.float64))
    assert trainer.learning_rate_at(0.5, 4999) == 0.5 and trainer.learning_rate_at(0.5, 5000) == pytest.approx(0.495)
    x, eps, _ = _inputs(torch.float64)
    trainer.global_step = 4999
    assert trainer.step("vae", x, 1e-3, eps)["lr"] == 1e-3
    assert trainer.optimizers["vae"].param_groups[0]["lr"] == 1e-3
    record = trainer.step("vae", x, 1e-3, eps)  # pre-increment step 5000
    assert record["lr"] == pytest.approx(0.99e-3, rel=1e-15) and record["global_step"] == 5001
    assert trainer.optimizers["vae"].param_groups[0]["lr"] == record["lr"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_adam_per_phase(dtype):
    trainer = OddTrainer(model=_model(dtype))
    x, eps, p = _inputs(dtype)
    named = dict(trainer.model.named_parameters())
    assert trainer.optimizers == {}
    trainer.step("vae", x, 1e-3, eps)
    assert list(trainer.optimizers) == ["vae"]
    trainer.step("vae", x, 1e-3, eps)
    vae_opt = trainer.optimizers["vae"]
    assert isinstance(vae_opt, torch.optim.Adam) and vae_opt.defaults["eps"] == 1e-8
    assert len(vae_opt.param_groups[0]["params"]) == len(named)  # over all parameters
    assert int(vae_opt.state[named["enc.0.weight"]]["step"]) == 2

    # som_init, at global step 2: a new Adam whose first update is torch's step 1 (bias corrections
    # cancel, eps after them): delta = -lr * g / (|g| + eps)
    emb0 = named["som_embeddings"].detach().clone()
    record = trainer.step("som_init", x, 0.3, eps)
    som_opt = trainer.optimizers["som_init"]
    assert som_opt is not vae_opt and record["global_step"] == 3
    assert int(som_opt.state[named["som_embeddings"]]["step"]) == 1
    g = named["som_embeddings"].grad
    expected = emb0 - 0.3 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(named["som_embeddings"].detach(), expected, **TOL[dtype])

    record = trainer.step("joint", x, 1e-3, eps, p)
    assert set(record) == {"nll", "kl", "elbo", "kl_pq", "som", "total", "lr", "global_step"}
    assert list(trainer.optimizers) == ["vae", "som_init", "joint"] and record["global_step"] == 4
    assert int(trainer.optimizers["joint"].state[named["enc.0.weight"]]["step"]) == 1
    # back to vae: its own Adam resumes, the other phases' moments are not shared
    trainer.step("vae", x, 1e-3, eps)
    assert trainer.optimizers["vae"] is vae_opt and int(vae_opt.state[named["enc.0.weight"]]["step"]) == 3
    assert trainer.global_step == 5


def test_step_returns_terms_before_update_and_apply_gradients():
    dtype = torch.float64
    trainer = OddTrainer(model=_model(dtype))
    x, eps, p = _inputs(dtype)
    with torch.no_grad():
        before = {k: float(v) for k, v in trainer.model.loss_terms("joint", x, eps, p).items()}
    record = trainer.step("joint", x, 1e-3, eps, p)
    assert {k: record[k] for k in before} == before
    named = dict(trainer.model.named_parameters())
    emb0 = named["som_embeddings"].detach().clone()
    grad = torch.full_like(emb0, 0.5)
    out = trainer.apply_gradients("som_init", {"som_embeddings": grad}, 0.1)
    assert out == {"lr": 0.1, "global_step": 2}
    torch.testing.assert_close(named["som_embeddings"].detach(), emb0 - 0.1 * 0.5 / (0.5 + 1e-8))
    with pytest.raises(KeyError, match="unknown parameter"):
        trainer.apply_gradients("som_init", {"nope": grad}, 0.1)
