"""CI regression gate: ``python -m harness.regress`` (``nox -s regress``; .ci/run runs it after the tests).

1. **Quick tier** (T0–T3) of DPSOM dense and conv on MNIST seed 0, as ``nox -s parity`` runs it (one
   process per variant, one at a time, so each stays within the job's 4 GB), every row's verdict
   against the stored report in results/parity: a row that passed there and does not now, or is
   missing now, is a drift.
2. **CPU-sized schedule runs** (``regress.toml``, matrix format: DPSOM dense, reduced schedule on an
   MNIST subset, fixed seeds, both frameworks; rerun fresh into ``--out``), every metric's mean over
   the seeds per framework against the stored baseline (results/regress/runs): a drift when
   |now − baseline| > band, band = ``BAND_K`` × the larger of two standard errors, both read off
   the baseline: of its mean over its seeds (sd / √n), and of a difference of two means under
   float-level perturbation. The TF-vs-torch difference d at one seed is two float32 roundings of
   the same run apart (one run's rounding moves the metric by σ_f = rms(d) / √2); a rerun on another
   CPU's kernels, or on another library's GEMM, is another rounding of each run, so now − baseline
   is again two roundings apart: σ_f·√2 = rms(d) per seed, rms(d) / √n for the mean of n. (Until
   e639f68 the band took σ_f / √n, √2 too narrow for that: on a Zen 5 host the port's oneDNN backward
   moved the torch ``acc`` mean by −0.0111 against a band of 0.0111, while the host alone moved TF's
   topographic error by −0.019.) At least ``BAND_FLOOR``.

Prints every comparison and exits 1 listing the drifts (metric, baseline, now, delta, band).
``--update-baseline`` reruns part 2 into results/regress (nothing else is ever written there);
``--now DIR`` compares runs already in DIR instead of rerunning (e.g. a planted drift).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harness.matrix import ROOT, load_matrix, run_matrix
from harness.t5_table import load_runs

BASELINE = ROOT / "results" / "regress"
QUICK = (("dpsom", "dense"), ("dpsom", "conv"))
BAND_K = 3.0  # standard errors of the baseline's mean
BAND_FLOOR = 1e-4  # where every seed gave the same value (sd 0): one image in 10 000


def metric_drifts(baseline: pd.DataFrame, now: pd.DataFrame) -> pd.DataFrame:
    """Per (group, framework, metric): baseline mean, now mean, delta, band, drift (module docstring).
    A metric or run present in the baseline and absent now is a drift (NaN now)."""
    keys = ["model", "variant", "dataset", "limit", "schedule", "framework"]
    metrics = [c for c in baseline.columns if c.startswith("metric.")]
    wide = baseline.pivot_table(index=[*keys[:-1], "seed"], columns="framework", values=metrics)
    rows = []
    for key, g in baseline.groupby(keys, sort=True):
        h = now.merge(pd.DataFrame([dict(zip(keys, key))]), on=keys)
        for col in metrics:
            b = g[col].dropna().to_numpy()
            if not len(b):
                continue
            n_now = h[col].dropna() if col in h else pd.Series(dtype=float)
            sem = float(np.std(b, ddof=1) / np.sqrt(len(b))) if len(b) > 1 else 0.0
            pair = wide.xs(tuple(key[:-1]), level=tuple(keys[:-1]))[col] if {(col, "tf"), (col, "torch")} <= set(wide.columns) else None
            d = (pair["tf"] - pair["torch"]).dropna().to_numpy() if pair is not None else np.zeros(0)
            rounding = float(np.sqrt(np.mean(d**2)) / np.sqrt(len(b))) if len(d) else 0.0  # two roundings apart: rms(d) / √n
            band = max(BAND_K * max(sem, rounding), BAND_FLOOR)
            value = float(n_now.mean()) if len(n_now) == len(b) else float("nan")  # a lost seed is a drift
            delta = value - float(b.mean())
            rows.append({**dict(zip(keys, key)), "metric": col.removeprefix("metric."), "seeds": len(b), "baseline": float(b.mean()),
                         "now": value, "delta": delta, "band": band, "drift": not abs(delta) <= band})
    return pd.DataFrame(rows)


def quick_drifts(out: Path) -> list[str]:
    """Part 1: the quick tier per variant in its own process; drifts as lines."""
    lines = []
    for model, variant in QUICK:
        folder = out / "parity" / f"{model}-{variant}"
        cmd = [sys.executable, "-m", "harness.parity", "--model", model, "--variant", variant, "--tier", "quick", "--out", str(folder)]
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=False, env={**os.environ})  # its exit status is judged row by row below
        for stored in sorted((ROOT / "results" / "parity").glob(f"{model}-{variant}-T[0-3].json")):
            now_path = next(iter(folder.glob(f"{model}-{variant}-*{stored.stem.rsplit('-', 1)[1]}.json")), None)
            if now_path is None:
                lines.append(f"{stored.stem}: no report written now")
                continue
            was, now = json.loads(stored.read_text())["sections"], json.loads(now_path.read_text())["sections"]
            for section, rows in was.items():
                verdicts = {r["name"]: r["verdict"] for r in now.get(section, [])}
                for r in rows:
                    if r["verdict"] == "PASS" and verdicts.get(r["name"]) != "PASS":
                        lines.append(f"{stored.stem} / {section} / {r['name']}: stored PASS, now {verdicts.get(r['name'], 'missing')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.regress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "regress.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "regress", help="where this run's reports go (emptied first)")
    parser.add_argument("--now", type=Path, default=None, help="compare the runs in this folder (holding runs/) instead of rerunning")
    parser.add_argument("--skip-quick", action="store_true", help="part 2 only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--update-baseline", action="store_true", help="rerun part 2 into results/regress (replaces the baseline)")
    args = parser.parse_args(argv)
    runs = load_matrix(args.config).runs
    if args.update_baseline:
        shutil.rmtree(BASELINE / "runs", ignore_errors=True)
        run_matrix(list(runs), BASELINE, jobs=args.jobs, threads=1)
        print(f"baseline written: {BASELINE / 'runs'} ({len(runs)} runs)")
        return 0
    drifts = []
    if args.now is None:
        shutil.rmtree(args.out, ignore_errors=True)
        if not args.skip_quick:
            drifts += quick_drifts(args.out)
        run_matrix(list(runs), args.out, jobs=args.jobs, threads=1)  # one thread per job: as the baseline ran
    table = metric_drifts(load_runs(BASELINE), load_runs(args.now or args.out))
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    drifts += [f"{r.model}/{r.variant}/{r.framework} {r.metric}: baseline {r.baseline:.6g}, now {r.now:.6g}, delta {r.delta:+.3g}, band {r.band:.3g}"
               for r in table.itertuples() if r.drift]
    if drifts:
        print(f"\nREGRESSION: {len(drifts)} drift(s)\n  " + "\n  ".join(drifts), file=sys.stderr)
        return 1
    print(f"\nno drift: {len(table)} metric means within their bands" + ("" if args.skip_quick or args.now else ", quick tier rows as stored"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
