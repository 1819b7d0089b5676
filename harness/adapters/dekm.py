"""DEKM's two sides as the engine's protocols (harness/protocols.py).

``TorchDEKM`` is ``ports.dekm`` through the table-driven torch adapter (harness/adapters/torch.py),
the path a user's port takes; ``TFReferenceDEKM`` wraps ``reference_tf.dekm`` (tf.keras, eager). A
DEKM batch is ``{"x": [B, ...], "V": [B, d, d], "t": [B, d]}``; both sides take ``V[0]``. The
optimizer state of a phase (its own Keras Adam) is ``<weight>/adam_m``, ``<weight>/adam_v`` and
``optim.iterations``. Each adapter imports its framework lazily.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import numpy as np

from harness.adapters.torch import TorchPortAdapter
from harness.protocols import Batch, Unsupported
from harness.transplant import TransplantError, load_table

PHASE_OF = {"loss.recon": "pretrain", "loss.cluster": "cluster"}
PROBE_GRADIENT = 1e-6  # the Adam probe's gradient: small enough that ε's placement decides the update


def adam_probe(update: float) -> str:
    """Name the ε convention from a first Adam step (lr 1, gradient g = ``PROBE_GRADIENT``): Keras'
    ε-hat gives √(1−β2)·g / (√(1−β2)·g + ε) (0.240 for ε 1e-7), torch's g / (g + ε) (0.990 for 1e-8)."""
    return f"first update at g=1e-6, lr=1: {update:.6g}"


