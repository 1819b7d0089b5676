"""PyTorch port of DEKM against independent expectations: spec numbers (specs/dekm.md), numpy
re-implementations of TF's conv geometry and of the Keras Adam update, hand computations, sklearn/scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import confusion_matrix, normalized_mutual_info_score

from ports.dekm.config import get_config
from ports.dekm.data import (
    DataFormatError,
    DataNotFoundError,
    RawData,
    get_xy,
    load_mnist,
    load_usps,
    preprocess,
    pretrain_batches,
    resize_bilinear,
    windowed_shuffle,
)
from ports.dekm.evaluate import cluster_metrics, get_acc_nmi
from ports.dekm.losses import cluster_loss, cluster_loss_vector, recon_loss
from ports.dekm.model import DEKM, ConvTranspose2d, Conv2d, keras_fans, tf_same_pads
from ports.dekm.optim import KerasAdam, TorchAdam, make_optimizer
from ports.dekm.train import Trainer, fit, refit, relabelled_changes

torch.set_default_dtype(torch.float32)


def _model(variant: str = "tiny-conv", seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> DEKM:
    torch.manual_seed(seed)
    return DEKM(get_config(variant, **overrides)).to(dtype)


def _randomise(model: DEKM, seed: int = 3) -> DEKM:
    """Non-zero biases and O(1) kernels, so that geometry and layout errors cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.5))
    return model


# --- numpy TF: conv geometry written from TF's documented rules -------------------------------


def np_conv_tf(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, padding: str, s: int = 2) -> np.ndarray:
    """tf.nn.conv2d on NHWC with a (kh, kw, in, out) kernel: SAME pads ⌊P/2⌋ before, the rest after."""
    k, i = kernel.shape[0], x.shape[1]
    if padding == "same":
        o = -(-i // s)
        total = max((o - 1) * s + k - i, 0)
        x = np.pad(x, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)))
    else:
        o = (i - k) // s + 1
    out = np.zeros((x.shape[0], o, o, kernel.shape[3]))
    for a in range(k):
        for b in range(k):
            out += x[:, a : a + s * (o - 1) + 1 : s, b : b + s * (o - 1) + 1 : s, :] @ kernel[a, b]
    return out + bias


def np_conv_transpose_tf(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, padding: str, s: int = 2) -> np.ndarray:
    """tf.nn.conv2d_transpose (the adjoint of conv2d) by scatter; (kh, kw, out, in) kernel. SAME: output
    i·s, the window of the full output starting at the forward conv's ⌊P/2⌋ on that output size."""
    k, i = kernel.shape[0], x.shape[1]
    full = np.zeros((x.shape[0], (i - 1) * s + k, (i - 1) * s + k, kernel.shape[2]))
    for a in range(k):
        for b in range(k):
            full[:, a : a + s * (i - 1) + 1 : s, b : b + s * (i - 1) + 1 : s, :] += x @ kernel[a, b].T
    if padding == "same":
        o = i * s
        before = max((-(-o // s) - 1) * s + k - o, 0) // 2
        full = full[:, before : before + o, before : before + o, :]
    return full + bias


def _keras_kernel(module: torch.nn.Module) -> np.ndarray:
    w = module.weight.detach().numpy()
    return w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)  # Linear -> (in, out); convs -> (kh, kw, *, *)


def np_forward(model: DEKM, x: np.ndarray) -> dict[str, np.ndarray]:
    """The whole Keras model in numpy (NHWC throughout, Keras kernel layouts)."""
    cfg, enc, dec = model.config, model.encoder, model.decoder
    b = {n: m.bias.detach().numpy() for n, m in model.named_modules() if hasattr(m, "bias") and m.bias is not None}
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    out: dict[str, np.ndarray] = {}
    if cfg.convolution:
        h = x
        for name, pad in (("conv1", "same"), ("conv2", "same"), ("conv3", cfg.pad3)):
            h = out[f"encoder.{name}"] = relu(np_conv_tf(h, _keras_kernel(getattr(enc, name)), b[f"encoder.{name}"], pad))
        h = out["encoder.flatten"] = h.reshape(len(h), -1)
    else:
        h = x
        for i in (1, 2, 3):
            h = out[f"encoder.fc{i}"] = relu(h @ _keras_kernel(getattr(enc, f"fc{i}")) + b[f"encoder.fc{i}"])
    h = out["embedding"] = h @ _keras_kernel(model.embedding) + b["embedding"]
    if cfg.convolution:
        y = out["decoder.fc1"] = relu(h @ _keras_kernel(dec.fc1) + b["decoder.fc1"])
        y = y.reshape(len(y), *cfg.feature_shape)
        for name, pad, act in (("deconv1", cfg.pad3, relu), ("deconv2", "same", relu), ("deconv3", "same", lambda a: a)):
            y = out[f"decoder.{name}"] = act(np_conv_transpose_tf(y, _keras_kernel(getattr(dec, name)), b[f"decoder.{name}"], pad))
        out["reconstruction"] = y.reshape(len(y), -1)
    else:
        y = h
        for i in (1, 2, 3):
            y = out[f"decoder.fc{i}"] = relu(y @ _keras_kernel(getattr(dec, f"fc{i}")) + b[f"decoder.fc{i}"])
        out["reconstruction"] = y @ _keras_kernel(dec.out) + b["decoder.out"]
    return out


# --- architecture ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant,count", [("conv", 275_979), ("conv-usps", 262_539), ("conv-frgc", 297_997),
                                           ("conv-coil20", 275_979), ("dense-reuters", 4_548_010)])
