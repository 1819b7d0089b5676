"""The toy reference: pure numpy, forward and backward by hand, float32 or float64 (``dtype``).

Canonical layout is the TF one: kernels ``(in, out)``. Forward, in execution order:
``encoder.fc1 = tanh(x W1 + b1)``, ``z = encoder.fc1 W2 + b2``, ``decoder.fc1 = tanh(z W3 + b3)``,
``decoder.out = decoder.fc1 W4 + b4``, ``cluster.dist = ||z - c||^2`` per sample. Losses:
``loss.recon`` = batch mean of the per-sample squared error, ``loss.cluster`` = batch SUM of
``cluster.dist`` (the decoder gets no gradient from it). Optimizer: one SGD with momentum shared by
both phases (``buf = m buf + g``, ``w -= lr buf``, torch's convention), only weights with a gradient
move; state ``<weight>/momentum`` and ``optim.global_step``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from harness.protocols import Unsupported
from harness.transplant import TransplantError, check_weights

LAYERS = (("encoder.fc1", "d", "hidden"), ("encoder.fc2", "hidden", "latent"), ("decoder.fc1", "latent", "hidden"),
          ("decoder.fc2", "hidden", "d"))
PHASE_LOSS = {"pretrain": "loss.recon", "cluster": "loss.cluster"}


def weight_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    out = {}
    for layer, a, b in LAYERS:
        out[f"{layer}.kernel"], out[f"{layer}.bias"] = (getattr(cfg, a), getattr(cfg, b)), (getattr(cfg, b),)
    return out


class NumpyReference:
    def __init__(self, config: Any, dtype: str = "float32") -> None:
        self.config, self.dtype = config, np.dtype(dtype)
        self.name = "numpy-reference" if dtype == "float32" else f"numpy-reference-{dtype}"
        rng = np.random.default_rng(2020)  # the reference's own (native) initialisation
        self.w = {k: rng.uniform(-0.5, 0.5, s).astype(self.dtype) for k, s in weight_shapes(config).items()}
        self.buf = {k: np.zeros_like(v) for k, v in self.w.items()}
        self.global_step = 0

    # --- weights ----------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.w.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(weights, {k: v.shape for k, v in self.w.items()}, where=f"{self.name}.set_weights")
        self.w = {k: np.asarray(weights[k], self.dtype).copy() for k in self.w}

    # --- forward, losses, backward ------------------------------------------------------------------
    def _run(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        w, x, c = self.w, np.asarray(batch["x"], self.dtype), np.asarray(batch["c"], self.dtype)
        out = {"encoder.fc1": np.tanh(x @ w["encoder.fc1.kernel"] + w["encoder.fc1.bias"])}
        out["z"] = out["encoder.fc1"] @ w["encoder.fc2.kernel"] + w["encoder.fc2.bias"]
        out["decoder.fc1"] = np.tanh(out["z"] @ w["decoder.fc1.kernel"] + w["decoder.fc1.bias"])
        out["decoder.out"] = out["decoder.fc1"] @ w["decoder.fc2.kernel"] + w["decoder.fc2.bias"]
        out["cluster.dist"] = np.sum((out["z"] - c) ** 2, axis=1)
        return out

    def forward(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(batch)

    def _losses(self, batch, f) -> dict[str, Any]:
        x = np.asarray(batch["x"], self.dtype)
        return {"loss.recon": np.mean(np.sum((f["decoder.out"] - x) ** 2, axis=1)), "loss.cluster": np.sum(f["cluster.dist"])}

    def losses(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {k: float(v) for k, v in self._losses(batch, self._run(batch)).items()}

    def gradients(self, loss: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        w, f = self.w, self._run(batch)
        x, c, g = np.asarray(batch["x"], self.dtype), np.asarray(batch["c"], self.dtype), {}
        if loss == "loss.recon":
            g_out = 2 * (f["decoder.out"] - x) / len(x)
            g["decoder.fc2.kernel"], g["decoder.fc2.bias"] = f["decoder.fc1"].T @ g_out, g_out.sum(0)
            g_a = (g_out @ w["decoder.fc2.kernel"].T) * (1 - f["decoder.fc1"] ** 2)
            g["decoder.fc1.kernel"], g["decoder.fc1.bias"] = f["z"].T @ g_a, g_a.sum(0)
            g_z = g_a @ w["decoder.fc1.kernel"].T
        elif loss == "loss.cluster":
            g_z = 2 * (f["z"] - c)
        else:
            raise KeyError(f"{self.name}: no loss {loss!r}")
        g["encoder.fc2.kernel"], g["encoder.fc2.bias"] = f["encoder.fc1"].T @ g_z, g_z.sum(0)
        g_a = (g_z @ w["encoder.fc2.kernel"].T) * (1 - f["encoder.fc1"] ** 2)
        g["encoder.fc1.kernel"], g["encoder.fc1.bias"] = x.T @ g_a, g_a.sum(0)
        return {k: g[k] for k in self.w if k in g}  # weight order

    # --- optimizer ----------------------------------------------------------------------------------
    def _apply(self, gradients: Mapping[str, np.ndarray], lr_feed: float) -> dict[str, Any]:
        m, lr = self.dtype.type(self.config.momentum), self.dtype.type(lr_feed)
        for k, grad in gradients.items():
            self.buf[k] = m * self.buf[k] + np.asarray(grad, self.dtype)
            self.w[k] = self.w[k] - lr * self.buf[k]
        self.global_step += 1
        return {"lr": float(lr_feed), "global_step": self.global_step}

    def step(self, phase: str, batch: Mapping[str, np.ndarray], lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        loss = PHASE_LOSS[phase]
        record: dict[str, Any] = {loss: self.losses(batch)[loss]}
        grads = self.gradients(loss, batch)
        record.update(self._apply(grads, lr_feed))
        return {**record, "gradients": grads} if return_gradients else record

    def optimizer_state(self, phase: str | None = None) -> dict[str, Any]:
        return {"optim.global_step": np.int64(self.global_step), **{f"{k}/momentum": v.copy() for k, v in self.buf.items()}}

    def set_optimizer_state(self, state: Mapping[str, Any], phase: str | None = None) -> None:
        want = set(self.optimizer_state())
        if set(state) != want:
            raise TransplantError(f"{self.name}.set_optimizer_state: nothing loaded; missing {sorted(want - set(state))}, "
                                  f"unexpected {sorted(set(state) - want)}")
        self.global_step = int(state["optim.global_step"])
        self.buf = {k: np.asarray(state[f"{k}/momentum"], self.dtype).copy() for k in self.w}

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        return {"kind": "SGD", "momentum": float(self.config.momentum), "dampening": 0.0, "nesterov": False}

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        return float(lr_feed)  # no schedule

    def trace(self, batch: Mapping[str, np.ndarray], step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        out = self.forward(batch)
        if step is not None:
            self.step(step[0], batch, step[1])
        return out

    def save_checkpoint(self, path: str) -> str:
        """The 'original format' of the toy: one .npz in canonical names."""
        np.savez(f"{path}.npz", **self.w)
        return f"{path}.npz"

    def initial_weights(self) -> dict[str, np.ndarray]:
        raise Unsupported("the toy reference's own initialisation (U(-0.5, 0.5) from one fixed stream) is not redrawn")

    def prepare_data(self, raw, validation: bool = False) -> dict[str, np.ndarray]:
        raise Unsupported("the toy reference has no data path of its own (it is fed arrays)")

    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None) -> list[dict[str, Any]]:
        raise Unsupported("the toy reference has no training loop of its own")

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        raise Unsupported("the toy reference has no evaluation of its own")

    def profile_step(self, phase: str, batch: Mapping[str, np.ndarray], lr_feed: float) -> dict[str, Any]:
        raise Unsupported("the toy reference has no profiler")
