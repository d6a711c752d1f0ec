"""Image encodings, padded rows, byte order, cloud packing, depth images and camera_info (pure
unit tests)."""

import numpy as np
import pytest
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import Header

from stereo_kd_core.geometry import PinholeCamera, StereoGeometry
from stereo_kd_ros.conversions import (
    ImageFormatError,
    camera_info,
    dense_cloud,
    depth_image,
    disparity_from_msg,
    disparity_image,
    estimator_image_encoding,
    float_image,
    image_to_numpy,
    image_to_rgb,
    numpy_to_image,
    organized_cloud,
    pack_rgb,
    point_cloud,
    point_cloud_to_numpy,
    unpack_rgb,
    write_cloud,
    write_packed_rgb,
    write_points,
)

RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def padded(values: np.ndarray, encoding: str, padding: int, big_endian: bool = False) -> Image:
    """Image with `padding` extra bytes at the end of every row (filled with 0xAB)."""
    row_bytes = values[0].size * values.dtype.itemsize
    rows = np.full((values.shape[0], row_bytes + padding), 0xAB, dtype=np.uint8)
    ordered = values.astype(values.dtype.newbyteorder(">" if big_endian else "<"))
    rows[:, :row_bytes] = ordered.reshape(values.shape[0], -1).view(np.uint8)
    msg = Image(height=values.shape[0], width=values.shape[1], encoding=encoding,
                is_bigendian=int(big_endian), step=row_bytes + padding)
    msg.data = rows.tobytes()
    return msg


@pytest.mark.parametrize("encoding, pixels", [
    ("rgb8", RGB), ("bgr8", RGB[..., ::-1]), ("8UC3", RGB[..., ::-1]),
    ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])),
    ("bgra8", np.dstack([RGB[..., ::-1], np.full(RGB.shape[:2], 9, np.uint8)])),
])
@pytest.mark.parametrize("padding", [0, 3])
def test_colour_encodings_decode_to_rgb(encoding, pixels, padding):
    msg = padded(np.ascontiguousarray(pixels), encoding, padding)
    rgb = image_to_rgb(msg)
    np.testing.assert_array_equal(rgb, RGB)
    # rgb8 is a view of the message buffer; reordered encodings one contiguous OpenCV copy.
    assert np.shares_memory(rgb, np.frombuffer(msg.data, dtype=np.uint8)) == (encoding == "rgb8")
    assert encoding == "rgb8" or rgb.flags.c_contiguous


@pytest.mark.parametrize("encoding, dtype", [("mono8", np.uint8), ("8UC1", np.uint8), ("mono16", np.uint16)])
@pytest.mark.parametrize("padding", [0, 2, 5])
@pytest.mark.parametrize("big_endian", [False, True])
def test_mono_encodings_padding_and_byte_order(encoding, dtype, padding, big_endian):
    values = RNG.integers(0, np.iinfo(dtype).max, size=(4, 6), endpoint=True).astype(dtype)
    msg = padded(values, encoding, padding, big_endian)
    decoded = image_to_rgb(msg)
    assert decoded.dtype == dtype and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, values)


def test_big_endian_mono16_known_bytes():
    msg = Image(height=1, width=2, encoding="mono16", is_bigendian=1, step=4)
    msg.data = bytes([0x01, 0x02, 0xFF, 0x00])
    np.testing.assert_array_equal(image_to_rgb(msg), [[0x0102, 0xFF00]])


def test_round_trip_through_numpy_to_image():
    msg = numpy_to_image(RGB, "rgb8", Header(frame_id="f"))
    assert (msg.step, msg.is_bigendian, msg.header.frame_id) == (21, 0, "f")
    np.testing.assert_array_equal(image_to_numpy(msg), RGB)
    values = np.array([[0.5, np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(image_to_numpy(numpy_to_image(values, "32FC1", Header())), values)


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: setattr(m, "encoding", "yuv422"), "unsupported_encoding"),
    (lambda m: setattr(m, "step", 6), "step_too_small"),       # 7 mono8 pixels need 7 bytes
    (lambda m: setattr(m, "data", m.data[:-2]), "data_length"),
    (lambda m: setattr(m, "height", 0), "empty_image"),
])
def test_malformed_images_raise_with_reason(mutate, reason):
    msg = numpy_to_image(RGB[..., 0], "mono8", Header())
    mutate(msg)
    with pytest.raises(ImageFormatError) as raised:
        image_to_rgb(msg)
    assert raised.value.reason == reason


def test_packed_rgb_bits():
    packed = pack_rgb(np.array([[0x12, 0x34, 0x56]], dtype=np.uint8))
    assert packed.view(np.uint32)[0] == 0x00123456
    np.testing.assert_array_equal(unpack_rgb(pack_rgb(RGB)), RGB)


