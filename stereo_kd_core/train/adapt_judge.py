"""Whether `stereo-kd adapt` made the student better, judged without the teacher's word alone.

The teacher's labels cannot judge the run: training moves the student toward them, right or
wrong. The judge scores a student on the judge frames (the hold-out frames, or the training
frames with --holdout 0) with evidence from the images themselves; lower is better for all:

  photometric     SSIM + L1 between the left image and the right one warped by the student's
                  disparity, on the pixels visible in both views (inside the right image, not
                  occluded by a nearer pixel)
  left_right      the fraction of those pixels where the student's left-view disparity and its
                  right-view disparity (the mirrored, swapped pair) differ by more than 1 px
  sgbm_agreement  the student's EPE against the teacher's label where the teacher and OpenCV
                  SGBM agree (needs a teacher)
  teacher         the student's EPE against the teacher's confident labels: what training
                  optimises, kept as the control (it cannot see a wrong teacher)
  ground_truth    EPE against ground truth where the frames have it: recorded, never judged on

It scores the start, every checkpoint along the run and the end (`judge.json`); the best adapted
checkpoint by the chosen criterion is kept as `adapted.pt`, and it replaces the start only when
it beats the start by `min_gain` (a fraction of the start's score). benchmarks/adapt_criteria.py
measures how well each criterion predicts the true change (README): left_right, the default,
never let a run end worse than its start there; photometric ranks checkpoints best but is
fooled by a teacher that is itself a photometric matcher (SGBM).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stereo_kd_core.checkpoint import save_checkpoint
from stereo_kd_core.distill.label_confidence import (
    ConfidenceRule,
    agrees,
    left_right_consistent,
    right_view_disparity,
)
from stereo_kd_core.distill.losses import photometric_loss
from stereo_kd_core.estimator import NetworkEstimator, StereoEstimator
from stereo_kd_core.models.photometric import set_photometric

CRITERIA = ("photometric", "left_right", "sgbm_agreement", "teacher")
RECORDED = (*CRITERIA, "ground_truth")
JUDGE_FILE = "judge.json"
ADAPTED_CHECKPOINT = "adapted.pt"  # the best adapted checkpoint by the criterion
LEFT_RIGHT_PX = 1.0        # the student's own left-right check
OCCLUSION_PX = 1.0         # a pixel lands this far behind a nearer pixel's match: occluded
SGBM_AGREEMENT_PX = 1.0    # teacher and SGBM agree within this, pixels, ...
SGBM_AGREEMENT_FRACTION = 0.05  # ... or this fraction of the label, whichever is larger


@dataclass(frozen=True)
class JudgeFrame:
    """One pair the judge scores on; every disparity (H, W) float32 pixels, NaN where none."""

    left: np.ndarray                    # (H, W, 3) uint8 RGB
    right: np.ndarray
    label: np.ndarray | None = None     # the teacher's confident label
    agreed: np.ndarray | None = None    # the label where SGBM agrees with it
    truth: np.ndarray | None = None     # ground truth, only recorded


def sgbm_agreement(left: np.ndarray, right: np.ndarray, label: np.ndarray, max_disparity: int) -> np.ndarray | None:
    """The label where OpenCV SGBM (left-right checked) agrees with it, NaN elsewhere; None
    where the image is too narrow for SGBM at this range."""
    try:
        sgbm = StereoEstimator.load("sgbm", max_disparity=max_disparity, align_rows=False)  # as the labels see it
        sgbm = sgbm.predict(left, right).disparity
    except ValueError:
        return None
    rule = ConfidenceRule(agreement_px=SGBM_AGREEMENT_PX, agreement_fraction=SGBM_AGREEMENT_FRACTION)
    return np.where(agrees(label, sgbm, rule), label, np.nan).astype(np.float32)


def pick_evenly(count: int, max_frames: int) -> list[int]:
    """At most max_frames indices of range(count), spread evenly, first and last included."""
    picked = min(max_frames, count)
    return sorted({round(i * (count - 1) / max(picked - 1, 1)) for i in range(picked)})


def judge_frame(sample: Mapping, label: np.ndarray | None, max_disparity: int) -> JudgeFrame:
    """A judge frame of a sample dict (left, right, optionally ground truth "disparity") and its
    teacher label (None: no teacher)."""
    truth = sample.get("disparity")
    left, right = sample["left"], sample["right"]
    return JudgeFrame(left, right, label, None if label is None else sgbm_agreement(left, right, label, max_disparity),
                      None if truth is None or not np.isfinite(truth).any() else np.asarray(truth, np.float32))


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div(255).unsqueeze(0)


def visible_in_both(disparity: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the match x - d lies inside the right image and no pixel to the right
    (nearer, larger disparity) lands more than OCCLUSION_PX left of it."""
    width = disparity.shape[-1]
    target = torch.arange(width, dtype=torch.float32).view(1, 1, width) - disparity.float()  # (B, H, W)
    suffix_min = torch.cummin(target.flip(-1), dim=-1).values.flip(-1)  # min over x' >= x
    beyond = torch.cat([suffix_min[..., 1:], torch.full_like(suffix_min[..., :1], math.inf)], dim=-1)
    return (target >= 0) & (target <= width - 1) & (beyond >= target - OCCLUSION_PX)


