"""Disparity error metrics (EPE, bad-N, KITTI D1) per case and aggregated over cases.

Valid pixels: ground truth finite, > 0 and < max_disparity (and `mask`, when given).
A prediction that is not finite (NaN, inf) on a valid pixel counts as wrong for bad-1/2/3 and
D1 (an error of +inf), is left out of EPE (which would otherwise be inf), and lowers
`density`, the percentage of valid pixels with a finite prediction. Report density with EPE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

BAD_THRESHOLDS_PX = (1.0, 2.0, 3.0)
D1_THRESHOLD_PX = 3.0  # KITTI: an outlier is wrong by more than 3 px AND more than 5 % of the truth
D1_THRESHOLD_RELATIVE = 0.05
METRIC_KEYS = ("epe", "bad1", "bad2", "bad3", "d1", "density")


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)


def stereo_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    max_disparity: float = 192,
    mask: np.ndarray | torch.Tensor | None = None,
) -> dict:
    """Errors of `pred` against `gt` (same shape, pixels) over valid pixels.

    Returns epe (mean |error|, px), bad1/bad2/bad3 (% of valid pixels with |error| > 1/2/3 px),
    d1 (% with |error| > 3 px and > 5 % of gt), density (% with a finite prediction) and
    valid_pixels; rates and EPE are NaN when no pixel is valid.
    """
    pred, gt = _as_numpy(pred), _as_numpy(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt) & (gt > 0) & (gt < max_disparity)
    if mask is not None:
        mask = _as_numpy(mask).astype(bool)
        if mask.shape != gt.shape:
            raise ValueError(f"mask shape {mask.shape} differs from ground truth shape {gt.shape}")
        valid &= mask
    count = int(valid.sum())
    if count == 0:
        return {key: math.nan for key in METRIC_KEYS} | {"valid_pixels": 0}
    error = np.abs(pred[valid] - gt[valid])
    error[~np.isfinite(error)] = np.inf
    finite = np.isfinite(error)

    def percent(wrong: np.ndarray) -> float:
        return 100.0 * float(wrong.sum()) / count

    metrics = {
        "epe": float(error[finite].mean()) if finite.any() else math.nan,
        **{f"bad{t:g}": percent(error > t) for t in BAD_THRESHOLDS_PX},
        "d1": percent((error > D1_THRESHOLD_PX) & (error > D1_THRESHOLD_RELATIVE * gt[valid])),
        "density": percent(finite),
        "valid_pixels": count,
    }
    return metrics


def aggregate_metrics(per_case: Sequence[dict]) -> dict:
    """Combine per-case metrics.

    `<key>` is the mean over cases that have valid pixels (every case weighs the same, as in the
    Middlebury/ETH3D tables); `<key>_pixel_weighted` pools all pixels (every pixel weighs the
    same, as in KITTI); EPE pools over pixels with a finite prediction. Also: cases (count) and
    valid_pixels (total).
    """
    scored = [m for m in per_case if m["valid_pixels"] > 0]
    result: dict = {"cases": len(per_case), "valid_pixels": int(sum(m["valid_pixels"] for m in per_case))}
    for key in METRIC_KEYS:
        values = [m[key] for m in scored if not math.isnan(m[key])]
        result[key] = float(np.mean(values)) if values else math.nan
        weights = [m["valid_pixels"] * (m["density"] / 100.0 if key == "epe" else 1.0) for m in scored]
        pairs = [(m[key], w) for m, w in zip(scored, weights, strict=True) if w > 0 and not math.isnan(m[key])]
        total = sum(w for _, w in pairs)
        result[f"{key}_pixel_weighted"] = sum(v * w for v, w in pairs) / total if total > 0 else math.nan
    return result
