"""Training of the DPSOM TF reference: the original's three phases on the original's graph.

Reproduces ``train_model`` of ``DPSOM.py`` (github ratschlab/dpsom, commit 8e3cddc, HEAD eb41e7d;
paper arXiv 1910.01590), specs/dpsom.md §6:

1. VAE pretraining: ``epochs_pretrain`` (15) epochs of the ELBO at ``learning_rate_pretrain``;
2. SOM initialisation: ``L_a`` for ``som_init_epochs_per_stage`` (5) epochs at each of the LRs
   0.9 / 0.3 / 0.1 / 0.01;
3. joint training: ``num_epochs`` (300) epochs of the total loss at ``learning_rate``; at the start
   of every epoch q is computed for the whole training set (chunks of 5 100, one fresh ε per
   example) and the DEC target p from it; batch ``ii`` uses rows ``ii*B .. ii*B+B-1`` of p.

One in-order batch generator (data.py) runs through all phases (``n_train // batch_size`` full batches per
pass, remainder dropped); the learning rate fed per phase is decayed on the shared global step
(optim.py). A checkpoint with the original variable names is written after every epoch.

Deviations (logging only, no effect on the update rule):

* The original's extra logging ``session.run``s (§6.5: a val and a train loss every 100 steps in
  phases 1–2; a val loss after every joint step plus 4 runs every 100 steps; a q pass over the
  whole val stream at the start of every joint epoch) are not evaluated. Each of them drew one
  fresh ε of its batch size from the single native ε op, so by default (``replay_rng=True``)
  ``fit`` advances that stream by exactly those draws without computing anything else: a native
  run of ``fit`` then consumes the same ε as ``DPSOM.py`` and (same seed, same data, CPU) follows
  the original's trajectory bit for bit. TensorBoard scalars are written from the values fetched
  with each training step instead of from the logging runs.
* Resume restarts every native random stream (a new ``Session``), and the batch generator at the
  start of a pass, which is where every epoch starts; a resumed run is therefore no longer on the
  original's ε stream.

Long runs keep work safe (the port's rules too): a run does not start over another run's
checkpoints unless told to resume or overwrite them, a checkpoint is written only when every variable
is finite, a resume checks the whole checkpoint (names, shapes, finiteness) before restoring anything,
``state.json`` names its checkpoint relative to ``out_dir`` (a moved run directory still resumes), and
pruning never deletes the run's own newest checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from reference_tf import require_tensorflow
from reference_tf.dpsom.config import RUN_KEYS, DPSOMConfig, get_config, parse_flag, parse_overrides
from reference_tf.dpsom.losses import target_distribution
from reference_tf.dpsom.model import LOSS_KEYS, DPSOM
from reference_tf.dpsom.optim import PHASE_LOSS, PHASES

tf = require_tensorflow()

# The loss terms each phase's objective is made of (fetched with its train op by fit()).
PHASE_TERMS = {
    "vae": ("loss.elbo.nll", "loss.elbo.kl", "loss.elbo"),
    "som_init": ("loss.som_init.commit", "loss.som_init.som", "loss.som_init"),
    "joint": ("loss.elbo.nll", "loss.elbo.kl", "loss.elbo", "loss.kl_pq", "loss.som", "loss.total"),
}
STATE = "state.json"  # in out_dir: epochs done, the checkpoint (relative to out_dir), config
CHECKPOINT_NAME = re.compile(r"epoch-(\d+)\.(index|meta|data-\d+-of-\d+)")  # the files of one Saver checkpoint


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names step, phase, epoch, term and last checkpoint."""


class NonFiniteCheckpointError(FloatingPointError):
    """A variable is NaN/inf at a checkpoint: it is not written, the previous one is kept."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable state or checkpoint, another config,
    missing / mis-shaped / non-finite variables); raised before anything is restored."""


@dataclass(frozen=True)
class Epoch:
    phase: str
    lr_feed: float
    index: int  # 0-based position in the whole schedule


def schedule(config: DPSOMConfig) -> list[Epoch]:
    """The original's epoch plan: VAE, then 4 SOM-init LR stages, then joint epochs."""
    plan = [("vae", config.learning_rate_pretrain)] * config.epochs_pretrain
    for lr in config.som_init_learning_rates:
        plan += [("som_init", lr)] * config.som_init_epochs_per_stage
    plan += [("joint", config.learning_rate)] * config.num_epochs
    return [Epoch(phase, float(lr), i) for i, (phase, lr) in enumerate(plan)]


