"""Keras Adam as the original runs it (specs/dekm.md §1.5, §5.1), on top of ``torch.optim.Adam``.

Keras (``tf.keras.optimizers.Adam()``, lr 1e-3, β 0.9 / 0.999, ε 1e-7), iterations t from 1:
``lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)``, ``w ← w − lr_t·m/(√v + ε)`` — ε is added to √v *before* the bias
correction ("ε-hat"). Torch adds its ε after it: ``w ← w − lr/(1−β1ᵗ)·m/(√v/√(1−β2ᵗ) + ε)``. The two
agree in exact arithmetic when ε_torch = ε/√(1−β2ᵗ), but not in float32 (β rounded to float32
before the power, another operation order), so :class:`KerasAdam` writes Keras' update out.

The original builds two optimizers, one per phase, each fresh (``compile('adam')`` for pretraining, a
new ``Adam()`` for the clustering phase). ``iterations`` counts this optimizer's steps (Keras'
``optimizer.iterations``); torch's per-parameter ``step`` may lag for a parameter that got no
gradient (the decoder in the clustering phase: Keras feeds it zero gradients, which with fresh
moments leave it unchanged, exactly as skipping it does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .config import TORCH_ADAM_EPSILON, DEKMConfig


class TorchAdam(torch.optim.Adam):
    """Plain ``torch.optim.Adam`` that also counts its steps (``iterations``, the phase's global step)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = TORCH_ADAM_EPSILON) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        self.iterations = 0

    def step(self, closure=None):  # type: ignore[override]
        loss = super().step(closure)
        self.iterations += 1
        return loss


def _as_tf_casts(value: float, dtype: torch.dtype) -> Tensor:
    """``tf.cast(python_float, dtype)``: the float becomes a float32 constant first, then is cast (so β
    and the learning rate are float32-rounded even for a float64 variable)."""
    return torch.tensor(value, dtype=torch.float32).to(dtype)


class KerasAdam(torch.optim.Optimizer):
    """Keras' Adam update, operation for operation in the parameter's dtype (tf_keras ``Adam.update_step``):

    ``α = lr·√(1 − β2ᵗ)/(1 − β1ᵗ)`` with β and lr rounded to float32 (:func:`_as_tf_casts`), even for a
    float64 variable, *before* the power (in float32,
    β2 = 0.999 is 0.99900001287 and 1 − β2 is 1.3e-5 relatively off 1e-3: torch's Adam, which takes
    β as a Python double, moves every first step by 6.6e-6 relative), ``m += (g − m)(1 − β1)``,
    ``v += (g² − v)(1 − β2)``, ``w −= (m·α)/(√v + ε)``. State keys are torch Adam's (``exp_avg``,
    ``exp_avg_sq``, ``step``), so whatever reads a torch Adam reads this one."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-7) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=epsilon))
        self.epsilon = epsilon
        self.iterations = 0

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.iterations += 1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                t = torch.tensor(float(self.iterations), dtype=p.dtype)
                b1_power = torch.pow(_as_tf_casts(b1, p.dtype), t)
                b2_power = torch.pow(_as_tf_casts(b2, p.dtype), t)
                alpha = _as_tf_casts(group["lr"], p.dtype) * torch.sqrt(1 - b2_power) / (1 - b1_power)
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                m.add_((g - m) * (1 - b1))
                v.add_((g * g - v) * (1 - b2))
                p.sub_((m * alpha) / (torch.sqrt(v) + group["eps"]))
        return None


def make_optimizer(params: Iterable[Tensor], config: DEKMConfig) -> TorchAdam:
    """A fresh Adam for one phase: :class:`KerasAdam` (the original), or torch's with ε 1e-8 (``adam_epsilon="torch"``)."""
    betas = (config.beta_1, config.beta_2)
    if config.adam_epsilon == "torch":
        return TorchAdam(params, lr=config.learning_rate, betas=betas, eps=TORCH_ADAM_EPSILON)
    return KerasAdam(params, lr=config.learning_rate, betas=betas, epsilon=config.epsilon)
