"""Rows of a stereo pair that do not line up: measuring where the right view's rows lie against the
left's and taking that out.

Stereo matching searches along rows. A pair rectified with a calibration that is slightly off (a
camera knocked, a lens refocused, a rig warmed up) has its right rows a fraction of a pixel to a
few pixels above or below the left's, and a network trained on exact rows degrades fast: the
shipped default's realval EPE goes from 1.07 px to 1.79 px at a 1 px offset and to 12.6 px at 2.5 px;
a roll of 0.3 degrees takes it to 1.91 (README, "Rows that do not line up").

`measure_rows` tracks corners of the left view into the right view (pyramidal Lucas-Kanade,
checked back from right to left) and fits their vertical displacement as an offset, a tilt
across the image (a roll) and a stretch down it (a vertical scale); `onto_left_rows` resamples
the right view by the `RowShift` that `correction` keeps of it (bilinear, sub-pixel).
`RowTracker` keeps a running measurement over a stream of pairs for a camera whose rows change
slowly, re-measuring every few pairs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# the longest side a pair is measured at: enough corners for a 0.05 px estimate, a few ms
MEASURE_SIDE_PX = 640
MAX_CORNERS = 300
MIN_POINTS = 20                 # fewer consistent tracks: no measurement
MAX_OFFSET_PX = 8.0             # vertical displacements beyond this are mismatches
FORWARD_BACKWARD_PX = 0.3       # a track's round trip must come back within this
MAX_SPREAD_PX = 0.5             # median |residual| of the kept tracks above this: no measurement
# an offset smaller than this is left alone: below the measurement's own noise (about 0.05 px)
DEADBAND_PX = 0.1
# a tilt or stretch is taken out only from this many pixels at the image's edge: on realval's KITTI
# frame the tracks report a 0.7-0.8 px tilt that is not there (converging road lines bias them;
# correcting it costs 0.09 px of EPE), while a roll of 0.2 deg over 640 px is 1.1 px
TILT_MIN_PX = 1.0
# the share of the sideways tracks that must move right (into a left view's matches) to call a pair swapped
SWAPPED_SHARE = 0.8


@dataclass(frozen=True)
class RowShift:
    """Where the right view's rows lie below the left's, in pixels: `offset_px` at the image centre,
    plus `tilt_px` times the column's position from -1 (left edge) to 1 (right edge) and `scale_px`
    times the row's position from -1 (top) to 1 (bottom): right(x - d, y + shift(x, y)) = left(x, y)."""

    offset_px: float = 0.0
    tilt_px: float = 0.0
    scale_px: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.offset_px or self.tilt_px or self.scale_px)

    def scaled(self, factor: float) -> RowShift:
        """The same shift for the pair resized by `factor` (pixels scale with it)."""
        return RowShift(self.offset_px * factor, self.tilt_px * factor, self.scale_px * factor)


@dataclass(frozen=True)
class RowMeasurement:
    """A pair's `RowShift` as measured, the tracks it rests on and their median absolute deviation
    from it; `swapped`: the tracks find the left view's corners to the right in the right view, as
    they are when the two views are swapped (then nothing is measured: shift zero, no points)."""

    shift: RowShift
    points: int
    spread_px: float
    swapped: bool = False


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        grey = image
    else:
        grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    if grey.dtype != np.uint8:  # 16-bit cameras: scaled to 8 bits by the pair's peak
        peak = max(float(grey.max()), 1.0)
        grey = np.clip(grey.astype(np.float32) * (255.0 / peak), 0, 255).astype(np.uint8)
    return grey


def _tracks(grey_left: np.ndarray, grey_right: np.ndarray,
            max_offset_px: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """(left positions (N, 2) x, y; their vertical displacements (N,)) of the corners that track into
    the right view and back, with a match left of their pixel and a plausible vertical displacement;
    and whether the views look swapped (of the tracks that came back and moved a pixel or more
    sideways, at least MIN_POINTS and SWAPPED_SHARE moved right)."""
    corners = cv2.goodFeaturesToTrack(grey_left, MAX_CORNERS, 0.01, 7, blockSize=7)
    if corners is None or len(corners) < MIN_POINTS:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32), False
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)
    tracked, found, _ = cv2.calcOpticalFlowPyrLK(grey_left, grey_right, corners, None, winSize=(21, 21),
                                                 maxLevel=4, criteria=criteria)
    back, found_back, _ = cv2.calcOpticalFlowPyrLK(grey_right, grey_left, tracked, None, winSize=(21, 21),
                                                   maxLevel=4, criteria=criteria)
    start, end, back = corners[:, 0], tracked[:, 0], back[:, 0]
    dx, dy = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
    came_back = ((found[:, 0] == 1) & (found_back[:, 0] == 1)
                 & (np.abs(back - start).max(axis=1) < FORWARD_BACKWARD_PX) & (np.abs(dy) < max_offset_px))
    rightward, sideways = int((came_back & (dx >= 1.0)).sum()), int((came_back & (np.abs(dx) >= 1.0)).sum())
    swapped = rightward >= MIN_POINTS and rightward >= SWAPPED_SHARE * sideways
    usable = came_back & (dx <= 1.0)  # a match lies left of its pixel
    return start[usable], dy[usable], swapped


