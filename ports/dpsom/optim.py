"""TF1 Adam and the staircase learning-rate schedule, as the original DPSOM runs them (specs §6.1-6.2).

The original builds ONE ``tf.train.AdamOptimizer`` and three ``minimize`` ops (joint, VAE, SOM-init):
the m/v slots, ``beta1_power``/``beta2_power`` and ``global_step`` are shared by all phases, so the
bias correction uses the global step count. PyTorch's Adam differs in three ways, hence this class:

* TF1 adds ε to √v *before* bias correction: ``θ -= lr·√(1-β2^t)/(1-β1^t) · m/(√v + ε)``;
* the step count is global, not per parameter (a parameter idle in a phase keeps stale m/v but its
  next update uses the global t);
* a parameter with no gradient in a step (``grad is None``) is skipped entirely, slots untouched.

The β powers are float32 accumulators multiplied once per step, and the LR is computed in float32,
exactly like the TF variables and ops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .config import ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON

F32 = np.float32


def effective_learning_rate(lr_feed: float, global_step: int, decay_steps: int, decay_factor: float) -> np.float32:
    """``tf.train.exponential_decay(staircase=True)``: ``lr · r^floor(step / decay_steps)`` in float32,
    on the global step *before* this step's increment."""
    exponent = np.floor(F32(global_step) / F32(decay_steps))
    return F32(lr_feed) * np.power(F32(decay_factor), F32(exponent))


def epsilon_hat(epsilon: float, bc2_sqrt: float) -> float:
    """TF1 adds ε to √v *before* bias correction; in torch's form (after it) that is ε/√(1-β2^t)."""
    return epsilon / bc2_sqrt


class TF1Adam:
    """``tf.compat.v1.train.AdamOptimizer`` semantics over named parameters (see module docstring).

    Runs on torch's fused Adam kernel (7x faster than unfused ops on the 64 M-parameter conv head,
    and in float64 too: the unfused path allocates a parameter-sized √v temporary, 0.5 GiB per step
    on that head),
    which is the same update once lr, ε and the step count are set before every step: with
    lr' = α·(1-β1^t)/√(1-β2^t) and ε' = ε/√(1-β2^t), torch's ``lr'/(1-β1^t) · m/(√v/√(1-β2^t) + ε')``
    is TF1's ``α · m/(√v + ε)``, α = lr·√(1-beta2_power)/(1-beta1_power) in float32; every parameter's
    step count is forced to the global t (TF's shared ``beta1_power``/``beta2_power``).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        beta1: float = ADAM_BETA1,
        beta2: float = ADAM_BETA2,
        epsilon: float = ADAM_EPSILON,
    ) -> None:
        self.params = dict(named_params)
        self.beta1, self.beta2, self.epsilon = F32(beta1), F32(beta2), F32(epsilon)
        params = list(self.params.values())
        # TF's β are float32 tensors: 1 - 0.999f = 0.00099998713, not 0.001 (1.3e-5 relative in v).
        betas = (float(self.beta1), float(self.beta2))
        self._adam = torch.optim.Adam(params, lr=1e-3, betas=betas, eps=epsilon, fused=True)
        self._m: dict[str, Tensor] | None = None  # the slots, created on first use (see ``m``)
        self._v: dict[str, Tensor] | None = None
        self.beta1_power, self.beta2_power = F32(beta1), F32(beta2)  # TF's float32 accumulators start at β
        self.global_step = 0

    def _slots(self) -> None:
        """Every parameter's zero m/v at once (so a parameter first trained late still uses the global
        t), created on first use: a model that is only evaluated never holds 2x its weights in them."""
        if self._m is not None:
            return
        for p in self.params.values():
            # the step count on the parameter's device: the fused kernel reads it there (CPU or CUDA)
            self._adam.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device), "exp_avg": torch.zeros_like(p),
                                   "exp_avg_sq": torch.zeros_like(p)}
        self._m = {n: self._adam.state[p]["exp_avg"] for n, p in self.params.items()}
        self._v = {n: self._adam.state[p]["exp_avg_sq"] for n, p in self.params.items()}

    @property
    def m(self) -> dict[str, Tensor]:
        """First-moment slots by parameter name (TF's ``<var>/Adam``), live tensors."""
        self._slots()
        return self._m

    @property
    def v(self) -> dict[str, Tensor]:
        """Second-moment slots by parameter name (TF's ``<var>/Adam_1``), live tensors."""
        self._slots()
        return self._v

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update with learning rate ``lr`` (already decayed); advances the global counters.

        Parameters whose ``grad`` is None are skipped entirely, like TF's None gradients.
        """
        t = self.global_step + 1
        self._slots()
        updated = [p for p in self.params.values() if p.grad is not None]
        for p in updated:
            self._adam.state[p]["step"].fill_(t - 1)  # Adam increments it to t
        # TF's step size comes from the float32 accumulators: 1 - beta2_power loses ~1e-5 relative
        # to cancellation after a few steps, so α is computed exactly as TF does and torch's own
        # bias corrections (1 - β^t in double) are divided back out of lr and ε.
        alpha = F32(lr) * np.sqrt(F32(1) - self.beta2_power) / (F32(1) - self.beta1_power)
        bc1 = 1.0 - float(self.beta1) ** t
        bc2_sqrt = math.sqrt(1.0 - float(self.beta2) ** t)
        group = self._adam.param_groups[0]
        group["lr"] = float(alpha) * bc1 / bc2_sqrt
        group["eps"] = epsilon_hat(float(self.epsilon), bc2_sqrt)
        self._adam.step()
        for p in updated:  # the fused kernel writes in place unseen by autograd: make the version counters say so
            torch.autograd.graph.increment_version(p)
        self.beta1_power = F32(self.beta1_power * self.beta1)
        self.beta2_power = F32(self.beta2_power * self.beta2)
        self.global_step = t

    # --- state keyed by the parameter names given (the Trainer maps them to canonical names) ----
    def state_dict(self) -> dict[str, Tensor | int | np.float32]:
        state: dict[str, Tensor | int | np.float32] = {
            "optim.global_step": self.global_step,
            "optim.beta1_power": self.beta1_power,
            "optim.beta2_power": self.beta2_power,
        }
        for n in self.params:
            state[f"{n}/adam_m"], state[f"{n}/adam_v"] = self.m[n].clone(), self.v[n].clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        bad = [k for k in expected & set(state) if k.endswith(("/adam_m", "/adam_v"))
               and tuple(np.shape(state[k])) != tuple(self.m[k.rsplit("/", 1)[0]].shape)]
        if missing or unexpected or bad:
            raise ValueError(f"TF1Adam state: nothing loaded; missing {missing}, unexpected {unexpected}, shape mismatch {sorted(bad)}")
        self.global_step = int(state["optim.global_step"])
        self.beta1_power, self.beta2_power = F32(state["optim.beta1_power"]), F32(state["optim.beta2_power"])
        for n in self.params:
            self.m[n].copy_(torch.as_tensor(np.asarray(state[f"{n}/adam_m"])))
            self.v[n].copy_(torch.as_tensor(np.asarray(state[f"{n}/adam_v"])))
