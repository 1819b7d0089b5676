"""OddDPSOM: a small, deliberately different PyTorch DPSOM (dense architecture only).

Architecture (``enc_dims = (h1, h2, h3)``, D = ``latent_dim``, K = rows * cols)::

    enc = Sequential(Linear(784, h1), BatchNorm1d(h1), LeakyReLU,     # enc.0 / enc.1 / enc.2
                     Linear(h1, h2),  BatchNorm1d(h2), LeakyReLU,     # enc.3 / enc.4 / enc.5
                     Linear(h2, h3),  BatchNorm1d(h3), LeakyReLU)     # enc.6 / enc.7 / enc.8
    fc_mu = Linear(h3, D); fc_logvar = Linear(h3, D)
    z = mu + exp(0.5 * logvar) * eps
    dec = Sequential(Linear(D, h3),  BatchNorm1d(h3), LeakyReLU,      # dec.0 / dec.1 / dec.2
                     Linear(h3, h2), BatchNorm1d(h2), LeakyReLU,      # dec.3 / dec.4 / dec.5
                     Linear(h2, h1), BatchNorm1d(h1), LeakyReLU,      # dec.6 / dec.7 / dec.8
                     Linear(h1, 784))                                 # dec.9: linear logits
    som_embeddings: Parameter [rows, cols, D], flattened row-major to [K, D]

Every BatchNorm1d (eps 1e-3) always runs in eval mode with running statistics 0 / 1, i.e. it is
the frozen affine map ``weight * x / sqrt(1 + 1e-3) + bias``; ``train()`` leaves it in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# tf.nn.leaky_relu's alpha=0.2 as TensorFlow executes it (a float32 attribute): 0.2f. The same as 0.2
# in float32 arithmetic; used so that float64 runs do not add a sixth, undeclared difference.
LEAKY_SLOPE = 0.20000000298023224

PHASES = ("vae", "som_init", "joint")


@dataclass(frozen=True)
class OddConfig:
    """Hyper-parameters (MNIST defaults of the original; the test uses tiny sizes)."""

    latent_dim: int = 100
    som_dim: tuple[int, int] = (8, 8)
    enc_dims: tuple[int, ...] = (500, 500, 2000)  # decoder uses them reversed
    n_pixels: int = 784  # x is [B, 28, 28, 1], flattened
    alpha: float = 10.0  # Student-t degrees of freedom
    beta: float = 0.25  # weight of the SOM loss
    gamma: float = 20.0  # weight of KL(P || Q)
    theta: float = 1.0  # weight of the ELBO
    prior: float = 0.5  # weight of the VAE KL inside the ELBO
    prior_var: float = 1.0  # prior standard deviation s: N(0, s^2 I)
    q_epsilon: float = 1e-7
    bn_eps: float = 1e-3
    leaky_slope: float = LEAKY_SLOPE
    # optimisation (used by train.py)
    decay_rate: float = 0.99
    decay_steps: int = 5000
    adam_eps: float = 1e-8

    @property
    def n_nodes(self) -> int:
        return self.som_dim[0] * self.som_dim[1]


def _block(n_in: int, n_out: int, cfg: OddConfig) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out, eps=cfg.bn_eps), nn.LeakyReLU(cfg.leaky_slope)]


def neighbour_table(som_dim: tuple[int, int], with_self: bool) -> Tensor:
    """[K, 4] (or [K, 5] with the node itself first) flat indices of the torus neighbours.

    Order: (self,) up = (r+1) % R, down = (r-1) % R, right = (c+1) % C, left = (c-1) % C.
    """
    rows, cols = som_dim
    table = []
    for node in range(rows * cols):
        r, c = divmod(node, cols)
        nbrs = [((r + 1) % rows) * cols + c, ((r - 1) % rows) * cols + c, r * cols + (c + 1) % cols, r * cols + (c - 1) % cols]
        table.append(([node] if with_self else []) + nbrs)
    return torch.tensor(table, dtype=torch.long)


class OddDPSOM(nn.Module):
    def __init__(self, config: OddConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else OddConfig()
        self.config = cfg
        h = tuple(cfg.enc_dims)
        enc: list[nn.Module] = []
        for n_in, n_out in zip((cfg.n_pixels, *h[:-1]), h):
            enc += _block(n_in, n_out, cfg)
        self.enc = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(h[-1], cfg.latent_dim)
        self.fc_logvar = nn.Linear(h[-1], cfg.latent_dim)
        rev = tuple(reversed(h))
        dec: list[nn.Module] = []
        for n_in, n_out in zip((cfg.latent_dim, *rev[:-1]), rev):
            dec += _block(n_in, n_out, cfg)
        dec.append(nn.Linear(rev[-1], cfg.n_pixels))
        self.dec = nn.Sequential(*dec)
        # typical port initialisation: normal(0, 0.05) clipped to +-0.1 (weights are set by the tests)
        self.som_embeddings = nn.Parameter(torch.randn(*cfg.som_dim, cfg.latent_dim).mul(0.05).clamp(-0.1, 0.1))
        self.register_buffer("nbr4", neighbour_table(cfg.som_dim, with_self=False), persistent=False)
        self.register_buffer("nbr5", neighbour_table(cfg.som_dim, with_self=True), persistent=False)
        self.train()

    def train(self, mode: bool = True) -> OddDPSOM:
        """Like nn.Module.train, but every BatchNorm1d stays in eval mode (frozen running stats 0 / 1)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.eval()
        return self

    # ------------------------------------------------------------------------------------------
    def embeddings_flat(self) -> Tensor:
        return self.som_embeddings.reshape(-1, self.config.latent_dim)

    @staticmethod
    def _run(seq: nn.Sequential, h: Tensor, prefix: str, out: dict[str, Tensor]) -> Tensor:
        block = 0
        for layer in seq:
            h = layer(h)
            if isinstance(layer, nn.BatchNorm1d):
                block += 1
                out[f"{prefix}.bn{block}"] = h
            elif isinstance(layer, nn.LeakyReLU):
                out[f"{prefix}.act{block}"] = h
        return h

    def forward(self, x: Tensor, eps: Tensor | None = None) -> dict[str, Tensor]:
        """Named intermediates of one pass, in execution order.

        ``x``: [B, 28, 28, 1] (any shape with B first and 784 values per example); ``eps``: [B, D]
        standard normal, drawn from torch's global generator when None.
        """
        dtype = self.som_embeddings.dtype
        x = torch.as_tensor(x).to(dtype)
        out: dict[str, Tensor] = {}
        h = self._run(self.enc, x.reshape(x.shape[0], -1), "enc", out)
        mu = out["mu"] = self.fc_mu(h)
        logvar = out["logvar"] = self.fc_logvar(h)
        if eps is None:
            eps = torch.randn_like(mu)
        z = out["z"] = mu + torch.exp(0.5 * logvar) * torch.as_tensor(eps).to(dtype)
        out["logits"] = self._run(self.dec, z, "dec", out)
        dist = out["z_dist"] = pairwise_sq_dist(z, self.embeddings_flat())
        out["q"] = soft_assign(dist, self.config.alpha, self.config.q_epsilon)
        out["bmu"] = dist.argmin(dim=1)
        return out

    def loss_terms(self, phase: str, x: Tensor, eps: Tensor | None = None, p: Tensor | None = None) -> dict[str, Tensor]:
        """Loss terms of ``phase`` ('vae', 'som_init', 'joint'; 'all' = joint + som_init), with graphs.

        vae: nll, kl, elbo. som_init: som_init_commit, som_init_som, som_init.
        joint: nll, kl, elbo, kl_pq, som, total (needs ``p`` [B, K]).
        """
        if phase not in (*PHASES, "all"):
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES} or 'all'")
        cfg = self.config
        out = self(x, eps)
        x_flat = torch.as_tensor(x).to(out["z"].dtype).reshape(out["z"].shape[0], -1)
        terms: dict[str, Tensor] = {}
        if phase in ("vae", "joint", "all"):
            terms["nll"] = bernoulli_nll(out["logits"], x_flat)
            terms["kl"] = diag_gauss_kl(out["mu"], out["logvar"], cfg.prior_var)
            terms["elbo"] = terms["nll"] + cfg.prior * terms["kl"]
        if phase in ("joint", "all"):
            if p is None:
                raise ValueError("the joint loss needs the target distribution p [B, K]")
            p = torch.as_tensor(p).to(x_flat.dtype)
            q_sg = soft_assign(pairwise_sq_dist(out["z"].detach(), self.embeddings_flat()), cfg.alpha, cfg.q_epsilon)
            terms["kl_pq"] = kl_pq(p, out["q"])
            terms["som"] = som_loss(out["q"], q_sg, self.nbr4)
            terms["total"] = cfg.theta * terms["elbo"] + cfg.gamma * terms["kl_pq"] + cfg.beta * terms["som"]
        if phase in ("som_init", "all"):
            terms.update(som_init_loss(out["z"], self.embeddings_flat(), out["bmu"], self.nbr5))
        return terms


