"""Adapters that drive DPSOM sides through one protocol (docs/dpsom-interface.md).

The compare engine and the CLI talk to :class:`Side` only. Each adapter imports its framework
lazily, so a torch-only machine can still drive the port.

Protocol: ``get_weights() / set_weights(dict)`` in canonical layout; ``forward(x, eps)`` -> every
named tensor; ``losses(x, eps, p)`` -> every loss term; ``step(phase, x, lr_feed, eps, p)`` -> the
per-step record; ``optimizer_state()`` -> canonical optimizer state; ``describe()`` -> what the side
actually executes (for the config-as-executed record); ``trace(x, eps, step=None)`` -> the forward
tensors plus the input of every BatchNorm, from one run (harness/bn_detector.py).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Protocol

import numpy as np

from ports.dpsom.config import DPSOMConfig


class Side(Protocol):
    name: str
    config: DPSOMConfig

    def get_weights(self) -> dict[str, np.ndarray]: ...
    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...
    def forward(self, x: np.ndarray, eps: np.ndarray) -> dict[str, np.ndarray]: ...
    def losses(self, x: np.ndarray, eps: np.ndarray, p: np.ndarray) -> dict[str, float]: ...
    def step(self, phase: str, x: np.ndarray, lr_feed: float, eps: np.ndarray, p: np.ndarray | None) -> dict[str, float]: ...
    def optimizer_state(self) -> dict[str, Any]: ...


class TorchDPSOM:
    """``ports.dpsom`` in float32 (default) or float64 (the noise-floor reference)."""

    def __init__(self, config: DPSOMConfig, dtype: str = "float32") -> None:
        import torch

        from ports.dpsom.model import DPSOM
        from ports.dpsom.train import Trainer

        self._torch = torch
        self.name = f"torch-{dtype}"
        self.config = config
        self.dtype = getattr(torch, dtype)
        model = DPSOM(config).to(self.dtype)
        self.trainer = Trainer(config, model=model)

    def _t(self, a: np.ndarray | None):
        return None if a is None else self._torch.as_tensor(np.asarray(a)).to(self.dtype if np.asarray(a).dtype.kind == "f" else None)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.trainer.model.get_weights()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.trainer.model.set_weights(weights)

    def forward(self, x: np.ndarray, eps: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            out = self.trainer.model(self._t(x), self._t(eps))
        return {k: v.numpy() for k, v in out.items()}

    def forward_isolated(self, x: np.ndarray, eps: np.ndarray, teacher: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every named tensor, each computed from the ``teacher``'s (the other side's) inputs."""
        with self._torch.no_grad():
            out = self.trainer.model(self._t(x), self._t(eps), teacher=teacher)
        return {k: v.numpy() for k, v in out.items()}

    def losses(self, x: np.ndarray, eps: np.ndarray, p: np.ndarray) -> dict[str, float]:
        with self._torch.no_grad():
            joint = self.trainer.compute_terms("joint", self._t(x), self._t(eps), self._t(p))
            som_init = self.trainer.compute_terms("som_init", self._t(x), self._t(eps), None)
        return {k: float(v) for k, v in {**joint, **som_init}.items()}

    def step(self, phase: str, x: np.ndarray, lr_feed: float, eps: np.ndarray, p: np.ndarray | None) -> dict[str, float]:
        return self.trainer.step(phase, self._t(x), lr_feed, eps=self._t(eps), p=self._t(p))

    def gradients(self, loss_name: str, x: np.ndarray, eps: np.ndarray, p: np.ndarray | None) -> dict[str, np.ndarray]:
        """d loss / d parameter, canonical names and layout; parameters without gradient are absent."""
        from harness.transplant import torch_to_canonical

        phase = "som_init" if loss_name.startswith("loss.som_init") else "joint"
        terms = self.trainer.compute_terms(phase, self._t(x), self._t(eps), self._t(p))
        self.trainer.optimizer.zero_grad()
        terms[loss_name].backward()
        params = dict(self.trainer.model.named_parameters())
        out = {
            r.canonical: torch_to_canonical(params[r.torch_key].grad.numpy(), r.torch_transform)
            for r in self.trainer.model._table
            if r.torch_key in params and params[r.torch_key].grad is not None
        }
        self.trainer.optimizer.zero_grad()
        return out

    def optimizer_constants(self) -> dict[str, Any]:
        """Adam's constants as the port's optimizer object holds them; the ε placement probed."""
        from ports.dpsom.optim import epsilon_hat

        opt = self.trainer.optimizer
        placement = "before bias correction (TF1)" if epsilon_hat(1.0, 0.5) == 2.0 else "after bias correction"
        return {"beta1": float(opt.beta1), "beta2": float(opt.beta2), "epsilon": float(opt.epsilon), "epsilon_placement": placement}

    def learning_rate_at(self, lr_feed: float, global_step: int) -> float:
        """The effective LR the port's step uses at ``global_step`` (the Trainer's own function)."""
        from ports.dpsom.optim import effective_learning_rate

        return float(effective_learning_rate(lr_feed, global_step, self.config.decay_steps, self.config.decay_factor))

    def apply_gradients(self, phase: str, grads: dict[str, np.ndarray], lr_feed: float) -> dict[str, float]:
        """One optimizer update from given canonical gradients (the other side's), isolating the optimizer."""
        from harness.transplant import canonical_to_torch
        from ports.dpsom.optim import effective_learning_rate

        tr, cfg = self.trainer, self.config
        if phase != tr.phase:
            tr.begin_phase(phase)
        lr = effective_learning_rate(lr_feed, tr.optimizer.global_step, cfg.decay_steps, cfg.decay_factor)
        params = dict(tr.model.named_parameters())
        tr.optimizer.zero_grad()
        for r in tr.model._table:
            if r.canonical in grads:
                params[r.torch_key].grad = self._t(canonical_to_torch(np.asarray(grads[r.canonical]), r.torch_transform))
        tr.optimizer.step(float(lr))
        return {"lr": float(lr), "global_step": tr.optimizer.global_step}

    def optimizer_state(self) -> dict[str, Any]:
        return self.trainer.get_optimizer_state()

    def set_optimizer_state(self, state: dict[str, Any]) -> None:
        self.trainer.set_optimizer_state(state)

    def trace(self, x: np.ndarray, eps: np.ndarray, step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        """Every forward tensor of ONE run plus ``<bn>.input``, the tensor each BatchNorm received (NHWC).

        In the mode a training step runs in. With ``step=(phase, lr_feed)`` ("vae" or "som_init") the
        run is the forward inside that optimizer step, which is taken: the batch statistics a moving-
        statistics update used, dropout masks included, are the ones returned.
        """
        from ports.dpsom.model import FrozenBatchNorm

        model, seen = self.trainer.model, {}

        def keep_input(name: str):
            def hook(module, args, output) -> None:
                t = args[0].detach()
                seen[f"{name}.input"] = (t.permute(0, 2, 3, 1) if t.dim() == 4 else t).numpy().copy()
            return hook

        def keep_outputs(module, args, output) -> None:
            seen.update({k: v.detach().numpy().copy() for k, v in output.items()})

        hooks = [m.register_forward_hook(keep_input(n)) for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)]
        hooks.append(model.register_forward_hook(keep_outputs))
        try:
            if step is None:
                with self._torch.no_grad():
                    model(self._t(x), self._t(eps))
            else:
                self.step(step[0], x, step[1], eps, None)
        finally:
            for h in hooks:
                h.remove()
        return seen


