"""DEKM's auto-encoder in PyTorch, faithful to the original Keras model as executed.

Paper: Guo, Lin, Ye, "Deep Embedded K-Means Clustering", ICDMW 2021 (arXiv 2109.15149). Original
code: github spdj2271/DEKM at e58f506 (``DEKM.py`` / ``DEKM_dense.py``: ``model_conv``). Reference:
``reference_tf/dekm``. Behaviour: specs/dekm.md §3.

What "faithful" means here:

* Conv (§3.1): Conv5x5/2 same -> Conv5x5/2 same -> Conv3x3/2 ``pad3`` (ReLU each) -> NHWC flatten ->
  Dense ``embedding`` (linear, **h**) -> Dense + ReLU -> NHWC reshape -> ConvT3x3/2 ``pad3`` ->
  ConvT5x5/2 same (ReLU each) -> ConvT5x5/2 same (linear). ``pad3`` is 'same' iff H % 8 == 0.
* TF's SAME geometry (§3.4): a 'same' conv pads ⌊P/2⌋ before and ⌈P/2⌉ after (explicit ``F.pad``,
  then ``padding=0``); a 'same' transposed conv runs with ``padding=⌊(k-2)/2⌋`` and keeps
  ``[..., :2i, :2i]``. Flatten/reshape are channels-last, so every torch key is the canonical name
  (``encoder.conv1.weight`` ...) and weights map by a plain transpose / ``permute(3, 2, 0, 1)``.
* Keras initialisers (§1.2): conv-encoder kernels U(-0.05, 0.05), ``embedding`` and decoder kernels
  Glorot-uniform with Keras' fans; the dense variant's 8 kernels all U(-0.05, 0.05); biases zero.
* Dense (§3.2): d_in -> f0 -> f1 -> f2 -> d -> f2 -> f1 -> f0 -> d_in, ReLU except ``embedding`` and
  ``decoder.out``.

Declared deviations (config, all off by default): ``kernel_init="unit"`` (``nn.init.uniform_``:
U(0, 1) on every kernel) and ``padding="symmetric"`` (torch's ``padding=k//2``, transposed
``padding=k//2, output_padding=1``: right shapes, grid shifted by one pixel; 'valid' layers unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import KERAS_UNIFORM_LIMIT, DEKMConfig


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF's SAME padding of one spatial axis: total P = max((⌈i/s⌉-1)·s + k - i, 0), (⌊P/2⌋, ⌈P/2⌉)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def keras_fans(kernel_shape: tuple[int, ...]) -> tuple[int, int]:
    """Keras' ``_compute_fans`` on a Keras kernel shape: (receptive·shape[-2], receptive·shape[-1]).

    Dense (in, out); Conv2D (kh, kw, in, out); Conv2DTranspose (kh, kw, out, in): for the latter
    Keras' fan_in counts the layer's *output* channels (the sum, hence the Glorot bound, is the same).
    """
    receptive = int(np.prod(kernel_shape[:-2])) if len(kernel_shape) > 2 else 1
    return receptive * kernel_shape[-2], receptive * kernel_shape[-1]


def keras_kernel_shape(module: nn.Module) -> tuple[int, ...]:
    """The Keras kernel shape of a torch layer (the canonical layout of its ``weight``)."""
    w = module.weight
    if isinstance(module, nn.Linear):  # torch (out, in) -> Keras (in, out)
        return (w.shape[1], w.shape[0])
    # Conv2d (out, in, kh, kw) -> (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw) -> (kh, kw, out, in)
    return (w.shape[2], w.shape[3], w.shape[1], w.shape[0])


def init_kernel(module: nn.Module, rule: str) -> None:
    """Initialise ``module`` the Keras way: ``rule`` is 'uniform' (U(±0.05)), 'glorot' or 'unit' (U(0, 1)); bias 0."""
    with torch.no_grad():
        if rule == "uniform":
            module.weight.uniform_(-KERAS_UNIFORM_LIMIT, KERAS_UNIFORM_LIMIT)
        elif rule == "glorot":
            fan_in, fan_out = keras_fans(keras_kernel_shape(module))
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            module.weight.uniform_(-bound, bound)
        elif rule == "unit":
            nn.init.uniform_(module.weight)
        else:
            raise ValueError(f"unknown kernel initialiser {rule!r}")
        module.bias.zero_()


class Conv2d(nn.Conv2d):
    """Keras ``Conv2D(filters, k, strides=2, padding)``: 'same' pads TF's way (or ``k//2`` when symmetric)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: str, geometry: str = "tf") -> None:
        symmetric = padding == "same" and geometry == "symmetric"
        super().__init__(in_ch, out_ch, kernel, stride=2, padding=kernel // 2 if symmetric else 0)
        self.tf_same = padding == "same" and geometry == "tf"

    def forward(self, x: Tensor) -> Tensor:
        if self.tf_same:
            (top, bottom), (left, right) = (tf_same_pads(x.shape[-2], self.kernel_size[0], 2),
                                            tf_same_pads(x.shape[-1], self.kernel_size[1], 2))
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvTranspose2d(nn.ConvTranspose2d):
    """Keras ``Conv2DTranspose(filters, k, strides=2, padding)``.

    'same' (output 2i): ``padding=⌊(k-2)/2⌋`` gives 2i+1 rows, of which TF keeps the first 2i;
    symmetric: ``padding=k//2, output_padding=1`` (2i rows, shifted by one); 'valid': (i-1)·2+k.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: str, geometry: str = "tf") -> None:
        same = padding == "same"
        if same and geometry == "symmetric":
            pad, out_pad = kernel // 2, 1
        else:
            pad, out_pad = ((kernel - 2) // 2 if same else 0), 0
        super().__init__(in_ch, out_ch, kernel, stride=2, padding=pad, output_padding=out_pad)
        self.tf_same = same and geometry == "tf"

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        y = super().forward(x, output_size)
        if self.tf_same:
            y = y[..., : 2 * x.shape[-2], : 2 * x.shape[-1]]
        return y


def as_tensor(a: Any, like: Tensor) -> Tensor:
    """``a`` (array or tensor) in ``like``'s dtype and device; a read-only array is copied, not aliased."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    return torch.as_tensor(a).to(dtype=like.dtype, device=like.device)


def _same(t: Tensor) -> Tensor:
    return t


def _nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1)


