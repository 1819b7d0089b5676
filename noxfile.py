"""Pinned environments of the parity suite; every session installs only from constraints.txt.

    nox -s parity          # the main job: port vs TF reference (offline, CPU, minutes)
    nox -s tests           # the pytest suite (what CI runs)
    nox -s tests_notf      # torch-only environment: TF-dependent tests skip with one line each
    nox -s bench           # pytest-benchmark timings (per-step, both sides) -> results/bench/
    nox -s timing          # T6: interleaved A/B step times, FLOPs, % of GEMM floor -> results/timing/ (-- --help)
    nox -s matrix          # T5: the runs of matrix.toml (joblib; -- --jobs 2, --only dpsom-dense, --store ...)
    nox -s table           # T5: results/matrix -> summary.csv, figures, and the README tables
    nox -s regress         # CI regression gate: quick tier + CPU-sized schedule runs vs results/regress
    nox -s lint            # ruff check (rules in pyproject.toml [tool.ruff])

Environments are reused between runs (``reuse_venv``); a changed constraints.txt reinstalls.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")
ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}
# pytest-xdist: two workers, each given a whole module (or test class) at a time, so a module's fixtures
# are built once. The suite is mostly single-threaded (110 % of 2 cores in one process, measured): on a
# 2-core host (2026-12-04) it took 2544 s in one process, 1862 s of it outside the full-size DPSOM cross
# test that the regress gate now runs instead, and 1142 s in two workers (180 %). OMP_WAIT_POLICY=PASSIVE: the two workers'
# OpenMP threads share the cores, and a spinning thread that loses its core stalls its region (issue 11).
# ``nox -s tests -- -n 0`` runs in one process.
PYTEST_WORKERS = ("-n", "2", "--dist", "loadscope")
TESTS_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")


def _install(session: nox.Session, extras: str) -> None:
    """Editable install of the suite with the given extras, everything pinned by constraints.txt."""
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")
    session.run("python", "-m", "harness.versions", env=ENV)


def _env() -> dict[str, str]:
    env = dict(ENV)
    if "PARITY_DATA_DIR" not in os.environ and os.path.isdir(SHARED_DATA):
        env["PARITY_DATA_DIR"] = os.path.abspath(SHARED_DATA)
    return env


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Full suite: torch + TensorFlow 2.21 / tf-keras / TFP 0.25 (Keras 2 via TF_USE_LEGACY_KERAS=1)."""
    _install(session, "torch,tf,test")
    session.run("pytest", *PYTEST_WORKERS, *session.posargs, env={**_env(), **TESTS_ENV})


@nox.session(python=PYTHON)
def tests_notf(session: nox.Session) -> None:
    """Torch-only environment: proves the suite works where TensorFlow is not installed."""
    _install(session, "torch,test")
    session.run("pytest", *PYTEST_WORKERS, *session.posargs, env={**_env(), **TESTS_ENV})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole repository; installs nothing but ruff (pinned in constraints.txt)."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".", *session.posargs)


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """The main job: port vs reference on the same weights and noise; ``-- --help`` for options."""
    _install(session, "torch,tf,test")
    session.run("python", "-m", "harness.parity", *session.posargs, env=_env())


@nox.session(python=PYTHON)
def matrix(session: nox.Session) -> None:
    """T5 runs (matrix.toml) as joblib jobs; finished runs are never recomputed; ``-- --help``."""
    _install(session, "torch,tf,test")
    session.run("python", "-m", "harness.matrix", *session.posargs, env=_env())


@nox.session(python=PYTHON)
def table(session: nox.Session) -> None:
    """T5 tables and figures from results/matrix, then every README table from results/."""
    _install(session, "torch,tf,test")
    session.run("python", "-m", "harness.t5_table", *session.posargs, env=_env())
    session.run("python", "-m", "harness.readme", env=_env())


@nox.session(python=PYTHON)
def regress(session: nox.Session) -> None:
    """CI regression gate (harness/regress.py): exits 1 listing every drift from the stored baseline."""
    _install(session, "torch,tf,test")
    session.run("python", "-m", "harness.regress", *session.posargs, env=_env())


# glibc returns large freed blocks to the OS and faults them back in on the next step; TF's own
# allocator keeps them. Keeping them for both sides removes ~10 ms (5 %) of page faults from the
# torch dense step (measured 190 -> 180 ms) and changes no arithmetic. OMP_WAIT_POLICY=PASSIVE: spinning
# OpenMP threads that lose their core to another process stall every parallel region (issue 11); both
# timing sessions record it (and torch's thread count) with every result.
BENCH_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000", "OMP_WAIT_POLICY": "PASSIVE"}


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Per-step timings of both sides in one run (pytest-benchmark) -> results/bench/*.csv."""
    _install(session, "torch,tf,test")
    os.makedirs("results/bench", exist_ok=True)
    session.run(
        "pytest", "benchmarks", "--benchmark-only", "--benchmark-enable", "-p", "no:cacheprovider",
        "--benchmark-json=results/bench/latest.json", *session.posargs, env={**_env(), **BENCH_ENV},
    )
    session.run("python", "-m", "harness.bench_table", "results/bench/latest.json", env=_env())


@nox.session(python=PYTHON)
def timing(session: nox.Session) -> None:
    """T6 (harness/timing.py): interleaved step times per phase, FLOPs and % of the GEMM floor -> results/timing/,
    then the README tables (BENCH_ENV: OMP_WAIT_POLICY=PASSIVE, recorded in every result). E.g.
    ``nox -s timing -- --model dpsom --variant dense --device cuda --modes exact,fast``."""
    _install(session, "torch,tf,test")
    args = session.posargs or ["--model", "dpsom", "--variant", "dense"]
    session.run("python", "-m", "harness.timing", *args, env={**_env(), **BENCH_ENV})
    session.run("python", "-m", "harness.readme", env=_env())
