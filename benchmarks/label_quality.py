"""How good are psmnet's pseudo-labels under each confidence rule? Measured against ground truth
on ../shared/realval (16 real pairs, per dataset) and Motorcycle: for each rule, the fraction of
ground-truth pixels kept (confidence >= 0.5, as `adapt` keeps them), and EPE and bad-2 of the
teacher's label on the kept pixels. Validation data only: this picks the rule's settings, no
network learns from these pairs.

Pairs are processed as the corpus is labelled: at most 512 px wide (area downscale; ground
truth scaled with them, so bad-2 is at that scale). Teacher, SGBM and student outputs are
cached under runs/label_quality/ (the teacher takes ~20-50 s per pair on a loaded 2-core CPU).

    python benchmarks/label_quality.py [--realval ../shared/realval] [--teacher teachers/psmnet_kitti2015.pt]
writes benchmarks/results/label_quality.json and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np

from stereo_kd_core.data.corpus_labels import teacher_labels
from stereo_kd_core.data.io import read_image_rgb, read_pfm
from stereo_kd_core.distill.label_confidence import ConfidenceEvidence, ConfidenceRule, label_confidence
from stereo_kd_core.evaluate import motorcycle_sample

WIDTH_PX = 512
KEEP_CONFIDENCE = 0.5
BAD_PX = 2.0
PHOTOMETRIC_MAX_ERROR = 6.0  # see the rule table: 4-8 grey levels trade kept pixels for bad-2

RULES = {
    "psmnet raw": ConfidenceRule(lr_check_px=None, agreement="none"),
    "+ LR check": ConfidenceRule(agreement="none"),
    "+ LR + SGBM agreement": ConfidenceRule(agreement="sgbm"),
    "+ LR + student agreement": ConfidenceRule(agreement="student"),
    "+ LR + photometric": ConfidenceRule(agreement="none", photometric_max_error=PHOTOMETRIC_MAX_ERROR),
    "+ LR + SGBM-or-student agreement": ConfidenceRule(agreement="either"),
    "+ LR + SGBM-and-student agreement": ConfidenceRule(agreement="both"),
    "+ LR + SGBM-or-student + photometric": ConfidenceRule(agreement="either",
                                                           photometric_max_error=PHOTOMETRIC_MAX_ERROR),
    "+ LR + student + photometric": ConfidenceRule(agreement="student", photometric_max_error=PHOTOMETRIC_MAX_ERROR),
}


def downscale(left: np.ndarray, right: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most WIDTH_PX wide; ground truth by nearest neighbour (NaN kept), scaled in value."""
    height, width = left.shape[:2]
    if width <= WIDTH_PX:
        return left, right, truth
    scale = WIDTH_PX / width
    size = (WIDTH_PX, round(height * scale))
    left, right = (cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in (left, right))
    return left, right, cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST) * np.float32(scale)


def pairs(realval: Path) -> list[dict]:
    samples = []
    for case in sorted(p.parent for p in realval.glob("*/disp0GT.pfm")):
        truth = read_pfm(case / "disp0GT.pfm").astype(np.float32)
        truth[~np.isfinite(truth) | (truth <= 0)] = np.nan
        samples.append({"name": case.name, "dataset": case.name.split("_")[0], "left": read_image_rgb(case / "im0.png"),
                        "right": read_image_rgb(case / "im1.png"), "truth": truth})
    moto = motorcycle_sample()
    samples.append({"name": "motorcycle", "dataset": "motorcycle", "left": moto["left"], "right": moto["right"],
                    "truth": moto["disparity"]})
    for sample in samples:
        sample["left"], sample["right"], sample["truth"] = downscale(sample["left"], sample["right"], sample["truth"])
    return samples


