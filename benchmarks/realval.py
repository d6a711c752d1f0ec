"""Score estimators on real pairs with ground truth: ../shared/realval per dataset (Middlebury
2001/2005/2006, KITTI 2012) and scikit-image's Motorcycle. Validation only: these pairs are never
trained on, and no recipe reads them.

    python benchmarks/realval.py dsnet-fast runs/faster-gt/final.pt --json benchmarks/results/x.json

Prints one Markdown table (mean EPE / bad-2 per dataset, the mean over the 16 pairs, Motorcycle)
and writes every case with --json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from stereo_kd_core import StereoEstimator
from stereo_kd_core.evaluate import evaluate, open_eval_dataset

REALVAL = Path(__file__).resolve().parents[2] / "shared" / "realval"
DATASET_NAMES = {"mb2001": "Middlebury 2001", "mb2005": "Middlebury 2005", "mb2006": "Middlebury 2006",
                 "kitti2012": "KITTI 2012"}


def dataset_of(case_name: str) -> str:
    """'mb2006_Baby1' -> 'mb2006' (the realval folder naming: <dataset>_<scene>)."""
    return Path(case_name).name.split("_", 1)[0]


# ground truth scored up to this disparity for every row, whatever the model's range (a model run
# at input_scale s searches 192 / s of the pair's pixels; its misses beyond that count)
GT_MAX_DISPARITY = 192


def score(model: str, realval: Path, precision: str = "auto", input_scale: float = 1.0,
          min_confidence: float = 0.0, estimator: StereoEstimator | None = None, pairs=None) -> dict:
    """{"realval": {dataset: mean metrics}, "realval_mean": ..., "motorcycle": ..., "cases": [...]};
    with min_confidence also what that threshold publishes (kept %, bad-2 of the kept pixels).
    `estimator`: one loaded already (else `model` is loaded); `pairs`: a function applied to every
    sample before it is scored (a photometric change of the views, say)."""
    if estimator is None:
        estimator = StereoEstimator.load(model, device="cpu", precision=precision, input_scale=input_scale)
    keys = ("epe", "bad2", "d1") + (("kept", "bad2_kept") if min_confidence > 0 else ())
    changed = (lambda samples: samples) if pairs is None else (lambda samples: map(pairs, samples))
    real = evaluate(estimator, changed(open_eval_dataset("middlebury", str(realval))), max_disparity=GT_MAX_DISPARITY,
                    min_confidence=min_confidence)
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for case in real["cases"]:
        by_dataset[dataset_of(case["name"])].append(case)
    means = {name: {key: sum(c[key] for c in cases) / len(cases) for key in keys}
             for name, cases in sorted(by_dataset.items())}
    moto = evaluate(estimator, changed(open_eval_dataset("motorcycle")), max_disparity=GT_MAX_DISPARITY,
                    min_confidence=min_confidence)
    def mean_of(result: dict) -> dict:  # kept / bad2_kept: the mean over cases (aggregate_metrics leaves them out)
        return {key: result["mean"][key] if key in result["mean"]
                else sum(c[key] for c in result["cases"]) / len(result["cases"]) for key in keys}

    return {"model": model, "precision": precision, "input_scale": input_scale, "min_confidence": min_confidence,
            "realval": means, "realval_mean": mean_of(real), "motorcycle": mean_of(moto), "cases": real["cases"]}


def cell(metrics: dict) -> str:
    """'EPE / bad-2 %', and with a confidence threshold '(kept % at bad-2 % of them)'."""
    text = f"{metrics['epe']:.2f} / {metrics['bad2']:.1f} %"
    if "kept" in metrics:
        text += f" ({metrics['kept']:.1f} % kept at {metrics['bad2_kept']:.1f} %)"
    return text


def table(rows: list[dict]) -> str:
    datasets = sorted({name for row in rows for name in row["realval"]})
    header = ["model", *[f"{DATASET_NAMES.get(d, d)} EPE / bad-2" for d in datasets],
              "realval mean EPE / bad-2", "Motorcycle EPE / bad-2"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.get("label", row["model"])]
        cells += [cell(row["realval"][d]) for d in datasets]
        cells += [cell(row[key]) for key in ("realval_mean", "motorcycle")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="registry names, checkpoint paths or sgbm")
    parser.add_argument("--realval", default=str(REALVAL), help="folder of real pairs in Middlebury layout")
    parser.add_argument("--precision", default="auto", help="inference precision (auto: the measured CPU default)")
    parser.add_argument("--label", action="append", help="row label per model (default: the model string)")
    parser.add_argument("--json", help="write every row (with its cases) to this file")
    parser.add_argument("--input-scale", type=float, action="append",
                        help="run each model on the pairs resized by this factor (repeat: one row per factor)")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="also score what this confidence threshold publishes (the node's default: 0.8)")
    args = parser.parse_args()
    rows = []
    runs = [(model, scale) for model in args.models for scale in (args.input_scale or [1.0])]
    for index, (model, scale) in enumerate(runs):
        row = score(model, Path(args.realval), args.precision, scale, args.min_confidence)
        if args.label and index < len(args.label):
            row["label"] = args.label[index]
        elif scale != 1.0:
            row["label"] = f"{model}, input scale {scale:g}"
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
