"""Tests of the DEKM TF reference (reference_tf/dekm) against independent expectations.

Every number is checked against something computed here without the reference's code: the
parameter counts and shapes of specs/dekm.md §3, TF's SAME padding by an impulse, the Keras
initialiser distributions (KS tests), ``model.fit``'s own update, a hand-derived gradient of the
clustering loss, a numpy Keras-Adam, numpy S_w / eigenvectors / targets, and sklearn / scipy
metrics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow not installed (reference_tf needs it)")

from harness.transplant import TransplantError  # noqa: E402
from reference_tf.dekm.config import get_config  # noqa: E402
from reference_tf.dekm.data import DataNotFoundError, _check_permutation, get_xy, load_mnist, native_permutation, pretrain_orders  # noqa: E402
from reference_tf.dekm.evaluate import cluster_metrics, get_acc_nmi  # noqa: E402
from reference_tf.dekm.losses import cluster_loss, cluster_loss_vector, make_fit_loss, recon_loss  # noqa: E402
from reference_tf.dekm.model import DEKM  # noqa: E402
from reference_tf.dekm.optim import make_optimizer, optimizer_state, set_optimizer_state  # noqa: E402
from reference_tf.dekm.train import Trainer, fit, refit  # noqa: E402

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf
stats = pytest.importorskip("scipy.stats")


@pytest.fixture(autouse=True)
def _seeded():
    """Fixed Python / numpy / TF seeds per test (the reference itself sets none, as the original):
    deterministic initial weights and k-means++ draws, so no test depends on a lucky draw."""
    tf.keras.utils.set_random_seed(1234)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, *shape))  # float64, as the original feeds


def _clustered(n=40, seed=0):
    """Four bands of bright rows on noise: an easy 4-cluster set for the tiny conv model."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.uniform(0, 0.3, (n, 28, 28, 1))
    for k in range(4):
        x[y == k, 7 * k: 7 * k + 7, :, 0] += 0.7
    return x, y


# --- architecture (§3) ------------------------------------------------------------------------
@pytest.mark.parametrize("variant,count", [("conv", 275_979), ("conv-usps", 262_539), ("conv-frgc", 297_997),
                                           ("conv-coil20", 275_979), ("dense-reuters", 4_548_010)])
def test_parameter_counts(variant, count):
    assert DEKM(get_config(variant)).param_count() == count


def test_mnist_encoder_count_and_pad3():
    m = DEKM(get_config("conv"))
    enc = sum(int(np.prod(s)) for k, s in m.weight_shapes().items() if k.startswith(("encoder.", "embedding.")))
    assert enc == 137_482
    assert m.keras.get_layer("conv2d_2").padding == "valid" and m.keras.get_layer("conv2d_transpose").padding == "valid"
    u = DEKM(get_config("conv-usps"))
    assert u.keras.get_layer("conv2d_2").padding == "same" and u.keras.get_layer("conv2d_transpose").padding == "same"


def test_forward_keys_shapes_conv():
    m = DEKM(get_config("conv"))
    x = _images(3, (28, 28, 1))
    out = m.forward(x)
    expected = {"encoder.conv1": (3, 14, 14, 32), "encoder.conv2": (3, 7, 7, 64), "encoder.conv3": (3, 3, 3, 128),
                "encoder.flatten": (3, 1152), "embedding": (3, 10), "decoder.fc1": (3, 1152),
                "decoder.deconv1": (3, 7, 7, 64), "decoder.deconv2": (3, 14, 14, 32), "decoder.deconv3": (3, 28, 28, 1),
                "reconstruction": (3, 784)}
    assert list(out) == list(expected)
    assert {k: v.shape for k, v in out.items()} == expected
    assert all(v.dtype == np.float32 for v in out.values())
    full = m(x).numpy()  # the original's output, float32 from a float64 input
    assert full.dtype == np.float32 and full.shape == (3, 794)
    np.testing.assert_array_equal(full[:, :10], out["embedding"])
    np.testing.assert_array_equal(full[:, 10:], out["reconstruction"])
    np.testing.assert_array_equal(out["encoder.flatten"], out["encoder.conv3"].reshape(3, -1))  # NHWC flatten
    np.testing.assert_array_equal(out["reconstruction"], out["decoder.deconv3"].reshape(3, -1))
    for key in ("encoder.conv1", "decoder.fc1", "decoder.deconv2"):
        assert out[key].min() >= 0.0  # post-ReLU