def test_parameter_counts_match_spec(variant, count):
    model = DEKM(get_config(variant))
    assert model.param_count() == count
    if variant == "conv":  # rows 1-5 of §3.1
        assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(("encoder.", "embedding."))) == 137_482


def test_state_dict_keys_are_canonical_names():
    conv = ["encoder.conv1", "encoder.conv2", "encoder.conv3", "embedding", "decoder.fc1", "decoder.deconv1",
            "decoder.deconv2", "decoder.deconv3"]
    dense = ["encoder.fc1", "encoder.fc2", "encoder.fc3", "embedding", "decoder.fc1", "decoder.fc2", "decoder.fc3", "decoder.out"]
    for variant, names in (("tiny-conv", conv), ("tiny-dense", dense)):
        keys = list(DEKM(get_config(variant)).state_dict())
        assert keys == [f"{n}.{s}" for n in names for s in ("weight", "bias")]


def test_forward_keys_and_shapes_in_execution_order():
    cfg = get_config("conv-frgc")
    out = DEKM(cfg)(torch.zeros(2, 32, 32, 3))
    assert list(out) == ["encoder.conv1", "encoder.conv2", "encoder.conv3", "encoder.flatten", "embedding", "decoder.fc1",
                         "decoder.deconv1", "decoder.deconv2", "decoder.deconv3", "reconstruction"]
    assert out["encoder.conv3"].shape == (2, 4, 4, 128) and out["reconstruction"].shape == (2, 3072)
    assert out["decoder.deconv3"].shape == (2, 32, 32, 3) and out["encoder.flatten"].shape == (2, 2048)


# --- TF geometry -----------------------------------------------------------------------------


def test_tf_same_pads_are_asymmetric():
    assert [tf_same_pads(i, 5, 2) for i in (28, 14, 16, 8, 32)] == [(1, 2)] * 5
    assert [tf_same_pads(i, 3, 2) for i in (4, 8)] == [(0, 1)] * 2


def test_conv_impulse_sees_tf_padding_one_before():
    torch.manual_seed(0)
    conv = Conv2d(1, 1, 5, "same").double()
    x = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0
    y = conv(x)[0, 0].detach()
    w = conv.weight[0, 0].detach()
    assert y.shape == (14, 14)
    # TF pads 1 row/col before: output (0, 0)'s window starts at -1, the impulse meets kernel tap (1, 1)
    assert y[0, 0].item() == pytest.approx((w[1, 1] + conv.bias[0]).item(), abs=1e-12)
    sym = Conv2d(1, 1, 5, "same", "symmetric").double()
    sym.load_state_dict(conv.state_dict())
    assert sym(x)[0, 0, 0, 0].item() == pytest.approx((w[2, 2] + conv.bias[0]).item(), abs=1e-12)


