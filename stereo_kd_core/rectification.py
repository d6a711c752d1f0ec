"""Rectification of raw camera images from their calibration (CameraInfo's K, D, R, P).

Follows image_geometry.PinholeCameraModel: a raw pixel's ray is undistorted with D (plumb_bob,
rational_polynomial, or equidistant = OpenCV's fisheye model), rotated by R into the rectified
frame and projected with P. Rectifying samples, for every rectified pixel, the raw pixel that
sees it (the maps of cv2.initUndistortRectifyMap); the rectified image has the calibration's
width x height, and its camera is P (what the node's StereoGeometry is built from).

The maps are applied with OpenCV on the CPU (`RectificationMaps.remap`) or with torch's
grid_sample on any device (`RectificationMaps.grid_sample`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from stereo_kd_core.row_alignment import RowShift, onto_left_rows

# Coefficients per distortion model, as image_geometry / camera_calibration write them.
DISTORTION_COEFFICIENTS = {"plumb_bob": 5, "rational_polynomial": 8, "equidistant": 4}
ROTATION_TOLERANCE = 1e-3  # max |R^T R - I| and |det R - 1|: calibration files print R to ~5 digits


class CalibrationError(ValueError):
    """A calibration that cannot rectify; `reason` is a short counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CameraCalibration:
    """One camera's calibration, as in sensor_msgs/CameraInfo (row-major tuples). Validated on
    construction: raises CalibrationError naming what is wrong."""

    width: int
    height: int
    distortion_model: str
    d: tuple[float, ...]
    k: tuple[float, ...]  # 9
    r: tuple[float, ...]  # 9
    p: tuple[float, ...]  # 12

    def __post_init__(self) -> None:
        for name, values, size in (("K", self.k, 9), ("R", self.r, 9), ("P", self.p, 12)):
            if len(values) != size:
                raise CalibrationError("uncalibrated", f"{name} has {len(values)} values, expected {size}")
        if self.width <= 0 or self.height <= 0:
            raise CalibrationError("uncalibrated", f"image size is {self.width}x{self.height} (not calibrated)")
        for name, values in (("K", self.k), ("P", self.p)):
            if not any(values):
                raise CalibrationError("uncalibrated", f"{name} is all zero (camera not calibrated)")
        for name, values in (("K", self.k), ("D", self.d), ("R", self.r), ("P", self.p)):
            if not np.all(np.isfinite(values)):
                raise CalibrationError("uncalibrated", f"{name} has NaN or inf entries")
        if self.K[0, 0] <= 0 or self.K[1, 1] <= 0 or self.P[0, 0] <= 0 or self.P[1, 1] <= 0:
            raise CalibrationError("uncalibrated", "K or P has a non-positive focal length")
        expected = DISTORTION_COEFFICIENTS.get(self.distortion_model)
        if expected is None:
            raise CalibrationError("bad_distortion",
                                   f"distortion model '{self.distortion_model}' is not supported "
                                   f"(supported: {', '.join(DISTORTION_COEFFICIENTS)})")
        if len(self.d) != expected:
            raise CalibrationError("bad_distortion",
                                   f"{self.distortion_model} needs {expected} distortion coefficients, "
                                   f"D has {len(self.d)}")
        rotation = self.R
        orthogonality = np.abs(rotation.T @ rotation - np.eye(3)).max()
        determinant = np.linalg.det(rotation)
        if orthogonality > ROTATION_TOLERANCE or abs(determinant - 1) > ROTATION_TOLERANCE:
            raise CalibrationError("bad_rotation", f"R is not a rotation (|R^T R - I| = {orthogonality:.2g}, "
                                                   f"det R = {determinant:.6g})")

    @classmethod
    def from_camera_info(cls, info: Any) -> CameraCalibration:
        """From any object with CameraInfo's fields (rclpy or rosbags message)."""
        return cls(width=int(info.width), height=int(info.height), distortion_model=str(info.distortion_model),
                   d=tuple(float(v) for v in info.d), k=tuple(float(v) for v in info.k),
                   r=tuple(float(v) for v in info.r), p=tuple(float(v) for v in info.p))

    @property
    def K(self) -> np.ndarray:  # noqa: N802 (CameraInfo's names)
        return np.asarray(self.k, dtype=np.float64).reshape(3, 3)

    @property
    def D(self) -> np.ndarray:  # noqa: N802
        return np.asarray(self.d, dtype=np.float64)

    @property
    def R(self) -> np.ndarray:  # noqa: N802
        return np.asarray(self.r, dtype=np.float64).reshape(3, 3)

    @property
    def P(self) -> np.ndarray:  # noqa: N802
        return np.asarray(self.p, dtype=np.float64).reshape(3, 4)

    @property
    def fisheye(self) -> bool:
        return self.distortion_model == "equidistant"


def raw_coordinates(calibration: CameraCalibration) -> tuple[np.ndarray, np.ndarray]:
    """For every rectified pixel, the raw pixel that sees it: float32 (H, W) x and y."""
    size = (calibration.width, calibration.height)
    new_camera = calibration.P[:, :3]
    if calibration.fisheye:
        return cv2.fisheye.initUndistortRectifyMap(calibration.K, calibration.D, calibration.R, new_camera,
                                                   size, cv2.CV_32FC1)
    return cv2.initUndistortRectifyMap(calibration.K, calibration.D, calibration.R, new_camera, size,
                                       cv2.CV_32FC1)


