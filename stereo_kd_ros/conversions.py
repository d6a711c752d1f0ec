"""ROS message <-> NumPy conversions: images, DisparityImage, PointCloud2, camera geometry.

Incoming image data is viewed in place (no copy) whenever the layout allows it: rclpy hands
`msg.data` over as an `array.array('B')`, which NumPy can wrap with `np.frombuffer`. Outgoing
data is copied once into an `array.array('B')`, the one type the generated message setters
accept without a per-element check.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header
from stereo_msgs.msg import DisparityImage

from stereo_kd_core.geometry import StereoGeometry


@dataclass(frozen=True)
class PixelFormat:
    dtype: np.dtype        # one channel, little-endian
    channels: int
    rgb_channels: slice | None  # channel slice giving R, G, B (a view); None for one channel


PIXEL_FORMATS: dict[str, PixelFormat] = {
    "mono8": PixelFormat(np.dtype(np.uint8), 1, None),
    "8UC1": PixelFormat(np.dtype(np.uint8), 1, None),
    "mono16": PixelFormat(np.dtype("<u2"), 1, None),
    "16UC1": PixelFormat(np.dtype("<u2"), 1, None),
    "rgb8": PixelFormat(np.dtype(np.uint8), 3, slice(None)),
    "bgr8": PixelFormat(np.dtype(np.uint8), 3, slice(None, None, -1)),
    "8UC3": PixelFormat(np.dtype(np.uint8), 3, slice(None, None, -1)),  # OpenCV's default channel order
    "rgba8": PixelFormat(np.dtype(np.uint8), 4, slice(0, 3)),
    "bgra8": PixelFormat(np.dtype(np.uint8), 4, slice(2, None, -1)),
    "32FC1": PixelFormat(np.dtype("<f4"), 1, None),
}
INPUT_ENCODINGS = ("mono8", "8UC1", "mono16", "16UC1", "rgb8", "bgr8", "8UC3", "rgba8", "bgra8")


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class ImageFormatError(ValueError):
    """An Image message whose layout cannot be decoded; `reason` is a short counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_byte_array(values: np.ndarray) -> array.array:
    """One copy of a contiguous array into the byte container message setters take as is."""
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(values).data.cast("B"))
    return data


def _message_buffer(shape: tuple[int, ...], dtype: np.dtype) -> tuple[array.array, np.ndarray]:
    """A message byte buffer and a writable NumPy view of it, to build data in place."""
    dtype = np.dtype(dtype)
    data = array.array("B", bytes(int(np.prod(shape)) * dtype.itemsize))
    return data, np.frombuffer(data, dtype=dtype).reshape(shape)


def image_to_numpy(msg: Image, encodings: tuple[str, ...] = tuple(PIXEL_FORMATS)) -> np.ndarray:
    """View of an Image as HxW or HxWxC in its own channel order (read-only, no copy).

    Padded rows become a strided view; big-endian data becomes a byte-swapped dtype view.
    Raises ImageFormatError for an unsupported encoding or inconsistent step/data length.
    """
    fmt = PIXEL_FORMATS.get(msg.encoding)
    if fmt is None or msg.encoding not in encodings:
        raise ImageFormatError(
            "unsupported_encoding",
            f"unsupported encoding '{msg.encoding}' (supported: {', '.join(encodings)})",
        )
    height, width, step = msg.height, msg.width, msg.step
    pixel_bytes = fmt.dtype.itemsize * fmt.channels
    if height == 0 or width == 0:
        raise ImageFormatError("empty_image", f"empty image ({width}x{height})")
    if step < width * pixel_bytes:
        raise ImageFormatError(
            "step_too_small",
            f"step {step} is smaller than width * bytes_per_pixel = {width} * {pixel_bytes}",
        )
    if len(msg.data) != step * height:
        raise ImageFormatError(
            "data_length",
            f"data length {len(msg.data)} != step * height = {step} * {height} = {step * height}",
        )
    dtype = fmt.dtype.newbyteorder(">") if msg.is_bigendian else fmt.dtype
    if step % fmt.dtype.itemsize:
        # Rows that start off the element alignment cannot be strided views; copy them out.
        raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)[:, : width * pixel_bytes]
        flat = np.ascontiguousarray(raw).view(dtype)
    else:
        flat = np.frombuffer(msg.data, dtype=dtype)
        flat = np.lib.stride_tricks.as_strided(
            flat, shape=(height, width * fmt.channels), strides=(step, fmt.dtype.itemsize),
            writeable=False,
        )
    shape = (height, width) if fmt.channels == 1 else (height, width, fmt.channels)
    return flat.reshape(shape)


