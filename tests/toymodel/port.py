"""The toy port: a plain ``nn.Module`` (nn.Linear layers, torch layout ``(out, in)``) and its adapter,
a subclass of the table-driven :class:`harness.adapters.torch.TorchPortAdapter` (table.csv maps
the canonical ``(in, out)`` kernels with ``transpose``). One ``torch.optim.SGD`` with momentum for
both phases; its ``momentum_buffer`` is the canonical ``<weight>/momentum``.

``ToyNet.cluster_reduction`` is the knob the tests turn to plant a bug ("mean" instead of "sum").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.adapters.torch import TorchPortAdapter
from harness.protocols import Batch

TABLE = Path(__file__).with_name("table.csv")
PHASE_LOSS = {"pretrain": "loss.recon", "cluster": "loss.cluster"}


class ToyNet(nn.Module):
    cluster_reduction = "sum"

    def __init__(self, d: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Linear(d, hidden), nn.Linear(hidden, latent)
        self.dec1, self.dec2 = nn.Linear(latent, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"encoder.fc1": torch.tanh(self.enc1(x))}
        out["z"] = self.enc2(out["encoder.fc1"])
        out["decoder.fc1"] = torch.tanh(self.dec1(out["z"]))
        out["decoder.out"] = self.dec2(out["decoder.fc1"])
        out["cluster.dist"] = ((out["z"] - c) ** 2).sum(1)
        return out

    def loss_terms(self, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self(x, c)
        cluster = f["cluster.dist"].sum() if self.cluster_reduction == "sum" else f["cluster.dist"].mean()
        return {"loss.recon": ((f["decoder.out"] - x) ** 2).sum(1).mean(), "loss.cluster": cluster}


class ToyPort(TorchPortAdapter):
    def __init__(self, config: Any, dtype: str = "float32", device: str = "cpu") -> None:
        super().__init__(ToyNet(config.d, config.hidden, config.latent), TABLE, config, dtype, device)
        self.name, self.global_step = f"toy-torch-{dtype}", 0
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.0, momentum=config.momentum)

    def _xc(self, batch: Batch):
        return self.t(batch["x"]), self.t(batch["c"])

    def forward(self, batch: Batch) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: self.numpy(v) for k, v in self.module(*self._xc(batch)).items()}

    def forward_isolated(self, batch: Batch, teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        m, T = self.module, (lambda k: self.t(teacher[k]))
        with torch.no_grad():
            x, c = self._xc(batch)
            out = {"encoder.fc1": torch.tanh(m.enc1(x)), "z": m.enc2(T("encoder.fc1")), "decoder.fc1": torch.tanh(m.dec1(T("z"))),
                   "decoder.out": m.dec2(T("decoder.fc1")), "cluster.dist": ((T("z") - c) ** 2).sum(1)}
        return {k: self.numpy(v) for k, v in out.items()}

    def losses(self, batch: Batch) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in self.module.loss_terms(*self._xc(batch)).items()}

    def loss_tensor(self, loss: str, batch: Batch):
        return self.module.loss_terms(*self._xc(batch))[loss]

    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_tensor(PHASE_LOSS[phase], batch)
        loss.backward()
        grads = self.applied_gradients() if return_gradients else None
        record = {PHASE_LOSS[phase]: float(loss.detach()), **self.optimizer_step(phase, lr_feed)}
        return {**record, "gradients": grads} if return_gradients else record

    def optimizer_step(self, phase: str, lr_feed: float) -> dict[str, Any]:
        for group in self.opt.param_groups:
            group["lr"] = lr_feed
        self.opt.step()
        self.global_step += 1
        return {"lr": float(lr_feed), "global_step": self.global_step}

    def optimizer_for(self, phase: str | None):
        return self.opt

    def _read_optimizer(self, phase: str | None):
        slots = {}
        for key, p in self.module.named_parameters():
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            slots[key] = {"momentum": self.numpy(buf) if buf is not None else np.zeros(tuple(p.shape), self.dtype)}
        return {"optim.global_step": np.int64(self.global_step)}, slots

    def _write_optimizer(self, phase, scalars, slots) -> None:
        self.global_step = int(scalars["optim.global_step"])
        for key, p in self.module.named_parameters():
            self.opt.state[p]["momentum_buffer"] = self.t(slots[key]["momentum"]).clone()

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        g = self.opt.param_groups[0]
        return {"kind": type(self.opt).__name__, "momentum": float(g["momentum"]), "dampening": float(g["dampening"]),
                "nesterov": bool(g["nesterov"])}

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        return float(lr_feed)