@pytest.mark.parametrize("k,i,padding", [(5, 28, "same"), (5, 14, "same"), (3, 4, "same"), (3, 7, "valid"), (3, 8, "same")])
def test_conv_matches_numpy_tf(k, i, padding):
    torch.manual_seed(1)
    conv = Conv2d(3, 4, k, padding).double()
    x = np.random.default_rng(0).standard_normal((2, i, i, 3))
    got = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    want = np_conv_tf(x, _keras_kernel(conv), conv.bias.detach().numpy(), padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("k,i,padding", [(5, 7, "same"), (5, 14, "same"), (3, 2, "same"), (3, 3, "valid"), (3, 4, "same")])
def test_conv_transpose_matches_numpy_scatter_with_tf_crop(k, i, padding):
    torch.manual_seed(2)
    deconv = ConvTranspose2d(4, 3, k, padding).double()
    x = np.random.default_rng(1).standard_normal((2, i, i, 4))
    got = deconv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    want = np_conv_transpose_tf(x, _keras_kernel(deconv), deconv.bias.detach().numpy(), padding)
    o = 2 * i if padding == "same" else (i - 1) * 2 + k
    assert got.shape == want.shape == (2, o, o, 3)
    np.testing.assert_allclose(got, want, atol=1e-12)
    if padding == "same":  # the symmetric deviation: the right shape, the grid shifted by one pixel
        sym = ConvTranspose2d(4, 3, k, padding, "symmetric").double()
        sym.load_state_dict(deconv.state_dict())
        other = sym(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        assert other.shape == want.shape and np.abs(other - want).max() > 0.1 * np.abs(want).max()


@pytest.mark.parametrize("variant", ["tiny-conv", "tiny-dense", "conv-usps"])
def test_whole_forward_matches_numpy_keras_model(variant):
    model = _randomise(_model(variant))
    x = np.random.default_rng(4).random((3, *model.config.input_shape))
    with torch.no_grad():
        got = {k: v.numpy() for k, v in model(x).items()}
        h = model.embed(x).numpy()
    want = np_forward(model, x)
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(h, want["embedding"], rtol=1e-10, atol=1e-9)


def test_symmetric_padding_deviation_differs_and_keeps_valid_layers():
    tf_model = _randomise(_model("tiny-conv"))
    sym = _model("tiny-conv", padding="symmetric")
    sym.load_state_dict(tf_model.state_dict())  # same keys, same shapes
    assert sym.encoder.conv3.padding == (0, 0) and sym.decoder.deconv1.padding == (0, 0)  # MNIST: conv3/deconv1 valid
    assert sym.encoder.conv1.padding == (2, 2) and sym.decoder.deconv2.output_padding == (1, 1)
    x = torch.from_numpy(np.random.default_rng(5).random((4, 28, 28, 1)))
    with torch.no_grad():
        a, b = tf_model(x), sym(x)
    assert all(a[k].shape == b[k].shape for k in a)
    assert (a["embedding"] - b["embedding"]).abs().max() > 1e-2 * a["embedding"].abs().max()
    usps = _model("conv-usps", padding="symmetric")
    assert usps.encoder.conv3.padding == (1, 1) and usps.decoder.deconv1.output_padding == (1, 1)


def test_teacher_forcing_feeds_the_teachers_previous_tensor():
    model = _randomise(_model("tiny-conv"))
    x = np.random.default_rng(6).random((2, 28, 28, 1))
    h_teacher = np.random.default_rng(7).standard_normal((2, 6))
    conv2_teacher = np.random.default_rng(8).random((2, 7, 7, 5))
    with torch.no_grad():
        own = model(x)
        out = model(x, teacher={"embedding": h_teacher, "encoder.conv2": conv2_teacher})
    ref = np_forward(model, x)
    np.testing.assert_allclose(out["encoder.conv2"].numpy(), ref["encoder.conv2"], atol=1e-9)  # its own value is recorded
    np.testing.assert_allclose(out["encoder.conv1"].numpy(), own["encoder.conv1"].numpy(), atol=0)
    k3, b3 = _keras_kernel(model.encoder.conv3), model.encoder.conv3.bias.detach().numpy()
    conv3 = np.maximum(np_conv_tf(conv2_teacher, k3, b3, "valid"), 0)  # from the teacher's conv2
    np.testing.assert_allclose(out["encoder.conv3"].numpy(), conv3, atol=1e-9)
    h = conv3.reshape(2, -1) @ _keras_kernel(model.embedding) + model.embedding.bias.detach().numpy()
    np.testing.assert_allclose(out["embedding"].numpy(), h, atol=1e-9)
    k, b = _keras_kernel(model.decoder.fc1), model.decoder.fc1.bias.detach().numpy()
    np.testing.assert_allclose(out["decoder.fc1"].numpy(), np.maximum(h_teacher @ k + b, 0), atol=1e-9)
    with pytest.raises(ValueError, match=r"teacher\['embedding'\] has shape \(2, 5\)"):
        model(x, teacher={"embedding": np.zeros((2, 5))})


# --- initialisers ----------------------------------------------------------------------------


def test_keras_fans_for_transposed_kernels():
    assert keras_fans((3, 3, 64, 128)) == (576, 1152)  # Conv2DTranspose (kh, kw, out, in): fan_in counts out
    assert keras_fans((1152, 10)) == (1152, 10)


def test_initialisers_follow_keras():
    model = DEKM(get_config("conv"))
    sd_uniform = 0.1 / math.sqrt(12)  # U(-0.05, 0.05): 0.0289
    for name in ("conv2", "conv3"):
        w = getattr(model.encoder, name).weight
        assert w.abs().max() <= 0.05 and w.std().item() == pytest.approx(sd_uniform, rel=0.03)
    for module, fans in ((model.decoder.deconv1, (9 * 64, 9 * 128)), (model.decoder.deconv2, (25 * 32, 25 * 64)),
                         (model.embedding, (1152, 10)), (model.decoder.fc1, (10, 1152))):
        bound = math.sqrt(6.0 / sum(fans))
        w = module.weight
        assert 0.97 * bound < w.abs().max().item() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all((m.bias == 0).all() for m in model.modules() if getattr(m, "bias", None) is not None)
    dense = DEKM(get_config("dense"))
    ws = [m.weight for m in dense.modules() if isinstance(m, torch.nn.Linear)]
    assert len(ws) == 8 and all(w.abs().max() <= 0.05 for w in ws)
    assert dense.encoder.fc1.weight.std().item() == pytest.approx(sd_uniform, rel=0.01)
    unit = DEKM(get_config("tiny-conv", kernel_init="unit"))
    assert all(m.weight.min() >= 0 and m.weight.mean() > 0.4 for m in unit.modules() if hasattr(m, "weight"))


# --- losses ----------------------------------------------------------------------------------


def test_recon_loss_is_mean_over_all_elements_nhwc():
    x = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]], [[[0.0], [0.0]], [[0.0], [2.0]]]])  # [2, 2, 2, 1]
    rec = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert recon_loss(x, rec).item() == pytest.approx((1 + 4 + 9 + 16 + 4) / 8)
    x3 = torch.arange(8.0).reshape(1, 2, 2, 2)  # C = 2: NHWC flatten is 0..7 in order
    assert recon_loss(x3, torch.arange(8.0).reshape(1, 8)).item() == 0.0