def _robust_fit(design: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of `values` on `design`'s columns, refitted on the points within 3 robust sigmas
    of the fit (three times): (coefficients, kept mask)."""
    kept = np.ones(values.size, dtype=bool)
    coefficients = np.zeros(design.shape[1])
    coefficients[0] = float(np.median(values))
    for _ in range(3):
        deviation = np.abs(design @ coefficients - values)
        sigma = max(1.4826 * float(np.median(deviation[kept])), 0.02)
        kept = deviation < 3.0 * sigma
        coefficients = np.linalg.lstsq(design[kept], values[kept], rcond=None)[0]
    return coefficients, kept


def measure_rows(left: np.ndarray, right: np.ndarray) -> RowMeasurement | None:
    """Where the right view's rows lie against the left's (`RowMeasurement`), or None where the pair
    does not say (too few corners that track both ways, or tracks that disagree). Images HxW or HxWxC,
    any size (measured at most MEASURE_SIDE_PX on the longer side; the shift in the pair's pixels)."""
    grey_left, grey_right = _grey(left), _grey(right)
    height, width = grey_left.shape
    factor = min(1.0, MEASURE_SIDE_PX / max(height, width))
    if factor < 1.0:
        size = (max(int(round(width * factor)), 1), max(int(round(height * factor)), 1))
        grey_left = cv2.resize(grey_left, size, interpolation=cv2.INTER_AREA)
        grey_right = cv2.resize(grey_right, size, interpolation=cv2.INTER_AREA)
    if min(grey_left.shape) < 32:
        return None
    try:
        points, dy, swapped = _tracks(grey_left, grey_right, MAX_OFFSET_PX * factor)
    except cv2.error:  # a pair OpenCV cannot track says nothing of its rows; it is still matched as given
        return None
    if swapped:
        return RowMeasurement(RowShift(), 0, 0.0, swapped=True)
    if dy.size < MIN_POINTS:
        return None
    small_height, small_width = grey_left.shape
    across = points[:, 0] / ((small_width - 1) / 2.0) - 1.0
    down = points[:, 1] / ((small_height - 1) / 2.0) - 1.0
    design = np.stack([np.ones_like(across), across, down], axis=1)
    coefficients, kept = _robust_fit(design, dy)
    spread = float(np.median(np.abs(design[kept] @ coefficients - dy[kept]))) / factor
    if kept.sum() < MIN_POINTS or spread > MAX_SPREAD_PX:
        return None
    offset, tilt, stretch = (float(value) / factor for value in coefficients)
    return RowMeasurement(RowShift(offset, tilt, stretch), int(kept.sum()), spread)


def correction(shift: RowShift | None) -> RowShift:
    """What to take out of a measured shift: the offset from DEADBAND_PX, the tilt and the stretch
    from TILT_MIN_PX (at the image's edge); none without a measurement."""
    if shift is None:
        return RowShift()
    keep_tilt = abs(shift.tilt_px) >= TILT_MIN_PX or abs(shift.scale_px) >= TILT_MIN_PX
    return RowShift(shift.offset_px if keep_tilt or abs(shift.offset_px) >= DEADBAND_PX else 0.0,
                    shift.tilt_px if keep_tilt else 0.0, shift.scale_px if keep_tilt else 0.0)


def onto_left_rows(image: np.ndarray, shift: RowShift) -> np.ndarray:
    """The right view `image` resampled at rows y + shift(x, y) (bilinear; the border repeated): a
    pair whose right view lies `shift` below the left's, brought onto the left view's rows."""
    if not shift:
        return image
    height, width = image.shape[:2]
    across, down = 2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)  # x, y -> -1..1
    # source row = y + offset + tilt (across x - 1) + scale (down y - 1), an affine map of (x, y)
    matrix = np.float32([[1.0, 0.0, 0.0],
                         [shift.tilt_px * across, 1.0 + shift.scale_px * down,
                          shift.offset_px - shift.tilt_px - shift.scale_px]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


class RowTracker:
    """A camera's row shift over a stream: measured on the first pair and every `every`-th after it,
    each term the median of the last `window` measurements (a pair that gives none, or whose views
    look swapped, keeps the last). `last`: the latest measurement (None where the pair said nothing)."""

    def __init__(self, every: int = 30, window: int = 5) -> None:
        if every < 1 or window < 1:
            raise ValueError(f"every and window must be >= 1, got {every} and {window}")
        self.every = every
        self.measured: deque[RowShift] = deque(maxlen=window)
        self.last: RowMeasurement | None = None
        self._pairs = 0

    @property
    def shift(self) -> RowShift | None:
        """The running measurement, None before any pair gave one."""
        if not self.measured:
            return None
        terms = np.median([(s.offset_px, s.tilt_px, s.scale_px) for s in self.measured], axis=0)
        return RowShift(*(float(term) for term in terms))

    def update(self, left: np.ndarray, right: np.ndarray) -> RowShift:
        """Measure this pair when it is due; the shift to take out of its right view (`correction`)."""
        return self.update_lazily(lambda: (left, right))

    def update_lazily(self, views: Callable[[], tuple[np.ndarray, np.ndarray]]) -> RowShift:
        """`update` with the pair's rectified views made by `views` only when a measurement is due
        (raw cameras: rectifying both views for it costs a few ms)."""
        if self._pairs % self.every == 0:
            self.last = measure_rows(*views())
            if self.last is not None and not self.last.swapped:
                self.measured.append(self.last.shift)
        self._pairs += 1
        return correction(self.shift)
