"""PyTorch port of DPSOM against independent expectations (hand computations, closed forms, torch.distributions)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ports.dpsom.config import DPSOMConfig, get_config, parse_overrides, replace
from ports.dpsom.losses import (
    bernoulli_nll,
    kl_posterior_prior,
    loss_commit,
    loss_som,
    loss_som_init,
    neighbour_nodes,
    target_distribution,
)
from ports.dpsom.model import DPSOM, TriLPosterior, student_t_q, tril_stats, z_dist_flat
from ports.dpsom.optim import TF1Adam, effective_learning_rate
from ports.dpsom.train import Trainer, fit, schedule

torch.set_default_dtype(torch.float32)


def _model(variant: str = "tiny-dense", seed: int = 0, **overrides) -> DPSOM:
    torch.manual_seed(seed)
    return DPSOM(get_config(variant, **overrides))


def _batch(cfg: DPSOMConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.random((cfg.batch_size, *cfg.image_shape), dtype=np.float32)
    eps = rng.standard_normal((cfg.batch_size, cfg.latent_dim), dtype=np.float32)
    return torch.from_numpy(x), torch.from_numpy(eps)


# --- config ----------------------------------------------------------------------------------


def test_config_effective_defaults_and_overrides():
    cfg = get_config("dense")
    assert (cfg.decay_steps, cfg.batch_size, cfg.latent_dim, cfg.som_dim, cfg.beta, cfg.gamma) == (1000, 300, 100, (8, 8), 0.25, 20.0)
    assert cfg.head_dim == 5150 and get_config("conv").conv_feature_shape == (7, 7, 256)
    assert get_config("dense-fmnist").beta == 0.4
    cfg2 = replace(cfg, **parse_overrides(["num_epochs=3", "convolution=True", "som_dim=4,4"]))
    assert (cfg2.num_epochs, cfg2.convolution, cfg2.som_dim) == (3, True, (4, 4))
    assert DPSOMConfig.from_dict(cfg2.to_dict()) == cfg2


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(KeyError, match=r"unknown DPSOM config key\(s\) \['num_epoch'\].*valid keys: .*'num_epochs'"):
        get_config("dense", num_epoch=3)
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_overrides(["num_epochs"])
    with pytest.raises(ValueError, match="expected True or False"):
        get_config("dense", convolution="maybe")


# --- posterior ---------------------------------------------------------------------------------


def test_posterior_fill_triangular_order_and_softplus_diagonal():
    # TFP: reshape [r[3:], reverse(r)] = (4,5,6,6,5,4,3,2,1) to 3x3 and keep the lower triangle.
    model = _model("tiny-dense", latent_dim=3)
    with torch.no_grad():
        model.posterior.head.weight.zero_()
        model.posterior.head.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 1, 2, 3, 4, 5, 6], dtype=torch.float32))
    head, mu, L = model.posterior(torch.zeros(1, model.posterior.head.in_features))
    sp = lambda v: math.log1p(math.exp(v)) + 1e-5  # noqa: E731
    expected = [[sp(4), 0, 0], [6, sp(5), 0], [3, 2, sp(1)]]
    np.testing.assert_allclose(mu[0].detach().numpy(), [0.5, -1.0, 2.0])
    np.testing.assert_allclose(L[0].detach().numpy(), expected, rtol=1e-6)  # float32 rounding of softplus


def _fill_scale_tril_composed(raw: torch.Tensor, d: int) -> torch.Tensor:
    """FillScaleTriL written as TFP composes it: concat, reverse, reshape, band part, diagonal softplus."""
    full = torch.cat([raw[:, d:], raw.flip(-1)], dim=1).view(-1, d, d)
    scale_tril = torch.tril(full)
    scale_tril.diagonal(dim1=-2, dim2=-1).copy_(torch.nn.functional.softplus(full.diagonal(dim1=-2, dim2=-1)) + 1e-5)
    return scale_tril


def _sample_composed(head: torch.Tensor, eps: torch.Tensor, d: int) -> tuple[torch.Tensor, ...]:
    """mu, L, z and the KL's statistics of L as autograd composes them from TFP's ops."""
    mu, scale_tril = head[:, :d], _fill_scale_tril_composed(head[:, d:], d)
    z = mu + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    return mu, scale_tril, z, (scale_tril.square().sum((-2, -1)), torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)).sum(-1))


@pytest.mark.parametrize("d, dtype", [(3, torch.float32), (100, torch.float32), (100, torch.float64)])
@pytest.mark.parametrize("use", ["sample", "split"])
def test_posterior_node_matches_the_composed_ops_bit_for_bit(d, dtype, use):
    """The one-node posterior (fill, sample and the KL's statistics of L, a packed backward) gives the
    composed ops' L, z, KL and gradients exactly, so the stored torch runs and baselines stay valid.
    Raw values span softplus' regimes (|r| up to 30 > its threshold 20). ``sample``: the step's use (z
    and the KL, as the VAE and joint losses take them); ``split``: L alone, consumed outside the node
    by a matmul, its square and its log-diagonal."""
    gen = torch.Generator().manual_seed(d)
    n = d * (d + 1) // 2
    head0 = torch.cat([torch.randn(300, d, generator=gen, dtype=dtype), (torch.randn(300, n, generator=gen, dtype=dtype) * 10).clamp(-30, 30)], 1)
    eps = torch.randn(300, d, generator=gen, dtype=dtype)
    posterior = TriLPosterior(1, d)

    def node(head):
        if use == "sample":
            return posterior.sample(head, eps, kl_stats=True)
        mu, scale_tril = posterior.split(head)  # z and the statistics from L by the composed ops
        return mu, scale_tril, mu + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1), tril_stats(scale_tril)

    got = []
    for forward in (lambda h: _sample_composed(h, eps, d), node):
        head = head0.clone().requires_grad_()
        mu, scale_tril, z, stats = forward(head)
        loss = z.square().sum() * 0.37 + kl_posterior_prior(mu, stats, 1.3)
        loss.backward()
        got.append((scale_tril.detach(), z.detach(), loss.detach(), head.grad))
    for ref, new in zip(*got):
        assert torch.equal(ref, new)
    assert (got[1][0].triu(1) == 0).all() and (got[1][3][:, d:] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_distance_node_matches_the_composed_ops_bit_for_bit(dtype):
    """z_dist_flat's one-node backward gives autograd's gradients of ``(z - m)².sum(-1)`` exactly, for z
    and the embeddings together and for the embeddings alone (the sg(z) path of L_SOM); its graph-free
    path the same distances."""
    gen = torch.Generator().manual_seed(1)
    z0, m0 = torch.randn(300, 100, generator=gen, dtype=dtype), 0.05 * torch.randn(64, 100, generator=gen, dtype=dtype)
    w = torch.rand(300, 64, generator=gen, dtype=dtype)
    for z_grad in (True, False):
        got = []
        for dist in (lambda z, m: (z.unsqueeze(1) - m.unsqueeze(0)).square().sum(-1), z_dist_flat):
            z, m = z0.clone().requires_grad_(z_grad), m0.clone().requires_grad_()
            d = dist(z, m)
            (w * torch.log1p(d)).sum().backward()  # a non-uniform upstream gradient, as q's
            got.append((d.detach(), z.grad, m.grad))
        (d_ref, gz_ref, gm_ref), (d_new, gz_new, gm_new) = got
        assert torch.equal(d_ref, d_new) and torch.equal(gm_ref, gm_new)
        assert (gz_new is None) if not z_grad else torch.equal(gz_ref, gz_new)
    with torch.no_grad():  # no graph: squared in place, the same floats
        assert torch.equal(z_dist_flat(z0, m0.clone().requires_grad_()), d_ref)


def test_sample_is_mu_plus_scale_times_eps():
    model = _model()
    x, eps = _batch(model.config)
    out = model(x, eps)
    expected = out["posterior.mu"].double() + torch.einsum("bij,bj->bi", out["posterior.scale_tril"].double(), eps.double())
    np.testing.assert_allclose(out["z"].detach().numpy(), expected.detach().numpy(), atol=1e-6)  # float32 matvec of 7 terms


@pytest.mark.parametrize("prior_std", [1.0, 1.7])
def test_kl_matches_torch_distributions(prior_std):
    model = _model()
    x, eps = _batch(model.config)
    out = model(x, eps)
    mu, L = out["posterior.mu"].double(), out["posterior.scale_tril"].double()
    q = torch.distributions.MultivariateNormal(mu, scale_tril=L)
    p = torch.distributions.MultivariateNormal(torch.zeros_like(mu), scale_tril=prior_std * torch.eye(mu.shape[1], dtype=torch.float64))
    expected = torch.distributions.kl_divergence(q, p).mean().item()
    assert kl_posterior_prior(mu, tril_stats(L), prior_std).item() == pytest.approx(expected, rel=1e-10)  # same math, float64
    assert all(torch.equal(a, b) for a, b in zip(out.kl_stats, tril_stats(out["posterior.scale_tril"])))  # the model's own


# --- losses on hand-checked arrays -------------------------------------------------------------


def test_student_t_q_hand_values():
    # alpha = 10: t = (1 + d/10)^-5.5; d = 0 -> 1, d = 10 -> 2^-5.5 = 0.0220970869; + 1e-7 each.
    q = student_t_q(torch.tensor([[0.0, 10.0]], dtype=torch.float64), alpha=10.0, eps=1e-7)
    t0, t1 = 1 + 1e-7, 2**-5.5 + 1e-7
    np.testing.assert_allclose(q.numpy(), [[t0 / (t0 + t1), t1 / (t0 + t1)]], rtol=1e-12)


def test_target_distribution_hand_values():
    q = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    # f = (1.2, 0.8); q^2/f = [[0.5333, 0.05], [0.1333, 0.45]]; row-normalised:
    expected = [[0.64 / 1.2 / (0.64 / 1.2 + 0.04 / 0.8), 0.04 / 0.8 / (0.64 / 1.2 + 0.04 / 0.8)],
                [0.16 / 1.2 / (0.16 / 1.2 + 0.36 / 0.8), 0.36 / 0.8 / (0.16 / 1.2 + 0.36 / 0.8)]]
    np.testing.assert_allclose(target_distribution(q).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(expected[0][0], 0.9142857142857143, rtol=1e-12)


def test_loss_commit_hand_value():
    p = torch.tensor([[0.5, 0.5], [1.0 - 1e-3, 1e-3]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 0.999 * math.log(0.999 / 0.5) + 0.001 * math.log(0.001 / 0.5)
    assert loss_commit(p, q).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    assert loss_commit(q, q).item() == 0.0


def test_torus_neighbours_3x3():
    # (self, up=(r+1), down=(r-1), right=(c+1), left=(c-1)) on a 3x3 torus, flat = 3r + c.
    got = neighbour_nodes(torch.tensor([4, 0, 8]), (3, 3)).tolist()
    assert got == [[4, 7, 1, 5, 3], [0, 3, 6, 1, 2], [8, 2, 5, 6, 7]]


def test_loss_som_closed_form_and_hand_case():
    # Uniform q_ng = 1/9: every log is -ln 9, four neighbours, Σ_j q_ij = 1 -> 4 ln 9.
    q = torch.softmax(torch.randn(4, 9, dtype=torch.float64), 1)
    assert loss_som(q, torch.full((4, 9), 1 / 9, dtype=torch.float64), (3, 3)).item() == pytest.approx(4 * math.log(9), rel=1e-12)
    # One example, q = one-hot at node 4 (centre): neighbours 7, 1, 5, 3.
    q_ng = torch.arange(1, 10, dtype=torch.float64).unsqueeze(0) / 45
    one_hot = torch.zeros(1, 9, dtype=torch.float64)
    one_hot[0, 4] = 1
    expected = -sum(math.log(v / 45) for v in (8, 2, 6, 4))
    assert loss_som(one_hot, q_ng, (3, 3)).item() == pytest.approx(expected, rel=1e-12)


def test_loss_som_init_hand_case():
    emb = torch.arange(9 * 2, dtype=torch.float64).reshape(9, 2)  # node j = (2j, 2j+1)
    z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    terms = loss_som_init(z, emb, torch.tensor([0]), (3, 3))
    nodes = [0, 3, 6, 1, 2]  # self, up, down, right, left of node 0
    sq = [(2 * j) ** 2 + (2 * j + 1) ** 2 for j in nodes]
    assert terms["loss.som_init.commit"].item() == pytest.approx(1 / 2)  # (0 + 1) / D
    assert terms["loss.som_init.som"].item() == pytest.approx(sum(sq) / 10)  # / (5 * D)
    assert terms["loss.som_init"].item() == pytest.approx(0.5 + sum(sq) / 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_som_init_loss_node_matches_the_composed_ops_bit_for_bit(dtype):
    """L_a as one node (a neighbour table, one gradient pass and one index_add_ per term) gives the
    composed ops' terms and the embeddings' gradient exactly: B = 300 on the 8x8 torus (busy nodes,
    many rows per node) and a few rows on a 3x5 one (idle nodes: zero gradient rows)."""
    for seed, (b, som_dim) in enumerate([(300, (8, 8)), (300, (8, 8)), (7, (3, 5))]):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(b, 100, generator=gen, dtype=dtype)
        emb0 = 0.05 * torch.randn(*som_dim, 100, generator=gen, dtype=dtype)
        k = torch.randint(0, som_dim[0] * som_dim[1], (b,), generator=gen)
        got = []
        for composed in (True, False):
            emb = emb0.clone().requires_grad_()
            flat = emb.reshape(-1, 100)
            if composed:
                nodes = neighbour_nodes(k, som_dim)
                commit = (z - flat.index_select(0, k)).square().mean()
                som = (z.unsqueeze(1) - flat.index_select(0, nodes.flatten()).view(*nodes.shape, -1)).square().mean()
                loss = som + commit
            else:
                terms = loss_som_init(z.clone().requires_grad_(), flat, k, som_dim)
                commit, som, loss = terms["loss.som_init.commit"], terms["loss.som_init.som"], terms["loss.som_init"]
            loss.backward()
            got.append((commit.detach(), som.detach(), loss.detach(), emb.grad))
        for ref, new in zip(*got):
            assert torch.equal(ref, new)
        assert (got[1][3] != 0).any()


def test_bernoulli_nll_matches_bce_with_logits():
    g = torch.Generator().manual_seed(3)
    logits, x = torch.randn(6, 28, 28, 1, generator=g, dtype=torch.float64) * 4, torch.rand(6, 28, 28, 1, generator=g, dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3)).mean()
    assert bernoulli_nll(logits, x).item() == pytest.approx(bce.item(), rel=1e-12)


# --- frozen BN, dropout, layout ----------------------------------------------------------------


def test_dense_packs_a_weight_that_stays_fixed_and_gives_the_same_floats():
    """Forwards at fixed weights (full-size dense encoder and head: the SOM initialisation's, an
    evaluation's) run on the weight packed into oneDNN's layout from the second one on, with the
    unpacked forward's floats; a weight update or another batch size goes back to the plain weight."""
    import copy

    from ports.dpsom.model import _ONEDNN, _ONEDNN_PACK, Trace

    if not (_ONEDNN and _ONEDNN_PACK):
        pytest.skip("this torch has no oneDNN linear / weight reorder")
    model = _model("dense")
    head = model.posterior.head
    gen = torch.Generator().manual_seed(4)
    for batch in (300, 17, 300):
        x = torch.rand(batch, 28, 28, 1, generator=gen)
        with torch.no_grad():
            outs = [model.posterior.head(model.encoder(x, Trace())) for _ in range(3)]
        assert head._packed[1] is not None and head._packed[1].is_mkldnn  # noqa: SLF001
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with torch.no_grad():
        head.weight.mul_(1.5)  # an update: the next forward is unpacked again, at the new values
    plain = model.posterior.head(model.encoder(x, Trace())).detach()
    assert head._packed[1] is None  # noqa: SLF001
    assert torch.equal(model.posterior.head(model.encoder(x, Trace())).detach(), plain)
    assert copy.deepcopy(head)._packed is None  # noqa: SLF001  (an opaque tensor is not copied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, channel_dim", [((300, 500), -1), ((30, 32, 28, 28), 1)])
def test_block_in_place_matches_the_composed_ops_bit_for_bit(dtype, shape, channel_dim):
    """A block's LeakyReLU in place on the layer output and the frozen BN's shift added in place give
    the out-of-place ops' values and gradients (input, gamma, beta) exactly; ties at 0 included."""
    from ports.dpsom.model import FrozenBatchNorm, Trace, _block

    gen = torch.Generator().manual_seed(2)
    pre0 = torch.randn(shape, generator=gen, dtype=dtype)
    pre0.view(-1)[::97] = 0.0  # the kink itself: the gradient's side from the result's sign
    c = shape[channel_dim]
    bn = FrozenBatchNorm(c, 1e-3, "frozen_affine", channel_dim).to(dtype)
    with torch.no_grad():
        bn.gamma.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
        bn.beta.copy_(torch.randn(c, generator=gen, dtype=dtype))
    w = torch.randn(shape, generator=gen, dtype=dtype)
    view = [1] * len(shape)
    view[channel_dim] = -1
    got = []
    for composed in (True, False):
        pre_leaf = pre0.clone().requires_grad_()
        pre = pre_leaf * 1.0  # a fresh non-leaf, as a layer's output
        bn.zero_grad()
        if composed:
            inv = bn.gamma * torch.rsqrt(bn.moving_variance + bn.eps)
            y = torch.nn.functional.leaky_relu(pre, 0.2) * inv.view(view) + (bn.beta - bn.moving_mean * inv).view(view)
        else:
            y = _block(pre, bn, 0.2, "after_activation", Trace(), "a", "b", spatial=len(shape) == 4)
        (w * y).sum().backward()
        got.append((y.detach(), pre_leaf.grad, bn.gamma.grad.clone(), bn.beta.grad.clone()))
    for ref, new in zip(*got):
        assert torch.equal(ref, new)


@pytest.mark.parametrize("variant", ["tiny-dense", "tiny-conv"])
def test_bn_is_frozen_affine_and_batch_independent(variant):
    trainer = Trainer(get_config(variant))
    model = trainer.model
    x, eps = _batch(model.config)
    out = model(x, eps)
    # At init gamma=1, beta=0, stats 0/1: BN* = x / sqrt(1 + 1e-3).
    np.testing.assert_allclose(out["encoder.bn1"].detach().numpy(), out[f"encoder.{'conv' if model.config.convolution else 'fc'}1"].detach().numpy() / math.sqrt(1.001), rtol=1e-6)
    alone = model(x[:1], eps[:1])["posterior.mu"]
    np.testing.assert_allclose(alone.detach().numpy(), out["posterior.mu"][:1].detach().numpy(), atol=1e-6)
    p = torch.full((x.shape[0], model.config.n_nodes), 1 / model.config.n_nodes)
    for phase in ("vae", "som_init", "joint"):
        trainer.step(phase, x, 1e-3, eps=eps, p=p)
    for name, buf in model.named_buffers():
        if name.endswith("moving_mean"):
            assert torch.count_nonzero(buf) == 0, name
        if name.endswith("moving_variance"):
            assert torch.all(buf == 1), name
    again = model(x, eps)
    assert torch.equal(again["z"], model(x, eps)["z"])  # no dropout, no batch statistics: repeatable


def test_conv_flatten_is_channels_last():
    model = _model("tiny-conv")
    x, eps = _batch(model.config)
    out = model(x, eps)
    np.testing.assert_array_equal(out["encoder.flatten"].detach().numpy(), out["encoder.bn4"].detach().numpy().reshape(x.shape[0], -1))
    assert out["encoder.bn4"].shape[1:] == (7, 7, 9)


def test_forward_keys_in_execution_order():
    dense = list(_model("tiny-dense")(*_batch(get_config("tiny-dense"))))
    assert dense[:2] == ["encoder.fc1", "encoder.bn1"] and dense[6:10] == ["posterior.head", "posterior.mu", "posterior.scale_tril", "z"]
    assert dense[-4:] == ["decoder.logits", "som.z_dist", "som.q", "som.k"]


def test_initialisers_follow_keras():
    from harness.adapters.dpsom import TorchDPSOM

    torch.manual_seed(0)
    model = TorchDPSOM(get_config("dense"))
    w = model.get_weights()
    limit = math.sqrt(6 / (2000 + 5150))
    k = w["posterior.head.kernel"]
    assert k.shape == (2000, 5150) and np.abs(k).max() <= limit
    assert k.std() == pytest.approx(limit / math.sqrt(3), rel=0.01)  # U(-l, l): sd l/sqrt(3); 10M draws
    assert np.all(w["posterior.head.bias"] == 0) and np.all(w["encoder.bn1.gamma"] == 1)
    emb = w["som.embeddings"]
    assert emb.shape == (8, 8, 100) and np.abs(emb).max() < 0.1
    # truncated N(0, 0.05) at 2 sd has sd 0.05 * 0.8796 = 0.04398; 6400 draws -> ~1% sampling error
    assert emb.std() == pytest.approx(0.04398, rel=0.05)
    assert model.trainer.model.param_count() == 13_814_334  # 11.95 M encoder + 1.85 M decoder + BN + 6 400 embeddings


# --- gradient flow (specs §5.8) ---------------------------------------------------------------


def _grad_owners(trainer: Trainer, phase: str, loss_key: str, x, eps, p) -> set[str]:
    terms = trainer.compute_terms(phase, x, eps, p)
    trainer.optimizer.zero_grad()
    terms[loss_key].backward()
    groups = set()
    for name, param in trainer.model.named_parameters():
        if param.grad is not None and torch.count_nonzero(param.grad) > 0:
            groups.add(name.split(".")[0])
    return groups


@pytest.mark.parametrize(
    "phase,loss_key,owners",
    [
        ("joint", "loss.elbo", {"encoder", "posterior", "decoder"}),
        ("joint", "loss.kl_pq", {"encoder", "posterior", "som"}),
        ("joint", "loss.som", {"som"}),
        ("som_init", "loss.som_init", {"som"}),
        ("joint", "loss.total", {"encoder", "posterior", "decoder", "som"}),
    ],
)
def test_gradient_flow_table(phase, loss_key, owners):
    trainer = Trainer(get_config("tiny-dense"))
    x, eps = _batch(trainer.config)
    p = torch.softmax(torch.randn(x.shape[0], trainer.config.n_nodes), 1)
    assert _grad_owners(trainer, phase, loss_key, x, eps, p) == owners


@pytest.mark.parametrize("onednn_backward", [True, False], ids=["onednn", "mkl"])
def test_dense_backward_matches_the_float64_closed_form_on_either_library(monkeypatch, onednn_backward):
    """Both branches of the Dense backward (oneDNN on an AVX-512 host, MKL elsewhere: each host runs one)
    against g W, gᵀ x and Σ g in float64. Measured (5 draws, 300 x 2000 -> 515): worst relative error
    1.1e-6 oneDNN, 5.1e-7 MKL, so 1e-5 is 10x float32 rounding; a wrong operand or transpose is O(1)."""
    from ports.dpsom import model as port_model

    if not port_model._ONEDNN:
        pytest.skip("torch without oneDNN: Dense runs F.linear")
    monkeypatch.setattr(port_model, "_ONEDNN_BACKWARD", onednn_backward)
    torch.manual_seed(0)
    x, layer, g = torch.randn(300, 2000, requires_grad=True), port_model.Dense(2000, 515), torch.randn(300, 515)
    (layer(x) * g).sum().backward()
    x64, w64, g64 = x.detach().double(), layer.weight.detach().double(), g.double()
    for got, want in ((x.grad, g64 @ w64), (layer.weight.grad, g64.t() @ x64), (layer.bias.grad, g64.sum(0))):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("variant", ["tiny-dense", "tiny-conv"])
def test_no_phase_gradient_sums_rows_in_thread_order(variant):
    """No backward node of any phase accumulates by ``index_put_`` (advanced indexing's
    ``IndexBackward0``): on CPU its threads add rows for the same index in any order unless torch's
    deterministic mode is on; before the SOM-init gathers took index_select, two fits of one dense run
    (1500 images, 35 steps, 2 threads) diverged from the first som_init step. Structural, because a race
    is not provoked on demand (two pytest workers on two cores run its threads one after the other)."""
    trainer = Trainer(get_config(variant))
    x, eps = _batch(trainer.config)
    p = torch.softmax(torch.randn(x.shape[0], trainer.config.n_nodes), 1)
    for phase, loss in (("vae", "loss.elbo"), ("som_init", "loss.som_init"), ("joint", "loss.total")):
        seen, todo, nodes = set(), [trainer.compute_terms(phase, x, eps, p)[loss].grad_fn], []
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            nodes.append(type(fn).__name__)
            todo += [f for f, _ in fn.next_functions]
        # the walk reached the parameters; the custom nodes' own backwards are tested bit for bit against
        # the composed ops above (_SOMInitLoss: index_add_, never index_put_)
        assert "AccumulateGrad" in nodes and "IndexBackward0" not in nodes and "IndexPutBackward0" not in nodes, (phase, sorted(set(nodes)))


# --- optimizer and schedule -------------------------------------------------------------------


def test_tf1_adam_one_step_by_hand():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = TF1Adam([("theta", theta)])
    theta.grad = torch.tensor([0.5, 0.1])
    opt.step(0.1)
    g = np.array([0.5, 0.1])
    m, v = 0.1 * g, 0.001 * g**2
    alpha = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = np.array([1.0, -2.0]) - alpha * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(theta.detach().numpy(), expected, rtol=1e-6)  # float32 arithmetic
    assert opt.global_step == 1 and opt.beta1_power == np.float32(0.9) * np.float32(0.9)


def test_tf1_adam_global_step_and_idle_parameters():
    a = torch.nn.Parameter(torch.tensor([1.0]))
    b = torch.nn.Parameter(torch.tensor([3.0]))
    opt = TF1Adam([("a", a), ("b", b)])
    for _ in range(3):  # "phase 1": only a has a gradient; b's slots stay untouched
        a.grad, b.grad = torch.tensor([0.2]), None
        opt.step(1e-3)
    assert b.item() == 3.0 and opt.m["b"].item() == 0.0
    a.grad, b.grad = None, torch.tensor([-0.4])
    opt.step(1e-3)
    t = 4  # b's first update uses the *global* t for bias correction
    alpha = 1e-3 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    expected = 3.0 - alpha * (0.1 * -0.4) / (math.sqrt(0.001 * 0.16) + 1e-8)
    assert b.item() == pytest.approx(expected, rel=1e-6)
    assert opt.global_step == 4 and opt.beta1_power == pytest.approx(0.9**5, rel=1e-6)


def test_tf1_adam_six_steps_vs_numpy_formula():
    # TF1 in numpy: β1, β2, ε are float32 constants; beta1_power / beta2_power are float32 variables
    # multiplied once per step; α = lr·√(1-beta2_power)/(1-beta1_power) is a float32 op;
    # m += (g-m)(1-β1); v += (g²-v)(1-β2); θ -= α·m/(√v+ε). Parameters in float64 so that only the
    # float32 parts TF really has remain.
    f32 = np.float32
    b1, b2 = f32(0.9), f32(0.999)
    g = np.random.default_rng(0).standard_normal((6, 5)) * 1e-4  # small gradients: ε matters
    theta, m, v = np.ones(5), np.zeros(5), np.zeros(5)
    b1p, b2p = b1, b2
    param = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = TF1Adam([("p", param)])
    for t in range(1, 7):
        m += (g[t - 1] - m) * (1 - float(b1))
        v += (g[t - 1] ** 2 - v) * (1 - float(b2))
        alpha = f32(1e-2) * np.sqrt(f32(1) - b2p) / (f32(1) - b1p)
        theta -= float(alpha) * m / (np.sqrt(v) + float(f32(1e-8)))
        b1p, b2p = f32(b1p * b1), f32(b2p * b2)
        param.grad = torch.from_numpy(g[t - 1].copy())
        opt.step(1e-2)
    # float64 everywhere else; torch's kernel orders the double operations differently (~1e-16)
    np.testing.assert_allclose(param.detach().numpy(), theta, rtol=1e-12)
    np.testing.assert_allclose(opt.v["p"].numpy(), v, rtol=1e-12)
    assert (opt.beta1_power, opt.beta2_power) == (b1p, b2p)


def test_learning_rate_staircase():
    assert effective_learning_rate(1e-3, 999, 1000, 0.99) == np.float32(1e-3)
    assert effective_learning_rate(1e-3, 1000, 1000, 0.99) == pytest.approx(0.99e-3, rel=1.2e-7)  # one float32 ulp
    assert effective_learning_rate(1e-3, 56950, 1000, 0.99) == pytest.approx(5.696e-4, rel=1e-3)  # spec App. A
    assert effective_learning_rate(0.9, 2550, 1000, 0.99) == pytest.approx(0.9 * 0.99**2, rel=1e-6)


def test_schedule_matches_original_phases():
    plan = schedule(get_config("dense"))
    assert len(plan) == 15 + 20 + 300
    assert [e.lr_feed for e in plan[15:35:5]] == [0.9, 0.3, 0.1, 0.01]
    assert plan[0].phase == "vae" and plan[15].phase == "som_init" and plan[35].phase == "joint"
    assert 170 * 15 == 2550 and 170 * 35 == 5950  # global steps at phase boundaries (spec §6.3)


# --- weights ----------------------------------------------------------------------------------


# Weight round trips and strict set_weights: tests/test_contract.py (one mixin for every side).


# --- training loop ----------------------------------------------------------------------------


def test_run_twice_is_deterministic():
    records = []
    for _ in range(2):
        trainer = Trainer(get_config("tiny-dense"), model=_model(seed=5))
        x, _ = _batch(trainer.config)
        records.append([trainer.step(ph, x, 1e-3, p=torch.full((5, 9), 1 / 9)) for ph in ("vae", "som_init", "joint")])
    assert records[0] == records[1]


@pytest.fixture
def deterministic():
    """torch's deterministic algorithms, as every run of the suite and both CLIs set them: without them
    the SOM-initialisation gradient (``embeddings[k]``'s backward, an accumulating index_put over
    [B, 5] rows) differs from call to call on 2 threads (measured: last-bit differences from the 3rd
    step of a dense run on; none on 1 thread or with the switch)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("variant, n", [("dense", 600), ("tiny-conv", 15)])
def test_som_init_reuses_the_frozen_encoder_exactly(variant, n, deterministic):
    """The SOM initialisation's steps take each batch's posterior head from ``frozen_heads`` (computed
    once: the encoder is frozen in that phase) and end bit for bit where steps that run the encoder
    themselves end: every record, every weight, every Adam slot. ``dense``: the real MNIST shapes
    (batch 300, the 2000 x 5150 head) on 2 batches; schedule 1 VAE + 4 x 2 SOM-init + 1 joint epochs,
    so the cache is built after the VAE epoch, reused across stages and dropped at the joint phase."""
    cfg = replace(get_config(variant), epochs_pretrain=1, som_init_epochs_per_stage=2, num_epochs=1)
    x = np.random.default_rng(0).random((n, 28, 28, 1), dtype=np.float32)
    runs, builds = [], []
    for cached in (True, False):
        torch.manual_seed(3)
        trainer = Trainer(cfg, model=DPSOM(cfg))
        if not cached:
            trainer.frozen_heads = lambda x_train: None  # every step runs the encoder
        else:
            real = trainer.frozen_heads
            trainer.frozen_heads = lambda x_train, t=trainer, real=real: builds.append(t._heads) or real(x_train)  # noqa: SLF001
        rng = np.random.default_rng(1)
        records = fit(trainer, x, None, eps=lambda shape, rng=rng: rng.standard_normal(shape, dtype=np.float32), progress=False)
        state = {**{k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                 **{f"m/{k}": v.clone() for k, v in trainer.optimizer.m.items()}}
        runs.append((records, state))
    assert len(builds) == 8 and builds[0] is None and all(b is builds[1] for b in builds[2:])  # built once, for 8 epochs
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_frozen_heads_follow_the_encoder_weights():
    """A change to any encoder weight (a VAE step, a copy into it) rebuilds the cache; SOM steps do not."""
    cfg = get_config("tiny-dense")
    trainer = Trainer(cfg, model=_model(seed=4))
    x = np.random.default_rng(0).random((10, 28, 28, 1), dtype=np.float32)
    first = trainer.frozen_heads(x)
    trainer.step("som_init", x[:5], 0.1)
    assert trainer.frozen_heads(x) is first
    assert trainer.frozen_heads(x.copy()) is not first  # another array
    again = trainer.frozen_heads(x)
    with torch.no_grad():
        trainer.model.encoder.fc1.weight.add_(1.0)
    changed = trainer.frozen_heads(x)
    assert changed is not again and not torch.equal(changed, again)
    trainer.step("vae", x[:5], 0.1)
    assert trainer.frozen_heads(x) is not changed
    for deviation in ({"bn_mode": "batch_stats"}, {"dropout_active": True}):  # the encoder's forward is not pure
        assert Trainer(get_config("tiny-dense", **deviation), model=_model(seed=4, **deviation)).frozen_heads(x) is None


def test_fit_checkpoints_resumes_and_stops_on_nan(tmp_path):
    cfg = get_config("tiny-dense")
    x = np.random.default_rng(0).random((12, 28, 28, 1), dtype=np.float32)
    trainer = Trainer(cfg, model=_model(seed=2))
    history = fit(trainer, x, tmp_path)
    n_epochs = len(schedule(cfg))
    assert len(history) == n_epochs * 2 and history[-1]["global_step"] == n_epochs * 2
    resumed = Trainer(cfg, model=_model(seed=9))
    assert fit(resumed, x, tmp_path, resume=True) == []  # everything done: nothing re-run
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), resumed.model.state_dict().values()))
    ckpt = (tmp_path / "checkpoint.pt").read_bytes()
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=r"non-finite loss\.elbo\.nll=nan at global step 0 \(phase vae, epoch 0\)"):
        fit(Trainer(cfg, model=_model(seed=2)), bad, tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt


def test_fit_reads_records_k_steps_at_a_time_with_the_same_steps(tmp_path):
    """``sync_every=k`` (the fast path's deferred host sync): the records arrive in bursts of k steps
    (and at each epoch's end), equal to k=1's bit for bit, and a non-finite term is still named at
    its own step before its epoch's checkpoint."""
    cfg = get_config("tiny-dense")
    x = np.random.default_rng(0).random((5 * cfg.batch_size, 28, 28, 1), dtype=np.float32)  # 5 steps per epoch

    def run(k: int, out=None, data=x):
        trainer, seen = Trainer(cfg, model=_model(seed=2)), []
        on_step = lambda r: seen.append({**r, "steps_issued": trainer.global_step})  # noqa: E731
        return fit(trainer, data, out, on_step=on_step, progress=False, sync_every=k), seen

    history, seen = run(1)
    assert [r["steps_issued"] for r in seen] == [r["global_step"] for r in seen]  # k=1: read at every step
    for k in (2, 50):
        history_k, seen_k = run(k)
        assert history_k == history
        assert len(seen_k) == len(seen) and all(
            a.keys() == b.keys() and all(np.array_equal(a[f], b[f]) if f == "p" and a[f] is not None else a[f] == b[f]
                                         for f in a if f != "steps_issued") for a, b in zip(seen, seen_k))
        issued = [r["steps_issued"] - 5 * r["epoch"] for r in seen_k]  # steps issued in this epoch when read
        assert issued == [min(5, k * (i // k + 1)) for i in range(5)] * (len(seen_k) // 5)
    bad = x.copy()
    bad[cfg.batch_size + 1, 3, 3, 0] = np.inf  # the second batch: global step 1
    with pytest.raises(FloatingPointError, match=r"non-finite loss\.elbo\.nll=(nan|inf) at global step 1 \(phase vae, epoch 0\)"):
        run(50, tmp_path / "nan", bad)
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="sync_every=0"):
        run(0)


# --- evaluation metrics (the port's own sklearn code vs harness.metrics) ----------------------


@pytest.mark.parametrize("n_clusters", [64, 10, 4])
def test_port_cluster_metrics_equal_harness_metrics(n_clusters):
    from harness import metrics as hm
    from ports.dpsom.evaluate import cluster_metrics

    rng = np.random.default_rng(n_clusters)
    y = rng.integers(0, 10, 1000)
    k = np.where(rng.random(1000) < 0.5, y % n_clusters, rng.integers(0, n_clusters, 1000))  # some signal
    k[k == 3] = 5  # an empty cluster id below the maximum
    for method in ("geometric", "arithmetic", "min", "max"):
        got = cluster_metrics(y, k, nmi_average_method=method)
        want = hm.cluster_metrics(y, k)
        want["nmi"] = hm.nmi(y, k, average_method=method)
        assert list(got) == list(want) and got == want, method  # same keys, bit-identical floats
        assert all(type(v) is float for v in got.values())


def test_port_evaluate_equals_harness_metrics_on_assignments():
    from harness import metrics as hm
    from ports.dpsom.evaluate import assign_clusters, evaluate

    cfg = get_config("tiny-dense", nmi_average_method="arithmetic")
    model = _model(seed=3)
    rng = np.random.default_rng(4)
    n = 3 * cfg.batch_size + 2  # the remainder is not evaluated
    x = rng.random((n, *cfg.image_shape), dtype=np.float32)
    y = rng.integers(0, 10, n)
    got = evaluate(model, x, y, cfg)
    k = assign_clusters(model, x, cfg)
    want = hm.cluster_metrics(y[: len(k)], k)
    want["nmi"] = hm.nmi(y[: len(k)], k, average_method="arithmetic")
    want["n_evaluated"] = 3 * cfg.batch_size
    assert got == want
    with pytest.raises(ValueError, match="integer"):
        evaluate(model, x, y.astype(np.float64), cfg)


# --- fast mode ---------------------------------------------------------------------------------


# torch.compile's tracer warns from its own internals (a non-leaf's .grad looked at, an autograd Function
# instantiated, a deprecated torch._prims_common.check in a lowering; the ports' functools.cache'd index tables,
# pure functions of a size and a device, traced without their cache): not the port's warnings
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("variant", ["tiny-dense", "tiny-conv"])
def test_compiled_steps_follow_the_eager_ones_to_float32_noise(variant):
    """``Trainer(compiled=True)`` (the timing tier's fast mode) really compiles each phase's step and
    trains the same model: from the same weights, batch and noise, two steps of every phase give loss
    terms and weights within float32 noise of the eager (parity-exact) steps, not bit for bit (the
    compiler's own GEMM and fused kernels). Measured here (Zen 5, 2 cores): loss terms up to 1.6e-7 (dense) and
    1.8e-7 (conv) relative, weights up to 5.3e-6 and 8.1e-6 of their tensor's largest |w| (18 of 41 and 22 of 49
    tensors bit-identical); bounded at 1e-5 and 1e-4 (Adam's first steps move each weight by about the learning
    rate whatever the gradient's size, so a gradient's last bits move a weight by a larger fraction)."""
    import copy

    from torch._dynamo.utils import counters

    cfg = get_config(variant)
    eager = Trainer(cfg, model=_model(variant, seed=3))
    fast = Trainer(cfg, model=copy.deepcopy(eager.model), compiled=True)
    x, eps = _batch(cfg)
    p = torch.softmax(torch.randn(x.shape[0], cfg.n_nodes, generator=torch.Generator().manual_seed(0)), 1)
    graphs = counters["stats"]["unique_graphs"]
    for phase, lr in (("vae", 1e-3), ("som_init", 0.9), ("joint", 1e-3)):
        for _ in range(2):
            want, got = eager.step(phase, x, lr, eps=eps, p=p), fast.step(phase, x, lr, eps=eps, p=p)
            assert got.keys() == want.keys() and got["global_step"] == want["global_step"]
            for k, v in want.items():
                assert abs(got[k] - v) <= 1e-5 * max(1.0, abs(v)), (phase, k, got[k], v)
    assert counters["stats"]["unique_graphs"] >= graphs + 3  # one graph (at least) per phase
    for (name, a), b in zip(eager.model.state_dict().items(), fast.model.state_dict().values(), strict=True):
        assert ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() < 1e-4, name


@pytest.mark.filterwarnings("ignore")  # torch.compile's own internals (see above)
def test_cli_fast_mode_trains_compiled_and_keeps_its_own_result_name(tmp_path, capsys):
    """``python -m ports.dpsom.train mode=fast``: the whole schedule with the step compiled and the fast
    switches recorded, its result beside (not over) the exact run's; bad ``mode=`` / ``device=`` values
    are one-line errors before any data is read."""
    from torch._dynamo.utils import counters

    from harness.timing import preserved_torch_state
    from ports.dpsom.train import main

    import os

    if not os.environ.get("PARITY_DATA_DIR"):
        pytest.skip("real MNIST absent: set PARITY_DATA_DIR (the CLI reads the full MNIST only)")
    # batches of 3 000: 20 steps an epoch, 120 in the schedule (1 + 4 + 1 epochs)
    base = ["variant=tiny-dense", "batch_size=3000", f"results_dir={tmp_path / 'results'}", "progress=false"]
    graphs = counters["stats"]["unique_graphs"]
    with preserved_torch_state():  # the CLI sets torch's global switches for its process
        result = main([*base, f"out_dir={tmp_path / 'fast'}", "mode=fast"])
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cuda.matmul.allow_tf32
    assert counters["stats"]["unique_graphs"] >= graphs + 3  # each phase's step compiled
    assert result["mode"] == "fast" and result["determinism"] | {"seed": 0} == {
        "seed": 0, "torch_deterministic": False, "torch_tf32": True, "cudnn_benchmark": True, "compiled": True}
    stored = json.loads((tmp_path / "results" / f"dpsom-tiny-dense-MNIST-torch-cpu-fast-seed{result['config']['random_seed']}.json").read_text())
    assert stored["mode"] == "fast" and stored["train_seconds"] > 0
    assert all(np.isfinite(v) for v in result["metrics"].values()) and result["metrics"]["n_evaluated"] == 9000  # 3 full batches of 10 000
    for bad, message in (("mode=turbo", "mode='turbo': expected one of ['exact', 'fast']"),
                         ("device=cuda:7", "device='cuda:7': "),  # no GPU here, or fewer than 8
                         ("device=tpu", "device='tpu'")):
        with pytest.raises(SystemExit) as exit_:
            main([*base, f"out_dir={tmp_path / 'bad'}", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()