def _epe(disparity: np.ndarray, reference: np.ndarray | None) -> float | None:
    if reference is None:
        return None
    valid = np.isfinite(reference) & np.isfinite(disparity)
    return float(np.abs(disparity[valid] - reference[valid]).mean()) if valid.any() else None


def measure(network: nn.Module, frames: Sequence[JudgeFrame], device: str = "cpu", precision: str = "fp32",
            criteria: Sequence[str] = RECORDED, photometric: Mapping | None = None) -> dict[str, float | None]:
    """Mean of each criterion over the frames (None where no frame has what it needs), the network
    seeing colour and exposure as `photometric` says (models.photometric's keys; None: as it does).
    The network is copied: its training mode and device are left alone."""
    judged = set_photometric(copy.deepcopy(network), photometric or {}, "the judged network")
    estimator = NetworkEstimator(judged, "judged", device, precision, network.max_disparity)
    values: dict[str, list[float]] = {name: [] for name in criteria}

    def add(name: str, value: float | None) -> None:
        if name in values and value is not None and math.isfinite(value):
            values[name].append(value)

    for frame in frames:
        disparity = estimator.predict(frame.left, frame.right).disparity  # (H, W)
        finite = np.nan_to_num(disparity, nan=0.0)
        disparity_t = torch.from_numpy(finite).unsqueeze(0)  # (1, H, W)
        visible = visible_in_both(disparity_t) & torch.from_numpy(np.isfinite(disparity)).unsqueeze(0)
        if "photometric" in values:
            add("photometric", float(photometric_loss(_image_tensor(frame.left), _image_tensor(frame.right),
                                                      disparity_t, visible)))
        if "left_right" in values:
            right_disparity = right_view_disparity(estimator, frame.left, frame.right)  # (H, W)
            # the labels' left-right check (distill/label_confidence.py), on the student's own two views
            consistent = left_right_consistent(disparity, right_disparity, LEFT_RIGHT_PX)
            inconsistent = torch.from_numpy(~consistent).unsqueeze(0)  # (1, H, W)
            if visible.any():
                add("left_right", float((inconsistent & visible).sum() / visible.sum()))
        add("sgbm_agreement", _epe(disparity, frame.agreed))
        add("teacher", _epe(disparity, frame.label))
        add("ground_truth", _epe(disparity, frame.truth))
    return {name: float(np.mean(found)) if found else None for name, found in values.items()}


