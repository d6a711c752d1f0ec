"""A teacher's pseudo-labels for a folder of real pairs (the corpus that `corpus.py` builds, or
any Middlebury-layout folder), cached once per pair in `CASE/labels.npz`:

    disparity            float16 (H, W)  the teacher on (left, right), pixels, NaN invalid
    disparity_right      float16 (H, W)  the teacher on the mirrored, swapped pair: the right
                                         view's disparity (for the left-right check)
    teacher_confidence   float16 (H, W)  the teacher's own confidence (its distribution)
    confidence           float16 (H, W)  the label confidence under `label_confidence`
                                         (evidence beyond the teacher's word); written by
                                         `--confidence`, which can be rerun without the teacher

Cases are labelled round-robin over the corpus's sources, so a partial run covers them all;
a killed run resumes (files are written atomically).

    python -m stereo_kd_core.data.corpus_labels --data runs/real_corpus --teacher teachers/psmnet_kitti2015.pt
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from stereo_kd_core.data.io import read_image_rgb
from stereo_kd_core.distill.label_confidence import (
    AGREEMENT_NEEDS,
    DEFAULT_RULE,
    ConfidenceEvidence,
    label_confidence,
    right_view_disparity,
)
from stereo_kd_core.distill.teacher_cache import write_npz_atomic

LABEL_FILE = "labels.npz"
TEACHER_RECORD = "labels_teacher.json"
GOLDEN = 0.6180339887498949
KEEP_CONFIDENCE = 0.5  # `stereo-kd adapt`'s default --min-confidence


def cases_round_robin(root: Path) -> list[Path]:
    """CASE folders (with im0/im1): scenes before calibration targets (meta.json's kind), each
    round-robin over its sources (meta.json, else the name before the first '-')."""
    by_kind: dict[str, dict[str, list[Path]]] = {"scene": {}, "calibration_target": {}}
    for case in sorted(p.parent for p in root.glob("*/im0.png")):
        if not (case / "im1.png").is_file():
            continue
        meta = json.loads((case / "meta.json").read_text()) if (case / "meta.json").is_file() else {}
        source = meta.get("source", case.name.split("-")[0])
        by_kind.setdefault(meta.get("kind", "scene"), {}).setdefault(source, []).append(case)
    ordered = []
    for by_source in by_kind.values():  # scenes first, calibration targets last
        # within a source, golden-ratio order: any prefix spreads over the (often consecutive) frames
        spread = [sorted(cases, key=lambda case, n=len(cases): (cases.index(case) * GOLDEN) % 1.0)
                  for cases in by_source.values()]
        ordered += [case for round_ in itertools.zip_longest(*spread) for case in round_ if case is not None]
    return ordered


def teacher_labels(estimator, left: np.ndarray, right: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's disparity, confidence and right-view disparity of one rectified pair."""
    prediction = estimator.predict(left, right)
    return {"disparity": prediction.disparity.astype(np.float16),
            "disparity_right": right_view_disparity(estimator, left, right).astype(np.float16),
            "teacher_confidence": prediction.confidence.astype(np.float16)}


def label_cases(root: str | os.PathLike, teacher: str, precision: str = "bf16", limit: int | None = None,
                log=print, input_scale: float = 1.0) -> int:
    """Run `teacher` (a checkpoint path or registry name; on each pair resized by `input_scale`,
    its disparity brought back to the pair's size) on every case without labels.npz."""
    from stereo_kd_core.checkpoint import sha256_of_file
    from stereo_kd_core.estimator import StereoEstimator
    from stereo_kd_core.registry import shipped_models

    root = Path(root)
    sha = sha256_of_file(teacher) if Path(teacher).is_file() else shipped_models().get(teacher, {}).get("sha256")
    identity = {"teacher": Path(teacher).name, "precision": precision, "sha256": sha,
                **({"input_scale": input_scale} if input_scale != 1.0 else {})}
    record = root / TEACHER_RECORD
    if record.is_file() and json.loads(record.read_text()) != identity:
        raise ValueError(f"{root} holds labels of another teacher ({record.read_text().strip()}, now {identity})")
    todo = [case for case in cases_round_robin(root) if not (case / LABEL_FILE).is_file()][:limit]
    # loaded before the record is written: a teacher that fails to load must not claim the folder
    estimator = StereoEstimator.load(teacher, device="cpu", precision=precision, input_scale=input_scale,
                                     align_rows=False)
    record.write_text(json.dumps(identity, indent=2) + "\n")
    for index, case in enumerate(todo):
        start = time.perf_counter()
        arrays = teacher_labels(estimator, read_image_rgb(case / "im0.png"), read_image_rgb(case / "im1.png"))
        write_npz_atomic(case / LABEL_FILE, arrays)
        log(f"[{index + 1}/{len(todo)}] {case.name}: {time.perf_counter() - start:.1f} s")
    return len(todo)


def confidence_cases(root: str | os.PathLike, student: str | None, export: str | os.PathLike | None = None,
                     recompute: bool = False, log=print, agreement: str | None = None) -> int:
    """Write `confidence` into every labels.npz that lacks it (all with `recompute`, after a
    rule change) from the shared rule (SGBM and `student` as the independent estimators). With
    `export`, also write what `stereo-kd adapt` reads: export/pairs/<case>/im0.png, im1.png
    (links to the labelled cases) and export/labels/<case>.npy (the label where confidence >=
    KEEP_CONFIDENCE, NaN elsewhere), for `stereo-kd adapt --data export/pairs --teacher
    labels:export/labels`. `agreement` other than the shared rule's (e.g. "none": the teacher's
    left-right check alone, for the ablation without independent evidence) is written to the
    export only, never into labels.npz. Returns the number of cases written."""
    from stereo_kd_core.estimator import StereoEstimator

    rule = DEFAULT_RULE if agreement is None else replace(DEFAULT_RULE, agreement=agreement)
    store = rule == DEFAULT_RULE  # only the shared rule's confidence goes into the cache
    if not store and export is None:
        raise ValueError(f"agreement {agreement!r} is not the shared rule's: give an export folder for it")
    if "student" in AGREEMENT_NEEDS[rule.agreement] and not student:
        rule = replace(rule, agreement="sgbm")
    needs = AGREEMENT_NEEDS[rule.agreement]  # only the estimators the rule reads run
    sgbm = StereoEstimator.load("sgbm", max_disparity=192, align_rows=False) if "sgbm" in needs else None
    student_estimator = StereoEstimator.load(student, device="cpu", align_rows=False) if "student" in needs else None
    cases = [case for case in cases_round_robin(Path(root)) if (case / LABEL_FILE).is_file()]
    done = 0
    for case in cases:
        with np.load(case / LABEL_FILE) as stored:
            arrays = {key: stored[key] for key in stored.files}
        exported = export is None or (Path(export) / "labels" / f"{case.name}.npy").is_file()
        if "confidence" in arrays and exported and not recompute and store:
            continue
        left, right = read_image_rgb(case / "im0.png"), read_image_rgb(case / "im1.png")
        evidence = ConfidenceEvidence(
            disparity=arrays["disparity"].astype(np.float32),
            disparity_right=arrays["disparity_right"].astype(np.float32),
            teacher_confidence=arrays["teacher_confidence"].astype(np.float32),
            sgbm=sgbm.predict(left, right).disparity if sgbm else None,
            student=student_estimator.predict(left, right).disparity if student_estimator else None)
        confidence = label_confidence(evidence, left, right, rule)
        if store:
            arrays["confidence"] = confidence.astype(np.float16)
            write_npz_atomic(case / LABEL_FILE, arrays)
        kept = confidence >= KEEP_CONFIDENCE
        if export is not None:
            pairs_dir, labels_dir = Path(export) / "pairs" / case.name, Path(export) / "labels"
            pairs_dir.mkdir(parents=True, exist_ok=True)
            labels_dir.mkdir(parents=True, exist_ok=True)
            for name in ("im0.png", "im1.png"):
                link = pairs_dir / name
                if not link.exists():
                    link.symlink_to((case / name).resolve())
            np.save(labels_dir / f"{case.name}.npy", np.where(kept, evidence.disparity, np.nan).astype(np.float32))
        log(f"{case.name}: kept {float(kept.mean()):.0%}")
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stereo_kd_core.data.corpus_labels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/real_corpus", help="folder of CASE/im0.png, im1.png")
    parser.add_argument("--teacher", help="teacher checkpoint (e.g. teachers/psmnet_kitti2015.pt) to label with")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="teacher precision on the CPU")
    parser.add_argument("--limit", type=int, help="label at most this many cases in this run")
    parser.add_argument("--input-scale", type=float, default=1.0,
                        help="run the teacher on each pair resized by this factor (e.g. the default student at "
                             "1.5, more exact than itself at 1: a teacher of its own architecture)")
    parser.add_argument("--confidence", action="store_true",
                        help="(re)compute the label confidence of every labelled case")
    parser.add_argument("--student", default="dsnet-fast",
                        help="independent network for --confidence ('' for SGBM only)")
    parser.add_argument("--export", help="with --confidence: also write FOLDER/pairs + FOLDER/labels for "
                                         "`stereo-kd adapt --data FOLDER/pairs --teacher labels:FOLDER/labels`")
    parser.add_argument("--agreement", choices=("sgbm", "student", "either", "both", "none"),
                        help="with --confidence --export: this agreement instead of the shared rule's "
                             "(none: the teacher's left-right check alone), written to the export only")
    parser.add_argument("--recompute", action="store_true",
                        help="with --confidence: rewrite every case's confidence (after a rule change)")
    args = parser.parse_args(argv)
    if args.teacher:
        label_cases(args.data, args.teacher, args.precision, args.limit, input_scale=args.input_scale)
    if args.confidence:
        confidence_cases(args.data, args.student or None, args.export, args.recompute, agreement=args.agreement)
    if not (args.teacher or args.confidence):
        parser.error("give --teacher and/or --confidence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