def rectified_coordinates(calibration: CameraCalibration) -> tuple[np.ndarray, np.ndarray]:
    """For every raw pixel, where it lands in the rectified image: float32 (H, W) x and y (the
    inverse of raw_coordinates, used to render raw images from rectified ones)."""
    u, v = np.meshgrid(np.arange(calibration.width, dtype=np.float64),
                       np.arange(calibration.height, dtype=np.float64))
    pixels = np.stack([u.ravel(), v.ravel()], axis=-1)[:, None, :]  # (N, 1, 2)
    undistort = cv2.fisheye.undistortPoints if calibration.fisheye else cv2.undistortPoints
    rectified = undistort(pixels, calibration.K, calibration.D, R=calibration.R, P=calibration.P[:, :3])
    rectified = rectified.reshape(calibration.height, calibration.width, 2).astype(np.float32)
    return rectified[..., 0], rectified[..., 1]


@functools.lru_cache(maxsize=4)  # a player re-distorts frame after frame with one calibration per camera
def _distortion_maps(calibration: CameraCalibration) -> tuple[np.ndarray, np.ndarray]:
    return cv2.convertMaps(*rectified_coordinates(calibration), cv2.CV_16SC2)


def distort(rectified: np.ndarray, calibration: CameraCalibration) -> np.ndarray:
    """A raw image as the calibrated camera would see the scene of a `rectified` image (bilinear;
    0 where the raw view leaves the rectified image): test scenes and demos of raw input."""
    return cv2.remap(rectified, *_distortion_maps(calibration), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


@dataclass(eq=False)
class RectificationMaps:
    """The remap tables of one camera (built once per calibration)."""

    calibration: CameraCalibration
    raw_x: np.ndarray  # (H, W) float32: raw x of each rectified pixel
    raw_y: np.ndarray  # (H, W) float32
    _fixed_point: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)
    _grids: dict = field(default_factory=dict, init=False, repr=False)  # device -> (1, H, W, 2) grid

    def __post_init__(self) -> None:
        # OpenCV's fixed-point maps (1/32 px) remap about twice as fast as float maps.
        self._fixed_point = cv2.convertMaps(self.raw_x, self.raw_y, cv2.CV_16SC2)

    @classmethod
    def build(cls, calibration: CameraCalibration) -> RectificationMaps:
        return cls(calibration, *raw_coordinates(calibration))

    def check_size(self, height: int, width: int, what: str = "raw image") -> None:
        """ValueError unless a raw image of height x width is the size these maps were built for."""
        if (height, width) != (self.calibration.height, self.calibration.width):
            raise ValueError(f"{what} is {width}x{height} but its calibration is for "
                             f"{self.calibration.width}x{self.calibration.height}")

    def with_rows_moved(self, shift: RowShift) -> RectificationMaps:
        """These maps followed by `row_alignment.onto_left_rows(., shift)`: a right camera's maps that
        bring its rectified rows onto the left camera's, in one remap."""
        if not shift:
            return self
        return RectificationMaps(self.calibration, onto_left_rows(self.raw_x, shift), onto_left_rows(self.raw_y, shift))

    def remap(self, raw: np.ndarray) -> np.ndarray:
        """Rectify a raw (h, w[, C]) image on the CPU (bilinear, 0 outside the raw image)."""
        self.check_size(*raw.shape[:2])
        return cv2.remap(raw, *self._fixed_point, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def grid_sample(self, raw):
        """Rectify a raw (N, C, H, W) float tensor on its own device with torch's grid_sample
        (bilinear, zeros outside): the same sampling as remap with float maps."""
        import torch

        grid = self._grids.get(raw.device)
        if grid is None:
            height, width = self.calibration.height, self.calibration.width
            # align_corners=True: -1 and 1 are the centres of the first and last raw pixels.
            x = torch.from_numpy(self.raw_x) * (2.0 / (width - 1)) - 1.0
            y = torch.from_numpy(self.raw_y) * (2.0 / (height - 1)) - 1.0
            grid = torch.stack([x, y], dim=-1)[None].to(raw.device)  # (1, H, W, 2)
            self._grids[raw.device] = grid
        return torch.nn.functional.grid_sample(raw, grid.expand(raw.shape[0], -1, -1, -1).to(raw.dtype),
                                               mode="bilinear", padding_mode="zeros", align_corners=True)


def input_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(W', H') of an image resized by `scale` (rounded, at least 1 px): the estimator's input size."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_pair(left: np.ndarray, right: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Both images at `size` (W, H) by area interpolation (unchanged when already that size)."""
    if size == (left.shape[1], left.shape[0]):
        return left, right
    return (cv2.resize(left, size, interpolation=cv2.INTER_AREA),
            cv2.resize(right, size, interpolation=cv2.INTER_AREA))


class StereoRectifier:
    """Maps of both cameras, cached: rebuilt only for a calibration not seen last time."""

    def __init__(self) -> None:
        self._maps: dict[str, RectificationMaps] = {}
        self.builds = 0  # maps built so far (one per camera and calibration change)

    def maps(self, side: str, calibration: CameraCalibration) -> RectificationMaps:
        cached = self._maps.get(side)
        if cached is None or cached.calibration != calibration:
            cached = self._maps[side] = RectificationMaps.build(calibration)
            self.builds += 1
        return cached