def test_forward_keys_shapes_dense_and_frgc():
    cfg = get_config("tiny-dense")
    out = DEKM(cfg).forward(_images(2, (784,)))
    assert [(k, v.shape[1]) for k, v in out.items()] == [
        ("encoder.fc1", 13), ("encoder.fc2", 11), ("encoder.fc3", 37), ("embedding", 6), ("decoder.fc1", 37),
        ("decoder.fc2", 11), ("decoder.fc3", 13), ("reconstruction", 784)]
    f = DEKM(get_config("conv-frgc")).forward(_images(2, (32, 32, 3)))
    assert f["encoder.conv3"].shape == (2, 4, 4, 128) and f["decoder.deconv1"].shape == (2, 8, 8, 64)
    assert f["reconstruction"].shape == (2, 3072)


def test_same_padding_impulse_stride2():
    """TF 'same' k5 s2 on 28: 1 row/column before, 2 after (a delta kernel at tap (0, 0) reads
    in[2o - 1]; at tap (4, 4) it reads in[2o + 3], so output 13 reads padding)."""
    m = DEKM(get_config("conv"))
    w = {k: np.zeros(s, np.float32) for k, s in m.weight_shapes().items()}
    m.set_weights(w)
    layer = m.layers["encoder.conv1"]
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 1, 1, 0] = 1.0
    x[0, 27, 27, 0] = 2.0
    for tap, hits in (((0, 0), {(1, 1): 1.0}), ((4, 4), {(12, 12): 2.0})):
        k = np.zeros((5, 5, 1, 32), np.float32)
        k[tap[0], tap[1], 0, 0] = 1.0
        layer.kernel.assign(k)
        out = m.forward(x)["encoder.conv1"][0, :, :, 0]
        got = {tuple(int(i) for i in ij): float(out[tuple(ij)]) for ij in np.argwhere(out != 0)}
        assert got == hits, (tap, got)
    # symmetric padding (2 before) would have put the (0, 0)-tap impulse nowhere (odd row 1)


def test_initialisers_keras_uniform_and_glorot():
    def ks_uniform(a, lim):
        return stats.kstest(a.ravel(), stats.uniform(loc=-lim, scale=2 * lim).cdf).pvalue

    m = DEKM(get_config("conv"))
    for source in (m.get_weights(), m.initial_weights()):
        for name, value in source.items():
            layer, kind = name.rsplit(".", 1)
            if kind == "bias":
                assert not value.any(), name
                continue
            if layer.startswith("encoder."):
                lim = 0.05
            else:
                rf = int(np.prod(value.shape[:-2])) if value.ndim == 4 else 1
                lim = math.sqrt(6.0 / ((value.shape[-2] + value.shape[-1]) * rf))
            assert np.abs(value).max() <= lim, name
            assert ks_uniform(value, lim) > 1e-4, name
    fresh = m.initial_weights()
    assert not np.array_equal(fresh["encoder.conv1.kernel"], m.get_weights()["encoder.conv1.kernel"])
    d = DEKM(get_config("tiny-dense"))
    for name, value in d.get_weights().items():
        if name.endswith(".kernel"):
            assert np.abs(value).max() <= 0.05 and ks_uniform(value, 0.05) > 1e-4, name
        else:
            assert not value.any()


def test_float64_twin_matches_float32():
    cfg = get_config("tiny-conv")
    m32, m64 = DEKM(cfg), DEKM(cfg, dtype="float64")
    m64.set_weights(m32.get_weights())
    x = _images(4, (28, 28, 1))
    a, b = m32.forward(x), m64.forward(x)
    assert b["embedding"].dtype == np.float64
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6, rtol=1e-5)


# --- weights and checkpoints ------------------------------------------------------------------
def test_set_weights_strict_lists_every_problem():
    m = DEKM(get_config("tiny-conv"))
    before = m.get_weights()
    bad = {k: np.ones_like(v) for k, v in before.items()}
    del bad["embedding.bias"]
    bad["decoder.deconv1.kernel"] = np.zeros((3, 3, 7, 5))  # (kh, kw, in, out): the wrong transposed layout
    bad["encoder.conv4.kernel"] = np.zeros(3)
    with pytest.raises(TransplantError) as err:
        m.set_weights(bad)
    msg = str(err.value)
    for name in ("embedding.bias", "decoder.deconv1.kernel", "encoder.conv4.kernel"):
        assert name in msg
    after = m.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing written


