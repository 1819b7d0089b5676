"""Tier T5, the tables: the runs of harness/matrix.py -> one row per run, the comparison per metric
with an equivalence verdict, and figures. ``python -m harness.t5_table [--runs results/matrix]``.

Per (model, variant, dataset, schedule, port) and metric: mean ± sd (ddof 1) over seeds per framework;
the TF-minus-torch difference paired by seed (same weights and noise at one seed) with its
(1 − 2α) interval; a paired TOST (statsmodels ``ttost_paired``) against the margin declared in
``matrix.toml`` and a paired t-test (scipy ``ttest_rel``):

* **equivalent**: TOST p < α, i.e. the (1 − 2α) interval lies inside ±margin;
* **different**: not equivalent and the t-test rejects a zero difference (p < α);
* **not shown equivalent**: neither (too few seeds or too much spread for the margin).

Identical differences on every seed (sd 0, where the t statistics are undefined) are judged exactly:
equivalent when |d| < margin, else different. Also per seed: ARI between the two frameworks'
assignments and whether they are identical. Written (atomically): ``<runs>/runs.csv``,
``<runs>/summary.csv``, ``<runs>/figures/*.png``. The README table (harness/readme.py) renders
``summary.csv``. ``port``: "" for the model's own port, else the factory a user's port ran through
(matrix.toml ``port``); the reference's runs are paired with every port's (:func:`by_port`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harness.matrix import ROOT, STORED, load_matrix

# column -> the type every stored run must have (checked on load; the error names the file)
SCHEMA = {"model": str, "variant": str, "dataset": str, "schedule": str, "framework": str, "seed": int, "limit": int,
          "steps": int, "train_seconds": float, "eval_seconds": float, "device": str, "threads": int, "n_evaluated": int}
GROUP = ["model", "variant", "dataset", "limit", "schedule", "port"]
PUBLISHED = Path(__file__).resolve().parent / "published.csv"


def load_runs(folder: Path) -> pd.DataFrame:
    """Every ``<folder>/runs/*.json`` as one row (metrics as ``metric.<name>`` columns), schema checked."""
    rows = []
    for path in sorted((folder / "runs").glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        for key, kind in SCHEMA.items():
            value = doc.get(key)
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int)) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"{path}: {key} must be {kind.__name__}, found {value!r}")
        if not isinstance(doc.get("metrics"), dict) or not doc["metrics"]:
            raise ValueError(f"{path}: metrics must be a non-empty object, found {doc.get('metrics')!r}")
        rows.append({**{k: doc[k] for k in SCHEMA}, "port": doc.get("port") or "", "git_commit": doc.get("environment", {}).get("git_commit"),
                     **{f"metric.{k}": float(v) for k, v in doc["metrics"].items()}, "file": path.name})
    if not rows:
        raise FileNotFoundError(f"{folder / 'runs'}: no runs stored (python -m harness.matrix)")
    return pd.DataFrame(rows).sort_values([*GROUP, "seed", "framework"], ignore_index=True)


def by_port(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs as the comparisons see them: the reference's runs of a group once per port that ran
    in that group (a TF run is the same whichever port it is compared with)."""
    torch, tf = runs[runs["framework"] != "tf"], runs[runs["framework"] == "tf"]
    ports = torch[GROUP].drop_duplicates()
    tf = tf.drop(columns="port").merge(ports, on=GROUP[:-1], how="left").fillna({"port": ""})
    return pd.concat([tf, torch]).sort_values([*GROUP, "seed", "framework"], ignore_index=True)


def agreement(folder: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Per seed run by both frameworks: ARI of their assignments, whether they are identical."""
    from sklearn.metrics import adjusted_rand_score

    out = []
    for key, g in runs.groupby([*GROUP, "seed"], sort=True):
        files = dict(zip(g["framework"], g["file"]))
        if {"tf", "torch"} <= set(files):
            with np.load(folder / "runs" / files["tf"].replace(".json", ".npz")) as a, \
                    np.load(folder / "runs" / files["torch"].replace(".json", ".npz")) as b:
                ka, kb = a["assignments"], b["assignments"]
            out.append({**dict(zip([*GROUP, "seed"], key)), "ari": float(adjusted_rand_score(ka, kb)),
                        "identical": bool(np.array_equal(ka, kb))})
    return pd.DataFrame(out, columns=[*GROUP, "seed", "ari", "identical"])


def equivalence(tf: np.ndarray, torch: np.ndarray, margin: float, alpha: float) -> dict[str, float | str]:
    """Paired TOST + t-test on d = tf − torch (module docstring)."""
    from scipy import stats
    from statsmodels.stats.weightstats import ttost_paired

    d = np.asarray(tf, np.float64) - np.asarray(torch, np.float64)
    n, mean = len(d), float(np.mean(d))
    if n < 2:
        return {"diff": mean, "ci_low": np.nan, "ci_high": np.nan, "p_tost": np.nan, "p_ttest": np.nan, "verdict": "too few seeds"}
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:  # t statistics undefined; the difference is known exactly
        inside = abs(mean) < margin
        return {"diff": mean, "ci_low": mean, "ci_high": mean, "p_tost": 0.0 if inside else 1.0, "p_ttest": 1.0 if mean == 0 else 0.0,
                "verdict": "equivalent" if inside else "different"}
    half = float(stats.t.ppf(1 - alpha, n - 1)) * sd / np.sqrt(n)
    p_tost = float(ttost_paired(np.asarray(tf, np.float64), np.asarray(torch, np.float64), -margin, margin)[0])
    p_t = float(stats.ttest_rel(tf, torch).pvalue)
    verdict = "equivalent" if p_tost < alpha else "different" if p_t < alpha else "not shown equivalent"
    return {"diff": mean, "ci_low": mean - half, "ci_high": mean + half, "p_tost": p_tost, "p_ttest": p_t, "verdict": verdict}


def summarise(runs: pd.DataFrame, agree: pd.DataFrame, margins: dict[str, float], alpha: float) -> pd.DataFrame:
    """One row per group and metric (module docstring); verdicts for the metrics with a margin."""
    rows = []
    metrics = sorted(c for c in runs.columns if c.startswith("metric."))
    for key, g in runs.groupby(GROUP, sort=True):
        base = dict(zip(GROUP, key))
        ag = agree.merge(pd.DataFrame([base]), on=GROUP) if len(agree) else agree
        for col in metrics:
            name = col.removeprefix("metric.")
            per = {f: g[g["framework"] == f].set_index("seed")[col].dropna() for f in ("tf", "torch")}
            if all(s.empty for s in per.values()):
                continue
            row = {**base, "metric": name}
            for f, s in per.items():
                row.update({f"{f}_mean": s.mean() if len(s) else np.nan, f"{f}_sd": s.std(ddof=1) if len(s) > 1 else np.nan, f"{f}_n": len(s)})
            seeds = sorted(set(per["tf"].index) & set(per["torch"].index))
            row.update({"n_paired": len(seeds), "margin": margins.get(name, np.nan), "diff": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                        "p_tost": np.nan, "p_ttest": np.nan, "verdict": None})
            if name in margins and seeds:
                row.update(equivalence(per["tf"][seeds].to_numpy(), per["torch"][seeds].to_numpy(), margins[name], alpha))
            row.update({"ari_mean": ag["ari"].mean() if len(ag) else np.nan, "identical_seeds": int(ag["identical"].sum()) if len(ag) else 0,
                        "device": ", ".join(sorted(set(g["device"]))),
                        "tf_train_s": g[g["framework"] == "tf"]["train_seconds"].mean(),
                        "torch_train_s": g[g["framework"] == "torch"]["train_seconds"].mean()})
            rows.append(row)
    return pd.DataFrame(rows)


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(tmp, path)


def figures(folder: Path, runs: pd.DataFrame, specs: dict) -> list[Path]:
    """Per group: the reported metrics' distributions per framework (every seed a dot, paired seeds
    joined) and the training curves (per epoch, the mean of the loss its phase minimises; one line
    per run); and where the runs stored them, the SOM grid of decoded prototypes (:func:`_prototypes`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reported = {name: spec.reported_metrics for name, spec in specs.items()}
    losses = {name: {ph.name: ph.loss for ph in spec.phases} for name, spec in specs.items()}
    out_dir = folder / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, g in runs.groupby(GROUP, sort=True):
        model, variant, dataset, limit, schedule, port = key
        stem = f"{model}-{variant}-{dataset}{f'-n{limit}' if limit else ''}-{schedule}{'-' + port.replace(':', '.') if port else ''}"
        names = [m for m in reported.get(key[0], ()) if f"metric.{m}" in g]
        fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.4), squeeze=False)
        for ax, m in zip(axes[0], names):
            wide = g.pivot_table(index="seed", columns="framework", values=f"metric.{m}")
            for _, r in wide.iterrows():
                ax.plot([0, 1], [r.get("tf", np.nan), r.get("torch", np.nan)], "o-", color="0.6", lw=0.8)
            ax.set_xticks([0, 1], ["TF reference", "PyTorch port"])
            ax.set_xlim(-0.4, 1.4)
            ax.set_title(f"{m} ({len(wide)} seeds)")
        ax = axes[0][-1]
        for r in g.itertuples():
            doc = json.loads((folder / "runs" / r.file).read_text())
            y = [c.get(losses[key[0]].get(c["phase"], ""), np.nan) for c in doc.get("curve", [])]
            ax.plot(np.arange(len(y)), y, color="C0" if r.framework == "tf" else "C1", lw=0.8, label=r.framework)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys())
        ax.set_title("each phase's loss, per-epoch mean")
        ax.set_xlabel("epoch / refit")
        ax.set_yscale("symlog")
        fig.suptitle(f"{model} / {variant} / {dataset}{f' (first {limit})' if limit else ''} / {schedule} schedule"
                     f"{f' / port {port}' if port else ''}")
        written.append(_save(fig, out_dir / f"{stem}.png"))
        proto = _prototypes(folder, g)
        if proto is not None:
            written.append(_save(proto, out_dir / f"{stem}-prototypes.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=80, metadata={"Software": None}, bbox_inches="tight")
    os.replace(path.with_name(path.name + ".tmp.png"), path)
    plt.close(fig)
    return path


def _prototypes(folder: Path, g: pd.DataFrame):
    """The SOM grid of decoded prototypes of the lowest seed both frameworks stored them for, each
    node titled with its majority label (and its share of the node's inputs); None without them."""
    import matplotlib.pyplot as plt

    from harness.metrics import cluster_to_class

    for seed, s in g.groupby("seed", sort=True):
        files = dict(zip(s["framework"], s["file"]))
        arrays = {}
        for f in ("tf", "torch"):
            if f in files:
                with np.load(folder / "runs" / files[f].replace(".json", ".npz")) as z:
                    if "prototypes" in z:
                        arrays[f] = {k: z[k] for k in ("prototypes", "assignments", "labels")}
        if len(arrays) < len(files) or not arrays:
            continue
        rows, cols = json.loads((folder / "runs" / next(iter(files.values()))).read_text())["config"]["som_dim"]
        fig, axes = plt.subplots(rows, cols * len(arrays) + len(arrays) - 1, figsize=(1.1 * (cols * len(arrays) + 1), 1.2 * rows),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for j, (f, a) in enumerate(arrays.items()):
            k, y = a["assignments"], a["labels"]
            majority = cluster_to_class(y, k)
            for node in range(rows * cols):
                ax = axes[node // cols][j * (cols + 1) + node % cols]
                ax.imshow(np.asarray(a["prototypes"][node], np.float32).squeeze(-1), cmap="gray_r", vmin=0, vmax=1)
                hits = y[k == node]
                share = f" {np.mean(hits == majority[node]):.0%}" if len(hits) else " -"
                ax.set_title(f"{majority[node] if len(hits) else '·'}{share}", fontsize=7)
            fig.text((j * (cols + 1) + cols / 2) / (cols * len(arrays) + len(arrays) - 1), 1.0,
                     f"{'TF reference' if f == 'tf' else 'PyTorch port'}, seed {seed} (node: majority label, its share)",
                     ha="center", va="bottom", fontsize=9)
        return fig
    return None


def main(argv: list[str] | None = None) -> int:
    from harness.spec import models

    parser = argparse.ArgumentParser(prog="python -m harness.t5_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=STORED, help="folder holding runs/ (default results/matrix)")
    parser.add_argument("--config", type=Path, default=ROOT / "matrix.toml", help="margins and alpha (default matrix.toml)")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    try:
        matrix = load_matrix(args.config)
        runs = load_runs(args.runs)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paired = by_port(runs)
    agree = agreement(args.runs, paired)
    summary = summarise(paired, agree, matrix.margins, matrix.alpha)
    _atomic_csv(runs.drop(columns=["file"]), args.runs / "runs.csv")
    _atomic_csv(agree, args.runs / "agreement.csv")
    _atomic_csv(summary, args.runs / "summary.csv")
    if not args.no_figures:
        figures(args.runs, paired, models())
    shown = summary[summary["verdict"].notna()] if "verdict" in summary else summary
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(shown[[*GROUP, "metric", "tf_mean", "tf_sd", "torch_mean", "torch_sd", "n_paired", "diff", "verdict", "ari_mean"]]
              .to_string(index=False) if len(shown) else "no metric with a margin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
