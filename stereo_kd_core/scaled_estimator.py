"""Any estimator run on the pair resized by a factor, its disparity brought back to the pair's size.

A network's error is about constant in its own pixels (its cost volume is at 1/4 of its input):
on an enlarged pair that error shrinks in the caller's pixels, for about the square of the factor
in time. Measured for the default on ../shared/realval and Motorcycle (README, "Input scale"):
at 1.5 the realval EPE falls 1.23 -> 1.03 px, as long as the scene's disparities, enlarged, stay
within the network's range; at 0.5 it answers about 4x faster and less exactly. A pair smaller than
the size a model's time was measured at can be enlarged further for the same time (`SmallPairs`).

    StereoEstimator.load("dsnet-fast", input_scale=1.5)     # or stereo-kd predict --input-scale 1.5
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

from stereo_kd_core.estimator_base import RawPrediction, StereoEstimator, StereoPrediction, check_pair
from stereo_kd_core.rectification import input_size
from stereo_kd_core.scene_range import TRAINED_RANGE_FRACTION


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
    if valid.all():  # a network's dense answer: the same values in one resize
        resized = cv2.resize(disparity.astype(np.float32, copy=False), size, interpolation=cv2.INTER_LINEAR)
        return resized * np.float32(width / disparity.shape[1])
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


# Fitting the scene into the range (fit_range): the shipped networks learned scenes up to
# TRAINED_RANGE_FRACTION of their search range and fail beyond it; a pair whose enlarged disparities
# would pass it is run at a smaller scale instead.
FIT_PERCENTILE = 98          # the probe's disparity that must fit: 2 % of the pixels may lie beyond
FIT_STEP = 0.125             # scales are chosen on this grid (rounded down): a few input sizes only,
SMALLEST_FIT = 0.5           # as compiled and int8 graphs are built per size; and no smaller than this
PROBE_SCALE, PROBE_MIN_WIDTH = 0.25, 128  # the probe: the pair at 1/4 (at least 128 px wide)
# a small pair's probe (SmallPairs): at 1/4 it missed near thin objects that enlarging further pushed out of range
SMALL_PAIR_PROBE = 0.5


@dataclass(frozen=True)
class SmallPairs:
    """Pairs with fewer pixels than `pixels` (at scale 1) may be enlarged beyond the model's scale
    until, with their probe, they have about as many as `pixels` enlarged by it, at most to
    `max_scale` (grid scales, rounded down): a small camera's pair gets the time the model was
    measured and chosen at, in more of its own detail (manifest or checkpoint `small_pairs`:
    {"like": [H, W], "max_scale": s}). Measured for the default (README, "Small pairs")."""

    pixels: int
    max_scale: float

    @classmethod
    def from_entry(cls, entry: dict | None) -> SmallPairs | None:
        """A manifest's or checkpoint's `small_pairs` ({"like": [H, W], "max_scale": s}); None for none.
        ValueError for a malformed one."""
        if entry is None:
            return None
        try:
            height, width = (int(v) for v in entry["like"])
            max_scale = check_scale(float(entry["max_scale"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"small_pairs must be {{'like': [H, W], 'max_scale': s}}, got {entry!r} ({exc})") from None
        if height < 1 or width < 1:
            raise ValueError(f"small_pairs: 'like' must be a positive size, got {entry['like']!r}")
        return cls(height * width, max_scale)

    def composed(self, scale: float, caller_scale: float) -> SmallPairs:
        """As a ScaledEstimator of `scale` (the model's own scale times the caller's) takes it: the
        pixels enlarged by `scale`, the largest scale times the caller's factor."""
        return SmallPairs(round(self.pixels * scale * scale), self.max_scale * caller_scale)


DELEGATED = frozenset({"compiled", "wait_for_compile"})  # ScaledEstimator answers these for its inner one


def probe_size(width: int, height: int, fraction: float = PROBE_SCALE) -> tuple[int, int]:
    """(W, H) of fit_range's probe of a width x height pair: the pair at `fraction` (1/4; a small
    pair's SMALL_PAIR_PROBE), at least PROBE_MIN_WIDTH wide, at most 1x."""
    return input_size(width, height, min(1.0, max(fraction, PROBE_MIN_WIDTH / width)))


