"""Message payloads as plain NumPy: the byte layouts and field values of the stereo messages.

No ROS import here, so the same code serves the node (rclpy messages) and offline bag
processing (rosbags messages). Decoders take any object with the message's field names
(`encoding`, `height`, `width`, `step`, `is_bigendian`, `data`), as both message flavours have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from stereo_kd_core.data.bag import (  # noqa: F401 - image decoding lives in core; re-exported for the node
    INPUT_ENCODINGS,
    PIXEL_FORMATS,
    ImageFormatError,
    PixelFormat,
    image_to_numpy,
    image_to_rgb,
    stamp_to_ns,
)
from stereo_kd_core.geometry import PinholeCamera, StereoGeometry, nan_where_invalid

# Depth image encodings: REP 118 metres (NaN invalid), or OpenNI/RealSense millimetres (0 invalid).
DEPTH_ENCODINGS = ("32FC1", "16UC1")
MAX_DEPTH_MM = 65535  # the largest 16UC1 depth; farther points are published as 0 (invalid)
# Sub-pixel step reported in DisparityImage.delta_d, as stereo_image_proc does (SGBM's 4
# fractional bits); network outputs are continuous and at least this fine.
DISPARITY_STEP = 1.0 / 16.0
FLOAT32 = 7  # sensor_msgs/PointField.FLOAT32


@dataclass(frozen=True)
class ImagePayload:
    """sensor_msgs/Image fields of an unpadded little-endian image."""

    height: int
    width: int
    encoding: str
    step: int
    data: np.ndarray  # (height * step,) uint8


def image_payload(values: np.ndarray, encoding: str) -> ImagePayload:
    """HxW or HxWxC array -> the fields of a little-endian Image with unpadded rows."""
    fmt = PIXEL_FORMATS[encoding]
    channels = 1 if values.ndim == 2 else values.shape[2]
    if channels != fmt.channels:
        raise ValueError(f"encoding {encoding} needs {fmt.channels} channels, got {channels}")
    values = np.ascontiguousarray(values.astype(fmt.dtype, copy=False))  # little-endian on any machine
    height, width = int(values.shape[0]), int(values.shape[1])
    return ImagePayload(height, width, encoding, width * fmt.channels * fmt.dtype.itemsize,
                        values.reshape(-1).view(np.uint8))


def estimator_image_encoding(image: np.ndarray) -> str:
    """Encoding of an image as the estimator takes it (image_to_rgb's output): mono8, mono16 or rgb8."""
    encodings = {(2, np.dtype(np.uint8)): "mono8", (2, np.dtype(np.uint16)): "mono16",
                 (3, np.dtype(np.uint8)): "rgb8"}
    encoding = encodings.get((image.ndim, image.dtype))
    if encoding is None:
        raise ValueError(f"no image encoding for a {image.dtype} array of shape {image.shape}")
    return encoding


def depth_millimetres(depth_m: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 HxW depth in metres (NaN invalid) -> uint16 millimetres, 0 invalid: round(1000 x depth)
    (to nearest, ties to even). Depths beyond MAX_DEPTH_MM are 0 as well: a saturated value would
    be a false surface at 65.5 m. `out`: a (H, W) uint16 array to write into (a message buffer view)."""
    millimetres = np.multiply(depth_m, 1000.0, dtype=np.float64)  # (H, W), exact for any float32
    np.rint(millimetres, out=millimetres)
    with np.errstate(invalid="ignore"):
        millimetres[~(millimetres <= MAX_DEPTH_MM)] = 0  # NaN and too far
    out = np.empty(depth_m.shape, dtype="<u2") if out is None else out
    out[...] = millimetres
    return out


@dataclass(frozen=True)
class CameraInfoPayload:
    """sensor_msgs/CameraInfo fields of a rectified camera (no distortion, R identity, P = [K | 0])."""

    width: int
    height: int
    distortion_model: str
    d: tuple[float, ...]  # 5 (plumb_bob)
    k: tuple[float, ...]  # 9, row-major
    r: tuple[float, ...]  # 9
    p: tuple[float, ...]  # 12


def camera_info_payload(camera: PinholeCamera) -> CameraInfoPayload:
    """CameraInfo content for an image seen through `camera` (binning and ROI left at 0: full image)."""
    return CameraInfoPayload(
        width=camera.width, height=camera.height, distortion_model="plumb_bob", d=(0.0,) * 5,
        k=tuple(float(v) for v in camera.K.ravel()), r=tuple(float(v) for v in np.eye(3).ravel()),
        p=tuple(float(v) for v in camera.P.ravel()),
    )


@dataclass(frozen=True)
class ValidWindow:
    x_offset: int
    y_offset: int
    width: int
    height: int


def valid_window(valid: np.ndarray) -> ValidWindow:
    """Bounding box of the valid pixels (all zero when none is valid)."""
    rows = np.flatnonzero(valid.any(axis=1))
    if rows.size == 0:
        return ValidWindow(0, 0, 0, 0)
    cols = np.flatnonzero(valid[rows[0]: rows[-1] + 1].any(axis=0))
    return ValidWindow(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


@dataclass(frozen=True)
class DisparityPayload:
    """stereo_msgs/DisparityImage fields (the image is 32FC1, unpadded, little-endian)."""

    values: np.ndarray  # (H, W) '<f4', shifted disparity, invalid = min_disparity - 1
    f: float
    t: float
    min_disparity: float
    max_disparity: float
    delta_d: float
    valid_window: ValidWindow


def disparity_payload(disparity: np.ndarray, geometry: StereoGeometry, min_disparity: float,
                      max_disparity: float, delta_d: float = DISPARITY_STEP,
                      out: np.ndarray | None = None) -> DisparityPayload:
    """DisparityImage content the way stereo_image_proc fills it.

    `disparity` is the raw matcher output (x_left - x_right, NaN invalid). As stereo_image_proc
    does, the published values are shifted by the principal point offset, d' = d - (cx_l - cx_r),
    so that the message's own contract Z = f * T / d' holds; min/max_disparity are given in the
    same shifted units. Invalid pixels are set to min_disparity - 1 (below the valid range).
    `out`: an (H, W) '<f4' array to write the values into (e.g. a view of a message buffer).
    """
    offset = np.float32(geometry.disparity_offset)
    shifted_min = float(min_disparity - offset)
    values = np.empty(disparity.shape, dtype="<f4") if out is None else out  # (H, W)
    np.subtract(disparity, offset, out=values)
    valid = np.isfinite(values)
    if not valid.all():
        np.multiply(values, nan_where_invalid(valid), out=values)  # infinities become NaN too
        cv2.patchNaNs(values, shifted_min - 1.0)  # in place, one pass
    focal_px = geometry.fx if geometry.fx_right is None else geometry.fx_right  # f of the right P, as stereo_image_proc
    return DisparityPayload(values, float(focal_px), float(geometry.baseline_m), shifted_min,
                            float(max_disparity - offset), float(delta_d), valid_window(valid))


def disparity_from_payload(values: np.ndarray, min_disparity: float) -> np.ndarray:
    """Published (shifted) disparity values back to float32 HxW with NaN where invalid."""
    values = np.asarray(values, dtype=np.float32).copy()
    values[values < min_disparity] = np.nan
    return values


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 ...x3 RGB -> float32 ... holding 0x00RRGGBB in its bits (PCL's packed rgb)."""
    packed = np.zeros(rgb.shape[:-1], dtype="<u4")
    # Little-endian 0x00RRGGBB is the byte sequence B, G, R, 0: one strided byte copy.
    packed_bytes = packed.view(np.uint8).reshape(rgb.shape[:-1] + (4,))
    for byte, channel in ((0, 2), (1, 1), (2, 0)):
        packed_bytes[..., byte] = rgb[..., channel]
    return packed.view("<f4")


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_rgb: float32 ... -> uint8 ...x3."""
    bits = np.ascontiguousarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF], axis=-1).astype(np.uint8)


@dataclass(frozen=True)
class PointCloudPayload:
    """sensor_msgs/PointCloud2 fields: every field FLOAT32, count 1, at offset 4 * index."""

    values: np.ndarray  # (height, width, len(field_names)) '<f4'
    field_names: tuple[str, ...]  # ("x", "y", "z") or ("x", "y", "z", "rgb")
    is_dense: bool

    @property
    def point_step(self) -> int:
        return 4 * len(self.field_names)

    @property
    def row_step(self) -> int:
        return self.point_step * self.values.shape[1]


def point_cloud_shape(points: np.ndarray, dense: bool, with_color: bool) -> tuple[int, int, int]:
    """(height, width, channels) of the cloud `point_cloud_payload` builds from `points`."""
    channels = 4 if with_color else 3
    if dense:
        return 1, int(np.isfinite(points[..., 2]).sum()), channels
    return int(points.shape[0]), int(points.shape[1]), channels


def write_points(cloud: np.ndarray, points: np.ndarray) -> None:
    """x y z fields of an (H, W, 3 or 4) float32 cloud from (H, W, 3) float32 points."""
    if cloud.shape[2] == 3:
        cloud[...] = points
    else:
        # A NumPy copy into (H, W, 4)[..., :3] runs a 3-long inner loop; OpenCV's RGB -> RGBA writes
        # the same interleaving in one vectorised pass (its 4th value is overwritten by the colour).
        cv2.cvtColor(np.ascontiguousarray(points, dtype=np.float32), cv2.COLOR_RGB2RGBA, dst=cloud)


RGB_BITS = np.uint32(0x00FFFFFF)


def _rgb_bits(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W) little-endian uint32 0x00RRGGBB of the (H, W) grey or (H, W, 3) RGB uint8/uint16 image,
    as pack_rgb (written into `out` when given)."""
    if image.dtype == np.uint16:  # scaled by its peak, as the estimator does (12-bit sensors)
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(int(image.max()), 1))
    # OpenCV writes B, G, R, 255 per pixel in one vectorised pass: little-endian 0xFFRRGGBB.
    bgra = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA if image.ndim == 2 else cv2.COLOR_RGB2BGRA)
    return np.bitwise_and(bgra.view("<u4")[..., 0], RGB_BITS, out=out)


