"""Accuracy and CPU speed of estimators, as the JSON files behind the README's results table.

For every model given (registry name, checkpoint path, or sgbm) it runs, through the CLI:
  stereo-kd eval  on the fixed synthetic test split (seed 2026, never trained on) and on the
                  scikit-image Middlebury Motorcycle pair (zero-shot),
  stereo-kd bench at 384x640 on the CPU,
writes benchmarks/results/<label>_{synthetic,motorcycle,bench_cpu}.json and prints a Markdown table.

    python benchmarks/model_results.py sgbm dsnet-fast --synthetic-n 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stereo_kd_core.cli import main as cli

RESULTS = Path(__file__).resolve().parent / "results"
# The fixed synthetic test split: seed 2026 (training recipes refuse it), 256x512, scenes with
# disparities up to 0.8 * 128 px.
SYNTHETIC_SPLIT = ["--dataset", "synthetic", "--seed", "2026", "--height", "256", "--width", "512",
                   "--max-disparity", "128"]


def label_of(model: str) -> str:
    path = Path(model)
    return path.parent.name if path.name in ("final.pt", "last.pt") else path.stem


def evaluate(model: str, synthetic_n: int | None, prefix: Path) -> dict:
    """`stereo-kd eval` on the first `synthetic_n` pairs of the synthetic split (None: skipped) and
    on Motorcycle, writing <prefix>_synthetic.json and <prefix>_motorcycle.json; their means."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    means = {}
    datasets = {"synthetic": [*SYNTHETIC_SPLIT, "--n", str(synthetic_n)], "motorcycle": ["--dataset", "motorcycle"]}
    for name, dataset in datasets.items():
        if name == "synthetic" and synthetic_n is None:
            continue
        out = prefix.parent / f"{prefix.name}_{name}.json"
        assert cli(["eval", "--model", model, "--device", "cpu", *dataset, "--json", str(out)]) == 0
        means[name] = json.loads(out.read_text())["mean"]
    return means


def run(model: str, synthetic_n: int, bench_runs: int, threads: int, skip_synthetic: bool) -> dict:
    label = label_of(model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    row = {"model": model, "label": label, **evaluate(model, None if skip_synthetic else synthetic_n, RESULTS / label)}
    if bench_runs:
        out = RESULTS / f"{label}_bench_cpu.json"
        assert cli(["bench", model, "--device", "cpu", "--height", "384", "--width", "640", "--runs",
                    str(bench_runs), "--threads", str(threads), "--json", str(out)]) == 0
        row["bench"] = json.loads(out.read_text())
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | synthetic EPE | synthetic bad-2 % | synthetic D1 % | Motorcycle EPE | Motorcycle bad-2 % "
             "| Motorcycle D1 % | density % | CPU ms 384x640 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        syn = row.get("synthetic")
        moto = row["motorcycle"]
        bench = row.get("bench")
        syn_cells = (f"{syn['epe']:.2f} | {syn['bad2']:.1f} | {syn['d1']:.1f}" if syn else "- | - | -")
        lines.append(f"| {row['label']} | {syn_cells} | {moto['epe']:.2f} | {moto['bad2']:.1f} | {moto['d1']:.1f} "
                     f"| {moto['density']:.0f} | {bench['median_ms']:.0f} |" if bench else
                     f"| {row['label']} | {syn_cells} | {moto['epe']:.2f} | {moto['bad2']:.1f} | {moto['d1']:.1f} "
                     f"| {moto['density']:.0f} | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="registry names, checkpoint paths, or sgbm")
    parser.add_argument("--synthetic-n", type=int, default=200, help="pairs of the synthetic test split")
    parser.add_argument("--bench-runs", type=int, default=50, help="timed runs at 384x640 (0 = no timing)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for timing")
    parser.add_argument("--skip-synthetic", action="store_true", help="Motorcycle only (slow teachers)")
    args = parser.parse_args()
    rows = [run(m, args.synthetic_n, args.bench_runs, args.threads, args.skip_synthetic) for m in args.models]
    print(table(rows))


if __name__ == "__main__":
    main()