def test_h5_round_trip_and_layer_order(tmp_path):
    h5py = pytest.importorskip("h5py")
    for variant, names in (
        ("tiny-conv", ["input_1", "conv2d", "conv2d_1", "conv2d_2", "flatten", "embed", "dense", "reshape",
                       "conv2d_transpose", "conv2d_transpose_1", "conv2d_transpose_2", "flatten_1", "concatenate"]),
        ("tiny-dense", ["input_1"] + [f"dense_{i}" if i else "dense" for i in range(8)] + ["concatenate"]),
    ):
        cfg = get_config(variant)
        a = DEKM(cfg)
        w = {k: np.random.default_rng(1).normal(size=s).astype(np.float32) for k, s in a.weight_shapes().items()}
        a.set_weights(w)
        path = a.save_checkpoint(tmp_path / f"weight_base_{variant}.h5")
        with h5py.File(path, "r") as f:
            assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]] == names
            assert [n.decode() if isinstance(n, bytes) else n for n in f["embed" if cfg.convolution else "dense_3"].attrs[
                "weight_names"]] == (["embed/kernel:0", "embed/bias:0"] if cfg.convolution else ["dense_3/kernel:0", "dense_3/bias:0"])
        b = DEKM(cfg)
        b.load_checkpoint(path)
        got = b.get_weights()
        assert all(np.array_equal(w[k], got[k]) for k in w)


# --- losses and steps (§4) --------------------------------------------------------------------
def test_recon_loss_is_all_element_mean():
    x = _images(5, (28, 28, 1)).astype(np.float32)
    out = np.random.default_rng(2).normal(size=(5, 794)).astype(np.float32)
    got = float(recon_loss(x, tf.constant(out), 10))
    np.testing.assert_allclose(got, np.mean((out[:, 10:].astype(np.float64) - x.reshape(5, -1)) ** 2), rtol=1e-6)


