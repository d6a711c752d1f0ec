"""The generators' shared geometry: the virtual rig both render through, and random planes in
disparity (d(x, y) = a*x + b*y + c in left-image pixels) that their surfaces lie on."""

from __future__ import annotations

import numpy as np

MAX_SLOPE = 0.3  # |dd/dx|, |dd/dy| of a plane; keeps 1 - a well away from 0
VIRTUAL_BASELINE_MM = 100.0


def virtual_rig_calib(width: int, height: int, max_disparity: int) -> dict:
    """Middlebury-style calibration (same keys as `read_middlebury_calib`) of the generators' virtual
    rig: focal length = image width (about 53 degrees field of view), principal point at the centre."""
    focal_px = float(width)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    camera = np.array([[focal_px, 0, cx], [0, focal_px, cy], [0, 0, 1]], dtype=np.float64)
    return {
        "cam0": camera, "cam1": camera.copy(), "doffs": 0.0, "baseline": VIRTUAL_BASELINE_MM,
        "width": float(width), "height": float(height), "ndisp": float(max_disparity),
    }


def random_disparity_plane(rng: np.random.Generator, centre: tuple[float, float], half_extent: tuple[float, float],
                           low: float, high: float, max_slope: float = MAX_SLOPE) -> tuple[float, float, float]:
    """(a, b, c) of a random plane d = a*x + b*y + c whose disparity stays within [low, high] over
    the box centre +- half_extent, each slope also capped at max_slope."""
    centre_disparity = rng.uniform(low, high)
    room = min(centre_disparity - low, high - centre_disparity)
    # split the allowed variation between the two slopes, each also capped at max_slope
    share = rng.uniform(0, 1)
    slope_x = rng.uniform(-1, 1) * min(max_slope, share * room / max(half_extent[0], 1.0))
    slope_y = rng.uniform(-1, 1) * min(max_slope, (1 - share) * room / max(half_extent[1], 1.0))
    offset = centre_disparity - slope_x * centre[0] - slope_y * centre[1]
    return slope_x, slope_y, offset
