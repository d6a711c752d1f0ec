"""Rows of a stereo pair that do not line up: measuring the right view's vertical offset from the
left's and taking it out.

Stereo matching searches along rows. A pair rectified with a calibration that is slightly off (a
camera knocked, a lens refocused, a rig warmed up) has its right rows a fraction of a pixel to a
few pixels above or below the left's, and a network trained on exact rows degrades fast: the
shipped default's realval EPE goes from 1.08 px to 1.79 px at a 1 px offset and to 7.4 px at 2 px
(README, "Rows that do not line up").

`estimate_row_offset` tracks corners of the left view into the right view (pyramidal
Lucas-Kanade, checked back from right to left) and takes a robust mean of their vertical
displacement; `shift_rows` resamples the right view by it (bilinear, sub-pixel).
`RowOffsetTracker` keeps a running estimate over a stream of pairs for a camera whose offset
changes slowly, re-measuring every few pairs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

# the longest side a pair is measured at: enough corners for a 0.05 px estimate, a few ms
MEASURE_SIDE_PX = 640
MAX_CORNERS = 300
MIN_POINTS = 20                 # fewer consistent tracks: no estimate
MAX_OFFSET_PX = 8.0             # vertical displacements beyond this are mismatches
FORWARD_BACKWARD_PX = 0.3       # a track's round trip must come back within this
MAX_SPREAD_PX = 0.5             # median |residual| of the kept tracks above this: no estimate
# offsets smaller than this are left alone: below the estimate's own noise (about 0.05 px)
DEADBAND_PX = 0.1


@dataclass(frozen=True)
class RowOffset:
    """The right view's rows lie `offset_px` below the left's: right(x - d, y + offset_px) = left(x, y).
    `points`: the tracks it rests on; `spread_px`: their median absolute deviation from it."""

    offset_px: float
    points: int
    spread_px: float


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        grey = image
    else:
        grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    if grey.dtype != np.uint8:  # 16-bit cameras: scaled to 8 bits by the pair's peak
        peak = max(float(grey.max()), 1.0)
        grey = np.clip(grey.astype(np.float32) * (255.0 / peak), 0, 255).astype(np.uint8)
    return grey


def estimate_row_offset(left: np.ndarray, right: np.ndarray) -> RowOffset | None:
    """The right view's vertical offset from the left's (`RowOffset`), or None where the pair does
    not say (too few corners that track both ways, or tracks that disagree). Images HxW or HxWxC,
    any size (measured at most MEASURE_SIDE_PX on the longer side, the offset in the pair's pixels)."""
    grey_left, grey_right = _grey(left), _grey(right)
    height, width = grey_left.shape
    factor = min(1.0, MEASURE_SIDE_PX / max(height, width))
    if factor < 1.0:
        size = (max(int(round(width * factor)), 1), max(int(round(height * factor)), 1))
        grey_left = cv2.resize(grey_left, size, interpolation=cv2.INTER_AREA)
        grey_right = cv2.resize(grey_right, size, interpolation=cv2.INTER_AREA)
    if min(grey_left.shape) < 32:
        return None
    corners = cv2.goodFeaturesToTrack(grey_left, MAX_CORNERS, 0.01, 7, blockSize=7)
    if corners is None or len(corners) < MIN_POINTS:
        return None
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)
    tracked, found, _ = cv2.calcOpticalFlowPyrLK(grey_left, grey_right, corners, None, winSize=(21, 21),
                                                 maxLevel=4, criteria=criteria)
    back, found_back, _ = cv2.calcOpticalFlowPyrLK(grey_right, grey_left, tracked, None, winSize=(21, 21),
                                                   maxLevel=4, criteria=criteria)
    start, end, back = corners[:, 0], tracked[:, 0], back[:, 0]
    dx, dy = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
    usable = ((found[:, 0] == 1) & (found_back[:, 0] == 1)
              & (np.abs(back - start).max(axis=1) < FORWARD_BACKWARD_PX)
              & (dx <= 1.0) & (np.abs(dy) < MAX_OFFSET_PX * factor))  # a match lies left of its pixel
    dy = dy[usable]
    if dy.size < MIN_POINTS:
        return None
    offset, kept = float(np.median(dy)), np.ones(dy.size, dtype=bool)
    for _ in range(3):  # the mean of the tracks within 3 robust sigmas of the estimate
        deviation = np.abs(dy - offset)
        sigma = max(1.4826 * float(np.median(deviation[kept])), 0.02)
        kept = deviation < 3.0 * sigma
        offset = float(dy[kept].mean())
    spread = float(np.median(np.abs(dy[kept] - offset))) / factor
    if kept.sum() < MIN_POINTS or spread > MAX_SPREAD_PX:
        return None
    return RowOffset(offset / factor, int(kept.sum()), spread)


def shift_rows(image: np.ndarray, offset_px: float) -> np.ndarray:
    """`image` resampled at rows y + offset_px (bilinear; the border row repeated): the right view
    of a pair whose `RowOffset` is offset_px, brought onto the left view's rows."""
    if offset_px == 0.0:
        return image
    height, width = image.shape[:2]
    matrix = np.float32([[1.0, 0.0, 0.0], [0.0, 1.0, offset_px]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def correction(offset: RowOffset | None) -> float:
    """The shift to apply for an estimate: 0 without one or within DEADBAND_PX."""
    if offset is None or abs(offset.offset_px) < DEADBAND_PX:
        return 0.0
    return offset.offset_px


class RowOffsetTracker:
    """A camera's row offset over a stream: measured on the first pair and every `every`-th after
    it, the median of the last `window` estimates (a pair that gives none keeps the last value)."""

    def __init__(self, every: int = 30, window: int = 5) -> None:
        if every < 1 or window < 1:
            raise ValueError(f"every and window must be >= 1, got {every} and {window}")
        self.every = every
        self.estimates: deque[float] = deque(maxlen=window)
        self.last: RowOffset | None = None
        self._pairs = 0

    @property
    def offset_px(self) -> float | None:
        """The running estimate, None before any pair gave one."""
        return float(np.median(self.estimates)) if self.estimates else None

    def update(self, left: np.ndarray, right: np.ndarray) -> float:
        """Measure this pair when it is due; the shift to apply to its right view."""
        if self._pairs % self.every == 0:
            self.last = estimate_row_offset(left, right)
            if self.last is not None:
                self.estimates.append(self.last.offset_px)
        self._pairs += 1
        current = self.offset_px
        return 0.0 if current is None or abs(current) < DEADBAND_PX else current
