"""Our image conversions and PointCloud2 building against the ROS reference implementations,
cv_bridge.CvBridge and sensor_msgs_py.point_cloud2, byte for byte, where those import (a
colcon install on a ROS system; package.xml lists them as test dependencies)."""

import sys

import numpy as np
import pytest
from sensor_msgs.msg import Image, PointField
from std_msgs.msg import Header

from stereo_kd_ros.conversions import (
    INPUT_ENCODINGS,
    PIXEL_FORMATS,
    image_to_numpy,
    image_to_rgb,
    numpy_to_image,
    point_cloud,
)

RNG = np.random.default_rng(11)
HEIGHT, WIDTH = 6, 9
# Encodings image_to_rgb turns into RGB by reordering channels, and the cv_bridge target for them.
TO_RGB = {"rgb8": "rgb8", "bgr8": "rgb8", "rgba8": "rgb8", "bgra8": "rgb8"}


def image_values(encoding: str) -> np.ndarray:
    fmt = PIXEL_FORMATS[encoding]
    shape = (HEIGHT, WIDTH) if fmt.channels == 1 else (HEIGHT, WIDTH, fmt.channels)
    return RNG.integers(0, np.iinfo(fmt.dtype).max + 1, size=shape).astype(fmt.dtype.newbyteorder("="))


def image_message(values: np.ndarray, encoding: str, padding_pixels: int, big_endian: bool) -> Image:
    """An Image with `padding_pixels` whole pixels of 0xAB padding per row, in either byte order."""
    pixel_bytes = values.dtype.itemsize * (1 if values.ndim == 2 else values.shape[2])
    row_bytes = WIDTH * pixel_bytes
    step = row_bytes + padding_pixels * pixel_bytes
    rows = np.full((HEIGHT, step), 0xAB, dtype=np.uint8)
    ordered = values.astype(values.dtype.newbyteorder(">" if big_endian else "<"))
    rows[:, :row_bytes] = ordered.reshape(HEIGHT, -1).view(np.uint8)
    msg = Image(height=HEIGHT, width=WIDTH, encoding=encoding, is_bigendian=int(big_endian), step=step)
    msg.data = rows.tobytes()
    return msg


def native_bytes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values.astype(values.dtype.newbyteorder("="))).tobytes()


def bridge_decode(bridge, msg: Image, desired_encoding: str = "passthrough") -> np.ndarray:
    try:
        return bridge.imgmsg_to_cv2(msg, desired_encoding=desired_encoding)
    except AttributeError as error:  # its byte swap calls ndarray.newbyteorder, gone in NumPy 2
        if msg.is_bigendian and "newbyteorder" in str(error):
            pytest.skip(f"cv_bridge cannot decode big-endian images on NumPy {np.__version__}")
        raise


@pytest.mark.parametrize("encoding", INPUT_ENCODINGS)
@pytest.mark.parametrize("padding_pixels", [0, 2])
@pytest.mark.parametrize("big_endian", [False, True])
def test_image_decoding_matches_cv_bridge(encoding, padding_pixels, big_endian):
    cv_bridge = pytest.importorskip("cv_bridge")
    bridge = cv_bridge.CvBridge()
    values = image_values(encoding)
    msg = image_message(values, encoding, padding_pixels, big_endian)
    theirs = bridge_decode(bridge, msg)
    ours = image_to_numpy(msg)
    assert ours.shape == theirs.shape and ours.dtype.itemsize == theirs.dtype.itemsize
    assert native_bytes(ours) == native_bytes(theirs) == native_bytes(values)
    # What the estimator gets: RGB (or mono) in native byte order.
    rgb = image_to_rgb(msg)
    if encoding in TO_RGB:
        expected = bridge_decode(bridge, msg, TO_RGB[encoding])
    elif encoding == "8UC3":  # no colour order of its own: read as OpenCV's BGR
        expected = theirs[..., ::-1]
    else:
        expected = theirs
    assert rgb.dtype.byteorder in "=|" and rgb.shape == expected.shape
    assert native_bytes(rgb) == native_bytes(expected)


@pytest.mark.parametrize("encoding", [e for e in INPUT_ENCODINGS if e != "8UC3"] + ["32FC1"])
def test_image_encoding_matches_cv_bridge(encoding):
    cv_bridge = pytest.importorskip("cv_bridge")
    values = (RNG.random((HEIGHT, WIDTH)).astype(np.float32) if encoding == "32FC1"
              else image_values(encoding))
    ours = numpy_to_image(values, encoding, Header(frame_id="cam"))
    theirs = cv_bridge.CvBridge().cv2_to_imgmsg(values, encoding=encoding, header=Header(frame_id="cam"))
    assert (ours.height, ours.width, ours.encoding, ours.step) == (
        theirs.height, theirs.width, theirs.encoding, theirs.step)
    assert bool(ours.is_bigendian) == bool(theirs.is_bigendian) == (sys.byteorder == "big")
    assert bytes(ours.data) == bytes(theirs.data)


def reference_fields(with_color: bool) -> list[PointField]:
    names = ("x", "y", "z", "rgb") if with_color else ("x", "y", "z")
    return [PointField(name=name, offset=4 * index, datatype=PointField.FLOAT32, count=1)
            for index, name in enumerate(names)]


@pytest.mark.parametrize("with_color", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_point_clouds_match_sensor_msgs_py(with_color, dense):
    point_cloud2 = pytest.importorskip("sensor_msgs_py.point_cloud2")
    points = RNG.normal(size=(HEIGHT, WIDTH, 3)).astype(np.float32)  # (H, W, 3) metres
    points[1, 2:5] = np.nan
    points[4, 0, 2] = np.nan
    color = RNG.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    ours = point_cloud(points, Header(frame_id="cam"), color if with_color else None, dense=dense)

    # The reference cloud from the same points, rgb packed as PCL does: 0x00RRGGBB in a float's bits.
    fields = reference_fields(with_color)
    rows = np.zeros(HEIGHT * WIDTH, dtype=point_cloud2.dtype_from_fields(fields))  # (N,)
    for axis, name in enumerate("xyz"):
        rows[name] = points.reshape(-1, 3)[:, axis]
    if with_color:
        rgb = color.reshape(-1, 3).astype(np.uint32)
        rows["rgb"] = ((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).astype("<u4").view("<f4")
    if dense:
        rows = rows[np.isfinite(points.reshape(-1, 3)[:, 2])]
    theirs = point_cloud2.create_cloud(Header(frame_id="cam"), fields, rows)

    assert [(f.name, f.offset, f.datatype, f.count) for f in ours.fields] == [
        (f.name, f.offset, f.datatype, f.count) for f in theirs.fields]
    assert (ours.point_step, bool(ours.is_bigendian)) == (theirs.point_step, bool(theirs.is_bigendian))
    assert bytes(ours.data) == bytes(theirs.data)
    assert ours.height * ours.width == theirs.width
    if dense:
        assert (ours.height, ours.is_dense) == (1, True)
    else:
        assert (ours.height, ours.width, ours.row_step, ours.is_dense) == (
            HEIGHT, WIDTH, WIDTH * ours.point_step, False)
    # And the reference reader gets the points back.
    xyz = point_cloud2.read_points_numpy(ours, field_names=["x", "y", "z"])
    assert np.array_equal(xyz, np.stack([rows[name] for name in "xyz"], axis=-1), equal_nan=True)