class ScaledEstimator(StereoEstimator):
    """`inner` on each pair resized by `scale`; disparity (in the pair's pixels) and confidence at
    the pair's size. Its range in the pair's pixels is the inner range / scale.

    fit_range: first a probe (`inner` on the pair at 1/4, a tenth of the time) measures how near
    the scene is; when its disparities, enlarged by `scale`, would pass what the network learned
    (TRAINED_RANGE_FRACTION of its range), the pair runs at the largest grid scale that keeps them
    inside (down to SMALLEST_FIT), so a near scene is answered at lower resolution instead of
    failing. Its range in the pair's pixels is then the inner range / SMALLEST_FIT.

    small_pairs (with fit_range): a pair with fewer pixels than the size the model was measured at may
    run at a larger scale, up to about that size's pixels with its probe (`pair_scale`); its probe is at
    1/2, and the further enlargement stops where the probe's largest disparity would leave the trained
    range."""

    def __init__(self, inner: StereoEstimator, scale: float, name: str | None = None, fit_range: bool = False,
                 small_pairs: SmallPairs | None = None):
        self.inner, self.scale, self.fit_range = inner, check_scale(scale), bool(fit_range)
        # a small pair's own scale (pair_scale): pixels and max_scale composed with the caller's factor;
        # only with fit_range, whose probe keeps the further enlarged scene inside the range
        if small_pairs is not None and not self.fit_range:
            raise ValueError("small_pairs needs fit_range: enlarging a pair further is safe only where a probe "
                             "keeps its scene inside the network's range")
        self.small_pairs = small_pairs
        self.name = f"{inner.name}@x{scale:g}" if name is None else name
        self.backend, self.device, self.precision = inner.backend, inner.device, inner.precision
        self.channels_last = getattr(inner, "channels_last", False)
        # the smallest scale a pair runs at (a near scene's, with fit_range)
        self.smallest_scale = min(self.scale, SMALLEST_FIT) if self.fit_range else self.scale
        self.max_disparity = int(inner.max_disparity / self.smallest_scale)
        self.min_disparity = inner.min_disparity / self.scale
        # the narrowest the inner estimator is given: the pair at the smallest scale it runs at (the probe's)
        narrowest = min(self.smallest_scale, PROBE_SCALE) if self.fit_range else self.scale
        self.min_input_width = math.ceil(inner.min_input_width / narrowest)

    def __getattr__(self, name: str):
        """What the inner estimator says of its build (`compiled`, `wait_for_compile`). Nothing
        else: its network or predict_with_costs would answer for the pair as given, not resized."""
        if name in DELEGATED and "inner" in self.__dict__:
            return getattr(self.inner, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def for_pairs_shrunk_by(self, factor: float) -> ScaledEstimator:
        """This estimator for pairs its caller shrinks by `factor` first (the node's input_scale): a
        small pair's allowance shrinks with them (pixels x factor^2), as `load(input_scale=factor)`
        composes it, so that a camera's pair shrunk for speed is not enlarged back; a view sharing
        the inner estimator, or itself when nothing changes."""
        factor = check_scale(factor)
        if self.small_pairs is None or factor == 1.0:
            return self
        view = copy.copy(self)
        view.small_pairs = SmallPairs(round(self.small_pairs.pixels * factor * factor), self.small_pairs.max_scale)
        return view

    def pair_scale(self, height: int, width: int) -> float:
        """The largest scale a height x width pair may run at (the probe may choose less): `scale`,
        or for a pair with fewer pixels than `small_pairs` allows, the grid scale (rounded down)
        that gives it, with its probe (SMALL_PAIR_PROBE), about as many, at most small_pairs.max_scale."""
        if self.small_pairs is None:
            return self.scale
        probe_width, probe_height = probe_size(width, height, SMALL_PAIR_PROBE)
        room = (self.small_pairs.pixels - probe_width * probe_height) / (height * width)
        fill = math.floor(math.sqrt(max(room, 0.0)) / FIT_STEP) * FIT_STEP
        return max(self.scale, min(fill, self.small_pairs.max_scale))

    def probe_for(self, height: int, width: int) -> tuple[int, int]:
        """(W, H) of fit_range's probe of a height x width pair: `probe_size` at 1/4, or at
        SMALL_PAIR_PROBE for a small pair (one that `pair_scale` enlarges beyond `scale`)."""
        small = self.pair_scale(height, width) > self.scale
        return probe_size(width, height, SMALL_PAIR_PROBE if small else PROBE_SCALE)

    def scale_for(self, left: np.ndarray, right: np.ndarray) -> float:
        """The scale this (checked) pair runs at: `pair_scale`, or with fit_range the largest grid
        scale up to it that keeps the probe's disparities inside the trained range (`_fitted_scale`)."""
        height, width = left.shape[:2]
        if not self.fit_range:
            return self.pair_scale(height, width)
        size = self.probe_for(height, width)
        small = resize_image(left, size), resize_image(right, size)
        coarse = getattr(self.inner, "predict_coarse", None)
        disparity = coarse(*small) if coarse is not None else None  # a network's cost-resolution look
        if disparity is None:
            disparity = self.inner.predict(*small).disparity
        return self._fitted_scale(disparity * (width / size[0]), height, width)

    def _fitted_scale(self, disparity: np.ndarray, height: int, width: int) -> float:
        """fit_range's scale for a height x width pair from its probe's disparity (in the pair's
        pixels, at any resolution): its FIT_PERCENTILE disparity inside the trained range, and a
        small pair enlarged beyond `scale` only as far as its largest one stays inside it too."""
        valid = disparity[np.isfinite(disparity)]
        if valid.size == 0:
            return self.scale
        trained = TRAINED_RANGE_FRACTION * self.inner.max_disparity
        scale = self.pair_scale(height, width)
        if scale > self.scale:  # a near object the 1/4 probe missed failed there (generated split: 1.345 -> 1.411 px)
            nearest_fits = math.floor(trained / max(float(valid.max()), 1e-6) / FIT_STEP) * FIT_STEP
            scale = max(self.scale, min(scale, nearest_fits))
        fits = trained / max(float(np.percentile(valid, FIT_PERCENTILE)), 1e-6)
        if fits >= scale:
            return scale
        return max(math.floor(fits / FIT_STEP) * FIT_STEP, min(SMALLEST_FIT, self.scale))

    def run_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(W, H) of what a height x width pair runs at: enlarged by `pair_scale`, and the probe's with
        fit_range (smaller grid scales, for near scenes, come when first needed)."""
        return [input_size(width, height, self.pair_scale(height, width))] + (
            [self.probe_for(height, width)] if self.fit_range else [])

    def prepare_size(self, height: int, width: int) -> bool:
        """The inner estimator's prepare_size (a compiled network's background build) for the sizes
        a height x width pair is run at (`run_sizes`), not the pair's. True when a build started."""
        prepare = getattr(self.inner, "prepare_size", None)
        if prepare is None:
            return False
        return any([bool(prepare(h, w)) for w, h in self.run_sizes(height, width)])  # a list: every size starts

    def warm_up(self, height: int, width: int) -> float:
        """The inner estimator warmed up (a compiled network built, one size after another) at the
        sizes a height x width pair runs at; its seconds. Not a blank pair through predict: the
        probe would pick a scale for a scene that is not there and build that size instead."""
        started = time.perf_counter()
        warm = getattr(self.inner, "warm_up", None)
        for w, h in self.run_sizes(height, width):
            if warm is not None:
                warm(h, w)
            else:
                blank = np.zeros((h, w, 3), np.uint8)
                self.inner.predict(blank, blank)
        return time.perf_counter() - started

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = check_pair(left, right)
        height, width = left.shape[:2]
        size = input_size(width, height, self.scale_for(left, right))
        inner = self.inner.predict(resize_image(left, size), resize_image(right, size))
        return self._at_pair_size(inner, width, height, geometry)

    def _at_pair_size(self, inner: StereoPrediction, width: int, height: int, geometry) -> StereoPrediction:
        """The inner estimator's answer for the resized pair, as the answer for the width x height pair."""
        disparity = disparity_to_size(inner.disparity, (width, height))
        confidence = resize_image(inner.confidence.astype(np.float32), (width, height))
        return StereoPrediction(disparity=disparity, confidence=np.clip(confidence, 0.0, 1.0),
                                points=self._points(disparity, geometry))

    @property
    def can_rectify_on_device(self) -> bool:
        return bool(getattr(self.inner, "can_rectify_on_device", False))

    @property
    def rectifies_on_device(self) -> bool:
        """Whether predict_raw rectifies on the inner network's device (the node sets it)."""
        return self.can_rectify_on_device and bool(self.inner.rectifies_on_device)

    @rectifies_on_device.setter
    def rectifies_on_device(self, value: bool) -> None:
        if value and not self.can_rectify_on_device:
            raise ValueError(f"'{self.name}' cannot rectify on its device: its inner estimator is no PyTorch network")
        if self.can_rectify_on_device:
            self.inner.rectifies_on_device = bool(value)

    def predict_raw(self, left: np.ndarray, right: np.ndarray, maps, size: tuple[int, int] | None = None,
                    geometry=None, rectified_left: bool = False) -> RawPrediction:
        """As StereoEstimator.predict_raw. With `rectifies_on_device` the raw pair goes to the inner
        network's device as it came, and is rectified and resized there straight to the sizes it
        runs at (the probe's, then the enlarged pair's), as a plain network's is; the rectified left
        image at `size` is the full rectified one resized here (area), as OpenCV's path makes it."""
        if not self.rectifies_on_device:
            return super().predict_raw(left, right, maps, size, geometry, rectified_left)
        width, height = size if size is not None else (left.shape[1], left.shape[0])  # the inner checks the pair
        scale = self.pair_scale(height, width)
        if self.fit_range:
            probe = self.probe_for(height, width)
            look = self.inner.predict_raw(left, right, maps, probe).prediction.disparity
            scale = self._fitted_scale(look * (width / probe[0]), height, width)
        raw = self.inner.predict_raw(left, right, maps, input_size(width, height, scale), rectified_left=True)
        small_left = resize_image(raw.rectified_left, (width, height))
        return RawPrediction(self._at_pair_size(raw.prediction, width, height, geometry), small_left,
                             raw.rectified_left if rectified_left else None)
