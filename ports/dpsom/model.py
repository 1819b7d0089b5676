"""DPSOM in PyTorch, faithful to the original TensorFlow graph as executed.

Paper: Manduchi et al., "DPSOM: Deep Probabilistic Clustering with Self-Organizing Maps",
arXiv 1910.01590 (CHIL 2021 for T-DPSOM). Original code: github ratschlab/dpsom,
``dpsom/DPSOM_model.py`` at eb41e7d (model state of 8e3cddc). Reference: ``reference_tf/dpsom``.

What "faithful" means here (specs/dpsom.md §1, §3, §4):

* BatchNormalization is a frozen affine map ``gamma * (x - 0) / sqrt(1 + 1e-3) + beta``: the original
  never sets Keras' learning phase, so BN runs in inference mode with moving statistics that never
  change. It comes *after* the LeakyReLU (and after the inert dropout).
* Dropout(0.4) is declared by the original but never fires, so it is absent here.
* The posterior is a full-covariance Gaussian: a ``D + D(D+1)/2`` head filled into a lower-triangular
  scale in TFP's ``fill_triangular`` order, diagonal ``softplus + 1e-5``.
* The dense decoder applies LeakyReLU(0.2) to the Bernoulli logits; the conv decoder's first Dense
  has LeakyReLU and is reshaped channels-last.
* Keras initialisers: Glorot-uniform kernels, zero biases, BN gamma 1 / beta 0, embeddings from a
  truncated normal (sd 0.05, cut at 2 sd).

Deviations are explicit config switches, none on by default: ``bn_mode="batch_stats"``,
``bn_order="before_activation"`` (Dense/Conv -> BN -> LeakyReLU -> Dropout, the public port's
dense ordering) and ``dropout_active=True`` (Dropout(``dropout``) fires in training mode, in the
dense encoder where the original declares it). The SOM index is row-major on a torus (node k at row
k // C, column k % C of the (R, C) grid): the original's own index (row k // som_dim[0], see
config.SOM_INDEXES) equals it on square grids, the only ones ``som_index="original"`` admits, and a
non-square grid runs under the declared correction ``som_index="row_major"``. ``forward`` returns every named intermediate in
canonical (TF/NHWC) layout, in execution order; whatever the order, ``*.bnN`` is the BN output and
``*.fcN`` / ``*.convN`` / ``*.deconvN`` the LeakyReLU output of block N.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EMBEDDING_INIT_STDDEV, TRIL_DIAG_SHIFT, DPSOMConfig


def _glorot(module: nn.Module) -> nn.Module:
    """Keras defaults: Glorot-uniform kernel (torch's fan rules agree for Linear/Conv/ConvTranspose), zero bias."""
    nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T + b``: the forward GEMM by oneDNN (what TF's CPU MatMul runs); the two backward GEMMs by
    oneDNN too on an AVX-512 host, by ``torch.mm`` (MKL) on an AVX2 one: each the faster one measured
    (2 threads, batch 300, posterior head 2000 x 5150; oneDNN's operands are transposed views, no copy).
    Zen 1 (AVX2, 2 GHz): forward oneDNN 145 ms vs MKL 189; grad_input MKL 154 vs oneDNN 228;
    grad_weight MKL 155 vs oneDNN 174. Zen 5 (AVX-512, where MKL does not take its AVX-512 path on an
    AMD CPU): forward oneDNN 15.7 vs MKL 31.0; grad_input oneDNN 12.8 vs MKL 29.0; grad_weight oneDNN
    24.2 vs MKL 37.8 (and 1.5-2.2x on every other dense layer). Same IEEE float32 arithmetic, another
    summation order: one rule per host, so one host's runs are bit-reproducible."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, packed: Tensor) -> Tensor:  # type: ignore[override]
        """``packed``: ``weight`` itself, or the same values in oneDNN's blocked layout (:meth:`Dense.forward_weight`)."""
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        if _ONEDNN_BACKWARD:  # _linear_pointwise(a, b) = a b^T
            gx = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
            gw = torch.ops.mkldnn._linear_pointwise(grad.t(), x.t(), None, "none", [], "") if ctx.needs_input_grad[1] else None
        else:
            gx = torch.mm(grad, weight) if ctx.needs_input_grad[0] else None
            gw = torch.mm(grad.t(), x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class Dense(nn.Linear):
    """Keras ``Dense`` (Glorot-uniform kernel, zero bias), stored torch-style [out, in].

    On CPU in float32 the forward GEMM goes through oneDNN instead of MKL (see ``_OneDNNLinear``):
    up to 2.5x faster on the 2000 x 5150 posterior head on AMD EPYC, where MKL takes its generic path.
    Under ``torch.compile`` (the trainer's fast mode) it is ``F.linear``, whose GEMM the compiler picks.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        _glorot(self)
        self._packed: tuple[tuple[int, int, int], Tensor | None] | None = None  # see forward_weight

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and _ONEDNN and not torch.compiler.is_compiling():
            return _OneDNNLinear.apply(x, self.weight, self.bias, self.forward_weight(len(x)))
        return F.linear(x, self.weight, self.bias)

    def forward_weight(self, batch: int) -> Tensor:
        """The weight for oneDNN's forward GEMM: packed into oneDNN's blocked layout once it has served two
        forwards of ``batch`` rows unchanged (its version counter and storage), i.e. where the weights stay
        fixed across forwards (the frozen encoder of the SOM initialisation, evaluation passes), else
        itself. Same floats (tests/test_port_dpsom.py); Zen 5, batch 300: the dense head 14.4 -> 13.5 ms,
        the conv head 93.4 -> 84.2. A training step changes the weight every step, and packing it each
        time (2.5 and 14.9 ms) would cost more than it saves."""
        key = (self.weight._version, self.weight.data_ptr(), batch)  # noqa: SLF001  (autograd's in-place counter)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, None)  # the first forward at this version and batch: unpacked
            return self.weight
        if self._packed[1] is None and _ONEDNN_PACK:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch))
        return self.weight if self._packed[1] is None else self._packed[1]

    def __getstate__(self) -> dict:
        """Without the packed weight (an opaque oneDNN tensor: no storage to copy or pickle)."""
        return {**super().__getstate__(), "_packed": None}


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_BACKWARD = torch.backends.cpu.get_cpu_capability() == "AVX512"  # see _OneDNNLinear
_ONEDNN_PACK = hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # see Dense.forward_weight


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded generator on ``device``: torch draws a device tensor only from that device's generator
    (a CPU one with CUDA tensors is an error). The meta device has none; it gets a CPU one (shapes only)."""
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    return generator.manual_seed(seed)


class FrozenBatchNorm(nn.Module):
    """Keras BatchNormalization as the original executes it.

    ``frozen_affine`` (default): inference mode always, ``y = x * inv + (beta - mean * inv)`` with
    ``inv = gamma / sqrt(moving_variance + eps)`` (the form of ``tf.nn.batch_normalization``); the
    moving statistics stay 0 / 1. ``batch_stats``: a declared deviation (the public port's "fix"):
    batch statistics in training mode, Keras momentum 0.99 for the moving statistics.
    """

    def __init__(self, features: int, eps: float, mode: str, channel_dim: int = -1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("moving_mean", torch.zeros(features))
        self.register_buffer("moving_variance", torch.ones(features))
        self.eps, self.mode, self.channel_dim = eps, mode, channel_dim

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "batch_stats":
            return F.batch_norm(
                x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                training=self.training, momentum=0.01, eps=self.eps,
            )
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        inv = self.gamma * torch.rsqrt(self.moving_variance + self.eps)
        # the shift added in place into the product (its own buffer; the product's backward keeps x and
        # inv, not it): the same two roundings, one pass over memory less (conv bn1, 30 MB: 2.1 -> 1.3 ms)
        return (x * inv.view(shape)).add_((self.beta - self.moving_mean * inv).view(shape))


def _same(t: Tensor) -> Tensor:
    return t




def _nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1)


def _nchw(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


class Trace(dict):
    """The named intermediates of one forward pass, canonical layout, in execution order.

    With a ``teacher`` ({canonical name: array}, e.g. the TF reference's forward tensors) every
    emitted tensor is recorded, then the computation goes on from the teacher's value: each layer
    sees the other side's input, so a divergence shows where it is made, not everywhere after it.
    """

    def __init__(self, teacher: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.teacher = teacher or {}
        self.kl_stats: tuple[Tensor, Tensor] | None = None  # the posterior's (‖L‖_F², Σ ln L_dd), not a canonical tensor

    def emit(self, name: str, value: Tensor, to_canonical: Callable[[Tensor], Tensor] = _same,
             from_canonical: Callable[[Tensor], Tensor] = _same) -> Tensor:
        self[name] = to_canonical(value)
        if name not in self.teacher:
            return value
        return from_canonical(torch.as_tensor(np.asarray(self.teacher[name])).to(dtype=value.dtype, device=value.device))


def _leaky_relu_(pre: Tensor, slope: float) -> Tensor:
    """LeakyReLU in place on a layer's fresh output ``pre`` that nothing else holds (the Dense / Conv
    backward keeps the layer's input and weight, and no trace records ``pre``): the same kernel, so the
    same values, and the gradient from the result's sign, which is the input's (slope > 0); no second
    activation-sized buffer (conv1: 30 MB, 0.95 -> 0.45 ms)."""
    return F.leaky_relu(pre, slope, inplace=True)


def _block(pre: Tensor, bn: nn.Module, slope: float, order: str, out: Trace, act_name: str, bn_name: str,
           spatial: bool = False, drop: Callable[[Tensor], Tensor] = _same) -> Tensor:
    """LeakyReLU, BN* and dropout of one block after its Dense/Conv output ``pre``, in ``order``.

    ``act_name`` / ``bn_name`` are emitted (NHWC when ``spatial``) in execution order, so the
    forward dict lists them in the order they ran. Returns the block output.
    """
    views = (_nhwc, _nchw) if spatial else (_same, _same)
    if order == "after_activation":  # the original: act -> (dropout) -> BN
        act = out.emit(act_name, _leaky_relu_(pre, slope), *views)
        return out.emit(bn_name, bn(drop(act)), *views)
    y = out.emit(bn_name, bn(pre), *views)  # "before_activation": BN -> act -> (dropout)
    return drop(out.emit(act_name, F.leaky_relu(y, slope), *views))


class TriLPosterior(nn.Module):
    """``tfp.layers.MultivariateNormalTriL(D)``: head -> (mu, L) with L = FillScaleTriL(r)."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.head = Dense(in_features, latent_dim + latent_dim * (latent_dim + 1) // 2)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        head = self.head(h)
        return (head, *self.split(head))

    def split(self, head: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, L) from the head's output."""
        mu, scale_tril, _, _ = self.sample(head, None)
        return mu, scale_tril

    def sample(self, head: Tensor, eps: Tensor | None, kl_stats: bool = False
               ) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """(mu, L, z = mu + L·eps, (‖L‖_F², Σ_d ln L_dd)) from the head's output: the reparameterised sample
        and, with ``kl_stats``, the two statistics of L the KL needs (:func:`tril_stats`), in one autograd
        node (``_TriLGaussian``). ``eps`` None: no sample."""
        d = self.latent_dim
        mu = head[:, :d]
        z, frob2, log_det, scale_tril = _TriLGaussian.apply(mu, head[:, d:], eps, kl_stats, *fill_triangular_index(d, head.device))
        return mu, scale_tril, z, (frob2, log_det) if kl_stats else None


def fill_triangular(raw: Tensor, d: int) -> Tensor:
    """TFP's ``fill_triangular``: ``[r[d:], reverse(r)]`` (n + n - d = d·d entries) reshaped to d x d, lower
    triangle kept (r = 1..6: rows (4), (6, 5), (3, 2, 1)). Written as TFP composes it, into one buffer:
    pure copies, so the same floats as any gather; batch 300, D = 100: 0.35 ms against 1.3 for an
    ``index_select`` from ``[r, 0]`` (a per-row gather of 3 M floats)."""
    b, n = raw.shape
    scale_tril = raw.new_empty(b, d, d)
    flat = scale_tril.view(b, d * d)
    flat[:, : n - d] = raw[:, d:]
    flat[:, n - d :] = raw.flip(1)
    return scale_tril.tril_()


@functools.cache
def fill_triangular_index(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where :func:`fill_triangular` puts each r_k (n = d(d+1)/2; each lands in exactly one place of L): its
    flat position, its row and its column; and the r index of each diagonal entry."""
    n = d * (d + 1) // 2
    source = torch.cat([torch.arange(d, n), torch.arange(n).flip(0)]).view(d, d)  # which r_k sits at (i, j)
    lower = torch.ones(d, d, dtype=torch.bool).tril()
    position = torch.empty(n, dtype=torch.long)
    position[source[lower]] = torch.arange(d * d).view(d, d)[lower]
    index = (position, position // d, position % d, source.diagonal().clone())
    return tuple(t.to(device) for t in index)


def tril_stats(scale_tril: Tensor) -> tuple[Tensor, Tensor]:
    """``‖L‖_F²`` and ``Σ_d ln L_dd`` per sample: what the KL to an isotropic prior needs of L."""
    return scale_tril.square().sum((-2, -1)), torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)


def _sum_in_order(*terms: Tensor | None) -> Tensor | None:
    """Left to right, skipping absent terms: float addition is commutative, not associative."""
    total = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total


class _TriLGaussian(torch.autograd.Function):
    """FillScaleTriL (``tfp.bijectors``: L = fill_triangular(r), diagonal ``softplus(.) + 1e-5``), the sample
    ``z = mu + L·eps`` and the KL's ``‖L‖_F²`` and ``Σ ln L_dd``, as ONE autograd node.

    Every r_k lands in one place of L, so the backward works on the n = D(D+1)/2 packed entries instead of
    the [B, D, D] L that autograd would fill, sum and gather for the three consumers (a zero-filled copy for
    the diagonal's log, an outer product for the matmul, two products for the square, two accumulations):
    off the diagonal ``g_r = g_frob · 2 r + g_z,i · eps_j``; on it, the same terms plus ``g_logdet / L_dd``,
    then softplus' backward. The forward runs the composed ops themselves (same kernels, same floats); the
    backward's floats are autograd's bit for bit (tests/test_port_dpsom.py), float32 and float64: every
    product above is one rounding in both, 2·r is exact, and the diagonal's three terms are added in the
    order autograd's engine accumulates them (square + log, then the matmul's). Batch 300, D = 100, 2 cores:
    this part's forward + backward 36-42 -> 26-29 ms; the dense VAE / joint step 2-3 % faster (interleaved A/B).

    softplus and its backward see strided inputs (the diagonal of L; a stride-2 copy of it), so they take
    the same element-wise loop as on the diagonal view; a contiguous input takes the vectorised one, 1 ulp off.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, raw: Tensor, eps: Tensor | None, kl_stats: bool, position: Tensor,  # type: ignore[override]
                rows: Tensor, cols: Tensor, diag_source: Tensor) -> tuple[Tensor | None, ...]:
        b, d = raw.shape[0], diag_source.numel()
        scale_tril = fill_triangular(raw, d)
        diag = scale_tril.diagonal(dim1=-2, dim2=-1)
        pre = raw.new_empty(b, d, 2)[..., 0].copy_(diag)  # softplus' input, kept strided (see above)
        diag.copy_(F.softplus(diag) + TRIL_DIAG_SHIFT)
        z = None if eps is None else mu + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        frob2, log_det = tril_stats(scale_tril) if kl_stats else (None, None)
        ctx.save_for_backward(raw, pre, scale_tril.diagonal(dim1=-2, dim2=-1), eps, position, rows, cols, diag_source)
        ctx.set_materialize_grads(False)
        return z, frob2, log_det, scale_tril

    @staticmethod
    def backward(ctx, g_z: Tensor | None, g_frob: Tensor | None, g_logdet: Tensor | None,  # type: ignore[override]
                 g_tril: Tensor | None) -> tuple[Tensor | None, ...]:
        raw, pre, l_diag, eps, position, rows, cols, diag_source = ctx.saved_tensors
        b, d = pre.shape
        # off the diagonal (its packed entries are overwritten below), the consumers' terms in any order
        off = _sum_in_order(None if g_frob is None else raw * (2 * g_frob).unsqueeze(1),
                            None if g_z is None else g_z.index_select(1, rows) * eps.index_select(1, cols),
                            None if g_tril is None else g_tril.reshape(b, d * d).index_select(1, position))
        if off is None:
            return g_z, None, None, None, None, None, None, None
        on = _sum_in_order(_sum_in_order(None if g_frob is None else g_frob.unsqueeze(1) * (2 * l_diag),
                                         None if g_logdet is None else g_logdet.unsqueeze(1) / l_diag),
                           None if g_z is None else g_z * eps,
                           None if g_tril is None else g_tril.diagonal(dim1=-2, dim2=-1))
        if on.stride(-1) == 1:  # strided, as autograd's diagonal view is (see the class docstring)
            on = pre.new_empty(b, d, 2)[..., 0].copy_(on)
        off[:, diag_source] = torch.ops.aten.softplus_backward(on, pre, 1.0, 20.0)
        return g_z, off, None, None, None, None, None, None


class SOM(nn.Module):
    """The R x C grid of D-dimensional embeddings (flat index k = r * C + c, row-major)."""

    def __init__(self, som_dim: tuple[int, int], latent_dim: int) -> None:
        super().__init__()
        self.som_dim = tuple(som_dim)
        sd = EMBEDDING_INIT_STDDEV
        self.embeddings = nn.Parameter(nn.init.trunc_normal_(torch.empty(*som_dim, latent_dim), std=sd, a=-2 * sd, b=2 * sd))

    def flat(self) -> Tensor:
        return self.embeddings.reshape(-1, self.embeddings.shape[-1])


def z_dist_flat(z: Tensor, embeddings_flat: Tensor) -> Tensor:
    """``d_ij = sum_d (z_id - m_jd)^2`` by broadcasting, as the original (not the |a|^2 - 2ab + |b|^2 trick).
    Without a graph (SOM initialisation, evaluation) the [B, K, D] difference is squared in place: the
    same kernel, one 7.7 MB buffer less (batch 300, 64 nodes: 0.76 -> 0.59 ms after the head GEMM)."""
    if torch.is_grad_enabled() and (z.requires_grad or embeddings_flat.requires_grad):
        return _SquaredDistance.apply(z, embeddings_flat)
    return (z.unsqueeze(1) - embeddings_flat.unsqueeze(0)).square_().sum(-1)


class _SquaredDistance(torch.autograd.Function):
    """:func:`z_dist_flat` as one autograd node. The backward autograd derives for the composed ops (the
    square's ``grad·(2·diff¹)``: a copy and two products; the subtraction's negation; two broadcast sums)
    makes six passes over the [B, K, D] difference; this one makes three and gives the same floats: ×2 is
    exact, so ``diff·(2·grad)`` is ``grad·(2·diff)`` bit for bit, and ``-Σ_i t`` is ``Σ_i -t``
    (tests/test_port_dpsom.py). Dense joint step: the SOM terms' forward + backward in half the time."""

    @staticmethod
    def forward(ctx, z: Tensor, embeddings_flat: Tensor) -> Tensor:  # type: ignore[override]
        diff = z.unsqueeze(1) - embeddings_flat.unsqueeze(0)
        ctx.save_for_backward(diff)
        return diff.square().sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        t = diff * (2 * grad).unsqueeze(-1)
        return (t.sum(1) if ctx.needs_input_grad[0] else None), (-t.sum(0) if ctx.needs_input_grad[1] else None)


def student_t_q(z_dist: Tensor, alpha: float, eps: float) -> Tensor:
    """``q_ij ∝ eps + 1 / (1 + d_ij/alpha)^((alpha+1)/2)``, eps added before normalising (Keras epsilon).

    Power first, then the reciprocal, in the original's order (reciprocal-first differs by ~6e-7 relative).
    """
    t = eps + 1.0 / (1.0 + z_dist / alpha).pow((alpha + 1.0) / 2.0)
    return t / t.sum(dim=1, keepdim=True)


class DenseEncoder(nn.Module):
    """Dense+LeakyReLU -> (Dropout, inert) -> BN*, three times; the linear head lives in the posterior.

    ``bn_order="before_activation"``: Dense -> BN* -> LeakyReLU -> Dropout. ``dropout_active``:
    the dropout fires in training mode (keep with probability 1 - rate, kept values / (1 - rate),
    as Keras), its uniforms drawn from ``generator`` (torch's global stream when None).
    """

    def __init__(self, cfg: DPSOMConfig) -> None:
        super().__init__()
        dims = (cfg.n_pixels, *cfg.dense_enc_dims)
        for i in range(len(cfg.dense_enc_dims)):
            setattr(self, f"fc{i + 1}", Dense(dims[i], dims[i + 1]))
            setattr(self, f"bn{i + 1}", FrozenBatchNorm(dims[i + 1], cfg.bn_epsilon, cfg.bn_mode))
        self.n_blocks, self.slope, self.order = len(cfg.dense_enc_dims), cfg.leaky_relu_slope, cfg.bn_order
        self.rate = cfg.dropout if cfg.dropout_active else 0.0

    def _dropout(self, t: Tensor, generator: torch.Generator | None) -> Tensor:
        if not (self.training and self.rate > 0.0):
            return t
        keep = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device) >= self.rate
        return t * keep.to(t.dtype) / (1.0 - self.rate)

    def forward(self, x: Tensor, out: Trace, generator: torch.Generator | None = None) -> Tensor:
        h = x.reshape(x.shape[0], -1)
        for i in range(1, self.n_blocks + 1):
            h = _block(getattr(self, f"fc{i}")(h), getattr(self, f"bn{i}"), self.slope, self.order, out,
                       f"encoder.fc{i}", f"encoder.bn{i}", drop=lambda t: self._dropout(t, generator))
        return h


class DenseDecoder(nn.Module):
    """Dense+LeakyReLU -> BN* (``bn_order``), three times, then Dense(784) + LeakyReLU = the Bernoulli logits."""

    def __init__(self, cfg: DPSOMConfig) -> None:
        super().__init__()
        dims = (cfg.latent_dim, *reversed(cfg.dense_enc_dims))
        for i in range(len(cfg.dense_enc_dims)):
            setattr(self, f"fc{i + 1}", Dense(dims[i], dims[i + 1]))
            setattr(self, f"bn{i + 1}", FrozenBatchNorm(dims[i + 1], cfg.bn_epsilon, cfg.bn_mode))
        self.n_blocks, self.slope, self.image_shape = len(cfg.dense_enc_dims), cfg.leaky_relu_slope, cfg.image_shape
        self.order = cfg.bn_order
        setattr(self, f"fc{self.n_blocks + 1}", Dense(dims[-1], cfg.n_pixels))

    def forward(self, z: Tensor, out: Trace) -> Tensor:
        h = z
        for i in range(1, self.n_blocks + 1):
            h = _block(getattr(self, f"fc{i}")(h), getattr(self, f"bn{i}"), self.slope, self.order, out,
                       f"decoder.fc{i}", f"decoder.bn{i}")
        logits = _leaky_relu_(getattr(self, f"fc{self.n_blocks + 1}")(h), self.slope)
        logits = out.emit("decoder.logits", logits.view(-1, *self.image_shape))
        return logits


class ConvEncoder(nn.Module):
    """x - 0.5 -> [Conv3x3 same + LeakyReLU -> BN* (``bn_order``) (-> MaxPool2)] x 4 -> NHWC flatten."""

    def __init__(self, cfg: DPSOMConfig) -> None:
        super().__init__()
        chans = (cfg.image_shape[-1], *cfg.conv_channels)
        for i in range(4):
            setattr(self, f"conv{i + 1}", _glorot(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1)))
            setattr(self, f"bn{i + 1}", FrozenBatchNorm(chans[i + 1], cfg.bn_epsilon, cfg.bn_mode, channel_dim=1))
        self.slope, self.order = cfg.leaky_relu_slope, cfg.bn_order

    def forward(self, x: Tensor, out: Trace, generator: torch.Generator | None = None) -> Tensor:
        h = _nchw(out.emit("encoder.input", x - 0.5))
        for i in range(1, 5):
            h = _block(getattr(self, f"conv{i}")(h), getattr(self, f"bn{i}"), self.slope, self.order, out,
                       f"encoder.conv{i}", f"encoder.bn{i}", spatial=True)
            if i <= 2:
                h = F.max_pool2d(h, 2)
                h = out.emit(f"encoder.pool{i}", h, _nhwc, _nchw)
        h = out.emit("encoder.flatten", _nhwc(h).reshape(h.shape[0], -1))  # channels-last, as TF
        return h


class ConvDecoder(nn.Module):
    """Dense+LeakyReLU -> NHWC reshape -> [ConvT3x3 + LeakyReLU -> BN* (-> Upsample2)] x 3 -> Conv3x3 linear.

    LeakyReLU and BN* in the order ``bn_order`` says.
    """

    def __init__(self, cfg: DPSOMConfig) -> None:
        super().__init__()
        h, w, c = cfg.conv_feature_shape
        self.feature_shape, self.slope, self.order = (h, w, c), cfg.leaky_relu_slope, cfg.bn_order
        self.fc1 = Dense(cfg.latent_dim, h * w * c)
        chans = tuple(reversed(cfg.conv_channels))  # 256, 128, 64, 32
        for i in range(3):
            setattr(self, f"deconv{i + 1}", _glorot(nn.ConvTranspose2d(chans[i], chans[i + 1], 3, padding=1)))
            setattr(self, f"bn{i + 1}", FrozenBatchNorm(chans[i + 1], cfg.bn_epsilon, cfg.bn_mode, channel_dim=1))
        self.conv_out = _glorot(nn.Conv2d(chans[-1], cfg.image_shape[-1], 3, padding=1))

    def forward(self, z: Tensor, out: Trace) -> Tensor:
        h = out.emit("decoder.fc1", _leaky_relu_(self.fc1(z), self.slope))
        h = h.view(-1, *self.feature_shape).permute(0, 3, 1, 2)
        for i in range(1, 4):
            h = _block(getattr(self, f"deconv{i}")(h), getattr(self, f"bn{i}"), self.slope, self.order, out,
                       f"decoder.deconv{i}", f"decoder.bn{i}", spatial=True)
            if i >= 2:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = out.emit(f"decoder.up{i - 1}", h, _nhwc, _nchw)
        logits = out.emit("decoder.logits", _nhwc(self.conv_out(h)))
        return logits


class DPSOM(nn.Module):
    """Encoder -> full-covariance posterior -> z -> decoder, plus the SOM on z."""

    def __init__(self, config: DPSOMConfig) -> None:
        super().__init__()
        self.config = config
        if config.convolution:
            self.encoder, self.decoder = ConvEncoder(config), ConvDecoder(config)
            enc_out = int(np.prod(config.conv_feature_shape))
        else:
            self.encoder, self.decoder = DenseEncoder(config), DenseDecoder(config)
            enc_out = config.dense_enc_dims[-1]
        self.posterior = TriLPosterior(enc_out, config.latent_dim)
        self.som = SOM(config.som_dim, config.latent_dim)

    def forward(
        self, x: Tensor, eps: Tensor | None = None, *, decode: bool = True, generator: torch.Generator | None = None,
        teacher: Mapping[str, np.ndarray] | None = None, head: Tensor | None = None,
    ) -> Trace:
        """All named tensors for a batch ``x`` [B, 28, 28, 1]; ``eps`` [B, D] or sampled from ``generator``.

        ``decode=False`` skips the decoder (SOM-initialisation steps do not need it; TF prunes it too).
        ``teacher``: continue every layer from these tensors instead of this model's own (:class:`Trace`).
        ``head``: the posterior head's output for ``x`` where the caller already has it (encoder skipped).
        """
        out = Trace(teacher)
        if head is None:
            head = self.posterior.head(self.encoder(x, out, generator))
        head = out.emit("posterior.head", head)
        if eps is None:
            eps = torch.randn(len(head), self.config.latent_dim, generator=generator, dtype=head.dtype, device=head.device)
        mu, scale_tril, z, out.kl_stats = self.posterior.sample(head, eps, kl_stats=decode)
        mu, scale_tril = out.emit("posterior.mu", mu), out.emit("posterior.scale_tril", scale_tril)
        if {"posterior.mu", "posterior.scale_tril"} & out.teacher.keys():  # z (and the KL) from the teacher's values
            z, out.kl_stats = mu + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1), tril_stats(scale_tril)
        z = out.emit("z", z)
        if decode:
            self.decoder(z, out)
        cfg = self.config
        dist = out.emit("som.z_dist", z_dist_flat(z, self.som.flat()))
        out.emit("som.q", student_t_q(dist, cfg.alpha, cfg.q_epsilon))
        out.emit("som.k", dist.argmin(dim=1))
        return out

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