def image_to_rgb(msg: Image) -> np.ndarray:
    """An input image as the estimator takes it: HxW (mono) or HxWx3 RGB, uint8/uint16, native byte order.

    Always a view of the message data (channel reordering is a negative-stride view), except
    for big-endian 16-bit data, which is byte-swapped into a copy.
    """
    pixels = image_to_numpy(msg, INPUT_ENCODINGS)
    if pixels.dtype.byteorder == ">":
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    rgb_channels = PIXEL_FORMATS[msg.encoding].rgb_channels
    return pixels if rgb_channels is None else pixels[..., rgb_channels]


def numpy_to_image(values: np.ndarray, encoding: str, header: Header) -> Image:
    """HxW or HxWxC array -> little-endian Image with unpadded rows."""
    fmt = PIXEL_FORMATS[encoding]
    channels = 1 if values.ndim == 2 else values.shape[2]
    if channels != fmt.channels:
        raise ValueError(f"encoding {encoding} needs {fmt.channels} channels, got {channels}")
    values = values.astype(fmt.dtype, copy=False)  # little-endian on any machine
    msg = Image()
    msg.header = header
    msg.height, msg.width = int(values.shape[0]), int(values.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * fmt.channels * fmt.dtype.itemsize
    msg.data = _to_byte_array(values)
    return msg


def float_image(values: np.ndarray, header: Header) -> Image:
    """float32 HxW -> 32FC1 Image (depth in metres per REP 118, confidence, ...)."""
    return numpy_to_image(values.astype(np.float32, copy=False), "32FC1", header)


def geometry_from_camera_infos(left: CameraInfo, right: CameraInfo) -> StereoGeometry:
    """Stereo geometry from the rectified projections; ValueError naming the problem."""
    return StereoGeometry.from_projections(np.asarray(left.p), np.asarray(right.p))


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


def disparity_image(disparity: np.ndarray, header: Header, geometry: StereoGeometry,
                    min_disparity: float, max_disparity: float, delta_d: float) -> DisparityImage:
    """stereo_msgs/DisparityImage the way stereo_image_proc fills it.

    `disparity` is the raw matcher output (x_left - x_right, NaN invalid). As stereo_image_proc
    does, the published values are shifted by the principal point offset, d' = d - (cx_l - cx_r),
    so that the message's own contract Z = f * T / d' holds; min/max_disparity are given in the
    same shifted units. Invalid pixels are set to min_disparity - 1 (below the valid range).
    """
    offset = np.float32(geometry.disparity_offset)
    shifted_min = float(min_disparity - offset)
    data, values = _message_buffer(disparity.shape, np.dtype("<f4"))  # (H, W)
    np.subtract(disparity, offset, out=values)
    valid = np.isfinite(values)
    values[~valid] = np.float32(shifted_min - 1.0)
    window = valid_window(valid)
    msg = DisparityImage()
    msg.header = header
    msg.image = Image(header=header, height=values.shape[0], width=values.shape[1], encoding="32FC1",
                      is_bigendian=0, step=values.shape[1] * 4)
    msg.image.data = data
    msg.f = float(geometry.fx)
    msg.t = float(geometry.baseline_m)
    msg.min_disparity = shifted_min
    msg.max_disparity = float(max_disparity - offset)
    msg.delta_d = float(delta_d)
    msg.valid_window.x_offset = window.x_offset
    msg.valid_window.y_offset = window.y_offset
    msg.valid_window.width = window.width
    msg.valid_window.height = window.height
    return msg


def disparity_from_msg(msg: DisparityImage) -> np.ndarray:
    """Published disparity back to float32 HxW with NaN where invalid (below min_disparity)."""
    values = image_to_numpy(msg.image, ("32FC1",)).astype(np.float32)
    values[values < msg.min_disparity] = np.nan
    return values


def _point_fields(with_color: bool) -> list[PointField]:
    names = ("x", "y", "z", "rgb") if with_color else ("x", "y", "z")
    return [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
            for i, name in enumerate(names)]


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 ...x3 RGB -> float32 ... holding 0x00RRGGBB in its bits (PCL's packed rgb)."""
    packed = np.zeros(rgb.shape[:-1], dtype="<u4")
    # Little-endian 0x00RRGGBB is the byte sequence B, G, R, 0: one strided byte copy.
    packed_bytes = packed.view(np.uint8).reshape(rgb.shape[:-1] + (4,))
    for byte, channel in ((0, 2), (1, 1), (2, 0)):
        packed_bytes[..., byte] = rgb[..., channel]
    return packed.view("<f4")


def color_for_points(image_rgb: np.ndarray) -> np.ndarray:
    """Estimator-ready image (HxW or HxWx3, uint8/uint16) -> uint8 HxWx3 RGB for point colours."""
    if image_rgb.dtype == np.uint16:
        image_rgb = (image_rgb >> 8).astype(np.uint8)
    if image_rgb.ndim == 2:
        image_rgb = image_rgb[..., None]
    return np.broadcast_to(image_rgb, image_rgb.shape[:2] + (3,))


def point_cloud(points: np.ndarray, header: Header, color: np.ndarray | None = None,
                dense: bool = False) -> PointCloud2:
    """PointCloud2 from float32 HxWx3 points (NaN invalid) and optional uint8 HxWx3 RGB.

    Organized (height H, width W, is_dense false) unless `dense`, which keeps only the
    finite points in one row (is_dense true).
    """
    height, width = points.shape[:2]
    channels = 4 if color is not None else 3
    if dense:
        keep = np.isfinite(points[..., 2])
        points, color = points[keep][None], None if color is None else color[keep][None]  # (1, N, ...)
        height, width = points.shape[:2]
    data, cloud = _message_buffer((height, width, channels), np.dtype("<f4"))  # (H, W, x y z [rgb])
    if color is None:
        cloud[...] = points
    else:
        # Copying (H, W, 3) into (H, W, 4)[..., :3] in NumPy runs a 3-long inner loop; OpenCV's
        # RGB -> RGBA writes the same interleaving in one vectorised pass (4th value replaced next).
        cv2.cvtColor(np.ascontiguousarray(points), cv2.COLOR_RGB2RGBA, dst=cloud)
        # Packed rgb as little-endian 0x00RRGGBB: bytes B, G, R, 0 at offset 12 of each point.
        cloud_bytes = cloud.view(np.uint8).reshape(height, width, 4 * channels)
        for byte, channel in ((12, 2), (13, 1), (14, 0)):  # per channel: long inner loops
            cloud_bytes[..., byte] = color[..., channel]
        cloud_bytes[..., 15] = 0
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = int(height), int(width)
    msg.fields = _point_fields(color is not None)
    msg.is_bigendian = 0  # built little-endian on any machine
    msg.point_step = 4 * channels
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = bool(dense)
    msg.data = data
    return msg


def point_cloud_to_numpy(msg: PointCloud2) -> np.ndarray:
    """float32 (height, width, fields) view of a cloud built by `point_cloud`."""
    channels = msg.point_step // 4
    return np.frombuffer(msg.data, dtype="<f4").reshape(msg.height, msg.width, channels)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_rgb: float32 ... -> uint8 ...x3."""
    bits = np.ascontiguousarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF], axis=-1).astype(np.uint8)