class Judge:
    """Scores the start and every checkpoint of one adapt run; keeps the best adapted weights.

    out_dir/judge.json: {"criterion", "frames", "scores": {step: {criterion: value}}} (a resumed
    run reuses the scores of its frames); out_dir/adapted.pt: the best adapted checkpoint so far.
    """

    def __init__(self, frames: Sequence[JudgeFrame], frame_names: Sequence[str], out_dir: Path,
                 config: Mapping[str, Any], model_config: Mapping, device: str, precision: str,
                 input_scale: float = 1.0, fit_range: bool = False, small_pairs: dict | None = None,
                 photometric: Mapping | None = None) -> None:
        criterion = config["criterion"]
        if criterion not in CRITERIA:
            raise ValueError(f"adapt.judge.criterion {criterion!r}: one of {', '.join(CRITERIA)}")
        if not 0.0 <= float(config["min_gain"]) < 1.0:
            raise ValueError(f"adapt.judge.min_gain must be in [0, 1), got {config['min_gain']}")
        if int(config["max_frames"]) < 1:
            raise ValueError(f"adapt.judge.max_frames must be >= 1, got {config['max_frames']}")
        self.frames, self.criterion, self.min_gain = list(frames), criterion, float(config["min_gain"])
        # a second criterion that must not get worse by more than guard_tolerance (a fraction)
        self.guard, self.guard_tolerance = config.get("guard"), float(config.get("guard_tolerance", 0.05))
        if self.guard is not None and self.guard not in CRITERIA:
            raise ValueError(f"adapt.judge.guard {self.guard!r}: null or one of {', '.join(CRITERIA)}")
        if self.guard == criterion:  # judged by it already
            self.guard = None
        # left_right costs a second pass per frame: recorded when it judges or when asked (record_all)
        self.recorded = tuple(name for name in RECORDED if name != "left_right" or config["record_all"]
                              or "left_right" in (criterion, self.guard))
        self.out_dir, self.model_config = Path(out_dir), dict(model_config)
        self.device, self.precision = device, precision
        # how the start runs (frames arrive resized by its working scale; its colour and exposure
        # settings, models.photometric): every network is judged so and every checkpoint written runs so too
        self.photometric = dict(photometric or {})
        self.saved_extra = ({} if input_scale == 1.0 else {"input_scale": float(input_scale)}) | (
            {"fit_range": True} if fit_range else {}) | ({} if small_pairs is None else {"small_pairs": small_pairs}) \
            | self.photometric
        self.identity = {"criterion": criterion, "frames": list(frame_names), "recorded": list(self.recorded)}
        self.scores: dict[int, dict[str, float | None]] = {}
        path = self.out_dir / JUDGE_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if {k: stored.get(k) for k in self.identity} == self.identity:
                self.scores = {int(step): value for step, value in stored["scores"].items()}

    def _write(self) -> None:
        payload = {**self.identity, "scores": {str(k): v for k, v in sorted(self.scores.items())}}
        (self.out_dir / JUDGE_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    def score(self, step: int) -> float:
        value = self.scores[step][self.criterion]
        return math.inf if value is None else float(value)

    def best_adapted_step(self) -> int | None:
        adapted = [step for step in self.scores if step > 0]
        return min(adapted, key=lambda step: (self.score(step), -step)) if adapted else None

    def record(self, step: int, network: nn.Module) -> None:
        """Score `network` at `step` (once per step) and keep it as adapted.pt when it is the
        best adapted checkpoint so far."""
        if step in self.scores:
            return
        self.scores[step] = measure(network, self.frames, self.device, self.precision, self.recorded, self.photometric)
        if step > 0 and self.best_adapted_step() == step:
            save_checkpoint(self.out_dir / ADAPTED_CHECKPOINT, network, self.model_config, step=step,
                            extra={"judge": {"criterion": self.criterion, "scores": self.scores[step]},
                                   **self.saved_extra})
        self._write()

    def decision(self) -> dict[str, Any]:
        """{"kept": "adapted" | "start", criterion, start, best, best_step, min_gain, scores}:
        the adapted result is kept only when it beats the start by min_gain of the start's score."""
        if 0 not in self.scores:
            raise RuntimeError("the judge has no score of the start")
        best_step = self.best_adapted_step()
        start = self.score(0)
        best = self.score(best_step) if best_step is not None else math.inf
        better = math.isfinite(best) and (not math.isfinite(start) or best < start * (1.0 - self.min_gain))
        guard = None
        if self.guard is not None and best_step is not None:
            before, after = self.scores[0].get(self.guard), self.scores[best_step].get(self.guard)
            held = before is None or after is None or after <= before * (1.0 + self.guard_tolerance)
            guard = {"criterion": self.guard, "start": before, "best": after, "tolerance": self.guard_tolerance,
                     "held": held}
            better = better and held
        return {"kept": "adapted" if better else "start", "criterion": self.criterion, "start": start,
                "best": best, "best_step": best_step, "min_gain": self.min_gain, "guard": guard,
                "scores": {str(k): v for k, v in sorted(self.scores.items())}}


def settle(judge: Judge, start: nn.Module, final_path: Path, recipe: Mapping, keep_anyway: bool = False
           ) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    """Write final_path: the best adapted checkpoint when the judge prefers it (or keep_anyway),
    else the start's weights. Returns (the final network, the best adapted network or None,
    the decision with "final": "start" | "adapted" and "keep_anyway")."""
    from stereo_kd_core.checkpoint import load_model

    decision = judge.decision()
    adapted_path = judge.out_dir / ADAPTED_CHECKPOINT
    adapted = load_model(adapted_path) if decision["best_step"] is not None and adapted_path.is_file() else None
    use_adapted = adapted is not None and (decision["kept"] == "adapted" or keep_anyway)
    decision.update(final="adapted" if use_adapted else "start", keep_anyway=bool(keep_anyway))
    final = adapted if use_adapted else start
    save_checkpoint(final_path, final, judge.model_config, step=decision["best_step"] if use_adapted else 0,
                    extra={"recipe": dict(recipe), "judge": {k: v for k, v in decision.items() if k != "scores"},
                           **judge.saved_extra})
    return final, adapted, decision


def describe(decision: Mapping[str, Any]) -> str:
    """One console line: what the judge measured and which weights final.pt holds."""
    criterion, start, best, step = decision["criterion"], decision["start"], decision["best"], decision["best_step"]
    measured = (f"judge ({criterion}, lower is better): start {start:.4f}, best adapted {best:.4f}"
                + (f" at step {step}" if step is not None else ""))
    if decision["final"] == "adapted" and decision["kept"] == "adapted":
        return f"{measured}: final.pt holds the adapted weights"
    guard = decision.get("guard")
    if guard is not None and not guard["held"]:
        measured += (f", but its {guard['criterion']} got worse ({guard['start']:.4f} -> {guard['best']:.4f}, "
                     f"more than {guard['tolerance']:.0%})")
    if decision["final"] == "adapted":
        return f"{measured}: not better than the start, but --keep-anyway: final.pt holds the adapted weights"
    return (f"{measured}: NOT better than the start by {decision['min_gain']:.1%}: final.pt KEEPS THE STARTING "
            f"weights (the adapted ones are in {ADAPTED_CHECKPOINT}; --keep-anyway writes them to final.pt)")
