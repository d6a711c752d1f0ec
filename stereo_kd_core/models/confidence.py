"""Per-pixel confidence of a network's disparity: full-resolution cues and their calibration.

The networks compute the cues inside their eval forward (so an ONNX export carries them), all at
full resolution, shape (B, H, W) each:

* `peak`: probability mass of the disparity distribution within +-1 level of its expected level,
  upsampled with the disparity's own convex weights (bilinear for networks without them);
* `spread`: standard deviation of that distribution in pixels, upsampled the same way;
* `coarse_edge`: range (max - min) of the expected disparity over 3 x 3 cost cells, in pixels,
  upsampled the same way: depth edges at the scale the network matched;
* `refinement`: |refined - unrefined disparity| in pixels (0 without a refinement head);
* `disparity`: the disparity itself, pixels;
* `edge`: disparity range (max - min) over a 5 x 5 window in pixels: depth edges;
* `photometric`: 5 x 5 mean of |left - right warped by the disparity| (normalised colour);
* `texture`: 5 x 5 mean of the left image's gradient magnitude (normalised colour);
* `outside`: 1 where the matched right pixel falls outside the right image.

A `ConfidenceCalibration` (a small JSON table, fitted on generated pairs with ground truth by
benchmarks/confidence_study.py) maps them to c = P(|error| <= 2 px): a logistic model on
transformed cues followed by a monotone piecewise-linear (isotonic) map. Without a table the
confidence is `peak`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import shift_rows

CUE_NAMES = ("peak", "spread", "coarse_edge", "refinement", "disparity", "edge", "photometric", "texture",
             "outside")
CUE_WINDOW = 5  # px, the window of the local cues (edge, photometric, texture)
CALIBRATION_SUFFIX = ".confidence.json"  # next to a checkpoint: <stem>.confidence.json


def distribution_statistics(logits: Tensor, expected_level: Tensor) -> tuple[Tensor, Tensor]:
    """Peak mass (within +-1 level of the expected level) and standard deviation (levels) of
    softmax(logits) over dim 1. (B, D, h, w), (B, h, w) -> (B, h, w) each, float32."""
    probability = torch.softmax(logits.float(), dim=1)
    levels = torch.arange(logits.shape[1], device=logits.device, dtype=probability.dtype).view(1, -1, 1, 1)
    offset = levels - expected_level.unsqueeze(1)
    peak = (probability * (offset.abs() <= 1.0)).sum(1).clamp(0.0, 1.0)
    spread = (probability * offset.square()).sum(1).clamp(min=0.0).sqrt()
    return peak, spread


def distribution_confidence(logits: Tensor, expected_level: Tensor) -> Tensor:
    """The peak mass of `distribution_statistics`: near 1 for a sharp unimodal distribution, low
    for flat or multimodal ones. (B, D, h, w), (B, h, w) -> (B, h, w) in [0, 1]."""
    return distribution_statistics(logits, expected_level)[0]


def _window_reduce(x: Tensor, combine, pad_mode: str) -> Tensor:
    """Reduce (B, 1, H, W) over a CUE_WINDOW x CUE_WINDOW window with `combine` (torch.maximum or
    torch.add) as shifted slices, rows then columns: the CPU's max_pool2d / avg_pool2d run one
    thread per channel and took 40-180x longer on a single-channel full-resolution map."""
    half = CUE_WINDOW // 2
    height, width = x.shape[-2:]
    padded = F.pad(x, (half, half, 0, 0), mode=pad_mode)
    rows = padded[..., 0:width]
    for shift in range(1, CUE_WINDOW):
        rows = combine(rows, padded[..., shift:shift + width])
    padded = F.pad(rows, (0, 0, half, half), mode=pad_mode)
    out = padded[..., 0:height, :]
    for shift in range(1, CUE_WINDOW):
        out = combine(out, padded[..., shift:shift + height, :])
    return out


def _window_count(size: int, device: torch.device) -> Tensor:
    """How many of a window's positions along one axis of `size` lie inside the image."""
    index = torch.arange(size, device=device, dtype=torch.float32)
    half = CUE_WINDOW // 2
    return (index + half).clamp(max=size - 1) - (index - half).clamp(min=0) + 1


def _local_max(x: Tensor) -> Tensor:
    """(B, 1, H, W) -> the maximum over its window (image pixels only)."""
    return _window_reduce(x, torch.maximum, "replicate")  # a replicated border pixel is in the window anyway


def _local_mean(x: Tensor) -> Tensor:
    """(B, 1, H, W) -> the mean over its window of the pixels inside the image."""
    height, width = x.shape[-2:]
    count = _window_count(height, x.device).view(height, 1) * _window_count(width, x.device).view(1, width)
    return _window_reduce(x, torch.add, "constant") / count


