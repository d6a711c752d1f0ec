"""Pictures and files for people: colourised disparity maps and PLY point clouds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def colorize_disparity(disparity: np.ndarray, max_disparity: float | None = None) -> np.ndarray:
    """float HxW disparity -> uint8 HxWx3 RGB (turbo colour map), NaN and inf -> black.

    Scaled linearly from 0 to `max_disparity` (default: the largest finite value).
    """
    disparity = np.asarray(disparity, dtype=np.float32)
    valid = np.isfinite(disparity)
    if max_disparity is None:
        max_disparity = float(disparity[valid].max()) if valid.any() else 1.0
    scale = 255.0 / max(float(max_disparity), 1e-6)
    levels = np.clip(np.where(valid, disparity, 0.0) * scale, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray | None = None) -> int:
    """Write the finite points of (..., 3) `xyz` (with (..., 3) uint8 `rgb`) as binary PLY.

    Returns the number of points written.
    """
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(int(keep.sum()), dtype=fields)
    vertices["x"], vertices["y"], vertices["z"] = xyz[keep].T
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {vertices.size}",
              "property float x", "property float y", "property float z"]
    if rgb is not None:
        colors = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)[keep]
        vertices["red"], vertices["green"], vertices["blue"] = colors.T
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertices.tobytes())
    return int(vertices.size)
