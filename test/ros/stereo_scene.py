"""Synthetic stereo scene with analytic ground truth, and the messages that carry it.

A fronto-parallel textured plane (disparity `plane_disparity`) with a nearer textured box
(disparity `box_disparity`) in front of it. The right image is built pixel by pixel from the
same textures shifted by the true integer disparity, so every visible surface point has an
exact match: the setting SGBM is built for.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from stereo_kd_ros.conversions import numpy_to_image

FOCAL_PX = 100.0
BASELINE_M = 0.1


@dataclass
class StereoScene:
    left: np.ndarray           # (H, W) uint8
    right: np.ndarray          # (H, W) uint8
    disparity: np.ndarray      # (H, W) float32 true raw disparity x_left - x_right
    comparable: np.ndarray     # (H, W) bool: visible in both, away from borders and edges
    focal_px: float
    baseline_m: float
    cx_left: float
    cx_right: float
    cy: float

    def camera_infos(self, stamp: Time, frame_left: str = "left_optical",
                     frame_right: str = "right_optical") -> tuple[CameraInfo, CameraInfo]:
        height, width = self.left.shape
        infos = []
        for frame, cx, tx in ((frame_left, self.cx_left, 0.0),
                              (frame_right, self.cx_right, -self.focal_px * self.baseline_m)):
            info = CameraInfo()
            info.header = Header(stamp=stamp, frame_id=frame)
            info.width, info.height = width, height
            info.p = [self.focal_px, 0.0, cx, tx, 0.0, self.focal_px, self.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
            infos.append(info)
        return infos[0], infos[1]

    def images(self, stamp: Time, encoding: str = "mono8", frame_left: str = "left_optical",
               frame_right: str = "right_optical") -> tuple[Image, Image]:
        pair = []
        for frame, pixels in ((frame_left, self.left), (frame_right, self.right)):
            if encoding == "rgb8":
                pixels = np.repeat(pixels[..., None], 3, axis=2)
            pair.append(numpy_to_image(pixels, encoding, Header(stamp=stamp, frame_id=frame)))
        return pair[0], pair[1]


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    noise = rng.integers(0, 256, size=(height, width)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 0.8)


def make_scene(width: int = 128, height: int = 96, plane_disparity: int = 8, box_disparity: int = 16,
               max_disparity: int = 32, cx_offset: float = 0.0, seed: int = 0) -> StereoScene:
    """Plane + box scene; `cx_offset` = cx_left - cx_right of the rectified pair."""
    rng = np.random.default_rng(seed)
    plane = _texture(rng, height, width + max_disparity)
    box = _texture(rng, height, width + max_disparity)
    box_x0, box_x1 = width // 2, width // 2 + width // 4
    box_y0, box_y1 = height // 4, 3 * height // 4
    left = plane[:, :width].copy()
    disparity = np.full((height, width), plane_disparity, dtype=np.float32)
    left[box_y0:box_y1, box_x0:box_x1] = box[box_y0:box_y1, box_x0:box_x1]
    disparity[box_y0:box_y1, box_x0:box_x1] = box_disparity
    # Right image: plane seen at x + plane_disparity, the box (in front) at x + box_disparity.
    columns = np.arange(width)
    right = plane[:, columns + plane_disparity].copy()
    box_in_right = (columns + box_disparity >= box_x0) & (columns + box_disparity < box_x1)
    right[box_y0:box_y1][:, box_in_right] = box[box_y0:box_y1][:, columns[box_in_right] + box_disparity]

    comparable = np.zeros((height, width), dtype=bool)
    margin = 4  # SGBM block radius (2) plus a pixel either side of depth edges
    comparable[margin:-margin, max_disparity + margin:-margin] = True
    # Plane pixels hidden behind the box in the right view, and the box edges.
    occluded = np.zeros_like(comparable)
    occluded[box_y0:box_y1, box_x0 - (box_disparity - plane_disparity) - margin: box_x1 + margin] = True
    comparable &= ~occluded | (disparity == box_disparity)
    edges = np.zeros_like(comparable)
    edges[box_y0 - margin: box_y0 + margin] = True
    edges[box_y1 - margin: box_y1 + margin] = True
    edges[:, box_x0 - margin: box_x0 + margin] = True
    edges[:, box_x1 - margin: box_x1 + margin] = True
    comparable &= ~edges
    return StereoScene(
        left=np.clip(left, 0, 255).astype(np.uint8), right=np.clip(right, 0, 255).astype(np.uint8),
        disparity=disparity, comparable=comparable, focal_px=FOCAL_PX, baseline_m=BASELINE_M,
        cx_left=(width - 1) / 2, cx_right=(width - 1) / 2 - cx_offset, cy=(height - 1) / 2,
    )
