"""DPSOM configuration, shared by the PyTorch port and the TF reference.

One frozen dataclass builds both frameworks' models: field names and defaults are the original
``DPSOM.py`` sacred-config names (github ratschlab/dpsom, HEAD eb41e7d), carrying the value the
original code *executes* where it ignores its own config:

* ``decay_steps = 1000``: ``DPSOM.py`` declares 5000 but never passes it to ``DPSOM(...)``, whose
  constructor default 1000 is what runs (specs/dpsom.md §1.2).
* ``dropout = 0.4`` is kept for the record, but Keras' learning phase is never set, so Dropout is
  inert (``dropout_active = False``) and BatchNormalization is a frozen affine map
  (``bn_mode = "frozen_affine"``) placed after the LeakyReLU (``bn_order = "after_activation"``).

This module imports no framework, so a reference pinned to an older TensorFlow can use it.
"""

from __future__ import annotations

from ports.cli import FLAG_VALUES, parse_flag  # noqa: F401  (re-exported: the configs carry the CLI vocabulary)

import dataclasses
import json
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

# --- Framework constants of the original, with their conversion rules ------------------------
KERAS_BN_EPSILON = 1e-3  # Keras BatchNormalization default; torch's default is 1e-5.
KERAS_BN_MOMENTUM = 0.99  # torch momentum = 1 - Keras momentum = 0.01 (moot: stats never update).
# tf.nn.leaky_relu's alpha 0.2 (torch's default slope is 0.01), as TF executes it: LeakyRelu takes
# alpha as a 32-bit float attribute, so the slope is 0.2f = 0.20000000298023224. Identical in float32;
# in the float64 comparison 0.2 would differ from TF by 1.5e-8 relative on every negative input.
LEAKY_RELU_SLOPE = 0.20000000298023224
Q_EPSILON = 1e-7  # Keras backend epsilon, added to the Student-t kernel before normalising q.
TRIL_DIAG_SHIFT = 1e-5  # tfp.bijectors.FillScaleTriL default: diag = softplus(raw) + 1e-5.
ADAM_BETA1 = 0.9  # tf.train.AdamOptimizer (TF1) defaults ...
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-8  # ... TF1's epsilon-hat, added to sqrt(v) *before* bias correction.
EMBEDDING_INIT_STDDEV = 0.05  # truncated normal, resampled outside +-2 sigma.

BN_MODES = ("frozen_affine", "batch_stats")
# Where every BN* sits in its block. "after_activation" (the original): Dense/Conv + LeakyReLU
# (-> Dropout) -> BN. "before_activation" (the public port's dense blocks): Dense/Conv -> BN ->
# LeakyReLU (-> Dropout).
BN_ORDERS = ("after_activation", "before_activation")
# How node k of the som_dim = (R, C) grid (embeddings [R, C, D], flattened row-major) is located.
# "original": as DPSOM_model.py (HEAD eb41e7d) computes it: row k // R, column k % C; torus wraps by
# branches (the left wrap goes to column R - 1); loss_som flattens a neighbour as row * R + column.
# Right on square grids only: on every other grid of at least 2 x 2 it addresses nodes outside the
# grid (TF on CPU raises InvalidArgumentError, on GPU tf.gather_nd reads zeros: log 0 in loss_som).
# "row_major": row k // C, column k % C, neighbours (r +- 1) mod R, (c +- 1) mod C, flat r * C + c;
# identical to "original" on square grids, and what the original means on any grid.
SOM_INDEXES = ("original", "row_major")