class TFReferenceDPSOM:
    """``reference_tf.dpsom`` (tf.compat.v1 graph in its own tf.Graph)."""

    def __init__(self, config: DPSOMConfig, dtype: str = "float32") -> None:
        from reference_tf import require_tensorflow

        require_tensorflow()
        from reference_tf.dpsom.model import DPSOM
        from reference_tf.dpsom.train import Trainer

        self.name = "tf-reference" if dtype == "float32" else f"tf-reference-{dtype}"
        self.config = config
        self.model = DPSOM(config, dtype=dtype)
        self.trainer = Trainer(config, model=self.model)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.model.set_weights(weights)

    def forward(self, x: np.ndarray, eps: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.forward(x, eps)

    def losses(self, x: np.ndarray, eps: np.ndarray, p: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in self.model.losses(x, eps, p).items()}

    def step(self, phase: str, x: np.ndarray, lr_feed: float, eps: np.ndarray, p: np.ndarray | None,
             return_gradients: bool = False) -> dict[str, Any]:
        return self.trainer.step(phase, x, lr_feed, eps=eps, p=p, all_terms=False, return_gradients=return_gradients)

    def gradients(self, loss_name: str, x: np.ndarray, eps: np.ndarray, p: np.ndarray | None) -> dict[str, np.ndarray]:
        return self.model.gradients(loss_name, x, eps, p)

    def optimizer_state(self) -> dict[str, Any]:
        return self.model.get_optimizer_state()

    def set_optimizer_state(self, state: dict[str, Any]) -> None:
        self.model.set_optimizer_state(state)

    @functools.cached_property
    def _bn_inputs(self) -> dict[str, Any]:
        """Per BN output in ``forward_tensors``, the one float tensor entering that layer's name scope
        from outside (Dropout's output in the dense encoder, the LeakyReLU elsewhere): read off the
        graph, so what feeds each BN is measured, not assumed."""
        import tensorflow as tf

        ops, found = self.model.graph.get_operations(), {}
        for name, out in self.model.forward_tensors.items():
            if not re.fullmatch(r"(encoder|decoder)\.bn\d+", name):
                continue
            scope = re.match(r".*?/batch_normalization(?:_\d+)?/", out.op.name).group(0)
            feeds = {t.name: t for op in ops if op.name.startswith(scope) for t in op.inputs
                     if not t.op.name.startswith(scope) and t.dtype == tf.float32 and t.shape.rank == out.shape.rank}
            if len(feeds) != 1:
                raise RuntimeError(f"{name}: expected one tensor entering {scope}, found {sorted(feeds)}")
            found[name] = next(iter(feeds.values()))
        return found

    def trace(self, x: np.ndarray, eps: np.ndarray, step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        """As :meth:`TorchDPSOM.trace`: forward tensors + ``<bn>.input`` from one ``session.run``,
        which with ``step=(phase, lr_feed)`` also runs that phase's train op."""
        m = self.model
        fetch: dict[str, Any] = {"values": {**m.forward_tensors, **{f"{n}.input": t for n, t in self._bn_inputs.items()}}}
        if step is None:
            return m.session.run(fetch, m._feed(x, eps))["values"]  # noqa: SLF001
        fetch["_train"] = m.optim.train_ops[step[0]]
        return m.session.run(fetch, m._feed(x, eps, None, step[1], need_p=True))["values"]  # noqa: SLF001

    def learning_rate_at(self, lr_feed: float, global_step: int) -> float:
        return self.model.learning_rate_at(lr_feed, global_step)

    def optimizer_constants(self) -> dict[str, Any]:
        """What the graph's ``tf.compat.v1.train.AdamOptimizer`` was built with (float32 in the graph)."""
        opt = self.model.optim.optimizer
        f32 = lambda v: float(np.float32(v))  # noqa: E731
        return {"beta1": f32(opt._beta1), "beta2": f32(opt._beta2), "epsilon": f32(opt._epsilon),  # noqa: SLF001
                "epsilon_placement": "before bias correction (TF1)"}