def test_cluster_loss_hand_values_and_sum_vs_mean_gradient():
    h = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]], requires_grad=True)
    V = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swaps the axes
    t = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    # h·V = [[2, 1], [-1, 0], [0, 3]] -> squared errors per sample: (0 + 1)/2, (1 + 0)/2, (1 + 4)/2
    np.testing.assert_allclose(cluster_loss_vector(h, V, t).detach().numpy(), [0.5, 0.5, 2.5])
    assert cluster_loss(h, V, t).item() == pytest.approx(3.5)
    assert cluster_loss(h, V, t, "mean").item() == pytest.approx(3.5 / 3)
    (g_sum,) = torch.autograd.grad(cluster_loss(h, V, t), h)
    (g_mean,) = torch.autograd.grad(cluster_loss(h, V, t, "mean"), h)
    np.testing.assert_allclose(g_sum.numpy(), 3.0 * g_mean.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        cluster_loss(h, V, t, "none")


def test_cluster_phase_gradient_reaches_encoder_only():
    model = _model("tiny-conv")
    trainer = Trainer(model.config, model)
    x = np.random.default_rng(9).random((5, 28, 28, 1))
    loss = trainer.compute_terms("cluster", x, V=np.eye(6), t=np.zeros((5, 6)))["loss.cluster"]
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (not name.startswith("decoder.")), name


# --- optimizer -------------------------------------------------------------------------------


def _numpy_keras_adam(w: np.ndarray, grads: list[np.ndarray], lr=1e-3, b1=0.9, b2=0.999, eps=1e-7) -> list[np.ndarray]:
    """tf_keras' ``Adam.update_step`` in float64: ``tf.cast(self.beta_2, float64)`` turns the Python float
    into a float32 constant first, so the bias-correction powers (and lr, a float32 variable) use the
    float32-rounded values; the moment updates use ``1 - beta`` as a Python double."""
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    f32 = lambda a: float(np.float32(a))  # noqa: E731
    for t, g in enumerate(grads, start=1):
        lr_t = f32(lr) * math.sqrt(1 - f32(b2) ** t) / (1 - f32(b1) ** t)
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        w = w - lr_t * m / (np.sqrt(v) + eps)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_keras_adam_matches_numpy_keras_update(scale):
    rng = np.random.default_rng(10)
    w0 = rng.standard_normal(50)
    grads = [scale * rng.standard_normal(50) for _ in range(6)]
    want = _numpy_keras_adam(w0, grads)
    worst_of = {}
    for cls, kwargs in ((KerasAdam, {"epsilon": 1e-7}), (TorchAdam, {"eps": 1e-7})):
        p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        opt = cls([p], lr=1e-3, **kwargs)
        worst = 0.0
        for g, w in zip(grads, want):
            p.grad = torch.from_numpy(g.copy())
            opt.step()
            worst = max(worst, float(np.abs(p.detach().numpy() - w).max() / np.abs(w - w0).max()))
        assert opt.iterations == 6
        worst_of[cls] = worst
    assert worst_of[KerasAdam] <= 1e-6
    assert worst_of[TorchAdam] > (1e-2 if scale < 1 else 1e-5)  # ε after the bias correction: measurably off


def test_make_optimizer_and_fresh_per_phase():
    cfg = get_config("tiny-dense")
    params = list(DEKM(cfg).parameters())
    assert type(make_optimizer(params, cfg)) is KerasAdam
    opt = make_optimizer(params, get_config("tiny-dense", adam_epsilon="torch"))
    assert type(opt) is TorchAdam and opt.param_groups[0]["eps"] == 1e-8


# --- refit -----------------------------------------------------------------------------------


def _blobs(n_per: int = 12, k: int = 4, d: int = 6, seed: int = 11, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4
    y = np.repeat(np.arange(k), n_per)
    return (centres[y] + spread * rng.standard_normal((len(y), d))).astype(np.float32), y


def test_relabelling_counts():
    new = np.array([0, 0, 1, 1, 2, 2])
    assert relabelled_changes(new, np.full(6, -1), 3) == 6  # the initial -1 labels: everything changed
    assert relabelled_changes(new, np.array([2, 2, 0, 0, 1, 1]), 3) == 0  # a pure renaming
    assert relabelled_changes(new, np.array([2, 2, 0, 1, 1, 1]), 3) == 1  # one point moved


def test_refit_targets_rotation_and_change_count():
    H, y = _blobs()
    inits = [H[[0, 12, 24, 36]]]
    r0 = refit(H, np.full(len(H), -1), 4, 1, inits)
    assert r0.n_changed == len(H)
    assert r0.centres.dtype == np.float32 and r0.S_w.dtype == np.float32 and r0.V.dtype == np.float32
    np.testing.assert_array_equal(r0.labels, y)
    # S_w from its definition in float64, V orthonormal, eigenvalues ascending and V diagonalises S_w
    s64 = sum(np.outer(h - r0.centres[c], h - r0.centres[c]) for h, c in zip(H.astype(np.float64), r0.labels))
    np.testing.assert_allclose(r0.S_w, s64, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(r0.eigvals) >= 0)
    np.testing.assert_allclose(r0.V.T @ r0.V, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(r0.V.T @ s64 @ r0.V, np.diag(r0.eigvals), atol=1e-3 * r0.eigvals.max())
    np.testing.assert_allclose(r0.targets[:, :-1], (H @ r0.V)[:, :-1], rtol=1e-6)
    np.testing.assert_allclose(r0.targets[:, -1], (r0.centres @ r0.V)[r0.labels, -1], rtol=1e-6)
    # a second fit that only renames the clusters changes nothing
    r1 = refit(H, (r0.labels + 1) % 4, 4, 1, inits)
    assert r1.n_changed == 0


def test_refit_keeps_lowest_inertia_first_on_ties():
    H, _ = _blobs(seed=12, spread=1.5)
    good = H[[0, 12, 24, 36]]
    candidates = [H[[0, 1, 2, 3]], good[::-1], good]  # good[::-1]: the same partition, other label numbers
    fits = [KMeans(4, init=c, n_init=1).fit(H) for c in candidates]
    inertia = [f.inertia_ for f in fits]
    assert inertia[1] == inertia[2] and not np.array_equal(fits[1].labels_, fits[2].labels_)
    best = int(np.argmin(inertia))  # the first of the lowest
    r = refit(H, np.full(len(H), -1), 4, 3, candidates)
    np.testing.assert_array_equal(r.labels, fits[best].labels_)
    np.testing.assert_allclose(r.centres, fits[best].cluster_centers_)
    assert r.n_iter == fits[best].n_iter_


def test_cluster_loss_invariant_to_eigenvector_signs():
    H, _ = _blobs(seed=13)
    r = refit(H, np.full(len(H), -1), 4, 1, [H[[0, 12, 24, 36]]])
    signs = np.where(np.arange(6) % 2 == 0, -1.0, 1.0).astype(np.float32)
    V2 = r.V * signs
    t2 = H @ V2
    t2[:, -1] = (r.centres @ V2)[r.labels, -1]
    h = torch.from_numpy(H + 0.1 * np.random.default_rng(14).standard_normal(H.shape).astype(np.float32))
    a = cluster_loss(h, torch.from_numpy(r.V), torch.from_numpy(r.targets)).item()
    b = cluster_loss(h, torch.from_numpy(V2), torch.from_numpy(t2)).item()
    assert a > 0 and b == pytest.approx(a, rel=1e-5)


# --- evaluation ------------------------------------------------------------------------------


def test_get_acc_nmi_matches_sklearn_scipy():
    rng = np.random.default_rng(15)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.7, (y + 2) % 5, rng.integers(0, 5, 300))
    c = confusion_matrix(y, pred)
    rows, cols = linear_sum_assignment(c, maximize=True)
    acc, nmi = get_acc_nmi(y, pred)
    assert acc == round(c[rows, cols].sum() / 300, 5) and nmi == round(normalized_mutual_info_score(y, pred), 5)
    assert get_acc_nmi([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2]) == (1.0, 1.0)
    # fewer clusters than classes: the original's square table ignores the classes beyond N_p
    assert get_acc_nmi([0, 0, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1])[0] == pytest.approx(3 / 6)
    m = cluster_metrics(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 0, 1, 1, 1, 1]))
    assert m["acc"] == pytest.approx(5 / 6) and m["purity"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="3 predicted clusters but 2 classes"):
        get_acc_nmi([0, 0, 1], [0, 1, 2])


