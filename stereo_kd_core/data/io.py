"""File formats of stereo data sets: PFM, KITTI 16-bit disparity PNG, images, Middlebury calib.txt."""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

KITTI_DISPARITY_SCALE = 256.0  # KITTI stores disparity * 256 in a uint16 PNG, 0 = no ground truth


def read_pfm(path: str | os.PathLike) -> np.ndarray:
    """Read a PFM file as float32 HxW ("Pf") or HxWx3 ("PF"), first row = top of the image.

    The sign of the scale field gives the byte order (negative = little endian); PFM stores
    rows bottom-up.
    """
    path = Path(path)
    with open(path, "rb") as f:
        kind = f.readline().strip()
        if kind not in (b"PF", b"Pf"):
            raise ValueError(f"{path}: not a PFM file (header {kind[:8]!r})")
        tokens: list[bytes] = []
        while len(tokens) < 3:  # width, height, scale; whitespace-separated, usually on two lines
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: truncated PFM header")
            tokens += line.split()
        try:
            width, height, scale = int(tokens[0]), int(tokens[1]), float(tokens[2])
        except ValueError as error:
            raise ValueError(f"{path}: malformed PFM header {tokens!r}") from error
        channels = 3 if kind == b"PF" else 1
        dtype = np.dtype("<f4") if scale < 0 else np.dtype(">f4")
        count = width * height * channels
        data = np.frombuffer(f.read(count * 4), dtype=dtype)
    if data.size != count:
        raise ValueError(f"{path}: PFM data has {data.size} values, header says {count}")
    shape = (height, width, 3) if channels == 3 else (height, width)
    return np.ascontiguousarray(np.flipud(data.reshape(shape)).astype(np.float32))


def write_pfm(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an HxW or HxWx3 (or HxWx1) array as a little-endian float32 PFM."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        kind = b"Pf"
    elif array.ndim == 3 and array.shape[2] == 3:
        kind = b"PF"
    else:
        raise ValueError(f"PFM holds HxW or HxWx3 arrays, got shape {array.shape}")
    height, width = array.shape[:2]
    with open(path, "wb") as f:
        f.write(kind + b"\n" + f"{width} {height}\n".encode() + b"-1.0\n")
        f.write(np.flipud(array).astype("<f4").tobytes())


def _imread_unchanged(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode image file (corrupt or unsupported format): {path}")
    return image


def read_kitti_disparity(path: str | os.PathLike) -> np.ndarray:
    """Read a KITTI uint16 disparity PNG as float32 HxW pixels, NaN where the file holds 0."""
    raw = _imread_unchanged(path)
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise ValueError(f"{path}: KITTI disparity must be a single-channel 16-bit PNG, got {raw.dtype} {raw.shape}")
    disparity = raw.astype(np.float32) / KITTI_DISPARITY_SCALE
    disparity[raw == 0] = np.nan
    return disparity


def write_kitti_disparity(path: str | os.PathLike, disparity: np.ndarray) -> None:
    """Write disparity (pixels) as a KITTI uint16 PNG; NaN and non-positive values become 0 (invalid)."""
    disparity = np.asarray(disparity, dtype=np.float64)
    valid = np.isfinite(disparity) & (disparity > 0)
    encoded = np.zeros(disparity.shape, dtype=np.uint16)
    # a tiny positive disparity must not round to the invalid code 0
    encoded[valid] = np.clip(np.round(disparity[valid] * KITTI_DISPARITY_SCALE), 1, np.iinfo(np.uint16).max)
    if not cv2.imwrite(str(path), encoded):
        raise OSError(f"cannot write {path}")


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 HxWx3 RGB: grey expanded to three channels, 16 bit scaled to 8, alpha dropped."""
    image = _imread_unchanged(path)
    if image.dtype == np.uint16:
        image = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported image sample type {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 2:  # grey + alpha
        return np.ascontiguousarray(np.repeat(image[:, :, :1], 3, axis=2))
    return np.ascontiguousarray(image[:, :, 2::-1])  # BGR(A) -> RGB


def write_image_rgb(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 HxWx3 RGB image (PNG or any format OpenCV knows from the suffix)."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(np.asarray(image)[:, :, ::-1])):
        raise OSError(f"cannot write {path}")


def read_mask(path: str | os.PathLike, value: int = 255) -> np.ndarray:
    """Read a grey mask PNG as bool HxW, True where the pixel equals `value` (Middlebury: 255 = non-occluded)."""
    raw = _imread_unchanged(path)
    if raw.ndim == 3:
        raw = raw[:, :, 0]
    return raw == value


_MATRIX_RE = re.compile(r"^\[(.*)\]$")


def read_middlebury_calib(path: str | os.PathLike) -> dict:
    """Parse a Middlebury/ETH3D calib.txt: cam0/cam1 as 3x3 float64 arrays, every other key as a float."""
    calib: dict = {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{line_number}: expected key=value, got {line!r}")
        key, value = key.strip(), value.strip()
        matrix = _MATRIX_RE.match(value)
        try:
            if matrix:
                rows = [row.split() for row in matrix.group(1).split(";")]
                calib[key] = np.array(rows, dtype=np.float64)
            else:
                calib[key] = float(value)
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: cannot parse {key}={value!r}") from error
    for key in ("cam0", "cam1"):
        if key in calib and calib[key].shape != (3, 3):
            raise ValueError(f"{path}: {key} must be 3x3, got {calib[key].shape}")
    return calib


def write_middlebury_calib(
    path: str | os.PathLike,
    focal_px: float,
    cx0: float,
    cx1: float,
    cy: float,
    baseline_mm: float,
    width: int,
    height: int,
    ndisp: int,
) -> None:
    """Write a Middlebury 2014 calib.txt; doffs = cx1 - cx0 (depth_mm = baseline * f / (d + doffs))."""

    def camera(cx: float) -> str:
        return f"[{focal_px:.10g} 0 {cx:.10g}; 0 {focal_px:.10g} {cy:.10g}; 0 0 1]"

    lines = [
        f"cam0={camera(cx0)}",
        f"cam1={camera(cx1)}",
        f"doffs={cx1 - cx0:.10g}",
        f"baseline={baseline_mm:.10g}",
        f"width={int(width)}",
        f"height={int(height)}",
        f"ndisp={int(ndisp)}",
    ]
    Path(path).write_text("\n".join(lines) + "\n")