def test_packed_rgb_from_grey_and_16_bit_images():
    cloud = np.zeros((2, 3, 4), dtype=np.float32)
    grey = np.array([[0, 1, 2], [250, 254, 255]], dtype=np.uint8)
    write_packed_rgb(cloud, grey)
    np.testing.assert_array_equal(cloud.view(np.uint32)[..., 3], grey.astype(np.uint32) * 0x010101)
    # 16-bit colour is scaled by the image's peak: 12-bit data (x 16) packs like the 8-bit original
    rgb = RGB[:2, :3].copy()
    rgb[0, 0] = 255  # the 8-bit original reaches full scale
    write_packed_rgb(cloud, rgb.astype(np.uint16) * 16)
    np.testing.assert_array_equal(unpack_rgb(cloud[..., 3]), rgb)
    assert not cloud[..., :3].any()  # x y z untouched


def test_messages_passed_back_are_rewritten_in_place():
    geometry = StereoGeometry.from_intrinsics(100.0, 3.0, 2.0, 0.1, cx_right=1.0)  # offset 2 px
    first = np.array([[4.0, np.nan], [12.0, 7.0]], dtype=np.float32)
    msg = disparity_image(first, Header(frame_id="a"), geometry, 0.0, 31.0, 1 / 16)
    buffer = msg.image.data
    second = np.array([[np.nan, 3.0], [5.0, np.nan]], dtype=np.float32)
    again = disparity_image(second, Header(frame_id="b"), geometry, 0.0, 31.0, 1 / 16, msg=msg)
    assert again is msg and msg.image.data is buffer and msg.header.frame_id == "b"
    np.testing.assert_array_equal(disparity_from_msg(msg), second - 2.0)  # shifted by cx_l - cx_r
    window = msg.valid_window
    assert (window.x_offset, window.y_offset, window.width, window.height) == (0, 0, 2, 2)
    # A different size gets a new buffer of the right length.
    disparity_image(np.full((1, 3), 9.0, np.float32), Header(), geometry, 0.0, 31.0, 1 / 16, msg=msg)
    assert (msg.image.height, msg.image.width, len(msg.image.data)) == (1, 3, 12)
    np.testing.assert_array_equal(disparity_from_msg(msg), [[7.0, 7.0, 7.0]])

    depth = float_image(first, Header())
    depth_buffer = depth.data
    float_image(second, Header(), msg=depth)
    assert depth.data is depth_buffer
    np.testing.assert_array_equal(np.frombuffer(depth.data, np.float32).reshape(2, 2), second)


def test_organized_and_dense_clouds():
    points = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    points[0, 1] = np.nan
    colour = RGB[:2, :3]
    msg = point_cloud(points, Header(frame_id="f"), colour)
    cloud = point_cloud_to_numpy(msg)
    assert (msg.height, msg.width, msg.point_step, msg.row_step, msg.is_dense) == (2, 3, 16, 48, False)
    assert [(f.name, f.offset) for f in msg.fields] == [("x", 0), ("y", 4), ("z", 8), ("rgb", 12)]
    np.testing.assert_array_equal(cloud[..., :3], points)
    np.testing.assert_array_equal(unpack_rgb(cloud[..., 3]), colour)

    reused = PointCloud2()
    view = organized_cloud(reused, Header(), 2, 3, with_color=False)
    buffer = reused.data
    write_points(view, points)
    assert organized_cloud(reused, Header(), 2, 3, with_color=False) is not None and reused.data is buffer
    np.testing.assert_array_equal(point_cloud_to_numpy(reused), points)
    assert [f.name for f in reused.fields] == ["x", "y", "z"] and reused.point_step == 12

    dense = dense_cloud(cloud, Header())
    kept = point_cloud_to_numpy(dense)[0]
    assert (dense.height, dense.width, dense.is_dense) == (1, 5, True)
    np.testing.assert_array_equal(kept[:, :3], np.delete(points.reshape(-1, 3), 1, axis=0))


def test_depth_image_encodings():
    depth_m = np.array([[np.nan, 0.0004, 0.0015, 1.2344], [2.0, 65.535, 65.536, np.inf]], dtype=np.float32)
    metres = depth_image(depth_m, Header(frame_id="l"))
    assert (metres.encoding, metres.step, metres.is_bigendian) == ("32FC1", 16, 0)
    np.testing.assert_array_equal(np.frombuffer(metres.data, "<f4").reshape(2, 4), depth_m)

    millimetres = depth_image(depth_m, Header(frame_id="l"), "16UC1")
    assert (millimetres.encoding, millimetres.step, millimetres.header.frame_id) == ("16UC1", 8, "l")
    values = np.frombuffer(millimetres.data, "<u2").reshape(2, 4)
    # round(1000 x metres); 0 = invalid: NaN, below half a millimetre, beyond 65.535 m, inf.
    np.testing.assert_array_equal(values, [[0, 0, 2, 1234], [2000, 65535, 0, 0]])
    buffer = millimetres.data
    depth_image(np.full((2, 4), 0.5, np.float32), Header(), "16UC1", msg=millimetres)
    assert millimetres.data is buffer and np.all(np.frombuffer(buffer, "<u2") == 500)
    with pytest.raises(ValueError, match="16UC1"):
        depth_image(depth_m, Header(), "mono16")


