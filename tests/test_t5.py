"""Tier T5: the run matrix (harness/matrix.py), the tables and verdicts (harness/t5_table.py), the
README table (harness/readme.py) and the CI regression gate (harness/regress.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness import matrix, regress, t5_table
from harness.models.dpsom import topographic_error

ROOT = Path(__file__).resolve().parent.parent
TINY = """
[defaults]
dataset = "digits"
schedule = "original"
frameworks = ["tf", "torch"]
seeds = [0, 1]
limit = 50

[equivalence]
alpha = 0.05
margin = { nmi = 0.01, purity = 0.01 }

[[run]]
model = "dpsom"
variant = "tiny-dense"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


# --- the matrix file --------------------------------------------------------------------------------
def test_matrix_file_expands_every_run(tmp_path):
    m = matrix.load_matrix(_write(tmp_path, TINY))
    assert [r.stem for r in m.runs] == [f"dpsom-tiny-dense-digits-n50-original-seed{s}-{f}" for s in (0, 1) for f in ("tf", "torch")]
    assert m.alpha == 0.05 and m.margins == {"nmi": 0.01, "purity": 0.01}


def test_stored_matrix_files_load():
    runs = matrix.load_matrix(ROOT / "matrix.toml").runs
    assert {(r.model, r.variant) for r in runs} == {("dpsom", "dense"), ("dpsom", "conv"), ("dekm", "dense"), ("dekm", "conv")}
    assert {r.seed for r in runs} == set(range(5)) and {r.framework for r in runs} == {"tf", "torch"}
    assert len(matrix.load_matrix(ROOT / "regress.toml").runs) == 6