@dataclass(frozen=True)
class DPSOMConfig:
    """Hyper-parameters of DPSOM as executed by the original TF code (MNIST defaults)."""

    # data / protocol
    data_set: str = "MNIST"
    validation: bool = False
    batch_size: int = 300
    random_seed: int = 2020
    # architecture
    convolution: bool = False
    latent_dim: int = 100
    som_dim: tuple[int, int] = (8, 8)
    dense_enc_dims: tuple[int, ...] = (500, 500, 2000)  # decoder uses the reverse order
    conv_channels: tuple[int, ...] = (32, 64, 128, 256)
    image_shape: tuple[int, int, int] = (28, 28, 1)  # NHWC, as the original placeholder
    dropout: float = 0.4  # declared by the original, never active (Keras learning phase False)
    # loss weights (original names; paper names in ports/dpsom/losses.py)
    alpha: float = 10.0  # Student-t degrees of freedom (not a loss weight)
    beta: float = 0.25  # weight of L_SOM (0.4 for fMNIST in the README command line)
    gamma: float = 20.0  # weight of KL(P||Q), code name loss_commit
    theta: float = 1.0  # weight of the ELBO
    prior: float = 0.5  # weight of the VAE KL inside the ELBO
    prior_var: float = 1.0  # prior *standard deviation* multiplier despite its name
    # optimisation
    learning_rate: float = 1e-3  # joint phase
    learning_rate_pretrain: float = 1e-3  # VAE pretraining phase
    decay_factor: float = 0.99
    decay_steps: int = 1000  # effective value; DPSOM.py's 5000 is never passed
    epochs_pretrain: int = 15
    som_init_learning_rates: tuple[float, ...] = (0.9, 0.3, 0.1, 0.01)
    som_init_epochs_per_stage: int = 5
    num_epochs: int = 300
    # behaviour switches: the defaults are the original's; anything else is a declared deviation
    bn_mode: str = "frozen_affine"
    bn_order: str = "after_activation"  # BN_ORDERS; applies to every BN* block (dense and conv)
    dropout_active: bool = False  # True: Dropout(`dropout`) fires in training mode (dense encoder only, as declared)
    bn_epsilon: float = KERAS_BN_EPSILON
    leaky_relu_slope: float = LEAKY_RELU_SLOPE
    q_epsilon: float = Q_EPSILON
    som_index: str = "original"  # SOM_INDEXES; "row_major" is the declared fix that makes non-square grids run
    # evaluation
    eval_assignment: str = "sample"  # original: BMU of a random sample z ("mean": of mu)
    nmi_average_method: str = "geometric"

    def __post_init__(self) -> None:
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode={self.bn_mode!r}; expected one of {BN_MODES}")
        if self.bn_order not in BN_ORDERS:
            raise ValueError(f"bn_order={self.bn_order!r}; expected one of {BN_ORDERS}")
        if not isinstance(self.dropout_active, bool):
            raise ValueError(f"dropout_active={self.dropout_active!r}; expected True or False")
        if self.dropout_active and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: an active dropout rate must lie in [0, 1)")
        if self.eval_assignment not in ("sample", "mean"):
            raise ValueError(f"eval_assignment={self.eval_assignment!r}; expected 'sample' or 'mean'")
        if self.som_index not in SOM_INDEXES:
            raise ValueError(f"som_index={self.som_index!r}; expected one of {SOM_INDEXES}")
        if len(self.som_dim) != 2 or min(self.som_dim) < 1:
            raise ValueError(f"som_dim={self.som_dim}: expected two positive grid sizes (rows, columns)")
        if self.som_index == "original" and self.som_dim[0] != self.som_dim[1]:
            rows, cols = self.som_dim
            raise ValueError(
                f"som_dim={self.som_dim} with som_index='original': the original code (DPSOM_model.py) locates node k "
                f"at row k // som_dim[0], column k % som_dim[1] and flattens a neighbour as row * som_dim[0] + column, "
                f"which is right on square grids only; on this {rows}x{cols} grid it addresses nodes outside the grid "
                f"(the original raises InvalidArgumentError from tf.gather_nd on CPU and reads zeros on GPU, so loss_som "
                f"is inf). Set som_index=row_major (node k at row k // {cols}, column k % {cols}, a torus) to run a "
                f"non-square grid on both sides: a declared correction of the original."
            )
        if self.convolution and tuple(self.image_shape[:2]) != (28, 28):
            raise ValueError("the conv variant needs 28x28 inputs (two 2x2 poolings to 7x7)")

    # derived sizes
    @property
    def n_nodes(self) -> int:
        return self.som_dim[0] * self.som_dim[1]

    @property
    def n_pixels(self) -> int:
        h, w, c = self.image_shape
        return h * w * c

    @property
    def head_dim(self) -> int:
        """mu (D) plus the D(D+1)/2 entries of the lower-triangular scale."""
        return self.latent_dim + self.latent_dim * (self.latent_dim + 1) // 2

    @property
    def conv_feature_shape(self) -> tuple[int, int, int]:
        """NHWC shape at the conv <-> dense boundary."""
        h, w, _ = self.image_shape
        return (h // 4, w // 4, self.conv_channels[-1])

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DPSOMConfig:
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
        items = [t for t in text.strip("()[]").split(",") if t.strip()]
        kind = type(default[0]) if default else float
        return tuple(kind(t) for t in items)
    try:
        return type(default)(text)
    except ValueError as err:
        raise ValueError(f"{name}={value!r}: expected {type(default).__name__}") from err


def replace(config: DPSOMConfig, **overrides: Any) -> DPSOMConfig:
    """``dataclasses.replace`` that names the valid keys when given an unknown one."""
    valid = {f.name: f for f in dataclasses.fields(DPSOMConfig)}
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise KeyError(f"unknown DPSOM config key(s) {unknown}; valid keys: {sorted(valid)}")
    coerced = {k: _coerce(k, v, getattr(config, k)) for k, v in overrides.items()}
    return dataclasses.replace(config, **coerced)


# Keys of ``python -m ports.dpsom.train`` / ``python -m reference_tf.dpsom.train`` that steer the run
# rather than the model: one list for both CLIs, so a command line means the same on either side.
RUN_KEYS = ("variant", "data_dir", "out_dir", "resume", "overwrite", "results_dir", "progress")
def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["num_epochs=3", "convolution=True"]`` -> dict; rejects tokens without ``=``."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"override {arg!r} is not of the form key=value")
        out[key] = value
    return out


# --- Named variants ------------------------------------------------------------------------
VARIANTS: dict[str, DPSOMConfig] = {
    "dense": DPSOMConfig(),
    "conv": DPSOMConfig(convolution=True),
    "dense-fmnist": DPSOMConfig(data_set="fMNIST", beta=0.4),
    "conv-fmnist": DPSOMConfig(data_set="fMNIST", beta=0.4, convolution=True),
    # Tiny configs for tests: distinct odd sizes so that a transpose cannot hide.
    "tiny-dense": DPSOMConfig(
        latent_dim=7, som_dim=(3, 3), dense_enc_dims=(13, 11, 37), batch_size=5,
        epochs_pretrain=1, som_init_epochs_per_stage=1, num_epochs=1,
    ),
    "tiny-conv": DPSOMConfig(
        convolution=True, latent_dim=7, som_dim=(3, 3), conv_channels=(3, 5, 7, 9), batch_size=5,
        epochs_pretrain=1, som_init_epochs_per_stage=1, num_epochs=1,
    ),
}


def get_config(variant: str = "dense", **overrides: Any) -> DPSOMConfig:
    """A named variant with ``key=value`` overrides applied."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown DPSOM variant {variant!r}; known: {sorted(VARIANTS)}")
    return replace(VARIANTS[variant], **overrides)