def fit_records(fit, trainer, data: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """A side's own ``train.fit`` on the spec's data (harness/models/dekm.py ``ownloop_data``), its
    randomness injected: the pretraining epochs' index orders, and at refit r the k-means candidates
    ``kmeans_candidates(H, K, kmeans_seeds[r])`` from the side's OWN embeddings at that refit (the
    first n_init seeds). Records in the own-loop tier's form (harness/tier_ownloop.py): a clustering
    step's ``epoch`` names its refit and that refit's ``n_changed``, and a last ``stop`` step names why
    and when the loop ended (with the final ``acc`` / ``nmi`` and ``labels``)."""
    from harness.models.dekm import kmeans_candidates

    x, y, seeds = np.asarray(data["x"]), np.asarray(data["y"]), np.asarray(data["kmeans_seeds"])

    def inits(refit: int, n_init: int, H: np.ndarray) -> list[np.ndarray]:  # H: the refit's own embeddings
        return kmeans_candidates(H, trainer.config.n_clusters, seeds[refit % len(seeds), :n_init])

    out: list[dict[str, Any]] = []
    fit(trainer, x, y, pretrain_orders=list(np.asarray(data["pretrain_orders"])), kmeans_inits=inits, on_step=out.append)
    return [ownloop_record(r) for r in out]


def ownloop_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    base = {"global_step": rec.get("global_step"), "lr_feed": rec.get("lr"), "lr": rec.get("lr"), "p_step": None, "p": None}
    if rec["phase"] == "pretrain":
        return {"phase": "pretrain", "epoch": rec["epoch"], **base, "loss.recon": rec["loss.recon"]}
    if rec["phase"] == "cluster":
        return {"phase": "cluster", "epoch": f"refit {rec['refit']} (n_changed {rec['n_changed']})", **base, "loss.cluster": rec["loss.cluster"]}
    return {"phase": "stop", "epoch": f"{rec['reason']} after {rec['refits']} refits", **base,
            **{k: rec[k] for k in ("acc", "nmi", "labels") if k in rec}}


def evaluate_assignments(refit, embed_all, cluster_metrics, get_acc_nmi, data: Mapping[str, np.ndarray], config) -> dict[str, Any]:
    """A side's own evaluation as the original scores: its ``refit`` (k-means on its own H from the
    candidates from ``kmeans_seeds[0]``), the labels scored on every input (transductive) by its
    own metrics: the original's ``get_acc_nmi`` (``acc_original``, ``nmi_original``: rounded to 5
    decimals, square table) and ``cluster_metrics`` (ACC, arithmetic NMI, purity); ``distances``:
    squared distances of H to the centres."""
    from harness.models.dekm import kmeans_candidates

    x, y, seeds = np.asarray(data["x"]), np.asarray(data["y"]).astype(np.int64), np.asarray(data["kmeans_seeds"])
    H = embed_all(x)
    r = refit(H, np.full(len(x), -1), config.n_clusters, seeds.shape[1], kmeans_candidates(H, config.n_clusters, seeds[0]))
    labels = np.asarray(r.labels, np.int64)
    dist = ((np.asarray(H, np.float64)[:, None, :] - np.asarray(r.centres, np.float64)[None]) ** 2).sum(-1)
    acc, nmi = get_acc_nmi(y, labels)
    return {"assignments": labels, "labels": y, "distances": dist,
            "metrics": {**cluster_metrics(y, labels), "acc_original": float(acc), "nmi_original": float(nmi)},
            "nmi_average": "arithmetic", "assign_from": "k-means labels of the embeddings h (transductive)"}


def prepared(x: np.ndarray, y: np.ndarray, cluster_batch, batch_size: int) -> dict[str, np.ndarray]:
    """A side's own data (its preprocessing, in file order: the permutation is injected) in the tier's
    names: fed as float32 (Keras casts the float64 array at the model's input), evaluated on every
    input (transductive: ``x_eval`` is the training set), the clustering phase's batches over two
    passes from the side's own pointer rule, and the refit's one call over all N."""
    from harness.tier_data import batch_rows

    x, n, rows, index = np.asarray(x, np.float32), len(x), [], 0
    for _ in range(2 * -(-n // batch_size)):
        idx, index = cluster_batch(index, n, batch_size)
        rows.append(idx)
    y = np.asarray(y).astype(np.int64)
    return {"data.x_train": x, "data.y_train": y, "data.x_eval": x, "data.y_eval": y, "data.train_batches": batch_rows(rows, batch_size),
            "data.eval_batches": np.arange(n, dtype=np.int64)[None]}


def _variant(config) -> str:
    return "conv" if config.convolution else "dense"


class TorchDEKM(TorchPortAdapter):
    """``ports.dekm`` in float32 (default) or float64 (the noise-floor twin)."""

    def __init__(self, config, dtype: str = "float32", device: str = "cpu") -> None:
        import torch

        from ports.dekm.model import DEKM
        from ports.dekm.train import Trainer

        model = DEKM(config).to(device=device, dtype=getattr(torch, dtype))  # on its device before the Trainer: its generator and optimizer follow
        self.trainer = Trainer(config, model=model)
        super().__init__(model, load_table("dekm", _variant(config)), config, dtype, device)
        self.name = f"torch-{dtype}"

    def _x(self, batch: Batch):
        return self.t(batch["x"])

    def _vt(self, batch: Batch):
        return self.t(np.asarray(batch["V"])[0]), self.t(batch["t"])

    def forward(self, batch: Batch) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            out = self.trainer.model(self._x(batch))
        return {k: self.numpy(v) for k, v in out.items()}

    def forward_isolated(self, batch: Batch, teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            out = self.trainer.model(self._x(batch), teacher=teacher)
        return {k: self.numpy(v) for k, v in out.items()}

    def losses(self, batch: Batch) -> dict[str, float]:
        x, (V, t) = self._x(batch), self._vt(batch)
        with self._torch.no_grad():
            terms = {**self.trainer.compute_terms("pretrain", x), **self.trainer.compute_terms("cluster", x, V, t)}
        return {k: float(v) for k, v in terms.items()}

    def loss_tensor(self, loss: str, batch: Batch):
        return self.trainer.compute_terms(PHASE_OF[loss], self._x(batch), *self._vt(batch))[loss]

    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        V, t = self._vt(batch)
        record: dict[str, Any] = dict(self.trainer.step(phase, self._x(batch), lr_feed, V=V, t=t))
        if return_gradients:
            record["gradients"] = self.applied_gradients()
        for param in self.trainer.model.parameters():
            param.grad = None
        return record

    # --- the phase's Keras Adam ----------------------------------------------------------------------
    def optimizer_for(self, phase: str | None):
        return self.trainer.optimizers.get(phase or "pretrain")

    def _optimizer(self, phase: str):
        """The phase's optimizer, created (fresh, as the Trainer does at the phase's first step) if needed."""
        return self.trainer.optimizer(phase)

    def optimizer_step(self, phase: str, lr_feed: float) -> dict[str, Any]:
        opt = self._optimizer(phase)
        for group in opt.param_groups:
            group["lr"] = lr_feed
        opt.step()
        return {"lr": float(lr_feed), "global_step": opt.iterations}

    def _read_optimizer(self, phase: str | None):
        opt = self.optimizer_for(phase)
        slots: dict[str, dict[str, np.ndarray]] = {}
        for key, p in self.trainer.model.named_parameters():
            st = opt.state.get(p, {}) if opt is not None else {}
            if "exp_avg" in st:
                slots[key] = {"adam_m": self.numpy(st["exp_avg"]), "adam_v": self.numpy(st["exp_avg_sq"])}
            else:  # never stepped (or no gradient yet): Keras' zero slots
                zero = np.zeros(tuple(p.shape), self.numpy(p).dtype)
                slots[key] = {"adam_m": zero, "adam_v": zero.copy()}
        return {"optim.iterations": np.int64(opt.iterations if opt is not None else 0)}, slots

    def _write_optimizer(self, phase, scalars, slots) -> None:
        """Strict: every parameter's two slots and ``optim.iterations``; nothing written otherwise."""
        torch = self._torch
        params = dict(self.trainer.model.named_parameters())
        missing = sorted(f"{k}/{s}" for k in params for s in ("adam_m", "adam_v") if s not in slots.get(k, {}))
        if missing or "optim.iterations" not in scalars:
            raise TransplantError(f"{self.name}.set_optimizer_state: nothing loaded; missing {missing + ['optim.iterations'][:'optim.iterations' not in scalars]}")
        opt, n = self._optimizer(phase or "pretrain"), int(scalars["optim.iterations"])
        with torch.no_grad():
            for k, p in params.items():
                opt.state[p] = {"step": torch.tensor(float(n)), "exp_avg": torch.as_tensor(np.array(slots[k]["adam_m"])).to(p),
                                "exp_avg_sq": torch.as_tensor(np.array(slots[k]["adam_v"])).to(p)}
        opt.iterations = n

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        """The phase's optimizer class and constants, and the ε convention measured by a probe step."""
        import torch

        from ports.dekm.optim import make_optimizer

        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        probe = make_optimizer([w], self.config)
        for group in probe.param_groups:
            group["lr"] = 1.0
        w.grad = torch.full_like(w, PROBE_GRADIENT)
        probe.step()
        opt = self._optimizer(phase or "pretrain")
        b1, b2 = opt.param_groups[0]["betas"]
        return {"beta1": float(np.float32(b1)), "beta2": float(np.float32(b2)), "epsilon_update": adam_probe(-float(w.detach()[0])),
                "shared_between_phases": self.trainer.optimizer("pretrain") is self.trainer.optimizer("cluster")}

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        """Keras' Adam: a constant learning rate (its bias correction is inside the update)."""
        return float(lr_feed)

    def fresh_module(self):
        from ports.dekm.model import DEKM

        return DEKM(self.config)

    def prepare_data(self, raw: Mapping[str, np.ndarray], validation: bool = False) -> dict[str, np.ndarray]:
        """``ports.dekm.data.get_xy`` on the raw arrays (identity permutation) and ``train.cluster_batch``."""
        from ports.dekm.data import RawData, get_xy
        from ports.dekm.train import cluster_batch

        x, y = get_xy(RawData("MNIST", dict(raw), "data tier"), np.arange(len(raw["x_train"]) + len(raw["x_test"])),
                      flatten=not self.config.convolution)
        return prepared(x, y, cluster_batch, self.config.batch_size)

    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None, epochs: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """``ports.dekm.train.fit`` on the own-loop data (:func:`fit_records`); the whole loop only (its refits
        carry state beyond weights and optimizer: no ``epochs`` range)."""
        if epochs is not None:
            raise Unsupported(f"{self.name}: DEKM's loop runs whole (no epochs={epochs} range)")
        from ports.dekm import train

        return fit_records(train.fit, self.trainer, data)

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        """``ports.dekm``'s refit and ``evaluate.cluster_metrics`` (:func:`evaluate_assignments`)."""
        from ports.dekm.evaluate import cluster_metrics, get_acc_nmi
        from ports.dekm.train import refit

        return evaluate_assignments(refit, self.trainer.embed_all, cluster_metrics, get_acc_nmi, data, self.config)


class TFReferenceDEKM:
    """``reference_tf.dekm`` (tf.keras, eager), in float32 or float64."""

    def __init__(self, config, dtype: str = "float32") -> None:
        from reference_tf import require_tensorflow

        require_tensorflow()
        from reference_tf.dekm.model import DEKM
        from reference_tf.dekm.train import Trainer

        self.name = "tf-reference" if dtype == "float32" else f"tf-reference-{dtype}"
        self.config, self.dtype = config, dtype
        self.model = DEKM(config, dtype=dtype)
        self.trainer = Trainer(config, model=self.model)

    @staticmethod
    def _vt(batch: Batch):
        return np.asarray(batch["V"])[0], np.asarray(batch["t"])

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.model.set_weights(dict(weights))

    def forward(self, batch: Batch) -> dict[str, np.ndarray]:
        return self.model.forward(batch["x"])

    def losses(self, batch: Batch) -> dict[str, float]:
        V, t = self._vt(batch)
        terms = {**self.trainer.compute_terms("pretrain", batch["x"]), **self.trainer.compute_terms("cluster", batch["x"], V, t)}
        return {k: float(v) for k, v in terms.items()}

    def gradients(self, loss: str, batch: Batch) -> dict[str, np.ndarray]:
        """The reference's gradients; for ``loss.cluster`` without the decoder's: TF differentiates
        through the slice of the concat and gets zero tensors, torch (encoder only) gets None, and both
        mean "no gradient" (specs/dekm.md §4.3; the reference's own suite asserts the zeros)."""
        grads = self.trainer.gradients(loss, batch["x"], *self._vt(batch))
        return {k: v for k, v in grads.items() if not (PHASE_OF[loss] == "cluster" and k.startswith("decoder."))}

    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        V, t = self._vt(batch)
        return dict(self.trainer.step(phase, batch["x"], lr_feed, V=V, t=t, return_gradients=return_gradients))

    def optimizer_state(self, phase: str | None = None) -> dict[str, Any]:
        return self.trainer.optimizer_state(phase or "pretrain")

    def set_optimizer_state(self, state: Mapping[str, Any], phase: str | None = None) -> None:
        self.trainer.set_optimizer_state(phase or "pretrain", dict(state))

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        """As :meth:`TorchDEKM.optimizer_constants`, from the reference's own optimizer factory."""
        import tensorflow as tf

        from reference_tf.dekm.optim import make_optimizer

        w = tf.Variable([0.0], dtype=tf.float64)
        probe = make_optimizer(self.config)
        probe.learning_rate = 1.0
        probe.apply_gradients([(tf.constant([PROBE_GRADIENT], tf.float64), w)])
        opt = self.trainer.optimizer(phase or "pretrain")
        return {"beta1": float(np.float32(opt.beta_1)), "beta2": float(np.float32(opt.beta_2)),
                "epsilon_update": adam_probe(-float(w.numpy()[0])),
                "shared_between_phases": self.trainer.optimizer("pretrain") is self.trainer.optimizer("cluster")}

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        return float(lr_feed)

    def trace(self, batch: Batch, step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        raise Unsupported("DEKM has no BatchNorm: nothing to trace")

    def save_checkpoint(self, path: str) -> str:
        """The original's format: Keras ``save_weights`` to an .h5 file; returns its path."""
        path = path if path.endswith(".h5") else f"{path}.h5"
        self.model.save_checkpoint(path)
        return path

    def initial_weights(self) -> dict[str, np.ndarray]:
        return self.model.initial_weights()

    def prepare_data(self, raw: Mapping[str, np.ndarray], validation: bool = False) -> dict[str, np.ndarray]:
        """``reference_tf.dekm.data.mnist_xy`` (the original's MNIST branch) and ``train.cluster_batch``."""
        from reference_tf.dekm.data import mnist_xy
        from reference_tf.dekm.train import cluster_batch

        x, y = mnist_xy(*(raw[k] for k in ("x_train", "y_train", "x_test", "y_test")), flatten=not self.config.convolution)
        return prepared(x, y, cluster_batch, self.config.batch_size)

    def profile_step(self, phase: str, batch: Batch, lr_feed: float) -> dict[str, Any]:
        raise Unsupported(f"{self.name}: an eager Keras step has no graph trace to attribute (tf.profiler not wired)")

    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None, epochs: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """``reference_tf.dekm.train.fit`` on the own-loop data (:func:`fit_records`); the whole loop only (its refits
        carry state beyond weights and optimizer: no ``epochs`` range)."""
        if epochs is not None:
            raise Unsupported(f"{self.name}: DEKM's loop runs whole (no epochs={epochs} range)")
        from reference_tf.dekm import train

        return fit_records(train.fit, self.trainer, data)

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        """``reference_tf.dekm``'s refit and ``evaluate.cluster_metrics`` (:func:`evaluate_assignments`)."""
        from reference_tf.dekm.evaluate import cluster_metrics, get_acc_nmi
        from reference_tf.dekm.train import refit

        return evaluate_assignments(refit, self.trainer.embed_all, cluster_metrics, get_acc_nmi, data, self.config)