@pytest.mark.parametrize("edit, message", [
    (('variant = "tiny-dense"', 'variant = "tiny-dense"\nlr = 3'), "[[run]] #1: unknown key(s) ['lr']"),
    (('model = "dpsom"', 'model = "dpsomm"'), "model 'dpsomm' is not registered"),
    (('variant = "tiny-dense"', 'variant = "huge"'), "dpsom has no variant 'huge'"),
    (('schedule = "original"', 'schedule = "fast"'), "schedule 'fast' unknown; dpsom has ['original', 'reduced']"),
    (("seeds = [0, 1]", "seeds = [0, -1]"), "seeds must be a non-empty list of non-negative integers"),
    (('frameworks = ["tf", "torch"]', 'frameworks = ["jax"]'), "frameworks must be a non-empty list of ['tf', 'torch']"),
    (("limit = 50", 'limit = "all"'), "limit must be a non-negative integer"),
    (("margin = { nmi = 0.01, purity = 0.01 }", "margin = { nmi = -0.01 }"), "positive float margins"),
    (("[equivalence]", "[equivalnce]"), "unknown table(s) ['equivalnce']"),
    (('variant = "tiny-dense"', 'variant = "tiny-dense"\nport = "tests.oddport.adapter"'),
     "[[run]] #1: port 'tests.oddport.adapter': expected 'pkg.module:factory'"),
    (('variant = "tiny-dense"', 'variant = "tiny-dense"\nport = "tests.oddport.nowhere:factory"'), "cannot import 'tests.oddport.nowhere'"),
])
def test_matrix_file_errors_name_file_entry_and_key(tmp_path, edit, message):
    path = _write(tmp_path, TINY.replace(*edit))
    with pytest.raises(ValueError) as err:
        matrix.load_matrix(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_matrix_cli_lists_and_refuses_bad_selection(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    assert matrix.main(["--config", str(path), "--out", str(tmp_path / "out"), "--list"]) == 0
    assert capsys.readouterr().out.count("pending") == 4
    assert matrix.main(["--config", str(path), "--only", "dekm"]) == 2
    assert "no run of" in capsys.readouterr().err


def test_job_settings_are_put_back(monkeypatch):
    """A job run in the caller's process (jobs=1, the tests) sets JOB_ENV and its thread counts for its
    own duration only: variables the caller had come back with their values, the others are removed,
    and torch's pool has its size again (before, a one-thread job left TF_NUM_INTRAOP_THREADS=1 in its
    pytest worker)."""
    import torch

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    for k in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        monkeypatch.delenv(k, raising=False)
    before = torch.get_num_threads()
    with matrix.job_settings(1):
        assert (os.environ["OMP_WAIT_POLICY"], os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"]) == ("PASSIVE", "1", "1")
        assert torch.get_num_threads() == 1
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and torch.get_num_threads() == before
    assert not {"OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"} & set(os.environ)
    with pytest.raises(RuntimeError), matrix.job_settings(None):  # a failing job too
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_NUM_THREADS" not in os.environ
        raise RuntimeError
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


# --- runs: both frameworks, same seed -> same weights and noise -----------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5")
    runs = matrix.load_matrix(_write(out, TINY)).runs
    # threads left to run_matrix (cores / jobs = TF's and torch's own defaults): jobs=1 runs in this process,
    # where execute puts the environment back (test_job_settings_are_put_back) but TF builds its pools once,
    # from TF_NUM_INTRAOP_THREADS as the job set it; with 1 thread, Eigen's
    # sharded reductions give other floats to every later TF test in this pytest worker (measured: DEKM
    # conv-frgc's quick tier then flips one encoder.conv3 activation, tests/test_cross_dekm.py)
    docs = matrix.run_matrix(list(runs), out, jobs=1, progress=False)
    return out, runs, docs


@pytest.mark.tf
def test_tiny_runs_agree_across_frameworks(tiny_runs):
    """tiny-dense on 50 images of the embedded digits (offline, small: 299 test images): 60 steps, and
    the port's own loop lands on the reference's BMUs for all 295 evaluated images (59 batches of 5)
    at both seeds (float32 drift over 60 steps moves no argmin here)."""
    out, runs, docs = tiny_runs
    assert len(docs) == 4
    by = {(d["seed"], d["framework"]): d for d in docs}
    for seed in (0, 1):
        tf, torch = by[seed, "tf"], by[seed, "torch"]
        assert tf["steps"] == torch["steps"] == 60 and tf["noise_rows"] == torch["noise_rows"]
        with np.load(out / "runs" / f"dpsom-tiny-dense-digits-n50-original-seed{seed}-tf.npz") as a, \
                np.load(out / "runs" / f"dpsom-tiny-dense-digits-n50-original-seed{seed}-torch.npz") as b:
            assert len(a["assignments"]) == 295 == tf["n_evaluated"]
            np.testing.assert_array_equal(a["assignments"], b["assignments"])
            np.testing.assert_array_equal(a["labels"], b["labels"])
        for k in ("nmi", "purity", "acc", "topographic_error"):
            assert tf["metrics"][k] == torch["metrics"][k]
        # the NLL is a float32 mean over the evaluated batches of free-running models; measured TF vs torch:
        # 3.8e-9 / 3.8e-9 relative (seeds 0 / 1, these 50 digits), below one float32 ulp (6e-8): 1e-6 is
        # ~16 ulps, room for a reordered sum in another BLAS and none for a changed term
        assert tf["metrics"]["reconstruction_nll"] == pytest.approx(torch["metrics"]["reconstruction_nll"], rel=1e-6)
    assert by[0, "tf"]["metrics"]["nmi"] != by[1, "tf"]["metrics"]["nmi"]  # the seed reaches the run


@pytest.mark.tf
def test_finished_runs_are_not_recomputed(tiny_runs, monkeypatch):
    out, runs, _ = tiny_runs
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    monkeypatch.setattr("harness.spec.get_spec", lambda name: pytest.fail("a finished run was recomputed"))
    assert matrix.run_matrix(list(runs), out, jobs=1, progress=False) == []
    assert matrix.execute(runs[0], out)["metrics"]["nmi"] > 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before


@pytest.mark.tf
@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_interrupted_run_resumes_as_if_never_stopped(tiny_runs, tmp_path, monkeypatch, framework):
    """Killed in its 4th epoch (of 6), a run leaves its partial file (3 epochs) and no result; run
    again, it resumes there and ends exactly where the uninterrupted run ended: metrics, assignments,
    per-epoch loss means, noise rows. A side that cannot run in epochs (the whole-loop fallback)
    ends there too, so epoch chunking itself changes nothing."""
    from harness.adapters.dpsom import TFReferenceDPSOM, TorchDPSOM
    from harness.protocols import Unsupported

    out, runs, docs = tiny_runs
    run = next(r for r in runs if r.seed == 0 and r.framework == framework)
    ref = next(d for d in docs if d["seed"] == 0 and d["framework"] == framework)
    cls = {"tf": TFReferenceDPSOM, "torch": TorchDPSOM}[framework]
    real = cls.fit_records

    def killed(self, data, eps=None, epochs=None):
        if epochs and epochs[0] == 3:
            raise KeyboardInterrupt
        return real(self, data, eps, epochs)

    def whole(self, data, eps=None, epochs=None):
        if epochs is not None:
            raise Unsupported("whole loop only")
        return real(self, data, eps)

    partial = tmp_path / "runs" / f"{run.stem}.partial.npz"
    monkeypatch.setattr(cls, "fit_records", killed)
    with pytest.raises(KeyboardInterrupt):
        matrix.execute(run, tmp_path, checkpoint_every=0.0)  # a partial file after every epoch
    assert partial.exists() and not (tmp_path / "runs" / f"{run.stem}.json").exists()
    monkeypatch.setattr(cls, "fit_records", real)
    resumed = matrix.execute(run, tmp_path)
    monkeypatch.setattr(cls, "fit_records", whole)
    unchunked = matrix.execute(run, tmp_path / "whole")
    assert not partial.exists() and [r["epoch"] for r in resumed["resumed"]] == [3] and unchunked["resumed"] == []
    assert resumed["resumed"][0]["started_at"] == resumed["environment"]["git_commit"]  # the commit the run began at
    for doc in (resumed, unchunked):
        assert doc["metrics"] == ref["metrics"] and doc["curve"] == ref["curve"]
        assert (doc["steps"], doc["noise_rows"]) == (ref["steps"], ref["noise_rows"]) == (60, ref["noise_rows"])
    with np.load(out / "runs" / f"{run.stem}.npz") as a, np.load(tmp_path / "runs" / f"{run.stem}.npz") as b:
        np.testing.assert_array_equal(a["assignments"], b["assignments"])


@pytest.mark.tf
def test_a_users_port_runs_through_the_same_matrix(tiny_runs, tmp_path):
    """``port = "pkg.module:factory"`` runs a user's port as the torch framework, by the same job: here
    the suite's own port through the user's factory signature (tests/oddport ``faithful``), so its run
    must equal the suite's own torch run. Its TF runs are the reference's, shared: the table compares
    the same TF runs with each port, and the README names the port."""
    out, _, _ = tiny_runs
    path = _write(tmp_path, TINY.replace('variant = "tiny-dense"', 'variant = "tiny-dense"\nport = "tests.oddport.adapter:faithful"'))
    runs = matrix.load_matrix(path).runs
    assert [r.stem for r in runs if r.seed == 0] == ["dpsom-tiny-dense-digits-n50-original-seed0-tf",
                                                     "dpsom-tiny-dense-digits-n50-original-seed0-torch-tests.oddport.adapter.faithful"]
    shutil.copytree(out / "runs", tmp_path / "runs")
    docs = matrix.run_matrix(list(runs), tmp_path, jobs=1, progress=False)  # the two TF runs are already there
    assert len(docs) == 2 and {d["port"] for d in docs} == {"tests.oddport.adapter:faithful"}
    for d in docs:
        own = json.loads((out / "runs" / f"dpsom-tiny-dense-digits-n50-original-seed{d['seed']}-torch.json").read_text())
        assert d["metrics"] == own["metrics"] and d["curve"] == own["curve"]
    assert t5_table.main(["--runs", str(tmp_path), "--config", str(path), "--no-figures"]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv").fillna({"port": ""})
    nmi = summary[summary["metric"] == "nmi"].set_index("port")
    assert set(nmi.index) == {"", "tests.oddport.adapter:faithful"} and (nmi["n_paired"] == 2).all()
    assert nmi.loc["", "diff"] == nmi.loc["tests.oddport.adapter:faithful", "diff"]


def test_unusable_partial_run_is_refused_by_name(tmp_path):
    """A partial file that is not one, or belongs to another run, is an error naming it; nothing is trained."""
    path = _write(tmp_path, TINY.replace('frameworks = ["tf", "torch"]', 'frameworks = ["torch"]'))
    seed0, seed1 = matrix.load_matrix(path).runs
    partial = tmp_path / "runs" / f"{seed1.stem}.partial.npz"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"{partial}: not a readable partial run"):
        matrix.execute(seed1, tmp_path)
    state = json.dumps({"stem": seed0.stem, "config": {}})
    with open(partial, "wb") as f:
        np.savez(f, state=np.array(state))
    with pytest.raises(ValueError, match="a partial run of another stem and config than this run's"):
        matrix.execute(seed1, tmp_path)
    assert not (tmp_path / "runs" / f"{seed1.stem}.json").exists()


@pytest.mark.tf
def test_tables_and_readme_from_runs(tiny_runs, tmp_path):
    out, _, _ = tiny_runs
    folder = tmp_path / "results"
    shutil.copytree(out, folder / "matrix")
    assert t5_table.main(["--runs", str(folder / "matrix"), "--config", str(out / "m.toml")]) == 0
    summary = pd.read_csv(folder / "matrix" / "summary.csv")
    nmi = summary[summary["metric"] == "nmi"].iloc[0]
    assert nmi["verdict"] == "equivalent" and nmi["diff"] == 0 and nmi["ari_mean"] == 1.0 and nmi["identical_seeds"] == 2
    assert np.isnan(summary[summary["metric"] == "ami"].iloc[0]["margin"])  # no margin declared: no verdict
    assert (folder / "matrix" / "figures" / "dpsom-tiny-dense-digits-n50-original.png").stat().st_size > 10_000
    from harness.readme import _metrics

    table = _metrics(folder)
    assert "| dpsom / tiny-dense | digits (first 50) | original | nmi |" in table and "**equivalent**" in table


def test_run_schema_is_checked(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x.json").write_text(json.dumps({"model": "dpsom", "seed": "0"}))
    with pytest.raises(ValueError, match=r"x.json: variant must be str"):
        t5_table.load_runs(tmp_path)


# --- verdicts -------------------------------------------------------------------------------------
def test_equivalence_matches_the_two_one_sided_tests_by_hand():
    tf = np.array([0.700, 0.710, 0.690, 0.705, 0.695])
    torch = tf - np.array([0.002, -0.001, 0.003, 0.000, 0.001])
    d = tf - torch
    se = d.std(ddof=1) / np.sqrt(5)
    p_hand = max(stats.t.sf((d.mean() + 0.01) / se, 4), stats.t.cdf((d.mean() - 0.01) / se, 4))
    r = t5_table.equivalence(tf, torch, 0.01, 0.05)
    assert r["p_tost"] == pytest.approx(p_hand, rel=1e-9) and r["verdict"] == "equivalent"
    assert r["ci_low"] == pytest.approx(d.mean() - stats.t.ppf(0.95, 4) * se)


def test_equivalence_verdicts():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.7, 5)
    assert t5_table.equivalence(base, base, 0.01, 0.05)["verdict"] == "equivalent"  # sd 0, d = 0
    assert t5_table.equivalence(base, base - 0.02, 0.01, 0.05)["verdict"] == "different"  # sd 0, |d| > margin
    shifted = base - 0.05 + rng.normal(0, 0.002, 5)
    assert t5_table.equivalence(base, shifted, 0.01, 0.05)["verdict"] == "different"
    noisy = base + rng.normal(0, 0.05, 5)
    assert t5_table.equivalence(base, noisy, 0.01, 0.05)["verdict"] == "not shown equivalent"
    assert t5_table.equivalence(base[:1], base[:1], 0.01, 0.05)["verdict"] == "too few seeds"


def test_topographic_error_on_the_torus():
    """3x3 grid, node k at (k // 3, k % 3): second-best 1 (right of 0), 2 (left of 0 through the wrap),
    6 (above 0 through the wrap), 4 (diagonal: an error), 8 (diagonal through both wraps: an error)."""
    d = np.full((5, 9), 10.0)
    d[:, 0] = 0.0
    for i, second in enumerate((1, 2, 6, 4, 8)):
        d[i, second] = 1.0
    assert topographic_error(d, (3, 3)) == pytest.approx(2 / 5)


# --- regression gate ---------------------------------------------------------------------------------
def _frame(values: dict[int, float], framework="torch") -> pd.DataFrame:
    return pd.DataFrame([{"model": "dpsom", "variant": "dense", "dataset": "MNIST", "limit": 3000, "schedule": "reduced",
                          "framework": framework, "seed": s, "metric.nmi": v} for s, v in values.items()])


def test_metric_drift_band_is_three_standard_errors():
    base = _frame({0: 0.50, 1: 0.52, 2: 0.54})
    band = 3 * 0.02 / np.sqrt(3)
    same = regress.metric_drifts(base, base)
    assert not same["drift"].any() and same["band"].iloc[0] == pytest.approx(band)
    inside = regress.metric_drifts(base, _frame({0: 0.50 + 0.9 * band, 1: 0.52 + 0.9 * band, 2: 0.54 + 0.9 * band}))
    assert not inside["drift"].any()
    planted = regress.metric_drifts(base, _frame({0: 0.45, 1: 0.47, 2: 0.49}))
    assert planted["drift"].all() and planted["delta"].iloc[0] == pytest.approx(-0.05)
    lost = regress.metric_drifts(base, _frame({0: 0.50, 1: 0.52}))
    assert lost["drift"].all()  # a seed missing now


def test_regress_cli_fails_on_a_planted_drift(tmp_path, capsys):
    """The stored baseline compared with itself passes; with one framework's NMI lowered by 0.02 on
    every seed (far outside its band) it fails and names metric, baseline, now, delta and band."""
    base = ROOT / "results" / "regress"
    if not (base / "runs").exists():
        pytest.fail("results/regress/runs is not stored (python -m harness.regress --update-baseline)")
    assert regress.main(["--now", str(base)]) == 0
    shutil.copytree(base, tmp_path / "now")
    for path in (tmp_path / "now" / "runs").glob("*-torch.json"):
        doc = json.loads(path.read_text())
        doc["metrics"]["nmi"] -= 0.02
        path.write_text(json.dumps(doc))
    assert regress.main(["--now", str(tmp_path / "now")]) == 1
    err = capsys.readouterr().err
    assert "REGRESSION" in err and "dpsom/dense/torch nmi: baseline" in err and "delta -0.02" in err


def test_stored_summary_is_what_the_stored_runs_give(tmp_path):
    """results/matrix/{runs,agreement,summary}.csv regenerate byte for byte from results/matrix/runs
    (README's table renders summary.csv; test_readme checks that part)."""
    stored = ROOT / "results" / "matrix"
    if not (stored / "runs").exists():
        pytest.skip("no T5 runs stored yet")
    shutil.copytree(stored / "runs", tmp_path / "runs")
    assert t5_table.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    for name in ("runs.csv", "agreement.csv", "summary.csv"):
        assert (tmp_path / name).read_bytes() == (stored / name).read_bytes(), f"results/matrix/{name} is stale: nox -s table"


@pytest.mark.tf
def test_decoded_prototypes_agree_across_sides():
    """Both DPSOM sides decode given latent points (the reference through the original's is_training
    / z_e switch) to the same Bernoulli means: same weights, float32, |diff| < 1e-6 (measured max
    |diff| 1.19e-7 = one float32 ulp near 1)."""
    from harness.spec import get_spec

    spec = get_spec("dpsom")
    cfg = spec.get_config("tiny-dense")
    port, ref = spec.make_port(cfg), spec.make_reference(cfg)
    weights = spec.draw_weights({k: v.shape for k, v in port.get_weights().items()}, np.random.default_rng(3))
    port.set_weights(weights)
    ref.set_weights(weights)
    z = np.random.default_rng(4).normal(size=(9, cfg.latent_dim)).astype(np.float32)
    a, b = ref.decode(z), port.decode(z)
    ref.close()
    assert a.shape == b.shape == (9, 28, 28, 1) and 0 < a.min() and a.max() < 1
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert np.abs(a - port.decode(z[::-1].copy())).max() > 1e-3  # the decoded points matter


@pytest.mark.tf
def test_dekm_runs_through_the_matrix(tmp_path):
    """DEKM tiny-dense on the first 52 digits (a partial last batch: 52 is no multiple of 5, which the
    original's pointer needs): both frameworks from the same weights, orders and k-means++ seeds run
    the same number of steps to the same refit labels; the reported metrics are the last refit's."""
    path = _write(tmp_path, TINY.replace('model = "dpsom"', 'model = "dekm"').replace("limit = 50", "limit = 52")
                  .replace("seeds = [0, 1]", "seeds = [0]"))
    docs = {d["framework"]: d for d in matrix.run_matrix(list(matrix.load_matrix(path).runs), tmp_path, jobs=1, progress=False)}
    tf, torch = docs["tf"], docs["torch"]
    assert tf["steps"] == torch["steps"] > 0 and tf["n_evaluated"] == 52 and tf["end"] == torch["end"]
    for d in docs.values():  # the original's square table ignores classes beyond the clusters found: it can only under-count
        assert d["metrics"]["acc_original"] <= d["metrics"]["acc"] + 1e-5 and "nmi_arithmetic" in d["metrics"]
    assert tf["metrics"] == torch["metrics"]
    with np.load(tmp_path / "runs" / "dekm-tiny-dense-digits-n52-original-seed0-tf.npz") as a, \
            np.load(tmp_path / "runs" / "dekm-tiny-dense-digits-n52-original-seed0-torch.npz") as b:
        np.testing.assert_array_equal(a["assignments"], b["assignments"])


def test_dask_backend_runs_the_same_job(tmp_path):
    """The Dask backend (a local cluster here; ``--address`` for a real one) runs the same job to the
    same result as the in-process run: torch only, tiny-dense on 50 images."""
    path = _write(tmp_path, TINY.replace('frameworks = ["tf", "torch"]', 'frameworks = ["torch"]').replace("seeds = [0, 1]", "seeds = [0]"))
    runs = list(matrix.load_matrix(path).runs)
    local = matrix.run_matrix(runs, tmp_path / "local", jobs=1, progress=False)  # threads: see tiny_runs
    dask = matrix.run_matrix(runs, tmp_path / "dask", jobs=1, backend="dask", progress=False)
    assert len(local) == len(dask) == 1 and local[0]["metrics"] == dask[0]["metrics"] and local[0]["steps"] == dask[0]["steps"] == 60
    with pytest.raises(ValueError, match="backend 'spark': expected loky, dask or ray"):
        matrix.run_matrix(runs, tmp_path / "x", backend="spark")


def test_metric_drift_band_covers_float_level_perturbation():
    """Seeds that agree (sem 0.001) but frameworks 0.01 apart at every seed: the band is set by the
    float-level term. d = TF − torch is two roundings of one run apart, and so is a rerun on other
    kernels from the baseline: 3 × rms(d) / √n = 3 × 0.01 / √3."""
    base = pd.concat([_frame({0: 0.500, 1: 0.501, 2: 0.502}, "tf"), _frame({0: 0.510, 1: 0.511, 2: 0.492}, "torch")])
    band = regress.metric_drifts(base, base).set_index("framework")["band"]
    assert band["tf"] == pytest.approx(3 * 0.01 / np.sqrt(3))
    sem_torch = np.std([0.510, 0.511, 0.492], ddof=1) / np.sqrt(3)
    assert band["torch"] == pytest.approx(3 * max(sem_torch, 0.01 / np.sqrt(3)))