def image_cues(disparity: Tensor, left: Tensor, right: Tensor) -> dict[str, Tensor]:
    """The cues that need only the disparity (B, H, W) px and the views (B, 3, H, W), float32:
    edge, photometric, texture, outside; (B, H, W) each."""
    disparity = disparity.float().unsqueeze(1)  # (B, 1, H, W)
    # the default layout, as grid_sample's output: on channels_last views (the CPU's) the differences
    # and channel means below took 1.6 ms at 384x640 instead of 0.4
    left, right = left.float().contiguous(), right.float()
    edge = _local_max(disparity) + _local_max(-disparity)
    width = disparity.shape[-1]
    xs = torch.arange(width, device=disparity.device, dtype=torch.float32).view(1, 1, width) - disparity[:, 0]
    warped = shift_rows(right, disparity[:, 0])
    photometric = (left - warped).abs().mean(1, keepdim=True)
    grey = left.mean(1, keepdim=True)
    gradient_x = F.pad((grey[..., :, 1:] - grey[..., :, :-1]).abs(), (0, 1, 0, 0))
    gradient_y = F.pad((grey[..., 1:, :] - grey[..., :-1, :]).abs(), (0, 0, 0, 1))
    return {
        "edge": edge[:, 0],
        "photometric": _local_mean(photometric)[:, 0],
        "texture": _local_mean(gradient_x + gradient_y)[:, 0],
        "outside": (xs < 0).float(),
    }


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-4, 1.0 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


# How each cue enters the logistic model (monotone, so that the fitted weights read as "more of
# this cue is more / less confidence"). Shared by the fit and by inference: one definition.
CUE_TRANSFORMS = {
    "peak": _logit,
    "spread": lambda x: torch.log(x + 0.1),
    "coarse_edge": torch.log1p,
    "refinement": torch.log1p,
    "disparity": lambda x: torch.log1p(x.clamp(min=0.0)),
    "edge": torch.log1p,
    "photometric": lambda x: torch.log(x + 0.01),
    "texture": lambda x: torch.log(x + 0.01),
    "outside": lambda x: x,
    "lr": torch.log1p,  # |left - right disparity| px: measured by the study only (it costs a second pass)
}


def cue_features(cues: dict[str, Tensor], names: tuple[str, ...] | list[str]) -> Tensor:
    """The logistic model's inputs: transformed cues stacked on the last dim, (..., len(names))."""
    return torch.stack([CUE_TRANSFORMS[name](cues[name].float()) for name in names], dim=-1)


def piecewise_linear(x: Tensor, knots_x: list[float], knots_y: list[float]) -> Tensor:
    """Linear interpolation through (knots_x, knots_y) (increasing x), constant outside, written with
    clamps only so that it exports to ONNX as it runs in PyTorch."""
    y = torch.full_like(x, knots_y[0])
    for i in range(len(knots_x) - 1):
        x0, x1, y0, y1 = knots_x[i], knots_x[i + 1], knots_y[i], knots_y[i + 1]
        if x1 > x0:
            y = y + (y1 - y0) / (x1 - x0) * (x - x0).clamp(0.0, x1 - x0)
    return y


class ConfidenceCalibration:
    """c = isotonic(sigmoid(features . weights + bias)): P(|error| <= 2 px) from the cues.

    `table`: {"cues": [...], "weights": [...], "bias": float, "isotonic": {"x": [...], "y": [...]}, ...}
    (extra keys, e.g. how it was fitted, are kept and ignored)."""

    def __init__(self, table: dict):
        try:
            self.cues = tuple(str(name) for name in table["cues"])
            self.weights = [float(w) for w in table["weights"]]
            self.bias = float(table["bias"])
            self.knots_x = [float(v) for v in table["isotonic"]["x"]]
            self.knots_y = [float(v) for v in table["isotonic"]["y"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"confidence calibration table is malformed: {exc!r}") from None
        unknown = set(self.cues) - set(CUE_TRANSFORMS)
        if unknown or len(self.weights) != len(self.cues):
            raise ValueError(f"confidence calibration: unknown cues {sorted(unknown)} or "
                             f"{len(self.weights)} weights for {len(self.cues)} cues")
        if len(self.knots_x) != len(self.knots_y) or len(self.knots_x) < 2 or \
                any(self.knots_x[i + 1] < self.knots_x[i] for i in range(len(self.knots_x) - 1)) or \
                not all(math.isfinite(v) for v in self.knots_x + self.knots_y + self.weights + [self.bias]):
            raise ValueError("confidence calibration: isotonic knots must be >= 2 finite, increasing in x")
        self.table = dict(table)

    @classmethod
    def read(cls, path: str | Path) -> ConfidenceCalibration:
        with open(path) as f:
            return cls(json.load(f))

    def __call__(self, cues: dict[str, Tensor]) -> Tensor:
        """cues (B, H, W) each -> confidence (B, H, W) in [0, 1]."""
        # features . weights accumulated cue by cue: stacking the cues on a last axis of 9 and
        # reducing over it took 2.5x as long on the CPU (14 ms at 384x640 against 6)
        score = None
        for name, weight in zip(self.cues, self.weights, strict=True):
            feature = CUE_TRANSFORMS[name](cues[name].float())
            score = feature * weight + self.bias if score is None else torch.add(score, feature, alpha=weight)
        score = torch.sigmoid(score)
        return piecewise_linear(score, self.knots_x, self.knots_y).clamp(0.0, 1.0)


def calibration_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's calibration table lives: `<dir>/<stem>.confidence.json`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CALIBRATION_SUFFIX)
