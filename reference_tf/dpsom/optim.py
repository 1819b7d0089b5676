"""Optimiser of the DPSOM TF reference: one TF1 Adam shared by the three phases.

Reproduces ``DPSOM.optimize`` of the original (github ratschlab/dpsom, ``DPSOM_model.py`` at
8e3cddc, HEAD eb41e7d; paper arXiv 1910.01590), specs/dpsom.md §6.1–6.2:

* ``lr = lr_feed * decay_factor ** floor(global_step / decay_steps)`` (``exponential_decay``,
  staircase; decay_steps = 1000 is what the original executes), evaluated on the step count
  *before* the increment of the same ``session.run``;
* ONE ``tf.compat.v1.train.AdamOptimizer(lr, 0.9, 0.999, 1e-8)`` with three ``minimize`` ops
  (joint ``loss``, VAE ``loss_reconstruction_ze``, SOM-init ``loss_a``) that share the m/v slots,
  the ``beta1_power`` / ``beta2_power`` accumulators and ``global_step`` (each op adds 1). TF1's
  "epsilon-hat" update: ``var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.

Built inside the variable scope ``optimize`` (the original's lazy scope), which gives the
checkpoint names ``optimize/beta1_power``, ``optimize/beta2_power``, ``optimize/<var>/Adam`` and
``optimize/<var>/Adam_1`` -- exactly what TF names them in the original graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference_tf import require_tensorflow
from reference_tf.dpsom.config import ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, DPSOMConfig

tf = require_tensorflow()

PHASES = ("vae", "som_init", "joint")
PHASE_LOSS = {"vae": "loss.elbo", "som_init": "loss.som_init", "joint": "loss.total"}


@dataclass(frozen=True)
class Optim:
    """Graph handles of the shared optimiser."""

    optimizer: Any  # tf.compat.v1.train.AdamOptimizer
    lr: Any  # effective learning rate tensor (float32)
    train_ops: dict  # phase -> train op
    grads_and_vars: dict  # phase -> [(gradient, variable)] that the train op applies


def learning_rate(lr_feed, global_step, config: DPSOMConfig):
    """Staircase exponential decay on the global step, as the original."""
    return tf.compat.v1.train.exponential_decay(
        lr_feed, global_step, config.decay_steps, config.decay_factor, staircase=True
    )


def build(losses: dict, global_step, lr_feed, config: DPSOMConfig) -> Optim:
    """Create the Adam optimiser and its three train ops, in the original's order (joint, VAE, SOM).

    Call inside ``tf.compat.v1.variable_scope("optimize")`` of the model graph.
    """
    lr = learning_rate(lr_feed, global_step, config)
    optimizer = tf.compat.v1.train.AdamOptimizer(
        lr, beta1=ADAM_BETA1, beta2=ADAM_BETA2, epsilon=ADAM_EPSILON
    )
    # ``minimize`` is exactly compute_gradients + apply_gradients; split here so that the harness
    # can fetch the very gradients each train op applies (same session.run, same rounding).
    grads_and_vars, train_ops = {}, {}
    for phase in ("joint", "vae", "som_init"):  # the original's creation order
        gvs = optimizer.compute_gradients(losses[PHASE_LOSS[phase]])
        grads_and_vars[phase] = [(g, v) for g, v in gvs if g is not None]
        train_ops[phase] = optimizer.apply_gradients(grads_and_vars[phase], global_step=global_step)
    return Optim(optimizer=optimizer, lr=lr, train_ops=train_ops, grads_and_vars=grads_and_vars)
