"""Any estimator run on the pair resized by a factor, its disparity brought back to the pair's size.

A network's error is about constant in its own pixels (its cost volume is at 1/4 of its input):
on an enlarged pair that error shrinks in the caller's pixels, for about the square of the factor
in time. Measured for the default on ../shared/realval and Motorcycle (README, "Input scale"):
at 1.5 the realval EPE falls 1.23 -> 1.03 px, as long as the scene's disparities, enlarged, stay
within the network's range; at 0.5 it answers about 4x faster and less exactly.

    StereoEstimator.load("dsnet-fast", input_scale=1.5)     # or stereo-kd predict --input-scale 1.5
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from stereo_kd_core.estimator_base import StereoEstimator, StereoPrediction, check_pair
from stereo_kd_core.rectification import input_size


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at `size` (W, H): area interpolation to shrink (as the node resizes), bilinear to enlarge."""
    if size == (image.shape[1], image.shape[0]):
        return image
    enlarging = size[0] > image.shape[1] or size[1] > image.shape[0]
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if enlarging else cv2.INTER_AREA)


def disparity_to_size(disparity: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 (h, w) disparity map (NaN invalid) as the disparity of the same view at `size`
    (W, H): resampled bilinearly over the valid pixels only (normalised by their weight, so an
    invalid neighbour neither spreads nor pulls a value toward 0) and rescaled by the width
    ratio; invalid where the nearest source pixel is invalid."""
    width, height = size
    if (width, height) == (disparity.shape[1], disparity.shape[0]):
        return disparity
    valid = np.isfinite(disparity)
    weight = valid.astype(np.float32)
    filled = np.where(valid, disparity, np.float32(0.0)).astype(np.float32)
    total = cv2.resize(filled, size, interpolation=cv2.INTER_LINEAR)
    share = cv2.resize(weight, size, interpolation=cv2.INTER_LINEAR)
    kept = cv2.resize(weight, size, interpolation=cv2.INTER_NEAREST) > 0
    out = np.full((height, width), np.nan, np.float32)
    out[kept] = total[kept] / share[kept] * np.float32(width / disparity.shape[1])
    return out


def check_scale(scale: float) -> float:
    """The factor as a float; ValueError outside 0.1-4 (or not a number)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0.1 <= scale <= 4.0):
        raise ValueError(f"input scale must be between 0.1 and 4, got {scale!r}")
    return float(scale)


class ScaledEstimator(StereoEstimator):
    """`inner` on each pair resized by `scale`; disparity (in the pair's pixels) and confidence at
    the pair's size. Its range in the pair's pixels is the inner range / scale."""

    def __init__(self, inner: StereoEstimator, scale: float):
        self.inner, self.scale = inner, check_scale(scale)
        self.name = f"{inner.name}@x{scale:g}"
        self.backend, self.device, self.precision = inner.backend, inner.device, inner.precision
        self.channels_last = getattr(inner, "channels_last", False)
        self.max_disparity = int(inner.max_disparity / scale)
        self.min_disparity = inner.min_disparity / scale
        self.min_input_width = math.ceil(inner.min_input_width / scale)

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = check_pair(left, right)
        height, width = left.shape[:2]
        size = input_size(width, height, self.scale)
        inner = self.inner.predict(resize_image(left, size), resize_image(right, size))
        disparity = disparity_to_size(inner.disparity, (width, height))
        confidence = resize_image(inner.confidence.astype(np.float32), (width, height))
        return StereoPrediction(disparity=disparity, confidence=np.clip(confidence, 0.0, 1.0),
                                points=self._points(disparity, geometry))