def test_camera_info_of_a_rectified_camera():
    camera = PinholeCamera(width=64, height=48, fx=50.0, fy=51.0, cx=31.75, cy=23.75)
    msg = camera_info(camera, Header(frame_id="left_optical"))
    assert (msg.width, msg.height, msg.header.frame_id) == (64, 48, "left_optical")
    assert msg.distortion_model == "plumb_bob" and list(msg.d) == [0.0] * 5
    np.testing.assert_array_equal(np.reshape(msg.k, (3, 3)), camera.K)
    np.testing.assert_array_equal(np.reshape(msg.r, (3, 3)), np.eye(3))
    np.testing.assert_array_equal(np.reshape(msg.p, (3, 4)), [[50, 0, 31.75, 0], [0, 51, 23.75, 0], [0, 0, 1, 0]])
    assert (msg.binning_x, msg.binning_y, msg.roi.width, msg.roi.height) == (0, 0, 0, 0)  # full image
    again = camera_info(PinholeCamera(32, 24, 25.0, 25.5, 15.75, 11.75), Header(frame_id="b"), msg=msg)
    assert again is msg and (msg.width, msg.height, msg.p[0], msg.header.frame_id) == (32, 24, 25.0, "b")


def test_estimator_images_get_their_encoding_and_reuse_the_message():
    for pixels, encoding in ((RGB, "rgb8"), (RGB[..., 0], "mono8"), (RGB[..., 0].astype(np.uint16) * 200, "mono16")):
        assert estimator_image_encoding(pixels) == encoding
        msg = numpy_to_image(pixels, encoding, Header())
        buffer = msg.data
        assert numpy_to_image(pixels[::-1].copy(), encoding, Header(), msg=msg) is msg and msg.data is buffer
        np.testing.assert_array_equal(image_to_numpy(msg), pixels[::-1])
    with pytest.raises(ValueError):
        estimator_image_encoding(RGB.astype(np.float32))


def test_disparity_payload_marks_nan_and_infinities_below_the_range_and_keeps_the_rest_exactly():
    geometry = StereoGeometry.from_intrinsics(100.0, 3.0, 2.0, 0.1, cx_right=1.0)  # offset 2 px
    disparity = np.array([[4.25, np.nan, np.inf], [-np.inf, 12.0, 7.5]], dtype=np.float32)
    msg = disparity_image(disparity, Header(), geometry, 0.0, 31.0, 1 / 16)
    values = np.frombuffer(msg.image.data, np.float32).reshape(2, 3)
    # invalid = min_disparity - 1 in shifted units: 0 - 2 - 1
    np.testing.assert_array_equal(values, [[2.25, -3.0, -3.0], [-3.0, 10.0, 5.5]])
    window = msg.valid_window
    assert (window.x_offset, window.y_offset, window.width, window.height) == (0, 0, 3, 2)


@pytest.mark.parametrize("image", [RGB, RGB[..., 1], RGB.astype(np.uint16) * 16, None],
                         ids=["rgb8", "grey8", "rgb16", "no colour"])
def test_write_cloud_interleaves_planes_and_colour_like_the_field_writers(image):
    planes = tuple(RNG.normal(size=(5, 7)).astype(np.float32) for _ in range(3))
    planes[2][1, 2] = np.nan
    channels = 3 if image is None else 4
    expected = np.zeros((5, 7, channels), dtype=np.float32)
    write_points(expected, np.stack(planes, axis=-1))
    if image is not None:
        write_packed_rgb(expected, image)
    cloud = np.full((5, 7, channels), 9.0, dtype=np.float32)
    write_cloud(cloud, planes, image)  # in place
    np.testing.assert_array_equal(cloud.view(np.uint32), expected.view(np.uint32))
    # strided planes (views of an estimator's (H, W, 3) points) give the same cloud
    strided = np.stack(planes, axis=-1)
    cloud[:] = 9.0
    write_cloud(cloud, tuple(strided[..., axis] for axis in range(3)), image)
    np.testing.assert_array_equal(cloud.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(ValueError, match="fields"):
        write_cloud(np.zeros((5, 7, 4), np.float32), planes, None)
