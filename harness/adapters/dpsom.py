"""DPSOM's two sides as the engine's protocols (harness/protocols.py).

``TorchDPSOM`` is ``ports.dpsom`` through the table-driven torch adapter (harness/adapters/torch.py),
exactly the path a user's port takes; ``TFReferenceDPSOM`` wraps ``reference_tf.dpsom``. A DPSOM
batch is ``{"x": [B, 28, 28, 1], "eps": [B, D], "p": [B, K]}``. Each adapter imports its framework
lazily, so a torch-only machine can still drive the port.
"""

from __future__ import annotations

import functools
import re
from typing import Any
from collections.abc import Mapping

import numpy as np

from harness.adapters.torch import TorchPortAdapter
from harness.protocols import Batch
from harness.transplant import load_table
from ports.dpsom.config import DPSOMConfig


def _table(config: DPSOMConfig):
    return load_table("dpsom", "conv" if config.convolution else "dense")


class TorchDPSOM(TorchPortAdapter):
    """``ports.dpsom`` in float32 (default) or float64 (the noise-floor twin)."""

    def __init__(self, config: DPSOMConfig, dtype: str = "float32", device: str = "cpu") -> None:
        import torch

        from ports.dpsom.model import DPSOM
        from ports.dpsom.train import Trainer

        model = DPSOM(config).to(device=device, dtype=getattr(torch, dtype))  # on its device before the Trainer: its generator and optimizer follow
        self.trainer = Trainer(config, model=model)
        super().__init__(model, _table(config), config, dtype, device)
        self.name = f"torch-{dtype}"

    def _inputs(self, batch: Batch):
        return self.t(batch["x"]), self.t(batch["eps"])

    def forward(self, batch: Batch) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            out = self.trainer.model(*self._inputs(batch))
        return {k: self.numpy(v) for k, v in out.items()}

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Bernoulli means (sigmoid of the decoder's logits) of latent points ``z`` [n, D], NHWC."""
        from ports.dpsom.model import Trace

        with self._torch.no_grad():
            return self.numpy(self._torch.sigmoid(self.trainer.model.decoder(self.t(z), Trace(None))))

    def forward_isolated(self, batch: Batch, teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every named tensor, each computed from the ``teacher``'s (the other side's) inputs."""
        with self._torch.no_grad():
            out = self.trainer.model(*self._inputs(batch), teacher=teacher)
        return {k: self.numpy(v) for k, v in out.items()}

    def losses(self, batch: Batch) -> dict[str, float]:
        x, eps = self._inputs(batch)
        with self._torch.no_grad():
            joint = self.trainer.compute_terms("joint", x, eps, self.t(batch["p"]))
            som_init = self.trainer.compute_terms("som_init", x, eps, None)
        return {k: float(v) for k, v in {**joint, **som_init}.items()}

    def loss_tensor(self, loss: str, batch: Batch):
        phase = "som_init" if loss.startswith("loss.som_init") else "joint"
        return self.trainer.compute_terms(phase, *self._inputs(batch), self.t(batch["p"]))[loss]

    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False) -> dict[str, Any]:
        x, eps = self._inputs(batch)
        p = self.t(batch["p"]) if phase == "joint" else None
        record: dict[str, Any] = self.trainer.step(phase, x, lr_feed, eps=eps, p=p)
        if return_gradients:
            record["gradients"] = self.applied_gradients()
        for param in self.trainer.model.parameters():  # applied: not kept on the parameters (a copy of every weight)
            param.grad = None
        return record

    def optimizer_step(self, phase: str, lr_feed: float) -> dict[str, Any]:
        from ports.dpsom.optim import effective_learning_rate

        tr, cfg = self.trainer, self.config
        if phase != tr.phase:
            tr.begin_phase(phase)
        lr = effective_learning_rate(lr_feed, tr.optimizer.global_step, cfg.decay_steps, cfg.decay_factor)
        tr.optimizer.step(float(lr))
        return {"lr": float(lr), "global_step": tr.optimizer.global_step}

    def _read_optimizer(self, phase: str | None):
        """TF1Adam's state, keyed ``<torch key>/adam_m|v`` plus the ``optim.*`` scalars. The slots are
        views of the live tensors (not ``state_dict()``'s clones: 2 x the weights at once);
        :meth:`optimizer_state` copies each into the canonical layout."""
        opt, slots = self.trainer.optimizer, {}
        scalars = {"optim.global_step": opt.global_step, "optim.beta1_power": opt.beta1_power, "optim.beta2_power": opt.beta2_power}
        for name in opt.params:
            slots[name] = {"adam_m": self.numpy(opt.m[name]), "adam_v": self.numpy(opt.v[name])}
        return scalars, slots

    def _write_optimizer(self, phase, scalars, slots) -> None:
        """TF1Adam's ``load_state_dict``, in place: the same checks and writes, without the clone of
        every slot it makes (via ``state_dict()``) only to list the names it expects."""
        import torch

        opt = self.trainer.optimizer
        state = dict(scalars)
        for key, values in slots.items():
            state.update({f"{key}/{slot}": v for slot, v in values.items()})
        expected = {"optim.global_step", "optim.beta1_power", "optim.beta2_power"} | {f"{n}/{s}" for n in opt.params for s in ("adam_m", "adam_v")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        bad = [k for k in expected & set(state) if k.endswith(("/adam_m", "/adam_v"))
               and tuple(np.shape(state[k])) != tuple(opt.m[k.rsplit("/", 1)[0]].shape)]
        if missing or unexpected or bad:
            raise ValueError(f"TF1Adam state: nothing loaded; missing {missing}, unexpected {unexpected}, shape mismatch {sorted(bad)}")
        opt.global_step = int(state["optim.global_step"])
        opt.beta1_power, opt.beta2_power = np.float32(state["optim.beta1_power"]), np.float32(state["optim.beta2_power"])
        with torch.no_grad():
            for n in opt.params:
                opt.m[n].copy_(torch.as_tensor(np.asarray(state[f"{n}/adam_m"])))
                opt.v[n].copy_(torch.as_tensor(np.asarray(state[f"{n}/adam_v"])))

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        """Adam's constants as the port's optimizer object holds them; the ε placement probed."""
        from ports.dpsom.optim import epsilon_hat

        opt = self.trainer.optimizer
        placement = "before bias correction (TF1)" if epsilon_hat(1.0, 0.5) == 2.0 else "after bias correction"
        return {"beta1": float(opt.beta1), "beta2": float(opt.beta2), "epsilon": float(opt.epsilon), "epsilon_placement": placement}

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        """The effective LR the port's step uses at ``global_step`` (the Trainer's own function)."""
        from ports.dpsom.optim import effective_learning_rate

        return float(effective_learning_rate(lr_feed, global_step, self.config.decay_steps, self.config.decay_factor))

    def bn_modules(self) -> dict[str, Any]:
        from ports.dpsom.model import FrozenBatchNorm

        return {n: m for n, m in self.trainer.model.named_modules() if isinstance(m, FrozenBatchNorm)}

    def trace(self, batch: Batch, step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        """Forward tensors + ``<bn>.input`` (NHWC) from one run; the model's own named outputs are
        kept from inside a step too (the BN detector reads the step's BN inputs)."""
        seen: dict[str, np.ndarray] = {}

        def keep_outputs(module, args, output) -> None:
            seen.update({k: self.numpy(v).copy() for k, v in output.items()})

        hook = self.trainer.model.register_forward_hook(keep_outputs)
        try:
            traced = super().trace(batch, step)
        finally:
            hook.remove()
        return {**seen, **{k: v for k, v in traced.items() if k.endswith(".input")}}

    def fresh_module(self):
        """A new ``ports.dpsom.model.DPSOM``: its constructor is the port's own initialisation."""
        from ports.dpsom.model import DPSOM

        return DPSOM(self.config)

    def prepare_data(self, raw: Mapping[str, np.ndarray], validation: bool = False) -> dict[str, np.ndarray]:
        """``ports.dpsom.data`` on ``raw`` (float32 arrays, as the port feeds them); the training
        batches from the training loop's own per-epoch iterator (``train._batches``, once per epoch,
        as ``fit`` calls it), the evaluation's from ``data.batches`` (the rule
        ``evaluate.assign_clusters`` slices by, inline)."""
        from harness.tier_data import batch_rows
        from ports.dpsom import data as pdata
        from ports.dpsom import train as ptrain

        d = pdata.dpsom_data(pdata.RawMNIST(raw["x_train"], raw["y_train"], raw["x_test"], raw["y_test"], "data tier"), validation)
        B = self.config.batch_size
        train = [b for _ in range(2) for _, b in ptrain._batches(np.arange(len(d.x_train)), B)]  # noqa: SLF001
        return {"data.x_train": d.x_train, "data.y_train": d.y_train, "data.x_val": d.x_val, "data.y_val": d.y_val,
                "data.x_eval": d.x_eval, "data.y_eval": d.y_eval, "data.train_batches": batch_rows(train, B),
                "data.eval_batches": batch_rows(pdata.batches(np.arange(len(d.x_eval)), B), B)}

    # --- own loop and evaluation (harness/tier_ownloop.py, harness/tier_eval.py) ---------------------
    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None, epochs: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """``ports.dpsom.train.fit`` over the config's schedule (no checkpoints), one record per step."""
        from ports.dpsom import train

        records: list[dict[str, Any]] = []
        start, stop = epochs or (0, None)
        train.fit(self.trainer, np.asarray(data["x_train"]), None, eps=eps, on_step=records.append, progress=False,
                  start_at=start, stop_after=stop)
        return records

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        """``ports.dpsom.evaluate``: BMUs of the full batches of ``x_eval``, its ``cluster_metrics`` against ``y_eval``."""
        from ports.dpsom.evaluate import assign_clusters, cluster_metrics

        cfg = self.config
        k, dist = assign_clusters(self.trainer.model, np.asarray(data["x_eval"]), cfg, eps=eps, return_distances=True)
        k = k.astype(np.int64)
        y = np.asarray(data["y_eval"])[: len(k)].astype(np.int64)
        return {"assignments": k, "distances": dist, "labels": y, "metrics": cluster_metrics(y, k, cfg.nmi_average_method),
                "nmi_average": cfg.nmi_average_method, "assign_from": ASSIGN_FROM[cfg.eval_assignment]}

class TFReferenceDPSOM:
    """``reference_tf.dpsom`` (tf.compat.v1 graph in its own tf.Graph)."""

    def __init__(self, config: DPSOMConfig, dtype: str = "float32", optimizer_slots: bool = True) -> None:
        """``optimizer_slots=False``: a reference that is only evaluated (its Adam m/v are never
        initialised, no memory for them; ``step`` and ``optimizer_state`` fail)."""
        from reference_tf import require_tensorflow

        require_tensorflow()
        from reference_tf.dpsom.model import DPSOM
        from reference_tf.dpsom.train import Trainer

        self.name = "tf-reference" if dtype == "float32" else f"tf-reference-{dtype}"
        self.config = config
        self.model = DPSOM(config, dtype=dtype, optimizer_slots=optimizer_slots)
        self.trainer = Trainer(config, model=self.model)

    def close(self) -> None:
        """Close the session: its variables (weights, Adam slots) are freed; the side is unusable after."""
        self.model.close()

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.model.set_weights(weights)

    def forward(self, batch: Batch) -> dict[str, np.ndarray]:
        return self.model.forward(batch["x"], batch["eps"])

    def losses(self, batch: Batch) -> dict[str, float]:
        return {k: float(v) for k, v in self.model.losses(batch["x"], batch["eps"], batch["p"]).items()}

    def step(self, phase: str, batch: Batch, lr_feed: float, return_gradients: bool = False, run_metadata=None) -> dict[str, Any]:
        p = batch["p"] if phase == "joint" else None
        return self.trainer.step(phase, batch["x"], lr_feed, eps=batch["eps"], p=p, all_terms=False, return_gradients=return_gradients,
                                 run_metadata=run_metadata)

    def gradients(self, loss: str, batch: Batch) -> dict[str, np.ndarray]:
        return self.model.gradients(loss, batch["x"], batch["eps"], batch["p"])

    def profile_step(self, phase: str, batch: Batch, lr_feed: float) -> dict[str, Any]:
        """One :meth:`step` whose ``session.run`` is traced (``RunMetadata``, FULL_TRACE): each op's
        time, summed per canonical layer by its name scope (the mapping table's ``tf_variable`` column)."""
        import tensorflow as tf

        from harness.timing import attribute_graph_ops, graph_scopes

        metadata = tf.compat.v1.RunMetadata()
        self.step(phase, batch, lr_feed, run_metadata=metadata)
        ops = [(dev.device, node.node_name, float(node.op_end_rel_micros - node.op_start_rel_micros))
               for dev in metadata.step_stats.dev_stats for node in dev.node_stats]
        return attribute_graph_ops(ops, graph_scopes(_table(self.config)))

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Bernoulli means of latent points ``z`` [n, D] through the original's own switch: the decoder
        reads the fed ``z_e`` placeholder when ``is_training`` is False (DPSOM.py's decoding path)."""
        m, z = self.model, np.asarray(z, self.model.dtype.as_numpy_dtype)
        feed = {**m._feed(np.zeros((len(z), *self.config.image_shape)), np.zeros_like(z)), m.is_training: False, m.z_fed: z}  # noqa: SLF001
        logits = m.session.run(m.forward_tensors["decoder.logits"], feed)
        return 1.0 / (1.0 + np.exp(-logits))

    def optimizer_state(self, phase: str | None = None) -> dict[str, Any]:
        return self.model.get_optimizer_state()

    def set_optimizer_state(self, state: Mapping[str, Any], phase: str | None = None) -> None:
        self.model.set_optimizer_state(state)

    def save_checkpoint(self, path: str) -> str:
        """A TF checkpoint with the original DPSOM.py's variable names; returns its prefix."""
        return self.model.save(path)

    def restore_original_checkpoint(self, path: str) -> None:
        """The weights of a checkpoint written by the original ``DPSOM.py``, restored by TF's name
        matching (the graph's variables carry the original names), optimizer state untouched."""
        self.model.restore_weights(path)

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

    def trace(self, batch: Batch, step: tuple[str, float] | None = None) -> dict[str, np.ndarray]:
        """As :meth:`TorchDPSOM.trace`: forward tensors + ``<bn>.input`` from one ``session.run``,
        which with ``step=(phase, lr_feed)`` also runs that phase's train op."""
        m, x, eps = self.model, batch["x"], batch["eps"]
        fetch: dict[str, Any] = {"values": {**m.forward_tensors, **{f"{n}.input": t for n, t in self._bn_inputs.items()}}}
        if step is None:
            return m.session.run(fetch, m._feed(x, eps))["values"]  # noqa: SLF001
        fetch["_train"] = m.optim.train_ops[step[0]]
        return m.session.run(fetch, m._feed(x, eps, None, step[1], need_p=True))["values"]  # noqa: SLF001

    def learning_rate_at(self, phase: str, lr_feed: float, global_step: int) -> float:
        return self.model.learning_rate_at(lr_feed, global_step)

    def optimizer_constants(self, phase: str | None = None) -> dict[str, Any]:
        """What the graph's ``tf.compat.v1.train.AdamOptimizer`` was built with (float32 in the graph)."""
        opt = self.model.optim.optimizer
        f32 = lambda v: float(np.float32(v))  # noqa: E731
        return {"beta1": f32(opt._beta1), "beta2": f32(opt._beta2), "epsilon": f32(opt._epsilon),  # noqa: SLF001
                "epsilon_placement": "before bias correction (TF1)"}

    def initial_weights(self) -> dict[str, np.ndarray]:
        """Every weight's ``initial_value`` (the tensor its initializer assigns), evaluated without
        assigning: each run advances the graph's stateful random ops (seeded from the graph seed), so
        call k gives the (k+1)-th draw of a session (the first initialised the model's weights)."""
        m = self.model
        if not hasattr(self, "_initial_values"):
            with m.graph.as_default():
                self._initial_values = {c: m._vars[v].initial_value for c, v in m._weight_rows.items()}  # noqa: SLF001
        return m.session.run(self._initial_values)

    feed_dtype = None  # the model's (its x placeholder's) dtype; the data-only side below has no model

    def prepare_data(self, raw: Mapping[str, np.ndarray], validation: bool = False) -> dict[str, np.ndarray]:
        """``reference_tf.dpsom.data`` on ``raw``: its float64 arrays cast to the placeholder's dtype as
        ``model._feed`` casts every batch; the training batches as ``Trainer.fit`` takes them (``n //
        B`` per epoch from the one endless generator, two epochs), the evaluation's as many as
        ``evaluate.assign_clusters`` slices (``n // B``), from a fresh generator."""
        from harness.tier_data import batch_rows
        from reference_tf.dpsom import data as rdata

        d = rdata.dpsom_data(rdata.RawMNIST(raw["x_train"], raw["y_train"], raw["x_test"], raw["y_test"], "data tier"), validation)
        dtype = self.feed_dtype or self.model.dtype.as_numpy_dtype
        B = self.config.batch_size

        def taken(n: int, per_pass: int, passes: int) -> np.ndarray:
            gen = rdata.batches(np.arange(n), B)
            return batch_rows([next(gen) for _ in range(per_pass * passes)], B)

        return {"data.x_train": np.asarray(d.x_train, dtype), "data.y_train": d.y_train, "data.x_val": np.asarray(d.x_val, dtype),
                "data.y_val": d.y_val, "data.x_eval": np.asarray(d.x_eval, dtype), "data.y_eval": d.y_eval,
                "data.train_batches": taken(len(d.x_train), len(d.x_train) // B, 2),
                "data.eval_batches": taken(len(d.x_eval), len(d.x_eval) // B, 1)}

    # --- own loop and evaluation (harness/tier_ownloop.py, harness/tier_eval.py) ---------------------
    def fit_records(self, data: Mapping[str, np.ndarray], eps: Any = None, epochs: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """``reference_tf.dpsom.train.Trainer.fit`` over the config's schedule, one record per step
        (``data``: ``x_train``, and ``x_val`` for the native logging-run replay when ``eps`` is None)."""
        from types import SimpleNamespace

        records: list[dict[str, Any]] = []
        start, stop = epochs or (0, None)
        self.trainer.fit(SimpleNamespace(**{k: np.asarray(v) for k, v in data.items()}), progress=False, evaluate_at_end=False,
                         replay_rng=eps is None and "x_val" in data, eps=eps, on_step=records.append, start_at=start,
                         stop_after=stop)
        return records

    def evaluate_assignments(self, data: Mapping[str, np.ndarray], eps: Any = None) -> dict[str, Any]:
        """``reference_tf.dpsom.evaluate``: BMUs of the full batches of ``x_eval`` (a new session),
        ``harness.metrics.cluster_metrics`` against ``y_eval``."""
        from harness.metrics import cluster_metrics
        from reference_tf.dpsom.evaluate import assign_clusters

        k, dist = assign_clusters(self.model, np.asarray(data["x_eval"]), eps=eps, return_distances=True)
        y = np.asarray(data["y_eval"])[: len(k)].astype(np.int64)
        return {"assignments": k, "distances": dist, "labels": y, "metrics": cluster_metrics(y, k), "nmi_average": "geometric",
                "assign_from": ASSIGN_FROM[self.config.eval_assignment]}

class TFReferenceDPSOMData(TFReferenceDPSOM):
    """The reference's data path alone (``prepare_data``): no graph, no session, no TensorFlow import.
    What the spec's ``make_data_reference`` builds for the data tier; the model's methods raise
    :class:`~harness.protocols.Unsupported`. Fed dtype: float32, the original's placeholder."""

    feed_dtype = np.float32

    def __init__(self, config: DPSOMConfig) -> None:
        self.name = "tf-reference (data path)"
        self.config = config

    def __getattr__(self, name: str) -> Any:  # reached only for what __init__ did not set
        if name in ("model", "trainer"):
            from harness.protocols import Unsupported

            raise Unsupported(f"{self.name}: built for the data tier only, it has no {name}")
        raise AttributeError(name)


ASSIGN_FROM = {"sample": "z sample", "mean": "mu"}  # config.eval_assignment -> what the BMU is computed from
