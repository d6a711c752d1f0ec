"""Issue 22's acceptance check, on the real pairs with ground truth that we have: `stereo-kd adapt`
with the real psmnet teacher, `--steps 150 --holdout 0`, on scenes whose ground truth adapt never
sees (it only records it in judge.json), then the adapted (or kept) student scored against ground
truth at full resolution, as the product runs it (precision auto).

Two settings (../shared/realval, validation only: the adapted weights are thrown away):

  student-better  two Middlebury 2001 scenes where the student is already better than psmnet
                  (the issue's Tsukuba/Teddy case): EPE after <= before + 0.02 px
  teacher-better  realval's KITTI 2012 frame, where psmnet (KITTI 2015 weights) is far better
                  (the issue's two KITTI 2015 frames): EPE after <= 0.6 x before

    PYTHONPATH=. python benchmarks/adapt_acceptance.py --work /tmp/adapt_acceptance
    PYTHONPATH=. python benchmarks/adapt_acceptance.py --work /tmp/a --groups teacher-better --set train.steps=150
    PYTHONPATH=. python benchmarks/adapt_acceptance.py --work /tmp/a --teacher-only   # psmnet's own EPE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.data.io import read_image_rgb, read_pfm
from stereo_kd_core.metrics import stereo_metrics
from stereo_kd_core.train.adapt import run_adapt
from stereo_kd_core.train.adapt_judge import ADAPTED_CHECKPOINT
from stereo_kd_core.train.label_cache import psmnet_checkpoint
from stereo_kd_core.train.recipe import load_recipe

# the label confidence below which adapt does not train on a pixel: the recipe's own threshold
MIN_CONFIDENCE = float(load_recipe("adapt")["adapt"]["min_confidence"])

RESULTS = Path(__file__).resolve().parent / "results"
REALVAL = Path(__file__).resolve().parents[2] / "shared" / "realval"
GROUPS = {
    "student-better": {"scenes": ["mb2001_Venus", "mb2001_Poster"], "rule": "after <= before + 0.02 px"},
    "teacher-better": {"scenes": ["kitti2012_000070"], "rule": "after <= 0.6 x before"},
}


def passes(group: str, before: float, after: float) -> bool:
    return after <= before + 0.02 if group == "student-better" else after <= 0.6 * before


NEAR_PX = 80  # "near": ground truth at or above this; the generated pairs the student learned from reach 96-128


def copy_frames(frames: Path, scenes: list[str]) -> None:
    """The scenes' images only (adapt never sees the ground truth)."""
    for scene in scenes:
        (frames / scene).mkdir(parents=True, exist_ok=True)
        for name in ("im0.png", "im1.png"):
            shutil.copy(REALVAL / scene / name, frames / scene / name)


