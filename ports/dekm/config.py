"""DEKM configuration, shared by the PyTorch port and the TF reference.

One frozen dataclass builds both frameworks' models: field names follow the original's module
globals (``spdj2271/DEKM`` HEAD ``DEKM.py`` / ``DEKM_dense.py``: ``hidden_units``,
``update_interval``, ``pretrain_epochs`` ...), with the values the original *executes* (specs/dekm.md
§5.1): ``hidden_units = 10`` for every data set, a stop tolerance of 0.5 % of N, the hard cap of
14 000 clustering steps, Keras Adam's ε = 1e-7 and the first k-means fit's ``n_init = 100``.

The last group of fields are the seed port's choices (its README), declared deviations that are off
by default; the reference refuses them (the original has no such switch). This module imports no
framework, so a reference pinned to an older TensorFlow can use it.
"""

from __future__ import annotations

from ports.cli import FLAG_VALUES, parse_flag  # noqa: F401  (re-exported: the configs carry the CLI vocabulary)

import dataclasses
import json
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

KERAS_UNIFORM_LIMIT = 0.05  # Keras 'uniform' = RandomUniform(-0.05, 0.05); torch's uniform_ is U(0, 1)
KERAS_ADAM_EPSILON = 1e-7  # Keras Adam: added to sqrt(v) in the epsilon-hat form (torch: 1e-8 after bias correction)
TORCH_ADAM_EPSILON = 1e-8

# Declared deviations (the seed port's choices): field -> (the original's value, the allowed values)
DEVIATIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "kernel_init": ("keras", ("keras", "unit")),  # "unit": nn.init.uniform_ = U(0, 1) on every kernel
    "cluster_reduction": ("sum", ("sum", "mean")),  # "mean": nn.MSELoss() in the clustering phase (1/B of the gradient)
    "pretrain_shuffle": ("window", ("window", "full")),  # "full": DataLoader(shuffle=True) instead of shuffle(8000)
    "padding": ("tf", ("tf", "symmetric")),  # "symmetric": padding=k//2 (+ output_padding=1): grid shifted by a pixel
    "adam_epsilon": ("keras", ("keras", "torch")),  # "torch": torch.optim.Adam(eps=1e-8), epsilon after bias correction
    "shared_optimizer": (False, (False, True)),  # True: one Adam for both phases (the original builds a fresh one)
}


