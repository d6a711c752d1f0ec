"""How the shipped default should see a pair's colour and exposure (its manifest `saturation` and
`match_exposure`, stereo_kd_core.models.photometric): the same weights with each setting on the
real validation pairs (../shared/realval per dataset, Motorcycle: validation only, never trained
on), on the generated split (seed 2026, 200 pairs: the training domain) and, for some settings, on
the real pairs with their right view darkened or given another tone curve (two cameras that
disagree in exposure). Writes benchmarks/results/saturation_study.json and prints the README's table.

    python benchmarks/saturation_study.py [--model dsnet-faster-x1.25] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realval import REALVAL, score  # noqa: E402

from stereo_kd_core import StereoEstimator  # noqa: E402
from stereo_kd_core.allocator import keep_freed_memory  # noqa: E402
from stereo_kd_core.evaluate import evaluate, open_eval_dataset  # noqa: E402
from stereo_kd_core.models.photometric import photometric_settings, set_photometric  # noqa: E402
from stereo_kd_core.registry import describe_estimator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SATURATIONS = (1.0, 0.75, 0.5, 0.25, 0.0)
# the settings also scored on pairs whose right view was changed
ROBUSTNESS = ({"saturation": 1.0, "match_exposure": False}, {"saturation": 0.25, "match_exposure": False},
              {"saturation": 1.0, "match_exposure": True}, {"saturation": 0.25, "match_exposure": True})
SYNTHETIC = {"n": 200, "seed": 2026, "height": 256, "width": 512, "max_disparity": 192, "kind": "photo"}


def darker_right(sample: dict, factor: float = 0.6) -> dict:
    """The right view at `factor` of its brightness (a camera exposed shorter)."""
    right = np.clip(sample["right"].astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)
    return {**sample, "right": right}


def gamma_right(sample: dict, gamma: float = 1.6) -> dict:
    """The right view through another tone curve (a camera with another gamma)."""
    right = np.clip(255.0 * (sample["right"] / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    return {**sample, "right": right}


CHANGES = {"right view x0.6": darker_right, "right view gamma 1.6": gamma_right}


def seeing(estimator: StereoEstimator, settings: dict) -> None:
    """Make the loaded estimator's network see pairs with these photometric settings (eager only)."""
    inner = getattr(estimator, "inner", estimator)
    if getattr(inner, "compiled", False):
        raise ValueError("a compiled estimator keeps the settings it was built with")
    set_photometric(inner.inference_network, settings, "the study")


def summary(result: dict) -> dict:
    return {"realval": {name: {k: round(v, 4) for k, v in means.items()} for name, means in result["realval"].items()},
            "realval_mean": {k: round(v, 4) for k, v in result["realval_mean"].items()},
            "motorcycle": {k: round(v, 4) for k, v in result["motorcycle"].items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dsnet-faster-x1.25")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--realval", type=Path, default=REALVAL)
    parser.add_argument("--saturations", type=float, nargs="+", default=list(SATURATIONS))
    parser.add_argument("--match-exposure", choices=("both", "on", "off"), default="both")
    parser.add_argument("--json", type=Path, default=RESULTS / "saturation_study.json")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    estimator = StereoEstimator.load(args.model, device="cpu", precision=args.precision)
    shipped = photometric_settings(getattr(estimator, "inner", estimator).inference_network)
    matching = {"both": (False, True), "on": (True,), "off": (False,)}[args.match_exposure]
    rows = []
    for matched in matching:
        for saturation in args.saturations:
            settings = {"saturation": saturation, "match_exposure": matched}
            seeing(estimator, settings)
            row = {**settings, **summary(score(args.model, args.realval, estimator=estimator))}
            synthetic = evaluate(estimator, open_eval_dataset("synthetic", None, **SYNTHETIC), max_disparity=192)
            row["synthetic"] = {k: round(synthetic["mean"][k], 4) for k in ("epe", "bad2")}
            if settings in ROBUSTNESS:
                row["changed_right_view"] = {
                    name: summary(score(args.model, args.realval, estimator=estimator, pairs=change))
                    for name, change in CHANGES.items()}
            rows.append(row)
            mean = row["realval_mean"]
            print(f"saturation {saturation:g}, match_exposure {matched}: realval {mean['epe']:.3f} / "
                  f"{mean['bad2']:.2f} %, Motorcycle {row['motorcycle']['epe']:.3f}, synthetic "
                  f"{row['synthetic']['epe']:.3f}", flush=True)
    print("\n| saturation | match_exposure | " + " | ".join(rows[0]["realval"]) +
          " | realval mean | Motorcycle | generated split |")
    print("|---" * (len(rows[0]["realval"]) + 5) + "|")
    for row in rows:
        cells = [f"{m['epe']:.3f} / {m['bad2']:.1f} %" for m in row["realval"].values()]
        cells += [f"{row[k]['epe']:.3f} / {row[k]['bad2']:.2f} %" for k in ("realval_mean", "motorcycle", "synthetic")]
        print(f"| {row['saturation']:g} | {row['match_exposure']} | " + " | ".join(cells) + " |")
    print("\n| saturation | match_exposure | " + " | ".join(f"{name}: realval / Motorcycle" for name in CHANGES) + " |")
    print("|---" * (len(CHANGES) + 2) + "|")
    for row in rows:
        if "changed_right_view" in row:
            cells = [f"{v['realval_mean']['epe']:.3f} / {v['motorcycle']['epe']:.3f}"
                     for v in row["changed_right_view"].values()]
            print(f"| {row['saturation']:g} | {row['match_exposure']} | " + " | ".join(cells) + " |")
    args.json.write_text(json.dumps({
        "model": args.model, "shipped": shipped, "ran": describe_estimator(estimator, args.model),
        "synthetic_split": SYNTHETIC, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