def write_packed_rgb(cloud: np.ndarray, image: np.ndarray) -> None:
    """Colour field of an (H, W, 4) float32 x y z rgb cloud from the (H, W) grey or (H, W, 3) RGB
    uint8/uint16 image: 0x00RRGGBB bits, as pack_rgb."""
    _rgb_bits(image, out=cloud.view("<u4")[..., 3])


def write_cloud(cloud: np.ndarray, planes: tuple[np.ndarray, np.ndarray, np.ndarray],
                image: np.ndarray | None = None) -> None:
    """Every field of a contiguous (H, W, 3 or 4) float32 x y z [rgb] cloud in one interleaving pass,
    from the (H, W) float32 x, y, z planes and, for 4 fields, the image's colour (as write_packed_rgb).
    Interleaving planes is cheaper than writing each field into the cloud with a stride of 3-4."""
    fields = list(planes)
    if image is not None:
        fields.append(_rgb_bits(image).view("<f4"))
    if cloud.shape[2] != len(fields):
        raise ValueError(f"cloud has {cloud.shape[2]} fields, got {len(fields)}")
    cv2.merge(fields, dst=cloud)


def point_cloud_payload(points: np.ndarray, color: np.ndarray | None = None, dense: bool = False,
                        out: np.ndarray | None = None) -> PointCloudPayload:
    """PointCloud2 content from float32 HxWx3 points (NaN invalid) and optional HxW or HxWx3 image colours.

    Organized (height H, width W, is_dense false) unless `dense`, which keeps only the finite
    points in one row (is_dense true). rgb is PCL's packed float (little-endian 0x00RRGGBB).
    `out`: an array of `point_cloud_shape(...)` '<f4' to write into (e.g. a message buffer view).
    """
    if dense:
        keep = np.isfinite(points[..., 2])
        points, color = points[keep][None], None if color is None else color[keep][None]  # (1, N, ...)
    height, width, channels = point_cloud_shape(points, False, color is not None)
    cloud = np.empty((height, width, channels), dtype="<f4") if out is None else out  # (H, W, x y z [rgb])
    write_points(cloud, points)
    if color is not None:
        write_packed_rgb(cloud, np.ascontiguousarray(color))
    names = ("x", "y", "z", "rgb") if color is not None else ("x", "y", "z")
    return PointCloudPayload(cloud, names, bool(dense))


def point_cloud_values(data: Any, height: int, width: int, point_step: int) -> np.ndarray:
    """float32 (height, width, fields) view of cloud data built by `point_cloud_payload`."""
    return np.frombuffer(data, dtype="<f4").reshape(height, width, point_step // 4)