def score(model: str, frames: Path, scenes: list[str], labels: Path | None = None,
          precision: str = "auto") -> dict[str, dict]:
    """Per scene: EPE / bad-2 of `model` (registry name or checkpoint) against the ground truth, and
    where the error is: EPE on the ground-truth pixels with and without a trusted label in
    `labels` (adapt's label cache) and on near pixels (disparity >= NEAR_PX), each with its share
    of the mean."""
    estimator = StereoEstimator.load(model, device="cpu", precision=precision)
    out = {}
    for scene in scenes:
        left, right = read_image_rgb(frames / scene / "im0.png"), read_image_rgb(frames / scene / "im1.png")
        truth = read_pfm(REALVAL / scene / "disp0GT.pfm")
        disparity = estimator.predict(left, right).disparity
        metrics = stereo_metrics(disparity, truth, max_disparity=estimator.max_disparity)
        out[scene] = {"epe": metrics["epe"], "bad2": metrics["bad2"]}
        valid = np.isfinite(truth) & (truth > 0)
        error = np.where(valid, np.abs(disparity - np.where(valid, truth, 0)), 0)
        regions = {"near": valid & (truth >= NEAR_PX)}
        label_file = labels / f"{scene}.npz" if labels is not None else None
        if label_file is not None and label_file.is_file():
            with np.load(label_file) as stored:
                trusted = stored["confidence"].astype(np.float32) >= MIN_CONFIDENCE
            regions.update(labelled=valid & trusted, unlabelled=valid & ~trusted)
        out[scene]["where"] = {
            name: {"pixels": int(mask.sum()), "epe": float(error[mask].mean()) if mask.any() else None,
                   "share_of_mean_px": float(error[mask].sum() / max(valid.sum(), 1))}
            for name, mask in regions.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder: copies, labels, runs")
    parser.add_argument("--groups", nargs="*", default=list(GROUPS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--label", default="default recipe", help="name of this configuration in the JSON")
    parser.add_argument("--json", type=Path, default=RESULTS / "adapt_acceptance.json",
                        help="results file (rows are appended per label)")
    parser.add_argument("--teacher-only", action="store_true",
                        help="score psmnet itself on each group's scenes at full resolution (bf16 as adapt labels "
                             "on this CPU, and fp32) instead of adapting: what the student could reach by copying it")
    args = parser.parse_args()
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    if args.teacher_only:
        teacher = previous.get("teacher_full_resolution", {})
        for group in args.groups:
            frames = args.work / group / "frames"
            copy_frames(frames, GROUPS[group]["scenes"])
            teacher[group] = {precision: score(str(psmnet_checkpoint()), frames, GROUPS[group]["scenes"],
                                               precision=precision)
                              for precision in ("bf16", "fp32")}
            for precision, scores in teacher[group].items():
                print(f"{group}: psmnet {precision} EPE " + ", ".join(f"{k} {v['epe']:.3f}" for k, v in scores.items()))
        args.json.write_text(json.dumps(previous | {"teacher_full_resolution": teacher}, indent=1) + "\n")
        return
    overrides = {"train.steps": args.steps, "adapt.holdout": 0.0}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    rows = []
    for group in args.groups:
        scenes = GROUPS[group]["scenes"]
        frames = args.work / group / "frames"
        copy_frames(frames, scenes)
        out = args.work / group / args.label.replace(" ", "-")
        if out.exists():
            shutil.rmtree(out)
        started = time.perf_counter()
        report = run_adapt([frames], out, teacher="psmnet", overrides=overrides, device="cpu")
        seconds = time.perf_counter() - started
        start = str(registry.resolve_shipped("dsnet-fast")[0])  # loaded as final.pt is: from its file
        labels = out / "labels" / "0"
        before, after = score(start, frames, scenes, labels), score(str(out / "final.pt"), frames, scenes, labels)
        mean_before = float(np.mean([v["epe"] for v in before.values()]))
        mean_after = float(np.mean([v["epe"] for v in after.values()]))
        # the judge's best adapted checkpoint, scored also when final.pt kept the start: what adapting did
        # (final.pt holds those very weights when the judge took them: their score is `after`)
        adapted_path = out / ADAPTED_CHECKPOINT
        if (report.get("judge") or {}).get("final") == "adapted":
            adapted = after
        else:
            adapted = score(str(adapted_path), frames, scenes, labels) if adapted_path.is_file() else None
        row = {"group": group, "scenes": scenes, "rule": GROUPS[group]["rule"], "overrides": overrides,
               "label": args.label, "before": before, "after": after, "mean_epe_before": mean_before,
               "mean_epe_after": mean_after, "ratio": mean_after / mean_before,
               "mean_epe_adapted": None if adapted is None else float(np.mean([v["epe"] for v in adapted.values()])),
               "passes": passes(group, mean_before, mean_after), "judge": report.get("judge"),
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{group} [{args.label}]: EPE {mean_before:.3f} -> {mean_after:.3f} ({row['ratio']:.2f}x), "
              f"{'PASS' if row['passes'] else 'FAIL'} ({row['rule']}), {seconds / 60:.1f} min; the adapted "
              f"weights: {row['mean_epe_adapted']}", flush=True)
    replaced = {(x["group"], x["label"]) for x in rows}
    kept_rows = [r for r in previous["rows"] if (r["group"], r["label"]) not in replaced]
    result = previous | {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch CPU",
                         "teacher": "psmnet (KITTI 2015 weights)", "rows": kept_rows + rows}
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