# --- data ------------------------------------------------------------------------------------


def test_windowed_shuffle_is_a_bounded_permutation():
    rng = np.random.default_rng(16)
    order = windowed_shuffle(1000, 100, rng)
    assert np.array_equal(np.sort(order), np.arange(1000))
    lead = order - np.arange(1000)
    assert lead.max() <= 99 and lead.max() >= 90  # position p holds an index <= p + buffer - 1
    assert not np.array_equal(order, windowed_shuffle(1000, 100, rng))
    assert np.array_equal(windowed_shuffle(7, 1, rng), np.arange(7))
    assert np.array_equal(np.sort(windowed_shuffle(7, 50, rng)), np.arange(7))
    assert [len(b) for b in pretrain_batches(np.arange(12), 5)] == [5, 5, 2]


def test_get_xy_mnist_preprocessing_and_permutation():
    rng = np.random.default_rng(17)
    arrays = {"x_train": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), "y_train": np.array([1, 2, 3, 4], np.uint8),
              "x_test": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), "y_test": np.array([5, 6], np.uint8)}
    raw = RawData("MNIST", arrays, "synthetic")
    x, y = preprocess(raw)
    assert x.dtype == np.float64 and x.shape == (6, 28, 28, 1) and y.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(x[5, :, :, 0], arrays["x_test"][1] / 255.0)
    perm = np.array([5, 0, 3, 1, 4, 2])
    xp, yp = get_xy(raw, perm)
    assert yp.tolist() == [6, 1, 4, 2, 5, 3] and np.array_equal(xp[0], x[5])
    assert get_xy(raw, perm, flatten=True)[0].shape == (6, 784)
    with pytest.raises(ValueError, match="permutation of range"):
        get_xy(raw, np.array([0, 0, 1, 2, 3, 4]))


