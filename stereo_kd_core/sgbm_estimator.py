"""OpenCV's semi-global matcher behind the StereoEstimator seam: the classical peer and CPU fallback."""

from __future__ import annotations

import cv2
import numpy as np

from stereo_kd_core.estimator_base import StereoEstimator, StereoPrediction, check_pair, pair_peak


class SGBMEstimator(StereoEstimator):
    """OpenCV semi-global matching: the classical peer and CPU fallback.

    Confidence is 1 where SGBM returns a disparity that passed its uniqueness, left-right
    and speckle checks, 0 elsewhere (SGBM exposes no distribution over disparities).
    """

    def __init__(self, max_disparity: int = 192, block_size: int = 5):
        self.name = "sgbm"
        self.backend = "opencv"
        self.device = "cpu"
        self.precision = "fp32"
        self.max_disparity = int(max_disparity)
        self.min_disparity = 0.0
        num_disparities = ((self.max_disparity + 15) // 16) * 16
        # OpenCV's SGBM needs columns beyond the search range (narrower images crash or throw).
        self.min_input_width = num_disparities + 1
        channels = 3
        self._matcher = cv2.StereoSGBM_create(
            minDisparity=0, numDisparities=num_disparities, blockSize=block_size,
            P1=8 * channels * block_size**2, P2=32 * channels * block_size**2,
            disp12MaxDiff=1, uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
            mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
        )

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = check_pair(left, right)
        if left.shape[1] < self.min_input_width:
            raise ValueError(f"image is {left.shape[1]} px wide: sgbm with max_disparity {self.max_disparity} "
                             f"needs at least {self.min_input_width} columns")
        if left.dtype == np.uint16:
            to_8bit = 255.0 / pair_peak(left, right)
            left = cv2.convertScaleAbs(left, alpha=to_8bit)
            right = cv2.convertScaleAbs(right, alpha=to_8bit)
        fixed_point = self._matcher.compute(np.ascontiguousarray(left), np.ascontiguousarray(right))
        disparity = fixed_point.astype(np.float32) * np.float32(1.0 / 16.0)  # StereoSGBM: 4 fractional bits
        invalid = fixed_point < 0
        disparity[invalid] = np.nan
        confidence = (~invalid).astype(np.float32)
        return StereoPrediction(disparity=disparity, confidence=confidence,
                                points=self._points(disparity, geometry))