@pytest.mark.parametrize("variant", ["tiny-conv", "tiny-dense"])
def test_pretrain_step_equals_model_fit(variant):
    cfg = get_config(variant)
    x = _images(7, cfg.input_shape, seed=3)  # float64, as the original's fit gets it
    tr = Trainer(cfg)
    ref = DEKM(cfg)
    ref.set_weights(tr.model.get_weights())
    ref.keras.compile(optimizer=make_optimizer(cfg), loss=make_fit_loss(cfg.hidden_units))
    hist = ref.keras.fit(x, x, batch_size=7, epochs=1, shuffle=False, verbose=0)
    res = tr.step("pretrain", x)
    assert res["global_step"] == 1 and res["lr"] == pytest.approx(1e-3)
    np.testing.assert_allclose(res["loss.recon"], hist.history["loss"][0], rtol=1e-6)
    a, b = tr.model.get_weights(), ref.get_weights()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_cluster_gradient_is_sum_and_closed_form():
    cfg = get_config("tiny-conv")
    tr = Trainer(cfg)
    rng = np.random.default_rng(4)
    B, d = 6, cfg.hidden_units
    x = _images(B, cfg.input_shape, seed=5)
    V = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    t = rng.normal(size=(B, d)).astype(np.float32)
    g = tr.gradients("loss.cluster", x, V=V, t=t)
    # B x the gradient of the batch mean
    variables = tr.model.variables()
    with tf.GradientTape() as tape:
        mean = tf.reduce_mean(cluster_loss_vector(tr.model(x)[:, :d], tf.constant(V), tf.constant(t)))
    gm = dict(zip(variables, tape.gradient(mean, list(variables.values()))))
    for k in variables:
        if k.startswith("decoder."):
            assert gm[k] is None or not np.any(gm[k]), k
            assert g[k].shape == variables[k].shape and not g[k].any(), k  # zeros, as TF reports them
        else:
            np.testing.assert_allclose(g[k], B * gm[k].numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(g[k]).max()))
    # closed form at the embedding layer: dL/dh_b = (2/d)(h_b V - t_b) V^T
    fw = tr.model.forward(x)
    h, flat = fw["embedding"].astype(np.float64), fw["encoder.flatten"].astype(np.float64)
    dh = (2.0 / d) * (h @ V - t) @ V.T
    np.testing.assert_allclose(g["embedding.bias"], dh.sum(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["embedding.kernel"], flat.T @ dh, rtol=1e-4, atol=1e-7)
    loss = float(cluster_loss(tf.constant(fw["embedding"]), tf.constant(V), tf.constant(t)))
    np.testing.assert_allclose(loss, np.sum(np.mean((h @ V - t) ** 2, axis=1)), rtol=1e-5)
    assert tr.compute_terms("cluster", x, V=V, t=t)["loss.cluster"] == pytest.approx(loss, rel=1e-6)


def test_keras_adam_matches_numpy_formula_and_state_round_trip():
    cfg = get_config("tiny-dense")
    tr = Trainer(cfg)
    x = _images(5, cfg.input_shape, seed=6)
    w = {k: v.astype(np.float64) for k, v in tr.model.get_weights().items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.zeros_like(v) for k, v in w.items()}
    b1, b2, eps, lr = 0.9, 0.999, 1e-7, 1e-3
    for step in range(1, 4):
        g = tr.gradients("loss.recon", x)
        tr.step("pretrain", x)
        lr_t = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        for k in w:
            m[k] += (g[k] - m[k]) * (1 - b1)
            v2[k] += (g[k] ** 2 - v2[k]) * (1 - b2)
            w[k] -= lr_t * m[k] / (np.sqrt(v2[k]) + eps)
    got = tr.model.get_weights()
    for k in w:
        np.testing.assert_allclose(got[k], w[k], atol=2e-7, rtol=1e-5, err_msg=k)
    state = optimizer_state(tr.optimizers["pretrain"], tr.model)
    assert int(state["optim.iterations"]) == 3
    np.testing.assert_allclose(state["encoder.fc1.kernel/adam_m"], m["encoder.fc1.kernel"], rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(state["decoder.out.bias/adam_v"], v2["decoder.out.bias"], rtol=1e-4, atol=1e-14)
    # strict write: into a fresh optimizer, then a bad state is refused naming the problems
    other = make_optimizer(cfg, tr.model)
    set_optimizer_state(other, tr.model, state)
    assert all(np.array_equal(a, optimizer_state(other, tr.model)[k]) for k, a in state.items())
    bad = dict(state)
    del bad["embedding.kernel/adam_m"]
    bad["optim.step"] = 0
    with pytest.raises(TransplantError, match=r"embedding\.kernel/adam_m.*optim\.step"):
        set_optimizer_state(other, tr.model, bad)


def test_two_fresh_optimizers():
    cfg = get_config("tiny-conv")
    tr = Trainer(cfg)
    x = _images(5, cfg.input_shape, seed=7)
    assert tr.optimizers == {}
    for _ in range(2):
        tr.step("pretrain", x)
    V, t = np.eye(6), np.full((5, 6), 0.1)
    expected = tr.gradients("loss.cluster", x, V=V, t=t)
    assert tr.optimizer_state("cluster")["optim.iterations"] == 0  # created fresh and built: zeros
    res = tr.step("cluster", x, V=V, t=t, return_gradients=True)
    assert set(res["gradients"]) == set(expected)
    assert all(np.array_equal(res["gradients"][k], expected[k]) for k in expected)
    assert res["global_step"] == 1 and int(tr.optimizers["pretrain"].iterations.numpy()) == 2
    assert tr.optimizers["cluster"] is not tr.optimizers["pretrain"]
    st = tr.optimizer_state("cluster")
    assert not any(st[k].any() for k in st if k.startswith("decoder."))  # zero gradients never move the decoder


def test_embed_all_float32_one_call():
    cfg = get_config("tiny-conv")
    tr = Trainer(cfg)
    x = _images(9, cfg.input_shape, seed=8)
    H = tr.embed_all(x)
    assert H.dtype == np.float32 and H.shape == (9, 6)
    np.testing.assert_array_equal(H, tr.model.forward(x)["embedding"])


# --- refit (§4.2, §5.3) -----------------------------------------------------------------------
def _blobs(n_per=30, d=5, K=3, seed=9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (K, d))
    H = np.concatenate([c + rng.normal(0, 0.3 + 0.2 * i, (n_per, d)) for i, c in enumerate(centres)])
    return H.astype(np.float32)


def test_refit_relabelling_scatter_targets():
    H = _blobs()
    N, K = len(H), 3
    r0 = refit(H, np.full(N, -1), K, n_init=5)
    assert r0.n_changed == N  # the -1 labels land in column K-1; nothing renamed
    perm = np.array([2, 0, 1])
    r1 = refit(H, perm[r0.labels], K, n_init=5)
    assert r1.n_changed == 0  # a pure relabelling
    moved = r0.labels.copy()
    moved[:4] = (moved[:4] + 1) % K
    assert refit(H, moved, K, n_init=5).n_changed == 4
    # S_w, eigen-decomposition and targets against numpy written here
    U = r0.centres
    assert U.dtype == np.float32 and r0.S_w.dtype == np.float32
    S = sum((H[r0.labels == k] - U[k]).T.astype(np.float64) @ (H[r0.labels == k] - U[k]) for k in range(K))
    np.testing.assert_allclose(r0.S_w, S, rtol=1e-5)
    assert np.all(np.diff(r0.eigvals) >= 0)
    np.testing.assert_allclose(np.linalg.eigvalsh(S), r0.eigvals, rtol=1e-4)
    np.testing.assert_allclose(r0.V.T @ r0.V, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(r0.S_w @ r0.V, r0.V * r0.eigvals, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(r0.targets[:, :-1], (H @ r0.V)[:, :-1], rtol=1e-6)
    np.testing.assert_allclose(r0.targets[:, -1], (U @ r0.V)[r0.labels, -1], rtol=1e-6)


def test_refit_injected_inits_keeps_lowest_inertia():
    H = _blobs(seed=10)
    good = np.stack([H[r * 30: (r + 1) * 30].mean(0) for r in range(3)])
    # a local optimum: two centres split blob 0, one sits between blobs 1 and 2
    bad = np.stack([good[0] + 0.1, good[0] - 0.1, (good[1] + good[2]) / 2])
    from sklearn.cluster import KMeans

    fits = [KMeans(3, init=c, n_init=1).fit(H) for c in (bad, good)]
    best = fits[int(np.argmin([f.inertia_ for f in fits]))]
    r = refit(H, np.full(len(H), -1), 3, n_init=2, inits=[bad, good])
    assert r.n_iter == best.n_iter_ and np.array_equal(r.labels, best.labels_)
    np.testing.assert_array_equal(r.centres, best.cluster_centers_)
    # ties: the first candidate is kept (the same optimum under two labellings)
    first = refit(H, np.full(len(H), -1), 3, n_init=2, inits=[good[[2, 0, 1]], good])
    assert np.array_equal(first.labels, KMeans(3, init=good[[2, 0, 1]], n_init=1).fit(H).labels_)
    assert not np.array_equal(first.labels, KMeans(3, init=good, n_init=1).fit(H).labels_)


# --- metrics (§6) -----------------------------------------------------------------------------
def test_get_acc_nmi_against_sklearn_scipy():
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import confusion_matrix, normalized_mutual_info_score

    rng = np.random.default_rng(11)
    y = rng.integers(0, 5, 300)
    y_pred = np.where(rng.uniform(size=300) < 0.7, (y + 2) % 5, rng.integers(0, 5, 300))
    keep = y_pred.copy()
    acc, nmi = get_acc_nmi(y, y_pred)
    assert np.array_equal(y_pred, keep)  # not modified
    c = confusion_matrix(y_pred, y)
    r, col = linear_sum_assignment(c, maximize=True)
    assert acc == round(c[r, col].sum() / 300, 5)
    assert nmi == round(normalized_mutual_info_score(y, y_pred, average_method="arithmetic"), 5)
    m = cluster_metrics(y, y_pred)
    assert m["acc"] == pytest.approx(c[r, col].sum() / 300, abs=1e-12)
    assert m["purity"] == pytest.approx(c.max(axis=1).sum() / 300, abs=1e-12)
    assert get_acc_nmi(y, (y + 3) % 5) == (1.0, 1.0)
    with pytest.raises(IndexError):
        get_acc_nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 2]))


# --- data ------------------------------------------------------------------------------------------
def test_pretrain_orders_windowed_and_permutation_check():
    orders = pretrain_orders(60, 2, buffer_size=8, seed=3)
    assert all(np.array_equal(np.sort(o), np.arange(60)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    assert max(int((o - np.arange(60)).max()) for o in orders) <= 7  # position p holds an index <= p + 7
    with pytest.raises(ValueError, match="not a permutation"):
        _check_permutation(np.zeros(4, np.int64), 4)


def test_get_xy_mnist_permutation_injected():
    try:
        x_tr, y_tr, x_te, y_te = load_mnist(download=False)
    except DataNotFoundError:
        pytest.skip("MNIST not found offline (set PARITY_DATA_DIR to a dir holding mnist/)")
    perm = np.random.default_rng(12).permutation(70_000)
    x, y = get_xy("MNIST", perm)
    assert x.shape == (70_000, 28, 28, 1) and x.dtype == np.float64 and x.max() == 1.0
    for i in (0, 1, 69_999):  # train then test, divided by 255. in float64, then reindexed
        j = perm[i]
        src, lab = (x_tr[j], y_tr[j]) if j < 60_000 else (x_te[j - 60_000], y_te[j - 60_000])
        np.testing.assert_array_equal(x[i, :, :, 0], src / 255.0)
        assert y[i] == lab
    p = native_permutation(50, shuffle_seed=7)
    assert np.array_equal(np.sort(p), np.arange(50))


# --- the whole schedule (§5) ------------------------------------------------------------------
class _SizeTrainer(Trainer):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sizes = []

    def step(self, phase, x, lr_feed=1e-3, V=None, t=None):
        if phase == "cluster":
            self.sizes.append(len(x))
        return super().step(phase, x, lr_feed, V, t)


def test_fit_native_end_to_end_stops():
    cfg = get_config("tiny-conv", pretrain_epochs=2, max_iter=12)
    x, y = _clustered(42)
    tr = Trainer(cfg)
    pre_model = tr.model
    seen = []
    records = fit(tr, x, y, on_step=seen.append)
    assert seen == records  # the stop record too
    pre = [r for r in records if r["phase"] == "pretrain"]
    assert len(pre) == 2 * 9 and [r["global_step"] for r in pre] == list(range(1, 19))
    assert all(np.isfinite(r["loss.recon"]) and r["loss.recon"] > 0 for r in pre)
    clu = [r for r in records if r["phase"] == "cluster"]
    assert tr.model is not pre_model  # a new model for the clustering phase, fresh Adam
    assert [r["global_step"] for r in clu] == list(range(1, len(clu) + 1))
    assert all(r["refit"] == i // 3 for i, r in enumerate(clu)) and clu[0]["n_changed"] == 42
    stop = records[-1]
    assert stop["phase"] == "stop" and stop["reason"] in ("tol", "max_iter")
    if stop["reason"] == "tol":  # stopped right after refit r (step 3r), before training on it
        assert len(clu) % 3 == 0 and stop["refits"] == len(clu) // 3 + 1
    else:
        assert len(clu) == 12 and stop["refits"] == 4
    assert len(stop["labels"]) == 42 and 0 <= stop["acc"] <= 1


def test_fit_replay_pointer_cap_and_empty_batch():
    x, y = _clustered(42, seed=1)
    cfg = get_config("tiny-conv", pretrain_epochs=1, max_iter=10, tol=-1.0)  # never stops by tol
    tr = _SizeTrainer(cfg)
    orders = [np.random.default_rng(2).permutation(42)]
    records = fit(tr, x, y, pretrain_orders=orders)
    pre = [r for r in records if r["phase"] == "pretrain"]
    assert len(pre) == 9 and pre[-1]["global_step"] == 9
    assert tr.sizes == [5] * 8 + [2, 5]  # index*B : min((index+1)*B, N), then back to 0
    assert records[-1]["reason"] == "max_iter" and records[-1]["refits"] == 4
    cfg0 = get_config("tiny-conv", pretrain_epochs=0, max_iter=12, tol=-1.0)
    with pytest.raises(ValueError, match="empty batch"):
        fit(Trainer(cfg0), x[:40], y[:40])  # N = 8 B: the 9th batch is empty
    with pytest.raises(ValueError, match="pretrain_orders"):
        fit(Trainer(cfg), x, y, pretrain_orders=[np.arange(41)])


def test_reference_refuses_deviations():
    cfg = get_config("tiny-conv", kernel_init="unit")
    for build in (DEKM, Trainer, make_optimizer):
        with pytest.raises(ValueError, match="kernel_init"):
            build(cfg)
