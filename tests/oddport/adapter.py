"""The odd port (tests/oddport) driven by the parity suite: the adapter a user writes for their own port.

    python -m harness.check_port tests.oddport.adapter:factory
    nox -s parity -- --model dpsom --variant tiny-dense --port-adapter tests.oddport.adapter:factory

``dpsom_tiny_dense.csv`` maps the canonical names onto the port's ``state_dict`` keys. The port has
a diagonal posterior: ``fc_mu`` is the first D columns of the canonical ``posterior.head``
(``slice``, a partial mapping, so ``posterior.head.*`` are STRUCTURAL), and ``fc_logvar`` has no
canonical counterpart at all (it keeps a deterministic value of its own). ``faithful`` is the
suite's own port through the same factory signature (tests of ``harness.check_port``).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from harness.adapters.torch import TorchPortAdapter
from harness.protocols import Batch
from .model import PHASES, OddConfig, OddDPSOM, pairwise_sq_dist, soft_assign
from .train import OddTrainer

TABLE = Path(__file__).with_name("dpsom_tiny_dense.csv")
LOSSES = {"nll": "loss.elbo.nll", "kl": "loss.elbo.kl", "elbo": "loss.elbo", "kl_pq": "loss.kl_pq", "som": "loss.som",
          "total": "loss.total", "som_init_commit": "loss.som_init.commit", "som_init_som": "loss.som_init.som",
          "som_init": "loss.som_init"}
NAMES = {**{f"{p[:3]}.{odd}{i}": f"{p}.{kind}{i}" for p in ("encoder", "decoder") for i in (1, 2, 3)
            for odd, kind in (("bn", "bn"), ("act", "fc"))},  # canonical fcN = the block's LeakyReLU output
         "mu": "posterior.mu", "z": "z", "logits": "decoder.logits", "z_dist": "som.z_dist", "q": "som.q", "bmu": "som.k"}


class OddPortAdapter(TorchPortAdapter):
    table: Any = TABLE  # the mapping table (a CSV path or rows)

    def __init__(self, config: Any, dtype: str = "float32") -> None:
        if config.convolution:
            raise ValueError("the odd port is dense only")
        odd = OddConfig(latent_dim=config.latent_dim, som_dim=tuple(config.som_dim), enc_dims=tuple(config.dense_enc_dims),
                        alpha=config.alpha, beta=config.beta, gamma=config.gamma, theta=config.theta, prior=config.prior,
                        prior_var=config.prior_var, q_epsilon=config.q_epsilon, bn_eps=config.bn_epsilon,
                        leaky_slope=config.leaky_relu_slope)  # the optimiser settings stay the port's own
        with torch.random.fork_rng(devices=[]):  # the same initial values in every copy (float32 and float64)
            torch.manual_seed(0)
            model = OddDPSOM(odd)
        self._logvar0 = {k: v.detach().numpy().copy() for k, v in model.fc_logvar.state_dict().items()}
        self.trainer = OddTrainer(model=model)
        super().__init__(model, self.table, config, dtype)
        self.name, self.absent, self._last = f"odd-{dtype}", self.absent | {"posterior.head"}, None

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """The canonical weights, and fc_logvar (no canonical counterpart) back at its initial value:
        a step between two set_weights (the BatchNorm detector's) must not leave it moved."""
        super().set_weights(weights)
        with torch.no_grad():
            for k, v in self.module.fc_logvar.state_dict(keep_vars=True).items():
                v.copy_(self.t(self._logvar0[k]))

    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    # --- forward and losses ---------------------------------------------------------------------
    def _canonical(self, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        res = {}
        for k, v in out.items():  # execution order kept
            if k == "logvar":
                res["posterior.scale_tril"] = torch.diag_embed(torch.exp(0.5 * v))
            else:
                res[NAMES[k]] = v.reshape(-1, 28, 28, 1) if k == "logits" else v
        return {k: self.numpy(v) for k, v in res.items()}

    def forward(self, batch: Batch) -> dict[str, np.ndarray]:
        with self.noise_scope(), torch.no_grad():
            return self._canonical(self.module(self.t(batch["x"]), self.t(batch["eps"])))

    def forward_isolated(self, batch: Batch, teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each layer fed the reference's input to it: a block the reference's previous BN output
        (its block output), the posterior its encoder output, z its mu and scale, the decoder its z."""
        m, T, out = self.module, (lambda k: self.t(teacher[k])), {}
        with self.noise_scope(), torch.no_grad():
            x = self.t(batch["x"]).reshape(len(batch["x"]), -1)
            for part, p, seq, h in (("encoder", "enc", m.enc, x), ("decoder", "dec", m.dec, T("z"))):
                for i in (1, 2, 3):
                    out[f"{p}.bn{i}"] = seq[3 * i - 2](seq[3 * i - 3](h))
                    out[f"{p}.act{i}"] = seq[3 * i - 1](out[f"{p}.bn{i}"])
                    h = T(f"{part}.bn{i}")  # what the reference's next Dense gets
                if p == "enc":
                    out["mu"], out["logvar"] = m.fc_mu(h), m.fc_logvar(h)
                    sd = torch.diagonal(T("posterior.scale_tril"), dim1=-2, dim2=-1)  # the port's z = mu + sd * eps
                    out["z"] = T("posterior.mu") + sd * self.t(batch["eps"])
            out["logits"] = m.dec[9](h)
            out["z_dist"] = pairwise_sq_dist(T("z"), m.embeddings_flat())
            out["q"] = soft_assign(T("som.z_dist"), m.config.alpha, m.config.q_epsilon)
            out["bmu"] = T("som.z_dist").argmin(dim=1)
        return self._canonical(out)

    def _terms(self, phase: str, batch: Batch) -> dict[str, torch.Tensor]:
        terms = self.module.loss_terms(phase, self.t(batch["x"]), self.t(batch["eps"]), self.t(batch["p"]))
        return {LOSSES[k]: v for k, v in terms.items()}

    def losses(self, batch: Batch) -> dict[str, float]:
        with self.noise_scope(), torch.no_grad():
            return {k: float(v) for k, v in self._terms("all", batch).items()}

    def loss_tensor(self, loss: str, batch: Batch):
        return self._terms("all", batch)[loss]

    # --- optimizer: one torch Adam per phase, the port's own trainer ---------------------------------
    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        with self.noise_scope():
            rec = self.trainer.step(phase, self.t(batch["x"]), lr_feed, self.t(batch["eps"]),
                                    self.t(batch["p"]) if phase == "joint" else None)
        self._last = phase
        out = {LOSSES.get(k, k): v for k, v in rec.items()}
        return {**out, "gradients": self.applied_gradients()} if return_gradients else out

    def optimizer_step(self, phase: str, lr_feed: float) -> dict[str, Any]:
        grads = {k: p.grad for k, p in self.module.named_parameters() if p.grad is not None}
        self._last = phase
        return self.trainer.apply_gradients(phase, grads, lr_feed)

    def optimizer_for(self, phase: str | None):
        """``phase``'s Adam; None: the one stepped last (none before any step)."""
        phase = phase or self._last
        return None if phase is None else self.trainer.optimizer(phase)

    def _write_optimizer(self, phase, scalars, slots) -> None:
        """torch Adam's exp_avg / exp_avg_sq from the canonical slots, its step from beta1_power
        (TF1's convention: β1^(t+1) after t steps); phase None without slots: no optimizer (reset)."""
        self.trainer.global_step = int(scalars.get("optim.global_step", self.trainer.global_step))
        if (phase or self._last) is None or (phase is None and not slots):
            self.trainer.optimizers.clear()
            self._last = None
            return
        opt = self.optimizer_for(phase)
        beta1 = opt.param_groups[0]["betas"][0]
        t = round(np.log(float(scalars["optim.beta1_power"])) / np.log(beta1)) - 1
        for key, p in self.module.named_parameters():
            if key in slots:
                m, v = (self.t(slots[key][s]).reshape(p.shape) for s in ("adam_m", "adam_v"))
                opt.state[p] = {"step": torch.tensor(float(t)), "exp_avg": m, "exp_avg_sq": v}

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        return float(self.trainer.learning_rate_at(lr_feed, global_step))

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        """Read off the phase's Adam; the ε placement measured on a throwaway copy: one step from
        gradient g = ε moves by lr·g/(|g| + ε) = lr/2 when ε is added after bias correction, by
        lr·g/(|g| + ε/√(1-β2)) ≈ lr/32 when before (TF1)."""
        opt = self.optimizer_for(phase or PHASES[0])
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        probe = type(opt)([p], **{**opt.defaults, "lr": 1.0})
        p.grad = torch.full_like(p, opt.defaults["eps"])
        probe.step()
        after = abs(float(p.detach()) + 0.5) < 0.05
        (b1, b2), eps = opt.defaults["betas"], opt.defaults["eps"]
        return {"beta1": float(b1), "beta2": float(b2), "epsilon": float(eps),
                "epsilon_placement": "after bias correction" if after else "before bias correction (TF1)"}

    def bn_modules(self) -> dict[str, Any]:
        return {f"{p}.bn{i}": seq[3 * i - 2] for p, seq in (("encoder", self.module.enc), ("decoder", self.module.dec)) for i in (1, 2, 3)}


def factory(config: Any, dtype: str) -> OddPortAdapter:
    """``--port-adapter tests.oddport.adapter:factory``: the odd port for a DPSOM config."""
    return OddPortAdapter(config, dtype)


def faithful(config: Any, dtype: str):
    """The suite's own DPSOM port, through the same factory signature."""
    from harness.models.dpsom import SPEC

    return SPEC.make_port(config, dtype)
