"""``python -m harness.bench_table BENCH.json``: per-step medians (and IQRs) of both sides and their ratio.

Writes ``results/bench/dpsom-step-<env>.csv`` (fixed float format, sorted) from one pytest-benchmark
run, so every ratio compares numbers measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

SETTINGS = ("torch_threads", "omp_wait_policy", "commit", "cpu_isa", "tf_onednn_opts")  # benchmarks/test_step_time.py stores them with every result


def table(bench_json: Path) -> pd.DataFrame:
    doc = json.loads(bench_json.read_text())
    rows = [
        {**{k: b["extra_info"][k] for k in ("side", "variant", "phase")}, "median_s": b["stats"]["median"], "iqr_s": b["stats"]["iqr"],
         "min_s": b["stats"]["min"], "rounds": b["stats"]["rounds"]}
        for b in doc["benchmarks"]
    ]
    settings = {k: {str(b["extra_info"].get(k, "unrecorded")) for b in doc["benchmarks"]} for k in SETTINGS}
    mixed = {k: sorted(v) for k, v in settings.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"{bench_json}: one table compares one run's settings; these differ between benchmarks: {mixed}")
    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=["variant", "phase"], columns="side", values="median_s")
    if {"torch", "tf"} <= set(wide.columns):
        wide["ratio_torch_over_tf"] = wide["torch"] / wide["tf"]
    iqr = df.pivot_table(index=["variant", "phase"], columns="side", values="iqr_s")
    wide = wide.join(iqr.add_suffix("_iqr"))
    wide = wide.reset_index().sort_values(["variant", "phase"])
    info = doc.get("machine_info", {})
    wide["cpu"] = info.get("cpu", {}).get("brand_raw", "?")
    wide["cores"] = info.get("cpu", {}).get("count", "?")
    wide["rounds"] = int(df["rounds"].min())
    wide["datetime"] = doc.get("datetime", "?")
    for k, v in settings.items():
        wide[k] = v.pop() if v else "unrecorded"
    for package in ("torch", "tensorflow"):
        try:
            from importlib.metadata import version

            wide[f"{package}_version"] = version(package)
        except Exception:  # noqa: BLE001 -- a torch-only run has no TF version to record
            wide[f"{package}_version"] = "absent"
    return wide


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    src = Path(args[0] if args else "results/bench/latest.json")
    df = table(src)
    import torch

    # one file per device kind: a CPU's per ISA (harness.env.cpu_isa: AVX2 and AVX-512 hosts rank the frameworks differently)
    device = "cuda" if torch.cuda.is_available() else f"cpu-{str(df['cpu_isa'].iloc[0]).lower()}"
    out = src.parent / f"dpsom-step-torch{'.'.join(torch.__version__.split('.')[:2])}-{device}.csv"
    df.to_csv(out, index=False, float_format="%.4f")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