@dataclass(frozen=True)
class DEKMConfig:
    """Hyper-parameters of DEKM as executed by the original TF code (MNIST conv defaults)."""

    # data
    ds_name: str = "MNIST"
    # architecture
    convolution: bool = True
    input_shape: tuple[int, ...] = (28, 28, 1)  # NHWC (conv) or (d_in,) (dense)
    n_clusters: int = 10
    hidden_units: int = 10  # d, the embedding size (10 for every data set at HEAD)
    filters: tuple[int, ...] = (32, 64, 128)  # dense: (500, 500, 2000); the decoder mirrors them
    # pretraining (model.fit)
    pretrain_epochs: int = 200
    pretrain_batch_size: int = 256
    shuffle_buffer: int = 8000  # tf.data shuffle(8000): a windowed shuffle, reshuffled every epoch
    # clustering phase
    batch_size: int = 256
    update_interval: int = 40  # k-means refit every 40 steps (conv) / 10 (dense)
    max_iter: int = 14000  # for ite in range(int(140 * 100))
    tol: float = 0.005  # stop when n_changed <= tol * N
    kmeans_n_init: int = 100  # the first fit; every later one int(2 * n_iter_) of the previous best run
    # Keras Adam (compile(optimizer='adam') and tf.keras.optimizers.Adam(): the same defaults)
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = KERAS_ADAM_EPSILON
    # declared deviations (port only; DEVIATIONS)
    kernel_init: str = "keras"
    cluster_reduction: str = "sum"
    pretrain_shuffle: str = "window"
    padding: str = "tf"
    adam_epsilon: str = "keras"
    shared_optimizer: bool = False

    def __post_init__(self) -> None:
        for name, (_, allowed) in DEVIATIONS.items():
            value = getattr(self, name)
            if value not in allowed or type(value) is not type(allowed[0]):
                raise ValueError(f"{name}={value!r}; expected one of {allowed}")
        if self.convolution and len(self.input_shape) != 3:
            raise ValueError(f"input_shape={self.input_shape}: the conv model takes (H, W, C)")
        if not self.convolution and len(self.input_shape) != 1:
            raise ValueError(f"input_shape={self.input_shape}: the dense model takes (d_in,)")
        if self.convolution and len(self.filters) != 3:
            raise ValueError(f"filters={self.filters}: the conv model has three conv layers")
        if self.convolution and (self.input_shape[0] != self.input_shape[1] or self.input_shape[0] < 8):
            raise ValueError(f"input_shape={self.input_shape}: the conv model takes square images of at least 8x8")
        if self.hidden_units < 2 or self.n_clusters < 2:
            raise ValueError(f"hidden_units={self.hidden_units}, n_clusters={self.n_clusters}: both must be at least 2")
        for name in ("pretrain_batch_size", "batch_size", "update_interval", "kmeans_n_init", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")

    # derived sizes
    @property
    def pad3(self) -> str:
        """The third conv's (and first transposed conv's) padding: 'same' if H % 8 == 0 else 'valid'."""
        return "same" if self.input_shape[0] % 8 == 0 else "valid"

    @property
    def n_pixels(self) -> int:
        """P: the reconstruction's width (H * W * C, or d_in)."""
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """NHWC shape at the conv <-> dense boundary: (H // 8, H // 8, filters[2])."""
        h = self.input_shape[0] // 8
        return (h, h, self.filters[2])

    def deviations(self) -> dict[str, Any]:
        """The declared deviations switched on: {field: value}."""
        return {k: getattr(self, k) for k, (orig, _) in DEVIATIONS.items() if getattr(self, k) != orig}

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DEKMConfig:
        return replace(cls(), **values)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Turn a ``key=value`` string (or JSON value) into the type of the field's default."""
    if not isinstance(value, str) or isinstance(default, str):
        return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    text = value.strip()
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{name}={value!r}: expected True or False")
    if isinstance(default, tuple):
        return tuple(int(t) for t in text.strip("()[]").split(",") if t.strip())
    try:
        return type(default)(text)
    except ValueError as err:
        raise ValueError(f"{name}={value!r}: expected {type(default).__name__}") from err


def replace(config: DEKMConfig, **overrides: Any) -> DEKMConfig:
    """``dataclasses.replace`` that names the valid keys when given an unknown one."""
    valid = {f.name for f in dataclasses.fields(DEKMConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise KeyError(f"unknown DEKM config key(s) {unknown}; valid keys: {sorted(valid)}")
    return dataclasses.replace(config, **{k: _coerce(k, v, getattr(config, k)) for k, v in overrides.items()})


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["pretrain_epochs=3", "padding=symmetric"]`` -> dict; rejects tokens without ``=``."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"override {arg!r} is not of the form key=value")
        out[key] = value
    return out


_DENSE = dict(convolution=False, filters=(500, 500, 2000), update_interval=10)

# --- Named variants (specs/dekm.md §2, §3, §5.1) --------------------------------------------
VARIANTS: dict[str, DEKMConfig] = {
    "conv": DEKMConfig(),
    "conv-usps": DEKMConfig(ds_name="USPS", input_shape=(16, 16, 1)),
    "conv-coil20": DEKMConfig(ds_name="COIL20", n_clusters=20),
    "conv-frgc": DEKMConfig(ds_name="FRGC", input_shape=(32, 32, 3), n_clusters=20),
    "dense": DEKMConfig(input_shape=(784,), **_DENSE),  # MNIST flattened (the seed port's example)
    "dense-reuters": DEKMConfig(ds_name="REUTERS", input_shape=(2000,), n_clusters=4, **_DENSE),
    # Tiny configs for tests: distinct odd sizes so that a transpose cannot hide.
    "tiny-conv": DEKMConfig(filters=(3, 5, 7), hidden_units=6, n_clusters=4, batch_size=5, pretrain_batch_size=5,
                            pretrain_epochs=1, update_interval=3, kmeans_n_init=3),
    "tiny-dense": DEKMConfig(input_shape=(784,), convolution=False, filters=(13, 11, 37), hidden_units=6, n_clusters=4,
                             batch_size=5, pretrain_batch_size=5, pretrain_epochs=1, update_interval=3, kmeans_n_init=3),
}


def get_config(variant: str = "conv", **overrides: Any) -> DEKMConfig:
    """A named variant with ``key=value`` overrides applied."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown DEKM variant {variant!r}; known: {sorted(VARIANTS)}")
    return replace(VARIANTS[variant], **overrides)