def test_mnist_loader_errors_name_the_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\0" * 16)
        load_mnist(tmp_path)
    for stem in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\0" * 16)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: IDX magic number 0x00000000, expected 0x00000803"):
        load_mnist(tmp_path)
    with pytest.raises(DataNotFoundError, match="PARITY_DATA_DIR"):
        import os

        saved = os.environ.pop("PARITY_DATA_DIR", None)
        try:
            load_mnist(None)
        finally:
            if saved is not None:
                os.environ["PARITY_DATA_DIR"] = saved


def test_usps_h5_loader(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(18)
    with h5py.File(tmp_path / "USPS.h5", "w") as f:
        for name, n in (("train", 3), ("test", 2)):
            f.create_dataset(f"{name}/data", data=rng.random((n, 256)))
            f.create_dataset(f"{name}/target", data=np.arange(n))
    raw = load_usps(tmp_path)
    x, y = preprocess(raw)
    assert x.shape == (5, 16, 16, 1) and x.dtype == np.float32 and y.tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_allclose(x[3, :, :, 0].reshape(-1), raw.arrays["x_test"][0], rtol=1e-6)  # no /255
    with pytest.raises(DataNotFoundError, match="COIL20.h5"):
        from ports.dekm.data import load_coil20

        load_coil20(tmp_path)


def test_resize_bilinear_halves_by_block_means():
    x = np.random.default_rng(19).random((2, 8, 8, 1)).astype(np.float32)
    want = x.reshape(2, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_bilinear(x, 4), want, rtol=1e-6)


# --- training loop ---------------------------------------------------------------------------


def _synthetic(variant: str, n: int, seed: int = 20) -> tuple[np.ndarray, np.ndarray]:
    cfg = get_config(variant)
    rng = np.random.default_rng(seed)
    protos = rng.random((4, *cfg.input_shape))
    y = rng.permutation(np.arange(n) % 4)
    return np.clip(protos[y] + 0.05 * rng.standard_normal((n, *cfg.input_shape)), 0, 1), y


def _inits():
    def inits(refit_index: int, n_init: int, H):
        rng = np.random.default_rng(0)  # the same rows every refit: a stable partition
        return [H[rng.choice(len(H), 4, replace=False)] for _ in range(min(n_init, 3))]

    return inits


@pytest.mark.parametrize("variant", ["tiny-conv", "tiny-dense"])
def test_fit_runs_to_the_tol_stop(variant):
    x, y = _synthetic(variant, 23)
    torch.manual_seed(0)
    cfg = get_config(variant, tol=0.2)
    trainer = Trainer(cfg)
    seen = []
    records = fit(trainer, x, y, rng=np.random.default_rng(0), on_step=seen.append, kmeans_inits=_inits())
    assert seen == records
    pre = [r for r in records if r["phase"] == "pretrain"]
    clus = [r for r in records if r["phase"] == "cluster"]
    stop = records[-1]
    assert len(pre) == 5 and [r["global_step"] for r in pre] == [1, 2, 3, 4, 5]  # ceil(23 / 5) batches, 1 epoch
    assert stop["phase"] == "stop" and stop["reason"] == "tol" and stop["refits"] >= 2
    assert len(clus) == 3 * (stop["refits"] - 1)  # 3 steps per interval, the stop before the last refit's first step
    assert [r["global_step"] for r in clus] == list(range(1, len(clus) + 1))  # a fresh optimizer for the phase
    assert all(r["n_changed"] == 23 for r in clus if r["refit"] == 0)
    assert stop["labels"].shape == (23,) and 0.0 <= stop["acc"] <= 1.0
    assert set(trainer.optimizers) == {"pretrain", "cluster"} and trainer.optimizers["pretrain"] is not trainer.optimizers["cluster"]


def test_fit_batches_pointer_orders_and_max_iter(monkeypatch):
    x, y = _synthetic("tiny-dense", 12)
    torch.manual_seed(1)
    cfg = get_config("tiny-dense", tol=-1.0, max_iter=7, pretrain_epochs=2)
    trainer = Trainer(cfg)
    calls = []
    real_step = trainer.step

    def spy(phase, xb, lr_feed=1e-3, V=None, t=None):
        calls.append((phase, [int(np.flatnonzero((x.astype(np.float32) == row).all(axis=1))[0]) for row in np.asarray(xb)]))
        return real_step(phase, xb, lr_feed, V, t)

    monkeypatch.setattr(trainer, "step", spy)
    orders = [np.arange(12)[::-1], np.roll(np.arange(12), 3)]
    records = fit(trainer, x, y, pretrain_orders=orders, kmeans_inits=_inits())
    pre = [c[1] for c in calls if c[0] == "pretrain"]
    assert pre == [list(range(11, 6, -1)), list(range(6, 1, -1)), [1, 0], [9, 10, 11, 0, 1], [2, 3, 4, 5, 6], [7, 8]]
    clus = [c[1] for c in calls if c[0] == "cluster"]
    # index 0 -> 1 -> 2 ([10:12], partial) -> 0: the pointer rule, carried across the refits at steps 0, 3, 6
    assert clus == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11], [0, 1, 2, 3, 4]]
    stop = records[-1]
    assert stop["reason"] == "max_iter" and stop["refits"] == 3
    assert [r["refit"] for r in records if r["phase"] == "cluster"] == [0, 0, 0, 1, 1, 1, 2]


