"""Optimiser of the DEKM TF reference: Keras Adam, one fresh instance per phase (specs/dekm.md §1.5, §5).

Reproduces the original (github spdj2271/DEKM HEAD e58f506): pretraining runs
``model.compile(optimizer='adam')``; the clustering phase creates a NEW
``tf.keras.optimizers.Adam()``. Both are tf_keras' (Keras 2) "new" Adam with lr 1e-3, β 0.9/0.999,
ε 1e-7 in the ε-hat form: with t = iterations + 1,
``lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)``, ``m += (g − m)(1 − β1)``, ``v += (g² − v)(1 − β2)``,
``w −= lr_t·m/(√v + ε)``.

State names (canonical): ``<weight>/adam_m``, ``<weight>/adam_v`` (weight = ``encoder.conv1.kernel``
...) and ``optim.iterations``. The slots exist once the optimizer is built
(``optimizer.build(model.trainable_variables)``; :func:`make_optimizer` does it when given a model).
"""

from __future__ import annotations

import numpy as np

from reference_tf import require_tensorflow
from reference_tf.dekm.config import DEKMConfig
from reference_tf.dekm.model import refuse_deviations

tf = require_tensorflow()

PHASES = ("pretrain", "cluster")


def make_optimizer(config: DEKMConfig, model=None):
    """``tf.keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon)``; built on
    ``model.keras.trainable_variables`` when ``model`` (a :class:`DEKM`) is given."""
    refuse_deviations(config, "reference_tf DEKM make_optimizer")
    opt = tf.keras.optimizers.Adam(
        learning_rate=config.learning_rate, beta_1=config.beta_1, beta_2=config.beta_2, epsilon=config.epsilon
    )
    if model is not None:
        opt.build(model.keras.trainable_variables)
    return opt


def _state_variables(opt, model) -> dict:
    if not getattr(opt, "_built", False) or not hasattr(opt, "_index_dict"):
        raise ValueError("optimizer not built: call optimizer.build(model.keras.trainable_variables) first")
    out = {"optim.iterations": opt.iterations}
    for name, var in model.variables().items():
        key = opt._var_key(var)  # noqa: SLF001 (tf_keras optimizer API: slot index by variable key)
        if key not in opt._index_dict:  # noqa: SLF001
            raise ValueError(f"optimizer was built on other variables ({name} has no slot)")
        i = opt._index_dict[key]  # noqa: SLF001
        out[f"{name}/adam_m"] = opt._momentums[i]  # noqa: SLF001
        out[f"{name}/adam_v"] = opt._velocities[i]  # noqa: SLF001
    return out


def optimizer_state(opt, model) -> dict:
    """``{'<weight>/adam_m', '<weight>/adam_v', 'optim.iterations'}`` as numpy arrays."""
    return {k: np.asarray(v.numpy()) for k, v in _state_variables(opt, model).items()}


def set_optimizer_state(opt, model, state: dict) -> None:
    """Strict: every missing / unexpected / mis-shaped name listed in one error, nothing written."""
    from harness.transplant import check_weights

    variables = _state_variables(opt, model)
    check_weights(state, {k: tuple(v.shape.as_list()) for k, v in variables.items()},
                  where="reference_tf DEKM set_optimizer_state")
    for k, var in variables.items():
        var.assign(np.asarray(state[k], dtype=var.dtype.as_numpy_dtype))