class Trainer:
    """Runs the original's train ops on a :class:`~reference_tf.dpsom.model.DPSOM`."""

    def __init__(self, config: DPSOMConfig, model: DPSOM | None = None):
        if model is not None and model.config != config:
            raise ValueError("Trainer config and model config differ")
        self.config = config
        self.model = model if model is not None else DPSOM(config)

    @property
    def global_step(self) -> int:
        return int(self.model.session.run(self.model.global_step))

    def step(self, phase: str, x, lr_feed: float, eps=None, p=None, all_terms: bool = True,
             return_gradients: bool = False, run_metadata=None) -> dict:
        """One optimiser step of ``phase`` ("vae" | "som_init" | "joint").

        Returns the loss terms evaluated in the same ``session.run`` as the update, i.e. on the
        pre-update weights and the same ε (every term when ``all_terms``, otherwise the phase's
        own), ``lr`` (effective, on the pre-increment global step) and ``global_step`` after the
        update. The joint phase needs ``p``; the other phases default it to uniform (it only
        enters the reported ``loss.kl_pq`` / ``loss.total``). ``return_gradients`` adds
        ``"gradients"``: {canonical name: the gradient this train op applied}, fetched in the same
        ``session.run``. ``run_metadata`` (a ``tf.compat.v1.RunMetadata``): that ``session.run`` is
        traced (``FULL_TRACE``) into it, every op's start and end time per device.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if phase == "joint" and p is None:
            raise ValueError("the joint phase needs the target distribution p for this batch")
        m = self.model
        terms = LOSS_KEYS if all_terms else PHASE_TERMS[phase]
        fetch = {name: m.loss_tensors[name] for name in terms}
        fetch["lr"] = m.optim.lr
        fetch["_train"] = m.optim.train_ops[phase]
        if return_gradients:
            fetch["_gradients"] = m.applied_gradients[phase]
        feed = m._feed(x, eps, p, lr_feed, need_p=True)  # noqa: SLF001
        if run_metadata is None:
            values = m.session.run(fetch, feed)
        else:
            tf = require_tensorflow()
            full = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
            values = m.session.run(fetch, feed, options=full, run_metadata=run_metadata)
        record = {name: float(values[name]) for name in terms}
        record["lr"] = float(values["lr"])
        record["global_step"] = self.global_step
        if return_gradients:
            record["gradients"] = values["_gradients"]
        return record

    def q_all(self, x, chunk: int = 5100, eps=None, n_chunks: int | None = None) -> np.ndarray:
        """Soft assignments q [N, K] for a whole set, one ``session.run`` per chunk (fresh ε each,
        or rows of ``eps`` [N, D] when given).

        ``n_chunks=10`` splits like the original's per-epoch pass (chunks of ``N // 10``, the last
        one taking the remainder; 10 x 5 100 for MNIST) instead of fixed ``chunk`` sizes.
        """
        m = self.model
        if n_chunks is not None:
            size = len(x) // n_chunks
            bounds = [(i * size, (i + 1) * size if i < n_chunks - 1 else len(x)) for i in range(n_chunks)]
        else:
            bounds = [(s, min(s + chunk, len(x))) for s in range(0, len(x), chunk)]
        out = []
        for start, stop in bounds:
            e = None if eps is None else eps[start:stop]
            out.append(m.session.run(m.forward_tensors["som.q"], m._feed(x[start:stop], e)))  # noqa: SLF001
        return np.concatenate(out)

    def get_optimizer_state(self) -> dict:
        return self.model.get_optimizer_state()

    def set_optimizer_state(self, state: dict) -> None:
        self.model.set_optimizer_state(state)

    # ------------------------------------------------------------------------------------------
    def fit(self, data, out_dir=None, resume: bool = False, progress: bool = True, log_every: int = 100,
            keep_checkpoints: int = 3, evaluate_at_end: bool = True, stop_after: int | None = None,
            replay_rng: bool = True, eps: Callable[[tuple[int, ...]], np.ndarray] | None = None,
            on_step: Callable[[dict], None] | None = None, overwrite: bool = False, start_at: int = 0) -> dict:
        """Run the whole schedule on ``data`` (:class:`reference_tf.dpsom.data.DPSOMData`-like: ``x_train``,
        ``x_eval``, ``y_eval``); returns ``{"metrics": ..., "global_step": ..., "epochs": ...}``.

        ``out_dir`` receives ``checkpoints/epoch-NNNN*`` (original variable names; the newest
        ``keep_checkpoints`` kept), ``state.json`` and ``tensorboard/``; ``resume=True`` continues after
        the last completed epoch. A fresh run in an ``out_dir`` holding another run's checkpoints is
        refused unless ``overwrite`` (:func:`check_out_dir`); a checkpoint holding a NaN/inf variable is
        never written (NonFiniteCheckpointError, the previous one kept).
        ``stop_after=N`` stops once N epochs of the schedule are complete (a chunked run; resume
        later), without the final evaluation; ``start_at=k`` begins at epoch k from the current
        variables (a run continued by its caller, who restored weights and optimizer state). ``replay_rng`` advances the native ε stream by the
        draws of the original's logging runs (module docstring); it needs ``data.x_val``.

        Hooks (optional): ``eps(shape)`` returns the ε [n, D] of the next forward the loop makes, in
        the order it makes them (at the start of a joint epoch the q pass over the whole training
        set, then one per training step); it replaces the native stream, whose logging-run replay
        is then moot and skipped. ``on_step(record)`` receives every step's record: ``phase``,
        ``epoch`` (index in the schedule), ``global_step`` (after the step), ``lr_feed``, ``lr``
        (effective), ``p`` (the step's rows of the target distribution, None outside the joint
        phase), ``p_step`` (the global step at which that p was computed) and the phase's loss terms.
        """
        from reference_tf.dpsom.data import batches
        from reference_tf.dpsom.evaluate import evaluate
        from tqdm.auto import tqdm

        cfg, m = self.config, self.model
        B = cfg.batch_size
        steps = len(data.x_train) // B
        if steps == 0:
            raise ValueError(f"batch_size={B} is larger than the {len(data.x_train)} training examples: not one full batch "
                             "(the remainder is dropped), so nothing would train")
        plan = schedule(cfg)
        out = Path(out_dir) if out_dir is not None else None
        if resume and start_at:
            raise ValueError("start_at and resume=True both say where to start: pass one")
        state_path = check_out_dir(out, resume, overwrite)
        done, last_ckpt = int(start_at), None  # last_ckpt: this run's newest (an overwritten run's are not its own)
        if out is not None:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        if resume:
            done, last_ckpt = self._resume(out, len(plan))

        writer = None
        if out is not None:
            with m.graph.as_default():
                writer = tf.compat.v1.summary.FileWriter(str(out / "tensorboard"))
        gen = batches(data.x_train, B)
        bar = tqdm(total=len(plan) * steps, initial=done * steps, disable=not progress, desc="DPSOM (TF reference)")
        end = len(plan) if stop_after is None else max(done, min(len(plan), int(stop_after)))
        try:
            for epoch in plan[done:end]:
                p_epoch, p_step = None, None
                if epoch.phase == "joint":
                    p_step = self.global_step
                    eps_q = None if eps is None else eps((len(data.x_train), cfg.latent_dim))
                    p_epoch = target_distribution(self.q_all(data.x_train, n_chunks=10, eps=eps_q))
                    if replay_rng and eps is None:  # the original's q pass over the whole val stream
                        m.skip_native_eps(len(data.x_val))
                for ii in range(steps):
                    x = next(gen)
                    p = None if p_epoch is None else p_epoch[ii * B : (ii + 1) * B]
                    e = None if eps is None else eps((len(x), cfg.latent_dim))
                    record = self.step(epoch.phase, x, epoch.lr_feed, eps=e, p=p, all_terms=False)
                    if replay_rng and eps is None:  # the original's logging runs after this train step
                        if epoch.phase == "joint":
                            m.skip_native_eps(B, 1 + (4 if ii % 100 == 0 else 0))
                        elif ii % 100 == 0:
                            m.skip_native_eps(B, 2)
                    bad = [k for k in PHASE_TERMS[epoch.phase] if not math.isfinite(record[k])]
                    if bad:
                        raise NonFiniteLossError(
                            f"non-finite {bad[0]}={record[bad[0]]} (all non-finite: {bad}) at global step "
                            f"{record['global_step'] - 1} (phase {epoch.phase!r}, epoch {epoch.index + 1}/{len(plan)}, "
                            f"batch {ii}); last good checkpoint: {last_ckpt}"
                        )
                    if on_step is not None:
                        on_step({"phase": epoch.phase, "epoch": epoch.index, "lr_feed": epoch.lr_feed, **record,
                                 "p": p, "p_step": p_step})
                    gs = record["global_step"]
                    if writer is not None and (gs % log_every == 0 or ii == steps - 1):
                        values = [tf.compat.v1.Summary.Value(tag=f"{epoch.phase}/{k}", simple_value=record[k])
                                  for k in (*PHASE_TERMS[epoch.phase], "lr")]
                        writer.add_summary(tf.compat.v1.Summary(value=values), gs)
                    bar.set_postfix(phase=epoch.phase, loss=f"{record[PHASE_LOSS[epoch.phase]]:.4g}", refresh=False)
                    bar.update(1)
                if out is not None:
                    bad = m.nonfinite_variables()
                    if bad:
                        raise NonFiniteCheckpointError(
                            f"checkpoint epoch-{epoch.index + 1:04d} not written (global step {self.global_step}): "
                            f"non-finite {bad[0]} (all non-finite: {bad}); last good checkpoint, kept: {last_ckpt}")
                    last_ckpt = m.save(str(out / "checkpoints" / f"epoch-{epoch.index + 1:04d}"))
                    state = {"epochs_done": epoch.index + 1, "checkpoint": Path(os.path.relpath(last_ckpt, out)).as_posix(),
                             "global_step": self.global_step, "config": json.loads(cfg.to_json())}
                    tmp = state_path.with_suffix(".json.tmp")
                    tmp.write_text(json.dumps(state, indent=1))
                    os.replace(tmp, state_path)
                    _prune(out / "checkpoints", keep_checkpoints, epoch.index + 1)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        finished = end == len(plan)
        result = {"global_step": self.global_step, "epochs_done": end, "epochs": len(plan),
                  "checkpoint": last_ckpt, "finished": finished}
        if evaluate_at_end and finished:
            result["metrics"] = evaluate(m, data.x_eval, data.y_eval)
        return result


    def _resume(self, out: Path, n_epochs: int) -> tuple[int, str]:
        """Read ``state.json`` and restore its checkpoint, all or nothing: the state, the config and
        every variable of the checkpoint (name, shape, finiteness) are checked before anything is
        restored. Returns (epochs done, checkpoint prefix)."""
        state_path = out / STATE
        try:
            state = json.loads(state_path.read_text())
            done, stored = state["epochs_done"], state["checkpoint"]
            saved_config = state["config"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{state_path}: not a run state ({type(err).__name__}: {err})") from err
        if saved_config != json.loads(self.config.to_json()):
            raise CheckpointError(f"{state_path}: the checkpointed run used a different config")
        if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= n_epochs:
            raise CheckpointError(f"{state_path}: epochs_done={done!r}, expected an integer in [0, {n_epochs}]")
        prefix = checkpoint_path(out, stored)
        check_checkpoint_finite(prefix)
        try:
            self.model.restore(prefix)  # names and shapes checked before the Saver assigns anything
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        return done, prefix


def checkpoint_path(out: Path, stored: str) -> str:
    """The checkpoint prefix ``state.json`` names: relative to ``out`` (as written since relative paths
    were introduced, so a moved run directory resumes); an absolute or cwd-relative path written
    before that is used as it is when it is not found under ``out``."""
    path = Path(stored)
    if path.is_absolute():
        return str(path)
    inside = out / path
    return str(inside) if Path(f"{inside}.index").exists() or not Path(f"{path}.index").exists() else str(path)


def check_checkpoint_finite(prefix: str) -> None:
    """Read every tensor of the checkpoint (one at a time) and refuse a NaN/inf one, or an unreadable
    or truncated file, before a resume restores anything."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        bad = []
        for name in sorted(reader.get_variable_to_shape_map()):
            value = np.asarray(reader.get_tensor(name))
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                bad.append(name)
    except Exception as err:  # noqa: BLE001 -- whatever the reader raises (OpError, IndexError, ...), it cannot be resumed from
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {prefix}: not readable, nothing restored ({reason})") from err
    if bad:
        raise CheckpointError(f"checkpoint {prefix}: non-finite {bad}, nothing restored")


