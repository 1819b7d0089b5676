"""Tier T5, the runs: every run of the matrix declared in ``matrix.toml``, each an independent job.

``python -m harness.matrix [--config matrix.toml] [--only dpsom-dense] [--jobs 2] [--backend loky|dask|ray]``

A run is model × variant × dataset × schedule × framework × seed: that framework's side (``tf``: the
reference, ``torch``: the port) runs its OWN training loop (``fit_records``) over the named schedule
(``spec.schedules``), from the seed's initial weights (``spec.draw_weights`` on PCG64([seed, 2])),
on the schedule's data (``spec.schedule_data`` on PCG64(seed): the original's order and every random
quantity the spec injects), with every forward's noise from the stream PCG64([seed, 3]); then the
original's evaluation (``spec.final_evaluation``), scored with the field's metrics. At one seed both
frameworks therefore start from the same weights and draw the same noise, so their assignments can
be compared (ARI, harness/t5_table.py).

Jobs go through joblib: a local process pool by default (``--jobs``), or ``--backend dask
--address tcp://scheduler:8786`` / ``--backend ray --address auto`` for a cluster (each job imports
the suite, so the workers need it installed and the data reachable via PARITY_DATA_DIR). A finished
run (its JSON present) is never recomputed; a run interrupted mid-schedule resumes from
``<out>/runs/<stem>.partial.npz``, written at the end of an epoch every 5 minutes of training
(:func:`_train`). Each run is written atomically: ``<out>/runs/<stem>.json`` (metrics, steps, wall
time, config as executed, environment, device, per-epoch loss means) and ``<out>/runs/<stem>.npz``
(assignments and labels, and the decoded prototypes where the model has them).
``--out`` defaults to runs/matrix; ``--store`` writes into results/matrix (new runs only).

Run a long matrix from a snapshot of the code (``git worktree add --detach ../snapshot HEAD``, then
``python -m harness.matrix --out <repo>/results/matrix`` from the snapshot): a job imports parts of
the sides lazily, so editing the working tree under a running job mixes two versions of the code (seen:
an ImportError at the final evaluation of a 45-minute run). Each run records the commit it started at.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "results" / "matrix"
FRAMEWORKS = {"tf": "reference", "torch": "port"}  # framework -> the side that runs it
RUN_KEYS = ("model", "variant", "dataset", "schedule", "frameworks", "seeds", "limit", "port")
# limit: train on the first N examples of the schedule's data (0: all); port: "pkg.module:factory", a
# user's port (factory(config, dtype) -> PortSide, as ``nox -s parity -- --port-adapter``) run as the
# torch framework in place of the model's own; its TF runs are the reference's, shared with every port
OPTIONAL = {"limit": 0, "port": ""}
# threads and OpenMP wait policy of every job (recorded in each run): a spinning OpenMP pool that
# loses its core to a neighbouring job stalls every parallel region (issue 11's measurement)
JOB_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# training seconds between two writes of a run's partial file: the conv model's weights and Adam slots
# are 775 MB, 6.6 s per write on this machine under load (185 s of an 885 s run when written every epoch)
CHECKPOINT_EVERY_S = 300.0


@dataclass(frozen=True)
class Run:
    model: str
    variant: str
    dataset: str
    schedule: str
    framework: str
    seed: int
    limit: int = 0
    port: str = ""  # the torch side's factory ("": the model's own port); always "" for tf

    @property
    def stem(self) -> str:
        data = f"{self.dataset}-n{self.limit}" if self.limit else self.dataset
        port = f"-{self.port.replace(':', '.')}" if self.port else ""
        return f"{self.model}-{self.variant}-{data}-{self.schedule}-seed{self.seed}-{self.framework}{port}"


@dataclass(frozen=True)
class Matrix:
    runs: tuple[Run, ...]
    alpha: float
    margins: dict[str, float]


def load_matrix(path: Path) -> Matrix:
    """The matrix file, checked: every error names the file, the ``[[run]]`` entry and the key."""
    from harness.spec import models

    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such matrix file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    unknown = set(doc) - {"defaults", "run", "equivalence"}
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {sorted(unknown)}; expected [defaults], [[run]], [equivalence]")
    defaults, specs, runs = doc.get("defaults", {}), models(), []
    for i, entry in enumerate(doc.get("run", [])):
        where = f"{path}: [[run]] #{i + 1}"
        bad = set(entry) - set(RUN_KEYS)
        if bad or set(defaults) - set(RUN_KEYS):
            raise ValueError(f"{where}: unknown key(s) {sorted(bad | (set(defaults) - set(RUN_KEYS)))}; expected {list(RUN_KEYS)}")
        e = {**OPTIONAL, **defaults, **entry}
        missing = [k for k in RUN_KEYS if k not in e]
        if missing:
            raise ValueError(f"{where}: missing {missing} (neither in the entry nor in [defaults])")
        if e["model"] not in specs:
            raise ValueError(f"{where}: model {e['model']!r} is not registered; expected one of {sorted(specs)}")
        spec = specs[e["model"]]
        if e["variant"] not in spec.variants:
            raise ValueError(f"{where}: {e['model']} has no variant {e['variant']!r}; expected one of {list(spec.variants)}")
        schedules = spec.schedules(spec.get_config(e["variant"]))
        if e["schedule"] not in schedules:
            raise ValueError(f"{where}: schedule {e['schedule']!r} unknown; {e['model']} has {sorted(schedules)}")
        if not isinstance(e["frameworks"], list) or not set(e["frameworks"]) <= set(FRAMEWORKS) or not e["frameworks"]:
            raise ValueError(f"{where}: frameworks must be a non-empty list of {sorted(FRAMEWORKS)}, got {e['frameworks']!r}")
        if not isinstance(e["seeds"], list) or not e["seeds"] or not all(isinstance(s, int) and s >= 0 for s in e["seeds"]):
            raise ValueError(f"{where}: seeds must be a non-empty list of non-negative integers, got {e['seeds']!r}")
        if not isinstance(e["limit"], int) or e["limit"] < 0:
            raise ValueError(f"{where}: limit must be a non-negative integer (0: all the data), got {e['limit']!r}")
        if not isinstance(e["port"], str):
            raise ValueError(f"{where}: port must be a string 'pkg.module:factory', got {e['port']!r}")
        if e["port"]:
            from harness.parity import load_factory

            load_factory(e["port"], f"{where}: port")  # importable now, not an error in every job later
        runs += [Run(e["model"], e["variant"], str(e["dataset"]), e["schedule"], f, s, e["limit"], e["port"] if f == "torch" else "")
                 for s in e["seeds"] for f in e["frameworks"]]
    eq = doc.get("equivalence", {})
    alpha, margins = eq.get("alpha", 0.05), eq.get("margin", {})
    if not (isinstance(alpha, float) and 0 < alpha < 0.5) or not all(isinstance(v, float) and v > 0 for v in margins.values()):
        raise ValueError(f"{path}: [equivalence] needs alpha in (0, 0.5) and positive float margins, got alpha={alpha!r}, margin={margins!r}")
    return Matrix(tuple(dict.fromkeys(runs)), float(alpha), {k: float(v) for k, v in margins.items()})


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _savez(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def _epoch_means(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (phase, epoch) the mean of every float loss term: the training curve, kept small."""
    out: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        terms = {k: float(v) for k, v in r.items() if k.startswith("loss.") and isinstance(v, (float, np.floating))}
        for k, v in terms.items():
            out.setdefault((r["phase"], str(r["epoch"])), {}).setdefault(k, []).append(v)
    return [{"phase": p, "epoch": e, "steps": len(next(iter(t.values()))), **{k: float(np.mean(v)) for k, v in t.items()}}
            for (p, e), t in out.items()]


