"""DPSOM configuration of the TF reference: a re-export of :mod:`ports.dpsom.config`.

One serialised :class:`DPSOMConfig` builds both sides (this reference and the PyTorch port); the
dataclass lives in the framework-free ``ports/dpsom/config.py`` so that it is defined once. Values
are the ones the original code *executes* (github ratschlab/dpsom, DPSOM.py at 8e3cddc / HEAD
eb41e7d), e.g. ``decay_steps = 1000``.
"""

from ports.dpsom.config import (  # noqa: F401  (re-exports)
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPSILON,
    BN_MODES,
    EMBEDDING_INIT_STDDEV,
    FLAG_VALUES,
    KERAS_BN_EPSILON,
    KERAS_BN_MOMENTUM,
    LEAKY_RELU_SLOPE,
    Q_EPSILON,
    RUN_KEYS,
    SOM_INDEXES,
    TRIL_DIAG_SHIFT,
    VARIANTS,
    DPSOMConfig,
    get_config,
    parse_flag,
    parse_overrides,
    replace,
)

__all__ = [
    "ADAM_BETA1", "ADAM_BETA2", "ADAM_EPSILON", "BN_MODES", "EMBEDDING_INIT_STDDEV", "FLAG_VALUES",
    "KERAS_BN_EPSILON", "KERAS_BN_MOMENTUM", "LEAKY_RELU_SLOPE", "Q_EPSILON", "RUN_KEYS", "SOM_INDEXES", "TRIL_DIAG_SHIFT",
    "VARIANTS", "DPSOMConfig", "get_config", "parse_flag", "parse_overrides", "replace",
]
