"""The minimum confidence of published disparities: one default and one way to apply it.

The networks' confidence is calibrated (stereo_kd_core.models.confidence): a pixel with
confidence c is within 2 px of the truth with probability c. Every output (the node's
disparity, points2 and depth; `stereo-kd predict`, `bag`, `eval`) drops the pixels whose
confidence is below the threshold, and keeps those at or above it.
"""

from __future__ import annotations

import numpy as np

# Chosen from benchmarks/confidence_study.py's measurements on real pairs (README, "Confidence"):
# the node's `confidence_threshold` default and the CLI's --min-confidence default.
DEFAULT_MIN_CONFIDENCE = 0.8


def low_confidence(confidence: np.ndarray, min_confidence: float) -> np.ndarray | None:
    """Boolean HxW mask of the pixels to drop (confidence below `min_confidence`, or NaN), or None
    when the threshold is 0 or less (nothing is dropped)."""
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if min_confidence <= 0.0:
        return None
    return ~(np.asarray(confidence) >= np.float32(min_confidence))


def drop_low_confidence(disparity: np.ndarray, confidence: np.ndarray, min_confidence: float) -> np.ndarray:
    """`disparity` with NaN where the confidence is below `min_confidence` (a new array)."""
    low = low_confidence(confidence, min_confidence)
    return disparity.copy() if low is None else np.where(low, np.float32(np.nan), disparity).astype(np.float32)


def density_percent(disparity: np.ndarray) -> float:
    """Percentage of pixels with a finite disparity."""
    return 100.0 * float(np.isfinite(disparity).mean()) if disparity.size else float("nan")
