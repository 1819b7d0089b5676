"""``python -m harness.readme [--check]``: render README's result tables from results/.

Tables live between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers and are generated,
never hand-written: ``parity`` from results/parity/*-T[0-3].json (and the pipeline tiers' *-D.json, *-I.json ...), ``t4`` from results/parity/*-T4-*steps.json,
``bench`` from results/bench/*.csv, ``timing`` (T6) from results/timing/*.json, ``metrics`` (T5)
from results/matrix/summary.csv.
``--check`` exits 1 (listing the stale tables) when README.md and results/ disagree; the test suite
runs it, so CI fails on a README that does not match the stored results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harness.parity import PIPELINE

ROOT = Path(__file__).resolve().parent.parent


def _parity(results: Path) -> str:
    lines = []
    variants = sorted({p.name.rsplit("-", 1)[0] for p in (results / "parity").glob("*-T[0-3].json")})
    for stem in variants:
        # the quick tier's reports, then the pipeline tiers' (harness/parity.py PIPELINE) where stored
        paths = sorted((results / "parity").glob(f"{stem}-T[0-3].json")) + [
            p for t in PIPELINE if (p := results / "parity" / f"{stem}-{t}.json").exists()]
        docs = [json.loads(p.read_text()) for p in paths]
        doc = docs[0]
        first = next((d["first_divergence"] for d in docs if d["first_divergence"]), None)
        verdicts = {d["verdict"] for d in docs}
        verdict = next((v for v in ("FAIL", "STRUCTURAL", "INACCURATE", "DECLARED") if v in verdicts), "PASS")
        seconds = ", ".join(f"{d['tier']} {d['seconds']:.0f} s" for d in docs)
        if doc.get("peak_rss_mb"):
            seconds += f"; peak RSS {doc['peak_rss_mb'] / 1024:.1f} GiB"
        lines += [
            f"**{doc['model']} / {doc['variant']}** on {doc['data']} (seed {doc['seed']}, tolerance = "
            f"{doc['multiple']:g} × noise floor; {seconds}): verdict **{verdict}**"
            + (f", first divergence `{first['name']}` in {first['section']} ({first['verdict']}"
               + (f": {first['note']}" if first.get("note") else "") + ")" if first else ""),
            "",
            "| section | PASS | worst tensor | max abs diff | tolerance |",
            "|---|---|---|---|---|",
        ]
        for d in docs:
            for name, rows in d["sections"].items():
                n_pass = sum(r["verdict"] == "PASS" for r in rows)
                worst = max(rows, key=lambda r: r["max_abs"] / r["tolerance"] if r["tolerance"] else 0.0)
                lines.append(f"| {name} | {n_pass}/{len(rows)} | `{worst['name']}` | {worst['max_abs']:.3g} | {worst['tolerance']:.3g} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _bench(results: Path) -> str:
    lines = []
    for path in sorted((results / "bench").glob("*.csv")):
        df = pd.read_csv(path)
        row = df.iloc[0]
        lines += [
            f"`{path.name}`: {row['cpu']}{' ' + str(row['cpu_isa']) if 'cpu_isa' in row else ''}, {row['cores']} cores, torch {row['torch_version']}, TF {row['tensorflow_version']}, "
            f"median of {row['rounds']} steps (batch 300), one run"
            + (f", {row['torch_threads']} torch threads, OMP_WAIT_POLICY={row['omp_wait_policy']}, commit {str(row['commit'])[:12]}{'+dirty' if str(row['commit']).endswith('+dirty') else ''}"
               if "commit" in row else "")
            + (f", TF oneDNN {'on' if str(row['tf_onednn_opts']) in ('1', 'true', 'True') else 'off'} (TF_ENABLE_ONEDNN_OPTS={row['tf_onednn_opts']})"
               if "tf_onednn_opts" in row else ""),
            "",
            "| variant | phase | TF (ms) | IQR | torch (ms) | IQR | torch / TF |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in df.itertuples():
            lines.append(f"| {r.variant} | {r.phase} | {1e3 * r.tf:.0f} | {1e3 * r.tf_iqr:.0f} | {1e3 * r.torch:.0f} | {1e3 * r.torch_iqr:.0f} | "
                         f"{r.ratio_torch_over_tf:.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _timing(results: Path) -> str:
    """T6: step times per arm and phase, FLOPs and % of the GEMM floor (harness/timing.py)."""
    from harness.timing import markdown

    return markdown(results / "timing")


def _t4(results: Path) -> str:
    lines = ["| model / variant | steps (epoch) | seed | verdict | free-running: first step outside the band | final distance torch vs TF (weights / losses) "
             "| own float32 vs float64, port / TF (w: weights, l: losses) | synced: worst diff / tol (losses / weights / optimizer) | synced: first divergence | figure |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted((results / "parity").glob("*-T4-*steps.json")):
        d = json.loads(path.read_text())
        g, ex, sy = d["growth"], d["first_exit"], d.get("synced")
        exit_ = "none" if ex is None else f"{ex['step']} ({ex['phase']}, {ex['quantity']})"
        if sy:
            worst = " / ".join(f"{max(st['worst_ratio'][k] for st in sy['steps']):.2f}" for k in ("losses", "weights", "optimizer"))
            f = sy["first_divergence"]
            first = "none" if f is None else f"{f['step']} ({f['phase']}): {f['section']} `{f['name']}` {f['verdict']}"
        else:
            worst = first = "not run"
        lines.append(
            f"| {d['model']} / {d['variant']} | {d['steps']} ({d['epoch_steps']}) | {d['seed']} | {d['verdict']} | {exit_} | "
            f"{g['weights: torch vs TF'][-1]:.3g} / {g['losses: torch vs TF'][-1]:.3g} | "
            + " / ".join(f"{g[f'weights: {pair}'][-1]:.3g}" for pair in ("torch32 vs torch64", "TF32 vs TF64"))
            + " (w), " + " / ".join(f"{g[f'losses: {pair}'][-1]:.3g}" for pair in ("torch32 vs torch64", "TF32 vs TF64"))
            + f" (l) | {worst} | {first} | "
            f"[png](results/parity/{path.with_suffix('.png').name}) |")
    return "\n".join(lines)


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.4f} ± {sd:.4f}" if sd == sd else f"{mean:.4f}"


def _metrics(results: Path) -> str:
    """T5: one row per (model, variant, data, schedule) and metric the original reports (the spec's
    ``reported_metrics``) that has a margin, from results/matrix/summary.csv (harness/t5_table.py;
    every other metric is there too); published numbers from harness/published.csv."""
    path = results / "matrix" / "summary.csv"
    if not path.exists():
        return "No T5 runs stored yet (`python -m harness.matrix --store`, then `nox -s table`)."
    from harness.spec import models

    reported = {name: spec.reported_metrics for name, spec in models().items()}
    df = pd.read_csv(path)
    shown = [m in reported.get(model, ()) for model, m in zip(df["model"], df["metric"])]
    df = df[df["verdict"].notna().to_numpy() & np.array(shown, bool)]
    pub = pd.read_csv(Path(__file__).resolve().parent / "published.csv")
    pub = pub.merge(df[["model", "variant", "dataset", "metric"]].drop_duplicates(), on=["model", "variant", "dataset", "metric"])
    sources = list(dict.fromkeys(pub["source"]))
    lines = ["| model / variant | data | schedule | metric | TF reference | PyTorch port | Δ TF − torch (90 % CI) | margin | verdict "
             "| seeds | ARI TF vs torch | published, original schedule | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        data = f"{r.dataset} (first {r.limit})" if r.limit else r.dataset
        hits = pub[(pub["model"] == r.model) & (pub["variant"] == r.variant) & (pub["dataset"] == r.dataset) & (pub["metric"] == r.metric)]
        published = "; ".join(f"{h.value:.4f} {h.implementation} [{sources.index(h.source) + 1}]" for h in hits.itertuples()) or "none"
        ci = f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]" if r.ci_low == r.ci_low else "(no interval from one pair)"
        seeds = f"{r.n_paired}" if r.tf_n == r.torch_n == r.n_paired else f"TF {r.tf_n}, torch {r.torch_n}; Δ over {r.n_paired} paired"
        port = f" (port {r.port})" if isinstance(r.port, str) and r.port else ""  # "" reads back as NaN
        lines.append(f"| {r.model} / {r.variant}{port} | {data} | {r.schedule} | {r.metric} | {_fmt(r.tf_mean, r.tf_sd)} | {_fmt(r.torch_mean, r.torch_sd)} | "
                     f"{r.diff:+.4f} {ci} | ±{r.margin:g} | **{r.verdict}** | {seeds} | "
                     f"{r.ari_mean:.3f} ({r.identical_seeds} identical) | {published} | {r.device} |")
    lines += ["", *[f"[{i + 1}] {s}" for i, s in enumerate(sources)]]
    return "\n".join(lines)


RENDERERS = {"parity": _parity, "t4": _t4, "bench": _bench, "timing": _timing, "metrics": _metrics}


def render(readme: str, results: Path) -> str:
    for name, fn in RENDERERS.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise ValueError(f"README.md: markers <!-- {name}:begin --> / <!-- {name}:end --> not found")
        body = fn(results)
        readme = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(2)}", readme)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what results/ renders")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    wanted = render(current, args.results)
    if args.check:
        if current != wanted:
            print(f"{args.readme} is stale: run `python -m harness.readme` after updating results/", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
