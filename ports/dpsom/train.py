"""DPSOM training as the original runs it (specs/dpsom.md §6), in PyTorch.

Three phases share ONE TF1 Adam and one global step: VAE pretraining (``epochs_pretrain`` epochs
of L_ELBO at ``learning_rate_pretrain``), SOM initialisation (4 stages x ``som_init_epochs_per_stage``
epochs of L_a at 0.9 / 0.3 / 0.1 / 0.01) and joint training (``num_epochs`` epochs of
θ·L_ELBO + γ·KL(P‖Q) + β·L_SOM, with the target distribution P recomputed over the whole training
set at the start of every epoch, batch ``ii`` using rows ``ii·B … ii·B+B-1``). The LR is always
``lr_feed · 0.99^floor(global_step / 1000)``. Batches walk the training array in order, the
remainder dropped.

Not reproduced (RNG consumption and logging only): the original's extra logging ``session.run``s
(§6.5), each of which draws a fresh ε in TF.

Entry point: ``python -m ports.dpsom.train key=value ...`` (config keys, plus the run-level keys
``variant=``, ``data_dir=``, ``out_dir=``, ``resume=``, ``overwrite=``, ``results_dir=``, ``progress=``,
the same as the TF reference's).

Long runs keep work safe: a run does not start over another run's checkpoint unless told to resume
or overwrite it, a checkpoint is written only when every tensor in it is finite, and a resume reads
(without executing code) and checks the whole checkpoint before assigning anything.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import RUN_KEYS, DPSOMConfig, get_config, parse_flag, parse_overrides
from .losses import elbo_terms, joint_terms, loss_som_init, target_distribution
from .model import DPSOM, Trace, device_generator
from .optim import TF1Adam, effective_learning_rate

PHASES = ("vae", "som_init", "joint")
CHECKPOINT = "checkpoint.pt"  # the one checkpoint of a run, in its out_dir
CHECKPOINT_KEYS = ("config", "epochs_done", "model", "optimizer", "generator")
OPTIMIZER_SCALARS = {"optim.global_step": int, "optim.beta1_power": float, "optim.beta2_power": float}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names step, phase, epoch, term and last good checkpoint."""


class NonFiniteCheckpointError(FloatingPointError):
    """A weight or optimizer slot is NaN/inf at a checkpoint: it is not written, the previous one is kept."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, another config, missing / mis-shaped /
    non-finite tensors); raised before anything is assigned."""


@dataclass(frozen=True)
class Epoch:
    index: int
    phase: str
    lr_feed: float


def schedule(cfg: DPSOMConfig) -> list[Epoch]:
    """Every epoch of the run in order, with its phase and fed learning rate (§6.3)."""
    plan = [("vae", cfg.learning_rate_pretrain)] * cfg.epochs_pretrain
    for lr in cfg.som_init_learning_rates:
        plan += [("som_init", lr)] * cfg.som_init_epochs_per_stage
    plan += [("joint", cfg.learning_rate)] * cfg.num_epochs
    return [Epoch(i, phase, lr) for i, (phase, lr) in enumerate(plan)]


SYNC_EVERY = 50  # steps whose loss terms are read off the device at once in fit (one host sync)


@dataclass(frozen=True)
class PendingRecord:
    """A step's record whose loss terms are still a device tensor: the LR and global step are host
    numbers already (the schedule is computed on the host), only the terms need a synchronisation."""

    names: tuple[str, ...]
    values: torch.Tensor
    lr: float
    global_step: int

    def resolve(self, values: list[float] | None = None) -> dict[str, float]:
        """The record as :meth:`Trainer.step` returns it (``values``: the terms already read)."""
        record: dict[str, float] = dict(zip(self.names, self.values.tolist() if values is None else values))
        record["lr"] = self.lr
        record["global_step"] = self.global_step
        return record


def resolve_all(pending: list[PendingRecord]) -> list[dict[str, float]]:
    """Every record of ``pending`` with ONE device-to-host copy (the fast path's "log every k steps")."""
    if not pending:
        return []
    flat = torch.cat([r.values for r in pending]).tolist()
    bounds = np.cumsum([0] + [len(r.names) for r in pending])
    return [r.resolve(flat[a:b]) for r, a, b in zip(pending, bounds[:-1], bounds[1:])]


