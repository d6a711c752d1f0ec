"""How much a teacher's pseudo-label is worth, pixel by pixel, from evidence the teacher cannot
fake alone (DESIGN.md, "teaching signals"): its own left-right check, agreement with
independent estimators (OpenCV SGBM, the current student) and photometric consistency (the
right image warped by the label matches the left one). One rule, shared by every recipe that
distills pseudo-labels; the rule's default was chosen by `benchmarks/label_quality.py`
(kept fraction, EPE and bad-2 of the kept pixels against ground truth on realval and
Motorcycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ConfidenceEvidence:
    """What the rule looks at; every disparity is (H, W) float32 pixels of the left view, NaN
    where the estimator gives none."""

    disparity: np.ndarray  # the teacher's label
    disparity_right: np.ndarray | None = None  # the teacher's right-view disparity (left-right check)
    teacher_confidence: np.ndarray | None = None  # the teacher's own [0, 1] confidence
    sgbm: np.ndarray | None = None  # OpenCV SGBM (left-right checked inside: NaN where it fails)
    student: np.ndarray | None = None  # the current student


@dataclass(frozen=True)
class ConfidenceRule:
    """Which evidence a label must pass. A pixel's confidence is the teacher's own confidence
    (1 without one) where every enabled test passes, else 0.

    `agreement` is "sgbm", "student", "either" (SGBM where SGBM has a disparity, else the
    student), "both" or "none"."""

    lr_check_px: float | None = 1.0
    agreement: str = "either"
    agreement_px: float = 2.0  # |label - independent| allowed, pixels, ...
    agreement_fraction: float = 0.05  # ... or this fraction of the label, whichever is larger
    photometric_max_error: float | None = None  # mean |zero-mean grey difference| in a 5x5 window, 0-255


DEFAULT_RULE = ConfidenceRule()
# Each agreement mode and the independent estimators it reads (ConfidenceEvidence fields).
AGREEMENT_NEEDS: dict[str, tuple[str, ...]] = {"none": (), "sgbm": ("sgbm",), "student": ("student",),
                                               "either": ("sgbm", "student"), "both": ("sgbm", "student")}
AGREEMENT_MODES = tuple(AGREEMENT_NEEDS)
PHOTOMETRIC_WINDOW_PX = 5


def right_view_disparity(estimator, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The right view's disparity (H, W; positive; NaN invalid) from any estimator: run on the
    mirrored, swapped pair (the right view becomes a left view), then mirrored back."""
    mirrored = estimator.predict(np.ascontiguousarray(right[:, ::-1]), np.ascontiguousarray(left[:, ::-1]))
    return np.ascontiguousarray(mirrored.disparity[:, ::-1])


def left_right_consistent(disparity_left: np.ndarray, disparity_right: np.ndarray, threshold_px: float) -> np.ndarray:
    """True where the right view's disparity read at x - d(x) agrees with d(x) within
    threshold_px; matches outside the right image and NaNs are inconsistent."""
    height, width = disparity_left.shape
    xs = np.arange(width, dtype=np.float32)[None, :] - disparity_left.astype(np.float32)
    ys = np.repeat(np.arange(height, dtype=np.float32)[:, None], width, axis=1)
    right = np.nan_to_num(disparity_right.astype(np.float32), nan=-1e6)  # NaN would poison its neighbours
    seen = cv2.remap(right, np.nan_to_num(xs, nan=-1.0), ys, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=-1e6)
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(xs) & (xs >= 0) & (xs <= width - 1)
        return inside & (np.abs(seen - disparity_left) <= threshold_px)


def agrees(label: np.ndarray, other: np.ndarray, rule: ConfidenceRule = DEFAULT_RULE) -> np.ndarray:
    """True where both have a disparity and they differ by at most the rule's tolerance."""
    tolerance = np.maximum(rule.agreement_px, rule.agreement_fraction * np.abs(label))
    with np.errstate(invalid="ignore"):
        return np.isfinite(label) & np.isfinite(other) & (np.abs(label - other) <= tolerance)


def _grey(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return image.mean(axis=2) if image.ndim == 3 else image


def photometric_error(left: np.ndarray, right: np.ndarray, disparity: np.ndarray) -> np.ndarray:
    """Mean absolute zero-mean grey difference (0-255) in a 5x5 window between the left image and
    the right image warped by `disparity`; inf where the match leaves the right image or the
    disparity is NaN. Zero-mean windows ignore the cameras' gain and offset differences."""
    left_grey, right_grey = _grey(left), _grey(right)
    height, width = left_grey.shape
    xs = np.arange(width, dtype=np.float32)[None, :] - disparity.astype(np.float32)
    ys = np.repeat(np.arange(height, dtype=np.float32)[:, None], width, axis=1)
    warped = cv2.remap(right_grey, np.nan_to_num(xs, nan=-1.0), ys, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    window = (PHOTOMETRIC_WINDOW_PX, PHOTOMETRIC_WINDOW_PX)
    difference = (left_grey - cv2.blur(left_grey, window)) - (warped - cv2.blur(warped, window))
    error = cv2.blur(np.abs(difference), window)
    with np.errstate(invalid="ignore"):
        outside = ~(np.isfinite(xs) & (xs >= 0) & (xs <= width - 1))
    error[outside] = np.inf
    return error


def label_confidence(evidence: ConfidenceEvidence, left: np.ndarray | None = None, right: np.ndarray | None = None,
                     rule: ConfidenceRule = DEFAULT_RULE) -> np.ndarray:
    """(H, W) float32 confidence in [0, 1] of the teacher's label: 0 wherever a test of `rule`
    fails or the label is NaN. `left`, `right` (the pair, HxW[x3]) are needed only for the
    photometric test. ValueError when the rule needs evidence that is missing."""
    label = evidence.disparity.astype(np.float32)
    keep = np.isfinite(label)
    if rule.lr_check_px is not None:
        if evidence.disparity_right is None:
            raise ValueError("label confidence: the left-right check needs the teacher's right-view disparity")
        keep &= left_right_consistent(label, evidence.disparity_right, rule.lr_check_px)
    if rule.agreement not in AGREEMENT_MODES:
        raise ValueError(f"label confidence: agreement {rule.agreement!r} is not one of {AGREEMENT_MODES}")
    for name in AGREEMENT_NEEDS[rule.agreement]:
        if getattr(evidence, name) is None:
            raise ValueError(f"label confidence: agreement {rule.agreement!r} needs the {name} disparity")
    if rule.agreement == "sgbm":
        keep &= agrees(label, evidence.sgbm, rule)
    elif rule.agreement == "student":
        keep &= agrees(label, evidence.student, rule)
    elif rule.agreement == "both":
        keep &= agrees(label, evidence.sgbm, rule) & agrees(label, evidence.student, rule)
    elif rule.agreement == "either":
        # SGBM speaks where it found a left-right-consistent match; elsewhere the student decides
        keep &= np.where(np.isfinite(evidence.sgbm), agrees(label, evidence.sgbm, rule),
                         agrees(label, evidence.student, rule))
    if rule.photometric_max_error is not None:
        if left is None or right is None:
            raise ValueError("label confidence: the photometric test needs the left and right images")
        keep &= photometric_error(left, right, label) <= rule.photometric_max_error
    own = np.ones_like(label) if evidence.teacher_confidence is None else evidence.teacher_confidence
    return np.where(keep, np.clip(np.nan_to_num(own.astype(np.float32)), 0, 1), 0).astype(np.float32)
