"""DEKM configuration of the TF reference: a re-export of :mod:`ports.dekm.config`.

One serialised :class:`DEKMConfig` builds both sides; the dataclass lives in the framework-free
``ports/dekm/config.py`` so that it is defined once. The reference is the original as executed and
refuses the port's declared deviations (``DEKMConfig.deviations()``).
"""

from ports.dekm.config import (  # noqa: F401  (re-exports)
    DEVIATIONS,
    FLAG_VALUES,
    KERAS_ADAM_EPSILON,
    KERAS_UNIFORM_LIMIT,
    VARIANTS,
    DEKMConfig,
    get_config,
    parse_flag,
    parse_overrides,
    replace,
)

__all__ = ["DEVIATIONS", "FLAG_VALUES", "KERAS_ADAM_EPSILON", "KERAS_UNIFORM_LIMIT", "VARIANTS", "DEKMConfig",
           "get_config", "parse_flag", "parse_overrides", "replace"]
