"""`stereo-kd adapt`: distill a teacher into a student on the user's own unlabeled recordings.

The run, in order (everything lands in `out_dir`, and a second run with the same arguments
resumes where the first stopped):

1. Frames (`stereo_kd_core.data.recordings`): every `--data` source (a rosbag2 bag, or a folder
   of rectified pairs in Middlebury layout, KITTI layout or `left/` + `right/`) is read in time
   order, subsampled by `every`; the last `holdout` fraction of each source never trains.
2. Pseudo-labels (`stereo_kd_core.train.label_cache`): the teacher runs once per frame;
   `labels/` holds the disparity and a per-pixel confidence (the teacher's own where its
   left-right check passes within `lr_check_px`, else 0). `labels:DIR` teachers read
   precomputed files instead.
3. Training with the project's one trainer (`Trainer`, the adapt recipe of its objective): the
   student starts from `init` (train.init_from); pseudo-labels with confidence >=
   `min_confidence` supervise, the worst `drop_worst` fraction of them per batch is ignored;
   synthetic ground-truth samples (`replay_synthetic` of them, mixed into the same batches by
   `data.MixedDataset`) keep the student working elsewhere; optional self-supervision (`photometric`: SSIM + L1
   reconstruction of the left view, edge-aware smoothness); internal distillation points
   (`internal`, asked for: features, volume, cost) from a live teacher that is a project network.
4. `before_after.json` and `before_after.png`: the student before and after against the
   teacher's labels (and ground truth where a folder has it) on the hold-out frames, and on
   the fixed synthetic test split. The result, `final.pt`, is an ordinary checkpoint: the best
   checkpoint by the judge (adapt_judge.py: evidence that is not the teacher's), or the start's
   weights when that is not better than the start (`keep_anyway` takes the adapted ones).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stereo_kd_core import registry
from stereo_kd_core.checkpoint import load_model
from stereo_kd_core.data import AugmentConfig, MixedDataset, TrainingDataset
from stereo_kd_core.data.recordings import open_recordings, split_holdout
from stereo_kd_core.estimator import NetworkEstimator, resolve_device
from stereo_kd_core.evaluate import evaluate, open_eval_dataset
from stereo_kd_core.metrics import aggregate_metrics, stereo_metrics
from stereo_kd_core.models.photometric import photometric_settings
from stereo_kd_core.train import adapt_judge
from stereo_kd_core.train.label_cache import (
    NO_TEACHER,
    AdaptFrames,
    EstimatorTeacher,
    FileTeacher,
    LabelCache,
    load_teacher,
    teacher_precision,
)
from stereo_kd_core.train.recipe import TEST_SPLIT_SEED, RecipeError, adapt_internal_source, load_recipe
from stereo_kd_core.train.trainer import FINAL_CHECKPOINT, LAST_CHECKPOINT, Trainer, build_training_dataset
from stereo_kd_core.viz import labelled_tiles

DEFAULT_RECIPE = "adapt"
REPORT_JSON, REPORT_PICTURE = "before_after.json", "before_after.png"
PICTURE_FRAMES = 3  # hold-out frames shown in before_after.png


# --- the run -----------------------------------------------------------------------------
def load_student(spec: str | None) -> tuple[nn.Module, str]:
    """(network, description) of --init: a registry name or a checkpoint; None = the shipped
    default student, with a clear error while no trained default ships. `network.working_scale`,
    `network.fit_range`, `network.small_pairs` and its `photometric_settings`: how it runs (a shipped
    model's manifest, a checkpoint's own)."""
    if spec is None:
        spec = registry.default_model()
    if Path(spec).is_file():
        return load_model(spec), spec
    return registry.load_shipped(spec), spec


def adapt_recipe(source: str | Mapping, model_config: Mapping, overrides: Mapping[str, Any]) -> dict:
    """The adapt recipe with the student's config as its model section, values overridden."""
    recipe = load_recipe(source, {"model": dict(model_config), **overrides})
    adapt = recipe.get("adapt") or {}
    missing = {"every", "holdout", "min_confidence", "lr_check_px", "drop_worst", "photometric", "smoothness",
               "replay_synthetic", "internal", "evaluation", "judge", "agreement"} - set(adapt)
    if missing:
        raise RecipeError(f"an adapt recipe needs adapt.{', adapt.'.join(sorted(missing))}")
    if "teacher" in recipe:
        raise RecipeError("an adapt recipe has no 'teacher' section: the teacher is --teacher")
    return recipe


def _evaluate(network: nn.Module, samples: list[dict], device: str, max_disparity: int) -> dict | None:
    scored = [s for s in samples if s.get("disparity") is not None and np.isfinite(s["disparity"]).any()]
    if not scored:
        return None
    estimator = NetworkEstimator(network, "student", device, "fp32", network.max_disparity)
    result = evaluate(estimator, scored, max_disparity=max_disparity)
    return {"mean": result["mean"], "cases": [{k: c[k] for k in ("name", "epe", "bad2", "valid_pixels")}
                                              for c in result["cases"]]}


