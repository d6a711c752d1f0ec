"""Image encodings, padded rows, byte order and cloud packing (pure unit tests)."""

import numpy as np
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from stereo_kd_ros.conversions import (
    ImageFormatError,
    image_to_numpy,
    image_to_rgb,
    numpy_to_image,
    pack_rgb,
    unpack_rgb,
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
    # A view of the message buffer, not a copy.
    assert np.shares_memory(rgb, np.frombuffer(msg.data, dtype=np.uint8))


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