def check_out_dir(out: Path | None, resume: bool, overwrite: bool) -> Path | None:
    """The run's ``state.json`` path, after refusing what would lose work: ``resume`` without a state to
    resume from, and a fresh run (``resume=False``) over another run's checkpoints unless
    ``overwrite`` (its first checkpoint then replaces the state, and pruning removes the old files)."""
    if out is None:
        if resume:
            raise ValueError("resume=True needs an out_dir holding the run to resume from")
        return None
    state_path = out / STATE
    if resume and not state_path.exists():
        raise FileNotFoundError(f"resume=True but there is no {state_path} to resume from")
    ckpts = out / "checkpoints"
    in_use = state_path.exists() or (ckpts.is_dir() and any(CHECKPOINT_NAME.fullmatch(f.name) for f in ckpts.iterdir()))
    if not resume and in_use and not overwrite:
        raise FileExistsError(f"{out} holds another run's checkpoints ({STATE}, checkpoints/); pass resume=true to "
                              "continue that run or overwrite=true to replace it")
    return state_path


def _prune(directory: Path, keep: int, current: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0``: keep all) of the run now at epoch
    ``current``. Only Saver files ``epoch-<n>.<suffix>`` count, ordered by the NUMBER n (names misorder
    past epoch-9999); the newest ones kept are those at or before ``current``, so this run's own
    newest always stay, and any numbered after ``current`` (left by a run this one overwrote) go."""
    files: dict[int, list[Path]] = {}
    for f in directory.iterdir():
        match = CHECKPOINT_NAME.fullmatch(f.name)
        if match:
            files.setdefault(int(match.group(1)), []).append(f)
    own = sorted(n for n in files if n <= current)
    kept = set(own[-keep:] if keep > 0 else own)
    for n, paths in files.items():
        if n not in kept:
            for f in paths:
                f.unlink()


def environment() -> dict[str, Any]:
    """Versions and device of this process (harness.env's fingerprint when available)."""
    try:
        from harness.env import fingerprint

        info = dict(fingerprint())
    except ImportError:
        import platform

        info = {"python": platform.python_version(), "platform": platform.platform()}
    import tensorflow_probability as tfp
    import tf_keras

    info.update({"version.tensorflow": tf.__version__, "version.tf_keras": tf_keras.__version__,
                 "version.tensorflow_probability": tfp.__version__, "version.numpy": np.__version__,
                 "tf.gpus": [d.name for d in tf.config.list_physical_devices("GPU")]})
    return info


# The errors a command line can provoke (bad keys or values, missing data or state, a run directory
# in use, an unusable checkpoint, a diverged run): reported on one line, exit status 2.
USER_ERRORS = (KeyError, ValueError, OSError, FloatingPointError)


def main(argv: list[str] | None = None) -> dict:
    """``python -m reference_tf.dpsom.train [variant=dense] [data_dir=..] [out_dir=..] [resume=false]
    [overwrite=false] [results_dir=results/runs] [progress=true] [key=value ...]`` with any DPSOMConfig
    field as ``key``. An expected error (:data:`USER_ERRORS`) is printed as one ``error: ...`` line on
    stderr and exits with status 2."""
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(argv: list[str]) -> dict:
    args = parse_overrides(argv)
    run = {k: args.pop(k) for k in RUN_KEYS if k in args}
    variant = run.get("variant", "dense")
    resume = parse_flag("resume", run.get("resume", "false"))
    overwrite = parse_flag("overwrite", run.get("overwrite", "false"))
    progress = parse_flag("progress", run.get("progress", "true"))
    try:
        config = get_config(variant, **args)
    except KeyError as err:
        raise KeyError(f"{err.args[0]}; run-level keys: {list(RUN_KEYS)}") from None
    out_dir = Path(run.get("out_dir", f"runs/dpsom-reference_tf-{variant}-seed{config.random_seed}"))
    check_out_dir(out_dir, resume, overwrite)  # before the data and the graph: fail in seconds

    from reference_tf.dpsom.data import load_dpsom_data

    data = load_dpsom_data(config.data_set, run.get("data_dir"), config.validation)
    start = time.time()
    trainer = Trainer(config)
    result = trainer.fit(data, out_dir=out_dir, resume=resume, progress=progress, overwrite=overwrite)
    record = {
        "model": "dpsom", "side": "reference_tf", "variant": variant, "data_set": config.data_set,
        "eval_set": getattr(data, "eval_set", None), "metrics": result["metrics"],
        "global_step": result["global_step"], "wall_s": round(time.time() - start, 3),
        "checkpoint": result["checkpoint"], "config": json.loads(config.to_json()), "environment": environment(),
    }
    results_dir = Path(run.get("results_dir", "results/runs"))
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"dpsom-{variant}-{config.data_set}-tf-seed{config.random_seed}.json"  # as the port's, side "tf"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(json.dumps(record["metrics"], sort_keys=True))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