# --- loss pieces -----------------------------------------------------------------------------------
def pairwise_sq_dist(z: Tensor, m: Tensor) -> Tensor:
    """[B, K]: sum_d (z_id - m_jd)^2."""
    return (z[:, None, :] - m[None, :, :]).pow(2).sum(-1)


def soft_assign(z_dist: Tensor, alpha: float, q_eps: float) -> Tensor:
    """Student-t: t = eps + 1 / (1 + d/alpha)^((alpha+1)/2); q = t / sum_j t."""
    t = q_eps + 1.0 / (1.0 + z_dist / alpha).pow((alpha + 1.0) / 2.0)
    return t / t.sum(dim=1, keepdim=True)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels, mean over the batch."""
    nll = x * F.softplus(-logits) + (1.0 - x) * F.softplus(logits)
    return nll.sum(dim=1).mean()


def diag_gauss_kl(mu: Tensor, logvar: Tensor, prior_std: float) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, s^2 I)), mean over the batch:

    0.5 * sum_d [(exp(logvar) + mu^2) / s^2 - 1 + 2 ln s - logvar].
    """
    s2 = prior_std**2
    kl = 0.5 * ((logvar.exp() + mu.pow(2)) / s2 - 1.0 + 2.0 * math.log(prior_std) - logvar).sum(dim=1)
    return kl.mean()


def kl_pq(p: Tensor, q: Tensor) -> Tensor:
    """KL(P || Q): sum over nodes, mean over the batch."""
    return (p * torch.log(p / q)).sum(dim=1).mean()


def som_loss(q: Tensor, q_sg: Tensor, nbr4: Tensor) -> Tensor:
    """-mean_i sum_j q_ij (detached) * sum over the 4 torus neighbours e of j of log q_sg[i, e]."""
    log_nbrs = torch.log(q_sg)[:, nbr4].sum(dim=-1)  # [B, K]
    return -(q.detach() * log_nbrs).sum(dim=1).mean()


def som_init_loss(z: Tensor, m: Tensor, bmu: Tensor, nbr5: Tensor) -> dict[str, Tensor]:
    """Classic SOM initialisation (embeddings only): commit over B*D, som over B*5*D (self + 4)."""
    zd = z.detach()
    commit = (zd - m[bmu]).pow(2).mean()
    som = (zd[:, None, :] - m[nbr5[bmu]]).pow(2).mean()
    return {"som_init_commit": commit, "som_init_som": som, "som_init": som + commit}
