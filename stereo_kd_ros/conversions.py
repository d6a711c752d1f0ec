"""ROS message <-> NumPy conversions: images, DisparityImage, PointCloud2, camera geometry.

Incoming image data is viewed in place (no copy) whenever the layout allows it: rclpy hands
`msg.data` over as an `array.array('B')`, which NumPy can wrap with `np.frombuffer`.

Outgoing data is written in place into the message's own `array.array('B')`: the generated
`data` setter copies whatever it is given (array.array, bytes; a memoryview is converted
element by element, about 1000x slower), so a message passed back in through `msg=` keeps its
buffer and is rewritten frame after frame without any allocation or setter copy.
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header
from stereo_msgs.msg import DisparityImage

from stereo_kd_core.geometry import PinholeCamera, StereoGeometry
from stereo_kd_ros.payloads import (  # noqa: F401 (re-exported: the node's conversions in one place)
    DEPTH_ENCODINGS,
    INPUT_ENCODINGS,
    PIXEL_FORMATS,
    ImageFormatError,
    PixelFormat,
    ValidWindow,
    camera_info_payload,
    depth_millimetres,
    disparity_payload,
    estimator_image_encoding,
    image_to_numpy,
    image_to_rgb,
    pack_rgb,
    stamp_to_ns,
    unpack_rgb,
    valid_window,
    write_cloud,
    write_packed_rgb,
    write_points,
)


def writable_data(owner: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`owner.data` (a message's byte array) as a writable NumPy array of `shape`, in place.

    The message's existing buffer is reused when its size already fits; otherwise a zeroed one
    of the right size is assigned first.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if len(owner.data) != size:
        owner.data = array.array("B", bytes(size))
    return np.frombuffer(owner.data, dtype=dtype).reshape(shape)


def numpy_to_image(values: np.ndarray, encoding: str, header: Header, msg: Image | None = None) -> Image:
    """HxW or HxWxC array -> little-endian Image with unpadded rows.

    `msg`: a message returned by an earlier call, rewritten in place (its buffer reused).
    """
    fmt = PIXEL_FORMATS[encoding]
    channels = 1 if values.ndim == 2 else values.shape[2]
    if channels != fmt.channels:
        raise ValueError(f"encoding {encoding} needs {fmt.channels} channels, got {channels}")
    msg = Image() if msg is None else msg
    msg.header = header
    msg.height, msg.width = int(values.shape[0]), int(values.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * fmt.channels * fmt.dtype.itemsize
    writable_data(msg, values.shape, fmt.dtype)[...] = values  # little-endian on any machine
    return msg


def float_image(values: np.ndarray, header: Header, msg: Image | None = None) -> Image:
    """float32 HxW -> 32FC1 Image (depth in metres per REP 118, confidence, ...).

    `msg`: a message returned by an earlier call, rewritten in place (its buffer reused).
    """
    msg = Image() if msg is None else msg
    height, width = values.shape
    msg.header = header
    msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = height, width, "32FC1", 0, width * 4
    writable_data(msg, (height, width), np.dtype("<f4"))[...] = values
    return msg


def depth_image(depth_m: np.ndarray, header: Header, encoding: str = "32FC1",
                msg: Image | None = None) -> Image:
    """float32 HxW depth in metres (NaN invalid) -> depth Image: 32FC1 metres, NaN invalid (REP 118),
    or 16UC1 millimetres, 0 invalid (see payloads.depth_millimetres).

    `msg`: a message returned by an earlier call, rewritten in place (its buffer reused).
    """
    if encoding == "32FC1":
        return float_image(depth_m, header, msg=msg)
    if encoding != "16UC1":
        raise ValueError(f"depth encoding must be one of {', '.join(DEPTH_ENCODINGS)}, got '{encoding}'")
    msg = Image() if msg is None else msg
    height, width = depth_m.shape
    msg.header = header
    msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = height, width, "16UC1", 0, width * 2
    depth_millimetres(depth_m, out=writable_data(msg, (height, width), np.dtype("<u2")))
    return msg


def camera_info(camera: PinholeCamera, header: Header, msg: CameraInfo | None = None) -> CameraInfo:
    """CameraInfo of an image seen through the rectified `camera` (D 0, R identity, P = [K | 0]).

    `msg`: a message returned by an earlier call, rewritten in place.
    """
    msg = CameraInfo() if msg is None else msg
    payload = camera_info_payload(camera)
    msg.header = header
    msg.width, msg.height = payload.width, payload.height
    msg.distortion_model = payload.distortion_model
    msg.d, msg.k, msg.r, msg.p = payload.d, payload.k, payload.r, payload.p
    return msg


def geometry_from_camera_infos(left: CameraInfo, right: CameraInfo) -> StereoGeometry:
    """Stereo geometry from the rectified projections; ValueError naming the problem."""
    return StereoGeometry.from_projections(np.asarray(left.p), np.asarray(right.p))


def disparity_image(disparity: np.ndarray, header: Header, geometry: StereoGeometry,
                    min_disparity: float, max_disparity: float, delta_d: float,
                    msg: DisparityImage | None = None) -> DisparityImage:
    """stereo_msgs/DisparityImage the way stereo_image_proc fills it.

    `disparity` is the raw matcher output (x_left - x_right, NaN invalid). As stereo_image_proc
    does, the published values are shifted by the principal point offset, d' = d - (cx_l - cx_r),
    so that the message's own contract Z = f * T / d' holds; min/max_disparity are given in the
    same shifted units. Invalid pixels are set to min_disparity - 1 (below the valid range).
    `msg`: a message returned by an earlier call, rewritten in place (its buffer reused).
    """
    msg = DisparityImage() if msg is None else msg
    height, width = disparity.shape
    payload = disparity_payload(disparity, geometry, min_disparity, max_disparity, delta_d,
                                out=writable_data(msg.image, (height, width), np.dtype("<f4")))
    msg.header = header
    image = msg.image
    image.header = header
    image.height, image.width, image.encoding, image.is_bigendian, image.step = height, width, "32FC1", 0, width * 4
    msg.f, msg.t = payload.f, payload.t
    msg.min_disparity, msg.max_disparity, msg.delta_d = payload.min_disparity, payload.max_disparity, payload.delta_d
    window = payload.valid_window
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


def organized_cloud(msg: PointCloud2, header: Header, height: int, width: int,
                    with_color: bool) -> np.ndarray:
    """Lay `msg` out as an organized x y z [rgb] float32 cloud and return its data, writable in
    place: (H, W, 3 or 4). A message reused from the previous frame keeps its buffer."""
    channels = 4 if with_color else 3
    if msg.point_step != 4 * channels:
        msg.fields = _point_fields(with_color)
    msg.header = header
    msg.height, msg.width = int(height), int(width)
    msg.is_bigendian = False  # built little-endian on any machine
    msg.point_step = 4 * channels
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = False
    return writable_data(msg, (height, width, channels), np.dtype("<f4"))


def dense_cloud(cloud: np.ndarray, header: Header) -> PointCloud2:
    """PointCloud2 of the points of an organized (H, W, 3 or 4) cloud with finite z, in one row
    (is_dense true)."""
    kept = cloud[np.isfinite(cloud[..., 2])]  # (N, 3 or 4)
    msg = PointCloud2()
    organized_cloud(msg, header, 1, kept.shape[0], with_color=cloud.shape[2] == 4)[0] = kept
    msg.is_dense = True
    return msg


def point_cloud(points: np.ndarray, header: Header, color: np.ndarray | None = None,
                dense: bool = False) -> PointCloud2:
    """PointCloud2 from float32 HxWx3 points (NaN invalid) and optional HxW or HxWx3 image colours.

    Organized (height H, width W, is_dense false) unless `dense`, which keeps only the
    finite points in one row (is_dense true).
    """
    height, width = points.shape[:2]
    msg = PointCloud2()
    cloud = organized_cloud(msg, header, height, width, with_color=color is not None)
    write_points(cloud, points)
    if color is not None:
        write_packed_rgb(cloud, color)
    return dense_cloud(cloud, header) if dense else msg


def point_cloud_to_numpy(msg: PointCloud2) -> np.ndarray:
    """float32 (height, width, fields) view of a cloud built by `point_cloud`."""
    channels = msg.point_step // 4
    return np.frombuffer(msg.data, dtype="<f4").reshape(msg.height, msg.width, channels)