def execute(run: Run, out: Path, threads: int | None = None, checkpoint_every: float = CHECKPOINT_EVERY_S) -> dict[str, Any]:
    """One run (a joblib job): trains, evaluates and writes ``<out>/runs/<stem>.{json,npz}``; returns
    the JSON document. Already finished: read back, nothing recomputed. ``checkpoint_every``: seconds
    of training between two writes of the partial file (:func:`_train`)."""
    target = out / "runs" / f"{run.stem}.json"
    if target.exists():
        return json.loads(target.read_text())
    with job_settings(threads):
        return _execute(run, out, target, threads, checkpoint_every)


@contextlib.contextmanager
def job_settings(threads: int | None) -> Iterator[None]:
    """JOB_ENV and, with ``threads``, the thread counts of one job, put back as they were afterwards: a
    job that runs in the caller's process (joblib with one worker, the tests) must not leave them set
    there (seen: a test's one-thread job left TF_NUM_INTRAOP_THREADS=1 in its pytest worker, and a later
    TF test of that worker ran other floats). Set before TF/torch build their pools (TF reads these when
    its first session starts); a pool TF already built keeps its size."""
    env = dict(JOB_ENV)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch_threads = None
    if threads:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # imported above, where torch_threads was read


def _execute(run: Run, out: Path, target: Path, threads: int | None, checkpoint_every: float) -> dict[str, Any]:
    from harness.env import fingerprint, git_commit, seed_all
    from harness.spec import get_spec
    from harness.tier_ownloop import NoiseStream

    flags, commit = seed_all(run.seed), git_commit()  # the code as the job starts (see the module docstring)
    spec = get_spec(run.model)
    cfg = spec.get_config(run.variant)
    cfg = spec.replace_config(cfg, spec.schedules(cfg)[run.schedule])
    data, data_name = spec.schedule_data(cfg, run.dataset, np.random.Generator(np.random.PCG64(run.seed)),
                                         run.limit or None)
    shapes = {k: v.shape for k, v in spec.make_port(cfg).get_weights().items()}
    weights = spec.draw_weights(shapes, np.random.Generator(np.random.PCG64([run.seed, 2])))
    noise = NoiseStream([run.seed, 3])
    if FRAMEWORKS[run.framework] == "reference":
        side = spec.make_reference(cfg)
    elif run.port:
        from harness.parity import load_factory

        side = load_factory(run.port, f"{run.stem}: port")(cfg, "float32")
    else:
        side = spec.make_port(cfg, "float32")
    partial = out / "runs" / f"{run.stem}.partial.npz"
    try:
        side.set_weights(weights)
        records, train_s, checkpoint_s, resumed = _train(side, data, noise, partial, {"stem": run.stem, "config": spec.config_dict(cfg)},
                                                         commit, checkpoint_every)
        commit = resumed[0]["started_at"] if resumed else commit  # the commit the run began at, its resumes listed
        t0 = time.perf_counter()
        ev = spec.final_evaluation(side, cfg, data, records, noise)
        eval_s = time.perf_counter() - t0
    finally:
        getattr(side, "close", lambda: None)()
    bad = [k for k, v in ev["metrics"].items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{run.stem}: non-finite final metric(s) {bad}; nothing written")
    steps = [r for r in records if r["phase"] != "stop"]
    env = {**fingerprint(), "git_commit": commit, "code": str(ROOT)}
    doc = {**asdict(run), "data": data_name, "side": getattr(side, "name", FRAMEWORKS[run.framework]),
           "metrics": {k: float(v) for k, v in ev["metrics"].items()}, "nmi_average": ev.get("nmi_average"),
           "assign_from": ev.get("assign_from"), "n_evaluated": int(len(ev["assignments"])), "steps": len(steps),
           "end": records[-1].get("epoch"), "train_seconds": train_s, "eval_seconds": eval_s, "checkpoint_seconds": checkpoint_s,
           "device": env.get("torch.cuda") or "cpu", "threads": threads or os.cpu_count(), "job_env": {**JOB_ENV},
           "determinism": flags, "noise_rows": noise.rows, "config": spec.config_dict(cfg), "environment": env,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed": resumed, "curve": _epoch_means(steps)}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    arrays = {"assignments": np.asarray(ev["assignments"], np.int64), "labels": np.asarray(ev["labels"], np.int64)}
    if ev.get("prototypes") is not None:  # decoded prototypes (a model that has them), for the figures
        arrays["prototypes"] = np.asarray(ev["prototypes"], np.float16)
    _atomic_write(target.with_suffix(".npz"), lambda p: _savez(p, arrays))
    _atomic_write(target, lambda p: p.write_text(json.dumps(doc, indent=1, default=str)))
    partial.unlink(missing_ok=True)
    return doc


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    """A step record without its arrays (the joint steps' rows of P): what a run keeps of it."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items() if not isinstance(v, np.ndarray)}


def _train(side: Any, data: Any, noise: Any, partial: Path, identity: dict[str, Any], commit: str | None,
           checkpoint_every: float) -> tuple[list[dict[str, Any]], float, float, list[dict[str, Any]]]:
    """The side's own loop over the whole schedule, one epoch at a time (``fit_records(epochs=)``),
    with ``partial`` written atomically after the first epoch that ends ``checkpoint_every`` seconds
    of training after the last write: weights, optimizer state, the noise stream's position, the
    records and training seconds so far. A run interrupted mid-schedule resumes at the epoch its
    partial file ends and continues row for row as the uninterrupted run (test_t5 compares both).
    A side whose loop cannot run in epochs (``Unsupported``) runs whole, without resume. Returns
    (records, training seconds, seconds spent writing the partial file (this session's),
    [{epoch, commit, started_at} of every resume])."""
    from harness.protocols import Unsupported

    identity = json.loads(json.dumps(identity, default=str))  # as it reads back from the partial file
    records: list[dict[str, Any]] = []
    train_s, epoch, resumed = 0.0, 0, []
    if partial.exists():
        state = _read_partial(partial, identity)
        side.set_weights(state["weights"])
        side.set_optimizer_state(state["optimizer"])
        noise.restore(state["noise"])
        records, train_s, epoch = state["records"], state["train_seconds"], state["epochs_done"]
        started = state["resumed"][0]["started_at"] if state["resumed"] else state.get("commit")
        resumed = [{**r, "started_at": started} for r in state["resumed"]] + [{"epoch": epoch, "commit": commit, "started_at": started}]
    checkpoint_s, written = 0.0, train_s
    while True:
        t0 = time.perf_counter()
        try:
            chunk = side.fit_records(data, noise, epochs=(epoch, epoch + 1))
        except Unsupported:
            if epoch:
                raise
            return side.fit_records(data, noise), time.perf_counter() - t0, 0.0, []
        chunk_s = time.perf_counter() - t0
        train_s += chunk_s
        if not chunk:
            return records, train_s, checkpoint_s, resumed
        records += [_scalars(r) for r in chunk]
        epoch += 1
        if train_s - written < checkpoint_every:
            continue
        written = train_s
        state = {**identity, "commit": resumed[0]["started_at"] if resumed else commit, "epochs_done": epoch,
                 "train_seconds": train_s, "noise": noise.state(), "resumed": resumed,
                 "records": records}
        arrays = {"state": np.array(json.dumps(state, default=str))}
        arrays.update({f"weight/{k}": np.asarray(v) for k, v in side.get_weights().items()})
        arrays.update({f"optimizer/{k}": np.asarray(v) for k, v in side.optimizer_state().items()})
        partial.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(partial, functools.partial(_savez, arrays=arrays, compress=False))  # zlib: 4.8 s of dense's 166 MB, plain 0.3 s
        checkpoint_s += time.perf_counter() - t0 - chunk_s


def _read_partial(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """A run's partial state, checked against the run it would resume (stem and config as executed)."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # the file closed on a failed load too
            state = json.loads(str(z["state"]))
            weights = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("weight/")}
            optimizer = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("optimizer/")}
    except Exception as err:  # noqa: BLE001  (zip, npz and JSON errors alike: the file is unusable)
        raise ValueError(f"{path}: not a readable partial run ({type(err).__name__}: {err}); delete it to start the run over") from None
    differs = [k for k in identity if state.get(k) != identity[k]]
    if differs:
        raise ValueError(f"{path}: a partial run of another {' and '.join(differs)} than this run's; delete it to start over")
    return {**state, "weights": weights, "optimizer": optimizer}


def pending(runs: tuple[Run, ...] | list[Run], out: Path) -> list[Run]:
    return [r for r in runs if not (out / "runs" / f"{r.stem}.json").exists()]


def run_matrix(runs: list[Run], out: Path, jobs: int = 1, backend: str = "loky", address: str | None = None,
               threads: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Every pending run as a joblib job on ``backend``; finished runs are skipped. Returns the
    documents of the runs that ran, in completion order; a failed job is reported and re-raised
    after the others finished (their results are kept)."""
    from joblib import Parallel, delayed, parallel_config
    from tqdm.auto import tqdm

    todo = pending(runs, out)
    if not todo:
        return []
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    with job_settings(None):  # JOB_ENV, inherited by the local workers and put back afterwards
        config: dict[str, Any] = {"backend": backend, "n_jobs": jobs}
        if backend == "dask":
            try:
                from dask.distributed import Client
            except ImportError:
                raise ImportError("--backend dask needs dask[distributed]: pip install 'dask[distributed]'") from None
            client = Client(address) if address else Client(n_workers=jobs, threads_per_worker=1, processes=True)
            config = {"backend": "dask", "n_jobs": -1}
        elif backend == "ray":
            try:
                import ray
                from ray.util.joblib import register_ray
            except ImportError:
                raise ImportError("--backend ray needs ray: pip install 'ray[default]'") from None
            ray.init(address=address)
            register_ray()
        elif backend != "loky":
            raise ValueError(f"backend {backend!r}: expected loky, dask or ray")
        done, failed = [], []

        def job(r: Run):
            try:
                return r, execute(r, out, threads), None
            except Exception as err:  # noqa: BLE001  (reported with the run's name; the other runs go on)
                return r, None, f"{type(err).__name__}: {err}"

        try:
            with parallel_config(**config):
                results = Parallel(return_as="generator_unordered")(delayed(job)(r) for r in todo)
                for r, doc, err in tqdm(results, total=len(todo), desc="T5 runs", unit="run", disable=not progress):
                    if err:
                        failed.append(f"{r.stem}: {err}")
                        print(f"FAILED {failed[-1]}", file=sys.stderr, flush=True)
                    else:
                        done.append(doc)
                        if not progress:
                            print(f"{r.stem}: {doc['metrics']} ({doc['train_seconds']:.0f} s)", flush=True)
        finally:
            if backend == "dask":
                client.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} runs failed (the others are written):\n  " + "\n  ".join(failed))
    return done


def select(runs: tuple[Run, ...], only: list[str] | None) -> list[Run]:
    """Runs whose stem starts with one of ``only`` (e.g. ``dpsom-dense``, ``dpsom-conv-MNIST-reduced-seed0``)."""
    return [r for r in runs if not only or any(r.stem.startswith(o) for o in only)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "matrix.toml", help="the matrix file (default: matrix.toml)")
    parser.add_argument("--only", nargs="*", default=None, help="run stems starting with any of these, e.g. dpsom-dense")
    parser.add_argument("--jobs", type=int, default=1, help="parallel jobs of the local pool (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads per job (default: cores / jobs)")
    parser.add_argument("--backend", default="loky", choices=("loky", "dask", "ray"))
    parser.add_argument("--address", default=None, help="the Dask scheduler (tcp://host:8786) or Ray cluster (auto, ray://...)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/matrix)")
    parser.add_argument("--store", action="store_true", help="write into results/matrix (finished runs there are kept)")
    parser.add_argument("--list", action="store_true", help="list the runs and whether each is done; run nothing")
    args = parser.parse_args(argv)
    out = STORED if args.store else (args.out or ROOT / "runs" / "matrix")
    try:
        runs = select(load_matrix(args.config).runs, args.only)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no run of {args.config} matches --only {args.only}", file=sys.stderr)
        return 2
    todo = set(pending(runs, out))
    if args.list:
        for r in runs:
            print(f"{'pending' if r in todo else 'done   '} {r.stem}")
        return 0
    print(f"{len(runs)} runs, {len(todo)} pending -> {out}", file=sys.stderr)
    try:
        run_matrix(runs, out, args.jobs, args.backend, args.address, args.threads)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