def estimator_outputs(samples: list[dict], teacher: str, cache: Path, cached_only: bool = False) -> list[dict]:
    """Fill sample["outputs"] (teacher labels, SGBM, student) from the cache or by running them;
    returns the samples that have outputs (with cached_only, those in the cache)."""
    from stereo_kd_core.estimator import StereoEstimator

    cache.mkdir(parents=True, exist_ok=True)
    networks: dict = {}
    for sample in samples:
        path = cache / f"{sample['name']}.npz"
        if path.is_file():
            with np.load(path) as stored:
                sample["outputs"] = {key: stored[key].astype(np.float32) for key in stored.files}
            continue
        if cached_only:
            continue
        if not networks:
            networks = {"teacher": StereoEstimator.load(teacher, device="cpu", precision="bf16"),
                        "sgbm": StereoEstimator.load("sgbm", max_disparity=192),
                        "student": StereoEstimator.load("dsnet-fast", device="cpu")}
        start = time.perf_counter()
        outputs = teacher_labels(networks["teacher"], sample["left"], sample["right"])
        outputs["sgbm"] = networks["sgbm"].predict(sample["left"], sample["right"]).disparity
        outputs["student"] = networks["student"].predict(sample["left"], sample["right"]).disparity
        np.savez_compressed(path, **outputs)
        sample["outputs"] = {key: value.astype(np.float32) for key, value in outputs.items()}
        print(f"{sample['name']}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return [sample for sample in samples if "outputs" in sample]


def score(samples: list[dict], rule: ConfidenceRule) -> dict:
    per_pair = {}
    for sample in samples:
        outputs = sample["outputs"]
        evidence = ConfidenceEvidence(outputs["disparity"], outputs["disparity_right"], outputs["teacher_confidence"],
                                      outputs["sgbm"], outputs["student"])
        confidence = label_confidence(evidence, sample["left"], sample["right"], rule)
        truth = sample["truth"]
        has_truth = np.isfinite(truth)
        kept = has_truth & (confidence >= KEEP_CONFIDENCE)
        error = np.abs(outputs["disparity"][kept] - truth[kept])
        per_pair[sample["name"]] = {"dataset": sample["dataset"], "kept": float(kept.sum() / has_truth.sum()),
                                    "epe": float(error.mean()) if error.size else None,
                                    "bad2": float((error > BAD_PX).mean()) if error.size else None}
    return per_pair


def summarise(per_pair: dict) -> dict:
    """Means over pairs: per dataset, and over all pairs ('all')."""
    groups: dict[str, list[dict]] = {"all": list(per_pair.values())}
    for row in per_pair.values():
        groups.setdefault(row["dataset"], []).append(row)

    def mean(rows: list[dict], key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return round(float(np.mean(values)), 4) if values else None
    return {name: {key: mean(rows, key) for key in ("kept", "epe", "bad2")} | {"pairs": len(rows)}
            for name, rows in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realval", default="../shared/realval", help="folder of realval pairs with disp0GT.pfm")
    parser.add_argument("--teacher", default="teachers/psmnet_kitti2015.pt", help="psmnet checkpoint")
    parser.add_argument("--cache", default="runs/label_quality", help="cache of estimator outputs")
    parser.add_argument("--json", default="benchmarks/results/label_quality.json", help="results file")
    parser.add_argument("--cached-only", action="store_true", help="score only the pairs already in the cache")
    parser.add_argument("--photometric-sweep", action="store_true", help="also sweep the photometric threshold")
    args = parser.parse_args(argv)
    samples = pairs(Path(args.realval))
    samples = estimator_outputs(samples, args.teacher, Path(args.cache), args.cached_only)
    rules = dict(RULES)
    if args.photometric_sweep:
        for threshold in (3.0, 4.0, 6.0, 8.0, 12.0):
            rules[f"+ LR + photometric <= {threshold:g}"] = replace(RULES["+ LR + photometric"],
                                                                    photometric_max_error=threshold)
    results = {}
    for name, rule in rules.items():
        per_pair = score(samples, rule)
        results[name] = {"rule": asdict(rule), "summary": summarise(per_pair), "pairs": per_pair}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"keep_confidence": KEEP_CONFIDENCE, "bad_px": BAD_PX, "width_px": WIDTH_PX,
                                           "teacher": Path(args.teacher).name, "rules": results}, indent=1) + "\n")
    datasets = [name for name in results["psmnet raw"]["summary"] if name != "all"] + ["all"]
    print("| rule | " + " | ".join(f"{d} kept / EPE / bad-2" for d in datasets) + " |")
    print("|---|" + "---|" * len(datasets))
    for name, result in results.items():
        cells = []
        for dataset in datasets:
            row = result["summary"][dataset]
            epe = f"{row['epe']:.2f}" if row["epe"] is not None else "-"
            bad = f"{100 * row['bad2']:.1f} %" if row["bad2"] is not None else "-"
            cells.append(f"{100 * row['kept']:.0f} % / {epe} / {bad}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
