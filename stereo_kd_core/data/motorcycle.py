"""The Middlebury 2014 "Motorcycle" pair that ships inside scikit-image: an evaluation pair
(never training data) that the player, benchmarks and `stereo-kd eval` read."""

from __future__ import annotations

import numpy as np

from stereo_kd_core.geometry import StereoGeometry

# The scikit-image copy of Middlebury 2014 "Motorcycle", downsampled 4x (its docstring's calibration).
MOTORCYCLE_CALIB = {"focal_px": 994.978, "cx": 311.193, "cy": 254.877, "doffs": 31.086, "baseline_mm": 193.001}


def motorcycle_geometry() -> StereoGeometry:
    """Rectified geometry of the Motorcycle pair (the one place its calibration is turned into one)."""
    calib = MOTORCYCLE_CALIB
    return StereoGeometry.from_intrinsics(calib["focal_px"], calib["cx"], calib["cy"], calib["baseline_mm"] / 1000.0,
                                          cx_right=calib["cx"] + calib["doffs"])


def motorcycle_sample() -> dict:
    """The scikit-image Middlebury Motorcycle pair as a sample dict (non-finite GT -> NaN)."""
    from skimage import data  # imported here: scikit-image loads slowly and few callers need it

    left, right, disparity = data.stereo_motorcycle()
    disparity = np.asarray(disparity, dtype=np.float32)
    disparity[~np.isfinite(disparity)] = np.nan
    return {"left": left, "right": right, "disparity": disparity, "name": "motorcycle",
            "calib": dict(MOTORCYCLE_CALIB)}