def _nchw(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


class Trace(dict):
    """The named tensors of one forward pass (canonical layout, execution order).

    With a ``teacher`` ({canonical name: array}) each emitted tensor is recorded, then the forward
    goes on from the teacher's tensor, so every layer sees the other side's input to it.
    """

    def __init__(self, teacher: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.teacher = teacher or {}

    def emit(self, name: str, value: Tensor, to_canonical: Callable[[Tensor], Tensor] = _same,
             from_canonical: Callable[[Tensor], Tensor] = _same) -> Tensor:
        self[name] = to_canonical(value)
        if name not in self.teacher:
            return value
        forced = as_tensor(self.teacher[name], value)
        if tuple(forced.shape) != tuple(self[name].shape):
            raise ValueError(f"teacher[{name!r}] has shape {tuple(forced.shape)}, expected {tuple(self[name].shape)}")
        return from_canonical(forced)


class ConvEncoder(nn.Module):
    """conv1 (5x5 same), conv2 (5x5 same), conv3 (3x3 ``pad3``), ReLU each, then the NHWC flatten."""

    def __init__(self, cfg: DEKMConfig) -> None:
        super().__init__()
        c, (f1, f2, f3) = cfg.input_shape[-1], cfg.filters
        self.conv1 = Conv2d(c, f1, 5, "same", cfg.padding)
        self.conv2 = Conv2d(f1, f2, 5, "same", cfg.padding)
        self.conv3 = Conv2d(f2, f3, 3, cfg.pad3, cfg.padding)

    def forward(self, x: Tensor, out: Trace) -> Tensor:
        h = _nchw(x)
        for name in ("conv1", "conv2", "conv3"):
            h = out.emit(f"encoder.{name}", F.relu(getattr(self, name)(h)), _nhwc, _nchw)
        return out.emit("encoder.flatten", _nhwc(h).reshape(h.shape[0], -1))


class ConvDecoder(nn.Module):
    """fc1 (Dense + ReLU, reshaped NHWC), deconv1 (3x3 ``pad3``), deconv2 (5x5 same) + ReLU, deconv3 (5x5 same, linear)."""

    def __init__(self, cfg: DEKMConfig) -> None:
        super().__init__()
        self.feature_shape = cfg.feature_shape
        (f1, f2, f3), c = cfg.filters, cfg.input_shape[-1]
        self.fc1 = nn.Linear(cfg.hidden_units, int(np.prod(cfg.feature_shape)))
        self.deconv1 = ConvTranspose2d(f3, f2, 3, cfg.pad3, cfg.padding)
        self.deconv2 = ConvTranspose2d(f2, f1, 5, "same", cfg.padding)
        self.deconv3 = ConvTranspose2d(f1, c, 5, "same", cfg.padding)

    def forward(self, h: Tensor, out: Trace) -> Tensor:
        y = out.emit("decoder.fc1", F.relu(self.fc1(h)))
        y = _nchw(y.reshape(-1, *self.feature_shape))
        y = out.emit("decoder.deconv1", F.relu(self.deconv1(y)), _nhwc, _nchw)
        y = out.emit("decoder.deconv2", F.relu(self.deconv2(y)), _nhwc, _nchw)
        y = out.emit("decoder.deconv3", self.deconv3(y), _nhwc, _nchw)
        return out.emit("reconstruction", _nhwc(y).reshape(y.shape[0], -1))


class DenseEncoder(nn.Module):
    """fc1, fc2, fc3: Dense + ReLU (d_in -> f0 -> f1 -> f2)."""

    def __init__(self, cfg: DEKMConfig) -> None:
        super().__init__()
        dims = (cfg.input_shape[0], *cfg.filters)
        for i in range(3):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x: Tensor, out: Trace) -> Tensor:
        h = x
        for i in (1, 2, 3):
            h = out.emit(f"encoder.fc{i}", F.relu(getattr(self, f"fc{i}")(h)))
        return h


class DenseDecoder(nn.Module):
    """fc1, fc2, fc3: Dense + ReLU (d -> f2 -> f1 -> f0), then ``out`` (linear, -> d_in)."""

    def __init__(self, cfg: DEKMConfig) -> None:
        super().__init__()
        dims = (cfg.hidden_units, *reversed(cfg.filters))
        for i in range(3):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.out = nn.Linear(dims[-1], cfg.input_shape[0])

    def forward(self, h: Tensor, out: Trace) -> Tensor:
        y = h
        for i in (1, 2, 3):
            y = out.emit(f"decoder.fc{i}", F.relu(getattr(self, f"fc{i}")(y)))
        return out.emit("reconstruction", self.out(y))


class DEKM(nn.Module):
    """Encoder -> ``embedding`` (h) -> decoder; ``forward`` returns every named tensor (canonical layout)."""

    def __init__(self, config: DEKMConfig) -> None:
        super().__init__()
        self.config = config
        conv = config.convolution
        # registered in the original's layer order: state_dict keys and init draws follow it
        self.encoder = ConvEncoder(config) if conv else DenseEncoder(config)
        self.embedding = nn.Linear(int(np.prod(config.feature_shape)) if conv else config.filters[-1], config.hidden_units)
        self.decoder = ConvDecoder(config) if conv else DenseDecoder(config)
        self._check_geometry()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras' initialisers (module docstring), in layer order; ``kernel_init="unit"``: U(0, 1) everywhere."""
        cfg = self.config
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                continue
            if cfg.kernel_init == "unit":
                rule = "unit"
            elif not cfg.convolution or name.startswith("encoder."):
                rule = "uniform"
            else:
                rule = "glorot"
            init_kernel(module, rule)

    def _check_geometry(self) -> None:
        """The conv stack must reach ``feature_shape`` and come back to the input size (as Keras would)."""
        cfg = self.config
        if not cfg.convolution:
            return
        with torch.no_grad():
            h = self.encoder(torch.zeros(1, *cfg.input_shape), Trace())
            y = self.decoder(torch.zeros(1, cfg.hidden_units), Trace())
        if h.shape[1] != int(np.prod(cfg.feature_shape)) or y.shape[1] != cfg.n_pixels:
            raise ValueError(f"input_shape={cfg.input_shape}: the conv stack gives {h.shape[1]} features "
                             f"(expected {cfg.feature_shape}) and reconstructs {y.shape[1]} values (expected {cfg.n_pixels})")

    def _input(self, x: Tensor | np.ndarray) -> Tensor:
        """``x`` in the model's dtype (Keras casts the float64 data to float32 the same way)."""
        x = as_tensor(x, self.embedding.weight)
        want = self.config.input_shape
        if tuple(x.shape[1:]) != tuple(want):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [B, {', '.join(map(str, want))}]")
        return x

    def forward(self, x: Tensor | np.ndarray, teacher: Mapping[str, Any] | None = None) -> Trace:
        """All named tensors for ``x`` ([B, H, W, C] NHWC or [B, d_in]); ``teacher``: see :class:`Trace`."""
        out = Trace(teacher)
        h = self.encoder(self._input(x), out)
        h = out.emit("embedding", self.embedding(h))
        self.decoder(h, out)
        return out

    def embed(self, x: Tensor | np.ndarray) -> Tensor:
        """h only: the encoder and ``embedding`` (the decoder does not touch h)."""
        return self.embedding(self.encoder(self._input(x), Trace()))

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