def _predictions(network: nn.Module, samples: list[dict], device: str) -> list[np.ndarray]:
    estimator = NetworkEstimator(network, "student", device, "fp32", network.max_disparity)
    return [estimator.predict(s["left"], s["right"]).disparity for s in samples]


def run_adapt(data: Sequence[str | os.PathLike], out_dir: str | os.PathLike, teacher: str = "psmnet",
              init: str | None = None, recipe: str | Mapping = DEFAULT_RECIPE,
              overrides: Mapping[str, Any] | None = None, device: str = "auto",
              topics: Mapping[str, str | None] | None = None, keep_anyway: bool = False) -> dict:
    """Adapt a student to recorded stereo (see the module docstring); returns the report that
    is also written to out_dir/before_after.json. final.pt holds the start's weights unless the
    judge (adapt_judge.py) finds the best adapted checkpoint better, or keep_anyway."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student, init_name = load_student(init)
    recipe_dict = adapt_recipe(recipe, student.config, {**(overrides or {}), "train.init_from": init_name})
    adapt = recipe_dict["adapt"]
    device = resolve_device(device)
    label_precision = teacher_precision(adapt.get("teacher_precision", "auto"), device)
    teacher_obj = load_teacher(teacher, device, adapt["lr_check_px"], label_precision)
    photometric_max_error = adapt.get("photometric_max_error")
    more_evidence = adapt["agreement"] != "none" or photometric_max_error is not None
    if isinstance(teacher_obj, EstimatorTeacher) and more_evidence:
        # labels the student can trust: more evidence than the teacher's own left-right check
        start = (NetworkEstimator(copy.deepcopy(student), init_name, device, "fp32", student.max_disparity)
                 if adapt["agreement"] != "none" else None)
        teacher_obj.use_agreement(adapt["agreement"], start, init_name if start is not None else None,
                                  photometric_max_error)
    if teacher_obj is None and adapt["photometric"] <= 0:
        raise ValueError("--teacher none needs --photometric W > 0: without labels only self-supervision trains")

    # the student learns, and is judged, on pairs as it will see them: resized by its working scale
    scale = float(getattr(student, "working_scale", 1.0))
    recordings = open_recordings(data, out_dir, int(adapt["every"]), topics, scale)
    train_frames, holdout_frames = split_holdout(recordings, float(adapt["holdout"]))
    if isinstance(teacher_obj, FileTeacher):
        names = Counter(frame.name for frames in recordings for frame in frames)
        clashes = sorted(name for name, n in names.items() if n > 1)
        if clashes:
            raise ValueError(f"labels:DIR names files after frames, but several --data share frame names "
                             f"({', '.join(clashes[:5])}); adapt one source at a time")

    # internal points: the teacher's cost distributions cached with the labels, or (asked for) live
    internal_source = adapt_internal_source(adapt)
    cached_costs = bool(adapt["internal"]) and internal_source == "cache"
    internal_note = None
    if cached_costs and not (isinstance(teacher_obj, EstimatorTeacher) and teacher_obj.network is not None):
        cached_costs = False  # labels:DIR, SGBM, ONNX graphs: the labels alone teach
        internal_note = f"teacher {teacher} has no cost volumes: adapt.internal not used (labels only)"
        adapt["internal"] = None  # the trainer's objective: labels only

    started = time.perf_counter()
    cache = None
    if teacher_obj is not None:
        cache = LabelCache(out_dir, teacher_obj, costs=cached_costs)
        cache.fill(train_frames + holdout_frames)
    labels_s = time.perf_counter() - started

    # the teacher network joins training only for live internal points, and only at the same range
    teacher_network = None
    live_internal = bool(adapt["internal"]) and internal_source == "live"
    if teacher_obj is not None and teacher_obj.network is not None and live_internal:
        if teacher_obj.network.max_disparity == student.max_disparity:
            teacher_network = teacher_obj.network
        else:
            warnings.warn(f"teacher max_disparity {teacher_obj.network.max_disparity} != student "
                          f"{student.max_disparity}: output-level distillation only", stacklevel=2)
    student_max = student.max_disparity
    real = TrainingDataset(AdaptFrames(train_frames, cache, adapt["min_confidence"]),
                           crop_size=tuple(recipe_dict["data"]["crop"]),
                           augment=AugmentConfig(**recipe_dict["data"]["augment"]),
                           max_disparity=student_max, seed=recipe_dict["train"]["seed"])
    replay = adapt["replay_synthetic"]
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"--replay-synthetic must be in [0, 1), got {replay}")
    synthetic = build_training_dataset(recipe_dict) if replay > 0 else None
    dataset = MixedDataset(real, synthetic, float(replay))

    trainer = Trainer(recipe_dict, out_dir, dataset, teacher=teacher_network)
    # the judge: the start, every checkpoint and the end, scored on the hold-out frames (else training frames)
    judged = holdout_frames or train_frames
    judged = [judged[i] for i in adapt_judge.pick_evenly(len(judged), int(adapt["judge"]["max_frames"]))]
    judge_precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(trainer.autocast_dtype, "fp32")
    judge = adapt_judge.Judge(
        [adapt_judge.judge_frame(frame.sample(), None if cache is None else cache.confident(frame, adapt[
            "min_confidence"]), student_max) for frame in judged],
        [frame.key for frame in judged], out_dir, adapt["judge"], student.config, device, judge_precision, scale,
        getattr(student, "fit_range", False), getattr(student, "small_pairs", None), photometric_settings(student))
    judge.record(0, student)
    trainer.on_checkpoint = judge.record
    started = time.perf_counter()
    last = out_dir / LAST_CHECKPOINT
    try:
        final = trainer.run(resume=last.is_file())
    except RecipeError as error:
        raise RecipeError(f"{error}; give a new --out for a run with other settings") from None
    training_s = time.perf_counter() - started
    if final.name != FINAL_CHECKPOINT:
        raise RuntimeError(f"training stopped early at {final}")
    judge.record(trainer.total_steps, trainer.student)  # a resumed, finished run saves no checkpoint
    adapted, candidate, decision = adapt_judge.settle(judge, student, final, recipe_dict, keep_anyway)

    # --- before / after ---
    def holdout_samples(with_labels: bool) -> list[dict]:
        samples = []
        for frame in holdout_frames:
            sample = frame.sample()
            if with_labels and cache is not None:
                sample = {**sample, "disparity": cache.confident(frame, adapt["min_confidence"])}
            elif with_labels:
                sample.pop("disparity", None)
            samples.append(sample)
        return samples

    evaluation = adapt["evaluation"]
    synthetic_spec = recipe_dict["data"]["train"]
    synthetic_test = list(open_eval_dataset(
        "synthetic", n=int(evaluation["synthetic_n"]), seed=TEST_SPLIT_SEED,
        height=int(evaluation["synthetic_height"]), width=int(evaluation["synthetic_width"]),
        max_disparity=int(synthetic_spec.get("max_disparity", student_max))))
    labelled = holdout_samples(True)
    truth = holdout_samples(False)
    report: dict[str, Any] = {
        "teacher": teacher_obj.name if teacher_obj is not None else NO_TEACHER,
        "init": init_name, "final": str(final), "device": device,
        "student": registry.describe(init_name, init_name, "pytorch", device, "fp32"),  # as _evaluate runs it
        "frames": {"train": len(train_frames), "holdout": len(holdout_frames),
                   "holdout_names": [frame.key for frame in holdout_frames]},
        "internal_distillation": "live" if teacher_network is not None else "cache" if cached_costs else None,
        "internal_note": internal_note,
        "min_confidence": adapt["min_confidence"],
        "seconds": {"labels": labels_s, "training": training_s},
        "labels_computed": cache.computed if cache is not None else 0,
        "training_precision": judge_precision,
        "label_precision": label_precision if isinstance(teacher_obj, EstimatorTeacher) else None,
        "judge": decision,
    }
    for key, samples in (("holdout_vs_teacher", labelled), ("holdout_vs_ground_truth", truth),
                         ("synthetic_test", synthetic_test)):
        before = _evaluate(student, samples, device, student_max)
        after = before if adapted is student else _evaluate(adapted, samples, device, student_max)
        report[key] = None if before is None else {"before": before, "after": after}
        if before is not None and adapted is student and candidate is not None:  # what the judge turned down
            report[key]["adapted"] = _evaluate(candidate, samples, device, student_max)
    if report["holdout_vs_ground_truth"] is not None and cache is not None:
        teacher_labels = [cache.read(frame)[0] for frame in holdout_frames]
        per_case = [stereo_metrics(label, s["disparity"], max_disparity=student_max)
                    for label, s in zip(teacher_labels, truth, strict=True) if s.get("disparity") is not None]
        report["holdout_vs_ground_truth"]["teacher"] = {"mean": aggregate_metrics(per_case)}
    report["synthetic_test_split"] = {"seed": TEST_SPLIT_SEED, "n": int(evaluation["synthetic_n"])}

    shown = holdout_frames[:PICTURE_FRAMES] or train_frames[:1]
    if shown:
        samples = [frame.sample() for frame in shown]
        before, after = _predictions(student, samples, device), _predictions(adapted, samples, device)
        rows = []
        for frame, sample, b, a in zip(shown, samples, before, after, strict=True):
            label = cache.read(frame)[0] if cache is not None else np.full(b.shape, np.nan, np.float32)
            rows.append(([sample["left"], label, b, a],
                         [f"left {frame.key}", "teacher", "student before", "student after"]))
        labelled_tiles(out_dir / REPORT_PICTURE, rows, max_disparity=student_max)
        report["picture"] = str(out_dir / REPORT_PICTURE)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