def test_fit_refuses_the_empty_batch():
    x, y = _synthetic("tiny-dense", 10)
    cfg = get_config("tiny-dense", tol=-1.0, max_iter=10, pretrain_epochs=0)
    with pytest.raises(ValueError, match=r"N=10 is a multiple of batch_size=5"):
        fit(Trainer(cfg), x, y, rng=np.random.default_rng(0))


def test_shared_optimizer_and_mean_reduction_deviations():
    x, y = _synthetic("tiny-dense", 11)
    torch.manual_seed(2)
    cfg = get_config("tiny-dense", tol=-1.0, max_iter=2, shared_optimizer=True, cluster_reduction="mean")
    trainer = Trainer(cfg)
    records = fit(trainer, x, y, rng=np.random.default_rng(1))
    assert trainer.optimizers["pretrain"] is trainer.optimizers["cluster"]
    assert [r["global_step"] for r in records[:-1]] == [1, 2, 3, 4, 5]  # 3 pretrain + 2 cluster steps, one counter
    # mean vs sum: the same batch gives a loss ratio of B
    H = trainer.embed_all(x)
    r = refit(H, np.full(11, -1), 4, 1, [H[:4]])
    sum_trainer = Trainer(get_config("tiny-dense"), trainer.model)
    a = trainer.compute_terms("cluster", x[:5], r.V, r.targets[:5])["loss.cluster"].item()
    b = sum_trainer.compute_terms("cluster", x[:5], np.repeat(r.V[None], 5, 0), r.targets[:5])["loss.cluster"].item()
    assert b == pytest.approx(5 * a, rel=1e-6)


def test_trainer_step_reports_loss_before_update_and_lr():
    model = _model("tiny-dense", dtype=torch.float32)
    trainer = Trainer(model.config, model)
    x = np.random.default_rng(21).random((5, 784))
    before = trainer.compute_terms("pretrain", x)["loss.recon"].item()
    rec = trainer.step("pretrain", x, lr_feed=5e-4)
    assert rec["loss.recon"] == pytest.approx(before, rel=1e-6) and rec["lr"] == 5e-4 and rec["global_step"] == 1
    assert trainer.optimizers["pretrain"].param_groups[0]["lr"] == 5e-4
    assert trainer.compute_terms("pretrain", x)["loss.recon"].item() < before
    H = trainer.embed_all(x)
    assert H.dtype == np.float32 and H.shape == (5, 6)
    np.testing.assert_allclose(trainer.embed_all(x, chunk=2), H, rtol=1e-5, atol=1e-6)
