"""File formats against hand-written bytes and hand-computed values."""

import struct

import cv2
import numpy as np
import pytest

from stereo_kd_core.data.io import (
    read_image_rgb,
    read_kitti_disparity,
    read_middlebury_calib,
    read_pfm,
    write_kitti_disparity,
    write_middlebury_calib,
    write_pfm,
)


def test_read_pfm_grey_little_endian_rows_are_stored_bottom_up(tmp_path):
    # a 3 x 2 image; the file lists the bottom row first
    bottom, top = [4.0, 5.0, 6.5], [1.0, -2.0, np.inf]
    path = tmp_path / "grey.pfm"
    path.write_bytes(b"Pf\n3 2\n-1.0\n" + struct.pack("<6f", *bottom, *top))
    image = read_pfm(path)
    assert image.dtype == np.float32 and image.shape == (2, 3)
    np.testing.assert_array_equal(image, [top, bottom])


def test_read_pfm_colour_big_endian(tmp_path):
    # positive scale = big endian; 2 x 1 image of RGB triples
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    path = tmp_path / "colour.pfm"
    path.write_bytes(b"PF\n2 1\n1.0\n" + struct.pack(">6f", *values))
    image = read_pfm(path)
    assert image.shape == (1, 2, 3)
    np.testing.assert_array_equal(image[0], [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("shape", [(3, 5), (4, 2, 3)])
def test_pfm_round_trip(tmp_path, shape):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    array.flat[0] = np.inf
    path = tmp_path / "x.pfm"
    write_pfm(path, array)
    header = b"Pf\n" if len(shape) == 2 else b"PF\n"
    assert path.read_bytes().startswith(header + f"{shape[1]} {shape[0]}\n-1.0\n".encode())
    np.testing.assert_array_equal(read_pfm(path), array)


def test_pfm_rejects_other_files_and_shapes(tmp_path):
    path = tmp_path / "bad.pfm"
    path.write_bytes(b"P6\n1 1\n255\n\x00\x00\x00")
    with pytest.raises(ValueError, match="bad.pfm"):
        read_pfm(path)
    path.write_bytes(b"Pf\n4 4\n-1.0\n" + b"\x00" * 8)
    with pytest.raises(ValueError, match="truncated|values"):
        read_pfm(path)
    with pytest.raises(ValueError):
        write_pfm(tmp_path / "y.pfm", np.zeros((2, 2, 2)))


def test_kitti_disparity_round_trip_and_encoding(tmp_path):
    disparity = np.array([[0.0, 1.5, np.nan], [100.25, -3.0, 0.001]], dtype=np.float32)
    path = tmp_path / "000000_10.png"
    write_kitti_disparity(path, disparity)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    # 1.5 * 256 = 384, 100.25 * 256 = 25664; 0, NaN, negative -> 0; a tiny positive stays valid as 1
    np.testing.assert_array_equal(raw, [[0, 384, 0], [25664, 0, 1]])
    read = read_kitti_disparity(path)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, [[np.nan, 1.5, np.nan], [100.25, np.nan, 1 / 256]])


def test_read_image_rgb_conversions(tmp_path):
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[0, 0] = (255, 0, 0)  # blue in OpenCV order
    cv2.imwrite(str(tmp_path / "colour.png"), bgr)
    assert tuple(read_image_rgb(tmp_path / "colour.png")[0, 0]) == (0, 0, 255)

    cv2.imwrite(str(tmp_path / "grey.png"), np.array([[7, 200]], np.uint8))
    grey = read_image_rgb(tmp_path / "grey.png")
    assert grey.shape == (1, 2, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[0], [[7, 7, 7], [200, 200, 200]])

    cv2.imwrite(str(tmp_path / "deep.png"), np.array([[65535, 2570]], np.uint16))
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "deep.png")[0, :, 0], [255, 10])

    bgra = np.full((1, 1, 4), (10, 20, 30, 0), np.uint8)
    cv2.imwrite(str(tmp_path / "alpha.png"), bgra)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "alpha.png")[0, 0], [30, 20, 10])


def test_read_image_rgb_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_rgb(tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="corrupt.png"):
        read_image_rgb(tmp_path / "corrupt.png")


def test_read_middlebury_calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(
        "cam0=[3997.684 0 1176.728; 0 3997.684 1011.728; 0 0 1]\n"
        "cam1=[3997.684 0 1307.839; 0 3997.684 1011.728; 0 0 1]\n"
        "doffs=131.111\nbaseline=193.001\nwidth=2964\nheight=1988\nndisp=280\nisint=0\nvmin=31\ndyavg=0.918\n"
    )
    calib = read_middlebury_calib(path)
    np.testing.assert_array_equal(calib["cam1"], [[3997.684, 0, 1307.839], [0, 3997.684, 1011.728], [0, 0, 1]])
    assert calib["doffs"] == 131.111 and calib["baseline"] == 193.001
    assert (calib["width"], calib["height"], calib["ndisp"], calib["dyavg"]) == (2964, 1988, 280, 0.918)


def test_middlebury_calib_round_trip(tmp_path):
    path = tmp_path / "calib.txt"
    write_middlebury_calib(path, focal_px=712.5, cx0=320.25, cx1=331.75, cy=240.5, baseline_mm=120.0,
                           width=640, height=480, ndisp=192)
    calib = read_middlebury_calib(path)
    np.testing.assert_array_equal(calib["cam0"], [[712.5, 0, 320.25], [0, 712.5, 240.5], [0, 0, 1]])
    assert calib["cam1"][0, 2] == 331.75
    assert calib["doffs"] == pytest.approx(11.5)
    assert (calib["baseline"], calib["width"], calib["height"], calib["ndisp"]) == (120.0, 640, 480, 192)