class Trainer:
    """Model + the one shared optimizer; ``step`` is one ``session.run(train_op)`` of the original."""

    def __init__(self, config: DPSOMConfig, model: DPSOM | None = None, generator: torch.Generator | None = None,
                 compiled: bool = False) -> None:
        """``compiled``: each step's loss terms (forward, losses and, through AOTAutograd, their backward)
        run through ``torch.compile``: the fast mode of full-schedule runs, not parity-exact (its own
        kernels and fusions: another summation order; measured drift in the README's T6 section)."""
        self.config = config
        self.compiled = compiled
        self.model = model if model is not None else DPSOM(config)
        self.optimizer = TF1Adam(self.model.named_parameters())
        self.generator = generator if generator is not None else device_generator(self.device, config.random_seed)
        self.phase: str | None = None
        self._heads: tuple[np.ndarray, tuple[int, ...], torch.Tensor] | None = None  # see frozen_heads

    @functools.cached_property
    def _compiled_terms(self) -> Callable[..., dict[str, torch.Tensor]]:
        """:meth:`compute_terms` through ``torch.compile``, made at the first compiled step (an eager
        trainer never imports the compiler)."""
        return torch.compile(self.compute_terms)

    def begin_phase(self, phase: str) -> None:
        """Called when the phase changes. Nothing is reset: the original's one Adam (slots, β powers,
        global step) carries over from VAE pretraining to SOM initialisation to joint training. Leaving
        the SOM initialisation frees :meth:`frozen_heads`' cache (N x 5150 floats: 1 GB on MNIST)."""
        self.phase = phase
        if phase != "som_init":
            self._heads = None

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live: inputs are moved there, noise is drawn there."""
        return next(self.model.parameters()).device

    @property
    def global_step(self) -> int:
        return self.optimizer.global_step

    def _tensor(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``a`` as a tensor in the model's float dtype (a float64 model fed float32 data casts it), on its device."""
        param = next(self.model.parameters())
        return torch.as_tensor(a, dtype=param.dtype, device=param.device)

    def _eps(self, eps: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
        return None if eps is None else self._tensor(eps)

    def compute_terms(self, phase: str, x: torch.Tensor, eps: torch.Tensor | None, p: torch.Tensor | None,
                      head: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss terms of ``phase`` with their graphs (the first one listed last: the minimised loss);
        ``head``: the batch's posterior head in the SOM-initialisation phase (:meth:`frozen_heads`)."""
        cfg, model = self.config, self.model
        if phase == "vae":
            out = model(x, eps, generator=self.generator)
            return elbo_terms(cfg, out, x)
        if phase == "som_init":
            with torch.no_grad():  # L_a stops the gradient at z: the encoder graph is not needed
                out = model(x, eps, decode=False, generator=self.generator, head=head)
            return loss_som_init(out["z"], model.som.flat(), out["som.k"], cfg.som_dim)
        if phase == "joint":
            if p is None:
                raise ValueError("the joint phase needs the target distribution p for this batch")
            out = model(x, eps, generator=self.generator)
            return joint_terms(cfg, out, x, p, model.som.flat())
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def step(self, phase: str, x: np.ndarray | torch.Tensor, lr_feed: float, eps=None, p=None, head=None) -> dict[str, float]:
        """One optimizer step; returns the loss terms before the update, the effective LR, the new global step."""
        return self.step_pending(phase, x, lr_feed, eps, p, head).resolve()

    def step_pending(self, phase: str, x: np.ndarray | torch.Tensor, lr_feed: float, eps=None, p=None, head=None) -> PendingRecord:
        """:meth:`step` with its loss terms left on the device (no host synchronisation): read them with
        :meth:`PendingRecord.resolve` or, for many steps at once, :func:`resolve_all`."""
        cfg = self.config
        if phase != self.phase:
            self.begin_phase(phase)
        lr = effective_learning_rate(lr_feed, self.optimizer.global_step, cfg.decay_steps, cfg.decay_factor)
        x = self._tensor(x)
        compute = self._compiled_terms if self.compiled else self.compute_terms
        terms = compute(phase, x, self._eps(eps), None if p is None else self._tensor(p), head)
        loss = terms[{"vae": "loss.elbo", "som_init": "loss.som_init", "joint": "loss.total"}[phase]]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step(float(lr))
        return PendingRecord(tuple(terms), torch.stack([t.detach() for t in terms.values()]), float(lr), self.optimizer.global_step)

    @torch.no_grad()
    def frozen_heads(self, x_train: np.ndarray) -> torch.Tensor | None:
        """The posterior head's output for every full batch of ``x_train``, computed once for the whole
        SOM initialisation. That phase trains the SOM alone (L_a stops the gradient at z), so the
        encoder, hence each batch's mu and L, is the same at every one of its 20 epochs (only ε, drawn
        per step, changes): the step skips 95 % of its forward (conv: the whole encoder; dense MNIST:
        the 2000 x 5150 head GEMM). Batch by batch, as the step runs it: the same kernels on the same
        shapes, so the same floats (from the second batch on with the packed forward weights of
        ``Dense.forward_weight``, which give the unpacked weights' floats). Recomputed when ``x_train`` or any encoder / posterior weight
        changed (their version counters: a step of another phase, set_weights, a loaded checkpoint).
        None where the encoder is not a function of its weights alone (the declared deviations
        ``bn_mode=batch_stats``, whose forward moves the moving statistics, and ``dropout_active``)."""
        cfg = self.config
        if cfg.bn_mode != "frozen_affine" or (cfg.dropout_active and cfg.dropout > 0):
            return None
        frozen = [p for n, p in self.model.named_parameters() if n.startswith(("encoder.", "posterior."))]
        versions = tuple(p._version for p in frozen)  # noqa: SLF001  (autograd's in-place counter)
        if self._heads is None or self._heads[0] is not x_train or self._heads[1] != versions:
            self._heads = None  # the old cache freed before the new one is built
            heads = [self.model.posterior.head(self.model.encoder(self._tensor(xb), Trace(), self.generator))
                     for _, xb in _batches(x_train, self.config.batch_size)]
            self._heads = (x_train, versions, torch.cat(heads))
        return self._heads[2]

    @torch.no_grad()
    def q_all(self, x: np.ndarray, chunk: int = 5100, eps: np.ndarray | None = None) -> np.ndarray:
        """Soft assignments for a whole set in chunks (one fresh ε per example, as the original)."""
        qs = []
        for start in range(0, len(x), chunk):
            e = None if eps is None else self._tensor(eps[start : start + chunk])
            out = self.model(self._tensor(x[start : start + chunk]), e, decode=False, generator=self.generator)
            qs.append(out["som.q"])
        return torch.cat(qs).cpu().numpy()

    # --- checkpoints ---------------------------------------------------------------------------
    def _optimizer_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """The optimizer state's keys: None for the plain-number counters, else the slot's shape."""
        shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(OPTIMIZER_SCALARS)
        for n, p in self.optimizer.params.items():
            shapes[f"{n}/adam_m"] = shapes[f"{n}/adam_v"] = tuple(p.shape)
        return shapes

    def save(self, path: Path, epochs_done: int) -> None:
        """Atomic and finite: the file is the old checkpoint or the new one, never half-written, and
        never holds a NaN/inf tensor (it is what a diverged run is resumed from). Only tensors and plain
        Python values are stored, so :meth:`load` can read it with ``weights_only=True``."""
        model = self.model.state_dict()
        optimizer = {k: (OPTIMIZER_SCALARS[k](v) if k in OPTIMIZER_SCALARS else v) for k, v in self.optimizer.state_dict().items()}
        bad = _nonfinite({**{f"model.{k}": v for k, v in model.items()}, **{f"optimizer.{k}": v for k, v in optimizer.items()}})
        if bad:
            raise NonFiniteCheckpointError(
                f"{path} not written after {epochs_done} epochs (global step {self.global_step}): non-finite {bad[0]} "
                f"(all non-finite: {bad}); the previous checkpoint, if any, is kept")
        payload = {
            "config": self.config.to_dict(),
            "epochs_done": int(epochs_done),
            "model": model,
            "optimizer": optimizer,
            "generator": self.generator.get_state(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> int:
        """All or nothing: the whole file is read with ``weights_only=True`` (loading never executes
        code) and checked against this trainer (config, every key, shape and finiteness of the model,
        optimizer and generator state) before anything is assigned, so a bad checkpoint leaves the
        trainer exactly as it was. Returns the number of epochs the checkpoint completed."""
        try:
            payload = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: not a readable checkpoint (torch.load weights_only=True: {reason})") from err
        if not isinstance(payload, dict) or sorted(payload) != sorted(CHECKPOINT_KEYS):
            found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path}: not a DPSOM port checkpoint: expected keys {list(CHECKPOINT_KEYS)}, found {found}")
        run_config = self.config.to_dict()
        if payload["config"] != run_config:
            saved = payload["config"] if isinstance(payload["config"], dict) else {}
            diff = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
            raise CheckpointError(f"{path}: checkpoint config differs from this run's (checkpoint, run): {diff}")
        n_epochs = len(schedule(self.config))
        done = payload["epochs_done"]
        if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= n_epochs:
            raise CheckpointError(f"{path}: epochs_done={done!r}, expected an integer in [0, {n_epochs}]")
        problems = _check_tensors(payload["model"], {k: tuple(v.shape) for k, v in self.model.state_dict().items()}, "model")
        problems += _check_tensors(payload["optimizer"], self._optimizer_shapes(), "optimizer")
        state = payload["generator"]
        expected = self.generator.get_state()
        if not isinstance(state, torch.Tensor) or state.dtype != expected.dtype or state.shape != expected.shape:
            found = (state.dtype, tuple(state.shape)) if isinstance(state, torch.Tensor) else type(state).__name__
            problems.append(f"generator: expected a {expected.dtype} tensor of shape {tuple(expected.shape)}, found {found}")
        if problems:
            raise CheckpointError(f"{path}: does not fit this trainer, nothing loaded: " + "; ".join(problems))
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.generator.set_state(state)
        return done


def _nonfinite(values: dict[str, Any]) -> list[str]:
    """Names of the floating tensors (one host sync for all) and numbers holding a NaN or inf."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    finite = torch.stack([torch.isfinite(values[k]).all().cpu() for k in names]).tolist() if names else []
    bad = [k for k, ok in zip(names, finite) if not ok]
    return bad + [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]


def _check_tensors(given: Any, shapes: dict[str, tuple[int, ...] | None], where: str) -> list[str]:
    """What keeps ``given`` from loading into a state with these ``shapes`` (None: a plain number):
    missing / unexpected keys, wrong shapes or types, non-finite values. Empty: it fits."""
    if not isinstance(given, dict):
        return [f"{where}: expected a dict of tensors, found {type(given).__name__}"]
    problems = []
    missing, unexpected = sorted(set(shapes) - set(given)), sorted(set(given) - set(shapes))
    if missing:
        problems.append(f"{where}: missing {missing}")
    if unexpected:
        problems.append(f"{where}: unexpected {unexpected}")
    for k in [k for k in shapes if k in given]:
        value, shape = given[k], shapes[k]
        if shape is None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append(f"{where}.{k}: expected a number, found {type(value).__name__}")
        elif not isinstance(value, torch.Tensor):
            problems.append(f"{where}.{k}: expected a tensor of shape {shape}, found {type(value).__name__}")
        elif tuple(value.shape) != shape:
            problems.append(f"{where}.{k}: expected shape {shape}, found {tuple(value.shape)}")
    bad = _nonfinite({k: given[k] for k in shapes if k in given and (shapes[k] is None or isinstance(given[k], torch.Tensor))})
    if bad:
        problems.append(f"{where}: non-finite {bad}")
    return problems


def check_out_dir(out_dir: Path | None, resume: bool, overwrite: bool) -> Path | None:
    """The run's checkpoint path, after refusing what would lose work: ``resume`` without a checkpoint
    to resume from, and a fresh run (``resume=False``) over another run's checkpoint unless
    ``overwrite`` (which replaces it at this run's first checkpoint)."""
    if out_dir is None:
        if resume:
            raise ValueError("resume=True needs an out_dir holding the checkpoint to resume from")
        return None
    ckpt = Path(out_dir) / CHECKPOINT
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"resume=True but there is no checkpoint {ckpt} to resume from")
    if not resume and ckpt.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} holds another run's checkpoint ({CHECKPOINT}); pass resume=true to "
                              "continue that run or overwrite=true to replace it")
    return ckpt


def _batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for i in range(len(x) // batch_size):
        yield i, x[i * batch_size : (i + 1) * batch_size]


# Hooks of the own loop (all optional; without them ``fit`` draws its own ε from the trainer's generator):
# ``eps(shape)`` returns the next ``shape[0]`` rows [n, D] of one stream of ε, which the loop takes in the
# order its forwards use them (at the start of a joint epoch the q pass over the whole training set, then
# one batch per step); an epoch's steps are drawn at once, before its first step, and moved to the device
# in one copy, so a step waits for no host-to-device transfer (the rows are the same as drawn step by step);
# ``on_step(record)`` receives every step's record (see :func:`run_epoch`).
EpsSource = Callable[[tuple[int, ...]], np.ndarray]


def run_epoch(trainer: Trainer, epoch: Epoch, x_train: np.ndarray, eps: EpsSource | None = None,
              sync_every: int = 1) -> Iterator[tuple[dict[str, float], dict[str, Any]]]:
    """One epoch of the schedule: for a joint epoch the target distribution P over the whole training
    set first (§6.4), then the in-order full batches. Yields each step's ``trainer.step`` record and
    what the step used: ``p`` (its rows of P, None outside the joint phase) and ``p_step`` (the global
    step at which that P was computed). ``sync_every=k``: the records are read off the device k steps
    at a time (and at the epoch's end), so a GPU is not made to wait for the host at every step; the
    steps, their order and their noise are the same, the records arrive in bursts."""
    if sync_every < 1:
        raise ValueError(f"sync_every={sync_every}: expected a positive number of steps")
    bs, D = trainer.config.batch_size, trainer.config.latent_dim
    p_all, p_step = None, None
    heads = trainer.frozen_heads(x_train) if epoch.phase == "som_init" else None
    if epoch.phase == "joint":
        p_step = trainer.global_step
        q = trainer.q_all(x_train, eps=None if eps is None else eps((len(x_train), D)))
        p_all = target_distribution(torch.from_numpy(q)).numpy()
    pending: list[tuple[PendingRecord, dict[str, Any]]] = []
    n = len(x_train) // bs
    step_eps = None if eps is None else trainer._tensor(eps((n * bs, D)))  # the epoch's ε, drawn in advance
    for ii, xb in _batches(x_train, bs):
        p = None if p_all is None else p_all[ii * bs : (ii + 1) * bs]
        head = None if heads is None else heads[ii * bs : (ii + 1) * bs]
        e = None if step_eps is None else step_eps[ii * bs : (ii + 1) * bs]
        pending.append((trainer.step_pending(epoch.phase, xb, epoch.lr_feed, eps=e, p=p, head=head), {"p": p, "p_step": p_step}))
        if len(pending) == sync_every or ii == n - 1:
            yield from zip(resolve_all([r for r, _ in pending]), [used for _, used in pending])
            pending = []


def fit(trainer: Trainer, x_train: np.ndarray, out_dir: Path | None, resume: bool = False, log_every: int = 1,
        eps: EpsSource | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True, overwrite: bool = False, start_at: int = 0, stop_after: int | None = None,
        sync_every: int = SYNC_EVERY) -> list[dict[str, float]]:
    """Run the whole schedule with progress bars, TensorBoard scalars, a checkpoint per epoch, resume.

    A non-finite loss term stops training with the step, phase and term named; the last checkpoint
    on disk is the last good epoch (a checkpoint holding a NaN/inf tensor is never written). A run
    refuses ``resume=True`` without a checkpoint, and a fresh run over another run's checkpoint unless
    ``overwrite`` (:func:`check_out_dir`). ``out_dir=None``: no checkpoints, no TensorBoard (a run kept in
    memory). ``eps`` / ``on_step``: the hooks above; the record ``on_step`` receives holds ``phase``
    (name), ``epoch`` (index in the schedule), ``global_step`` (after the step), ``lr_feed``, ``lr``
    (effective), ``p`` and ``p_step`` (:func:`run_epoch`) and every loss term of the phase.
    ``start_at=k`` begins at epoch k of the schedule from the trainer's current state (a run continued
    by its caller, who restored weights and optimizer; a resumed run starts where its checkpoint
    ends); ``stop_after=N`` stops once N epochs of the schedule are complete (a chunked run).
    ``sync_every``: the loss terms stay on the device and are read every that many steps and at every
    epoch's end (:func:`run_epoch`), so a non-finite term is found up to that many steps late, still
    named at its own step, and before that epoch's checkpoint.
    """
    cfg = trainer.config
    plan = schedule(cfg)
    bs = cfg.batch_size
    if len(x_train) < bs:
        raise ValueError(f"batch_size={bs} is larger than the {len(x_train)} training examples: not one full batch "
                         "(the remainder is dropped), so nothing would train")
    out_dir = None if out_dir is None else Path(out_dir)
    if resume and start_at:
        raise ValueError("start_at and resume=True both say where to start: pass one")
    ckpt = check_out_dir(out_dir, resume, overwrite)
    if out_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
    start = trainer.load(ckpt) if resume else int(start_at)
    end = len(plan) if stop_after is None else max(start, min(len(plan), int(stop_after)))
    last_good = ckpt if resume else None  # this run's: an overwritten run's checkpoint is not its own
    writer = SummaryWriter(str(out_dir / "tensorboard")) if out_dir is not None else None
    history: list[dict[str, float]] = []
    try:
        for epoch in tqdm(plan[start:end], desc="DPSOM epochs", initial=start, total=len(plan), unit="epoch", disable=not progress):
            bar = tqdm(run_epoch(trainer, epoch, x_train, eps, sync_every), total=len(x_train) // bs, desc=f"{epoch.phase} #{epoch.index}",
                       leave=False, disable=not progress)
            for record, used in bar:
                bad = [k for k, v in record.items() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLossError(
                        f"non-finite {bad[0]}={record[bad[0]]} at global step {record['global_step'] - 1} "
                        f"(phase {epoch.phase}, epoch {epoch.index}); last good checkpoint: "
                        f"{last_good if last_good is not None else 'none yet'}"
                    )
                if on_step is not None:
                    on_step({"phase": epoch.phase, "epoch": epoch.index, "lr_feed": float(epoch.lr_feed), **record, **used})
                record.update(phase=PHASES.index(epoch.phase), epoch=epoch.index)
                history.append(record)
                if writer is not None and record["global_step"] % log_every == 0:
                    for k, v in record.items():
                        writer.add_scalar(f"{epoch.phase}/{k}", v, record["global_step"])
            if ckpt is not None:
                trainer.save(ckpt, epoch.index + 1)
                last_good = ckpt
    finally:
        if writer is not None:
            writer.close()
    return history


def seed_everything(seed: int) -> dict[str, Any]:
    """Seed python, numpy and torch; deterministic, TF32-free torch math. Returns the switches."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # deterministic cuBLAS needs a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # its NaN fill of every empty() changes no result, costs time
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"seed": seed, "torch_deterministic": True, "torch_tf32": False}


def environment(device: str) -> dict[str, Any]:
    """A small record of where the run happened: versions, device, threads, git commit."""
    import platform
    import subprocess

    def git(*args: str) -> str:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        commit = (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "device": device,
        "torch.cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch.num_threads": torch.get_num_threads(),
        "torch.tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "torch.tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "torch.deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    for name in ("numpy", "scipy", "sklearn", "torch"):
        module = sys.modules.get(name)
        if module is not None:
            info[f"version.{name}"] = getattr(module, "__version__", "?")
    return info


# The errors a command line can provoke (bad keys or values, missing data or checkpoint, a run
# directory in use, a diverged run): reported on one line, like the reference's CLI.
USER_ERRORS = (KeyError, ValueError, OSError, FloatingPointError)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m ports.dpsom.train [variant=dense] [data_dir=...] [out_dir=...] [resume=false]
    [overwrite=false] [results_dir=results/runs] [progress=true] key=value ...`` (any DPSOMConfig field as key).

    ``data_dir``: a directory with MNIST / Fashion-MNIST or a Keras ``.npz`` (default
    ``$PARITY_DATA_DIR``; see :mod:`ports.dpsom.data`). An expected error (:data:`USER_ERRORS`) is
    printed as one ``error: ...`` line on stderr and exits with status 2.
    """
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2) from None


# the port's own run-level keys, beside the ones it shares with the reference: where it trains (a torch
# device) and how (MODES)
PORT_RUN_KEYS = (*RUN_KEYS, "device", "mode")
MODES = ("exact", "fast")  # exact: what the parity tiers run; fast: fast_mode() and the step compiled


def fast_mode() -> dict[str, Any]:
    """The fast mode's switches, after :func:`seed_everything`: TF32 and cuDNN's benchmark on, deterministic
    algorithms off (the Trainer compiles the step). Not parity-exact, nor reproducible from run to run;
    its drift from the exact mode is measured by the timing tier (README, T6). Returns the switches."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"torch_deterministic": False, "torch_tf32": True, "cudnn_benchmark": True, "compiled": True}


def _device(name: str) -> torch.device:
    """``device=`` as a torch device that is present (an error naming the key otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r}: not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA GPU here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: this host has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: expected cpu or cuda[:N]")
    return device


def _run(argv: list[str]) -> dict[str, Any]:
    from .data import load_dpsom_data
    from .evaluate import evaluate

    args = parse_overrides(argv)
    run = {k: args.pop(k) for k in PORT_RUN_KEYS if k in args}
    variant = run.get("variant", "dense")
    resume = parse_flag("resume", run.get("resume", "false"))
    overwrite = parse_flag("overwrite", run.get("overwrite", "false"))
    progress = parse_flag("progress", run.get("progress", "true"))
    device, mode = _device(run.get("device", "cpu")), run.get("mode", "exact")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {list(MODES)}")
    try:
        cfg = get_config(variant, **args)
    except KeyError as err:
        raise KeyError(f"{err.args[0]}; run-level keys: {list(PORT_RUN_KEYS)}") from None
    out_dir = Path(run.get("out_dir", f"runs/ports-dpsom-{variant}"))
    check_out_dir(out_dir, resume, overwrite)  # before the data and the model: fail in seconds, not after loading
    flags = seed_everything(cfg.random_seed)
    if mode == "fast":
        flags.update(fast_mode())
    data = load_dpsom_data(cfg.data_set, run.get("data_dir"), cfg.validation)
    trainer = Trainer(cfg, model=DPSOM(cfg).to(device), compiled=mode == "fast")  # the same initial weights on every device
    t0 = time.perf_counter()
    fit(trainer, data.x_train, out_dir, resume=resume, progress=progress, overwrite=overwrite)
    train_seconds = time.perf_counter() - t0
    metrics = evaluate(trainer.model, data.x_eval, data.y_eval, cfg)
    result = {
        "side": "ports.dpsom", "variant": variant, "mode": mode, "metrics": metrics, "config": cfg.to_dict(),
        "determinism": flags, "environment": environment(str(device)), "data_source": data.source,
        "train_seconds": train_seconds,  # fit alone (its checkpoints included), not the evaluation
    }
    results = Path(run.get("results_dir", "results/runs"))
    results.mkdir(parents=True, exist_ok=True)
    where = "" if (device.type, mode) == ("cpu", "exact") else f"-{device.type}-{mode}"  # the default run keeps its name
    target = results / f"dpsom-{variant}-{cfg.data_set}-torch{where}-seed{cfg.random_seed}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    os.replace(tmp, target)
    print(json.dumps(metrics, indent=2))
    return result


if __name__ == "__main__":
    main()
