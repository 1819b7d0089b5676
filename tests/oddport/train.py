"""OddTrainer: one torch.optim.Adam per phase, a global step shared across phases, LR staircase /5000.

``step(phase, x, lr_feed, eps, p)``: the phase's loss ('elbo' for vae, 'som_init' for som_init,
'total' for joint) on the current weights, one update of that phase's own Adam with
``lr = lr_feed * 0.99 ** floor(global_step / 5000)`` (pre-increment step), then ``global_step += 1``.
Each phase's Adam is created (over all parameters) the first time the phase is stepped and kept for
that phase afterwards; its moments and step counts are its own. Parameters without a gradient in a
step (everything but ``som_embeddings`` in som_init) are left alone by torch's Adam.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .model import PHASES, OddConfig, OddDPSOM

LOSS_OF_PHASE = {"vae": "elbo", "som_init": "som_init", "joint": "total"}


def learning_rate_at(lr_feed: float, global_step: int, decay_rate: float = 0.99, decay_steps: int = 5000) -> float:
    """Staircase exponential decay: ``lr_feed * decay_rate ** floor(global_step / decay_steps)``."""
    return lr_feed * decay_rate ** (int(global_step) // decay_steps)


class OddTrainer:
    def __init__(self, config: OddConfig | None = None, model: OddDPSOM | None = None) -> None:
        self.model = model if model is not None else OddDPSOM(config)
        self.config = self.model.config
        self.optimizers: dict[str, torch.optim.Adam] = {}
        self.global_step = 0

    def learning_rate_at(self, lr_feed: float, global_step: int) -> float:
        return learning_rate_at(lr_feed, global_step, self.config.decay_rate, self.config.decay_steps)

    def optimizer(self, phase: str) -> torch.optim.Adam:
        """The phase's own Adam, created over all parameters on first use."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if phase not in self.optimizers:
            self.optimizers[phase] = torch.optim.Adam(
                self.model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=self.config.adam_eps
            )
        return self.optimizers[phase]

    def _update(self, phase: str, lr_feed: float) -> float:
        lr = self.learning_rate_at(lr_feed, self.global_step)
        opt = self.optimizer(phase)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        self.global_step += 1
        return lr

    def step(self, phase: str, x: Tensor, lr_feed: float, eps: Tensor | None = None, p: Tensor | None = None) -> dict[str, float | int]:
        """One optimizer step; returns the phase's loss terms (before the update), ``lr``, ``global_step`` (after)."""
        self.model.train()
        opt = self.optimizer(phase)
        terms = self.model.loss_terms(phase, x, eps, p)
        opt.zero_grad(set_to_none=True)
        terms[LOSS_OF_PHASE[phase]].backward()
        lr = self._update(phase, lr_feed)
        record: dict[str, float | int] = {k: float(v.detach()) for k, v in terms.items()}
        record["lr"] = lr
        record["global_step"] = self.global_step
        return record

    def apply_gradients(self, phase: str, grads: Mapping[str, Tensor], lr_feed: float) -> dict[str, float | int]:
        """One update of the phase's Adam from given gradients keyed by parameter name
        (``model.named_parameters()`` names); a parameter not in ``grads`` gets no update."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise KeyError(f"unknown parameter name(s) {unknown}; known: {sorted(params)}")
        opt = self.optimizer(phase)
        opt.zero_grad(set_to_none=True)
        for name, g in grads.items():
            params[name].grad = torch.as_tensor(g).to(dtype=params[name].dtype).reshape(params[name].shape).clone()
        lr = self._update(phase, lr_feed)
        return {"lr": lr, "global_step": self.global_step}

    def optimizer_constants(self) -> dict[str, object]:
        return {"beta1": 0.9, "beta2": 0.999, "epsilon": self.config.adam_eps,
                "epsilon_placement": "after bias correction (torch)", "per_phase": True}
