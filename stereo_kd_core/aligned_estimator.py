"""Any estimator given pairs whose rows line up: where the right view's rows lie against the left's
(an offset, a tilt, a stretch) measured on each pair (stereo_kd_core.row_alignment) and taken out
before the estimator runs.

    StereoEstimator.load("dsnet-fast")                      # aligns rows (the default)
    StereoEstimator.load("dsnet-fast", align_rows=False)    # pairs as given

A pair whose rows already line up (`row_alignment.correction` keeps nothing of its measurement, or
it gives none) goes to the estimator untouched.
"""

from __future__ import annotations

import warnings

import numpy as np

from stereo_kd_core.estimator_base import RawPrediction, StereoEstimator, StereoPrediction, check_pair
from stereo_kd_core.row_alignment import RowMeasurement, RowShift, correction, measure_rows, onto_left_rows


class RowAlignedEstimator(StereoEstimator):
    """`wrapped` on each pair with its right view shifted onto the left view's rows. Everything else
    is the wrapped estimator's, read and set there (name, range, build, warm-up, its `inner` network
    estimator when it scales pairs, ...). `last_measurement`: what the last pair's rows measured (None:
    nothing); `last_shift`: the RowShift its right view was given."""

    def __init__(self, wrapped: StereoEstimator):
        self.__dict__["wrapped"] = wrapped
        self.last_shift = RowShift()
        self.last_measurement: RowMeasurement | None = None

    def __getattr__(self, name: str):
        if name == "wrapped":
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("last_shift", "last_measurement"):
            object.__setattr__(self, name, value)
        else:  # a setting of the estimator (its name, rectifies_on_device, ...) is the wrapped one's
            setattr(self.wrapped, name, value)

    # StereoEstimator's class-level defaults would answer for these before __getattr__ is asked
    backend = property(lambda self: self.wrapped.backend)
    min_disparity = property(lambda self: self.wrapped.min_disparity)
    min_input_width = property(lambda self: self.wrapped.min_input_width)
    can_rectify_on_device = property(lambda self: self.wrapped.can_rectify_on_device)
    rectifies_on_device = property(lambda self: self.wrapped.rectifies_on_device)

    def aligned(self, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pair (checked) with its right view on the left view's rows."""
        left, right = check_pair(left, right)
        measured = self.last_measurement = measure_rows(left, right)
        if measured is not None and measured.swapped:
            warnings.warn("the left view's corners lie to the right in the right view: left and right look "
                          "swapped (the disparity of such a pair is meaningless)", RuntimeWarning, stacklevel=3)
        self.last_shift = correction(None if measured is None else measured.shift)
        return left, onto_left_rows(right, self.last_shift)

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        return self.wrapped.predict(*self.aligned(left, right), geometry=geometry)

    def predict_raw(self, left: np.ndarray, right: np.ndarray, maps, size: tuple[int, int] | None = None,
                    geometry=None, rectified_left: bool = False) -> RawPrediction:
        """As StereoEstimator.predict_raw, the rectified pair aligned. A wrapped estimator that
        rectifies on its own device (`rectifies_on_device`) gets the raw pair as it came: its
        rectified views never reach the host, so rows are not aligned there."""
        if getattr(self.wrapped, "rectifies_on_device", False):
            return self.wrapped.predict_raw(left, right, maps, size, geometry, rectified_left)
        return StereoEstimator.predict_raw(self, left, right, maps, size, geometry, rectified_left)
