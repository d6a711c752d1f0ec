"""`stereo-kd bag` / run_bag: a small bag written here goes through the estimator offline.

The written bag must keep every input message byte for byte and add disparity and points2
that equal the estimator's output run directly, encoded exactly as the node encodes them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from stereo_kd_core import StereoEstimator
from stereo_kd_core.cli import main as cli_main
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_ros import payloads
from stereo_kd_ros.bag import run_bag

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
T = TYPESTORE.types
HEIGHT, WIDTH, SHIFT_PX = 64, 96, 6
GEOMETRY = StereoGeometry.from_intrinsics(80.0, 47.5, 31.5, 0.12, cx_right=49.5)  # disparity offset -2
MAX_DISPARITY = 16
FRAME = "left_optical"


def textured_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB pair whose right image is the left one moved SHIFT_PX to the left (disparity SHIFT_PX)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(HEIGHT // 4, (WIDTH + SHIFT_PX) // 4 + 1, 3), dtype=np.uint8)
    wide = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))[:HEIGHT, : WIDTH + SHIFT_PX]
    return np.ascontiguousarray(wide[:, :WIDTH]), np.ascontiguousarray(wide[:, SHIFT_PX:])


def header(stamp_ns: int, frame_id: str):
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
        sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)


def image_msg(pixels: np.ndarray, encoding: str, stamp_ns: int):
    payload = payloads.image_payload(pixels, encoding)
    return T["sensor_msgs/msg/Image"](header=header(stamp_ns, FRAME), height=payload.height, width=payload.width,
                                      encoding=encoding, is_bigendian=0, step=payload.step, data=payload.data)


def info_msg(projection: np.ndarray, stamp_ns: int):
    roi = T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return T["sensor_msgs/msg/CameraInfo"](
        header=header(stamp_ns, FRAME), height=HEIGHT, width=WIDTH, distortion_model="plumb_bob",
        d=np.zeros(5), k=projection[:, :3].ravel().astype(np.float64), r=np.eye(3).ravel(),
        p=projection.ravel().astype(np.float64), binning_x=0, binning_y=0, roi=roi)


# (stamp ns, encoding) of the pairs; the last left image has no right partner.
PAIRS = [(1_000_000_000, "rgb8"), (1_100_000_000, "rgb8"), (1_200_000_000, "mono8")]
UNMATCHED_STAMP = 1_300_000_000


def pair_pixels(index: int, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    left, right = textured_pair(index)
    if encoding == "mono8":
        return left[..., 1].copy(), right[..., 1].copy()
    return left, right


def write_input_bag(path, storage: StoragePlugin) -> dict[str, list[bytes]]:
    """The test bag; returns the serialized messages per topic in write order."""
    written: dict[str, list[bytes]] = {}
    p_left, p_right = GEOMETRY.projection_matrices()
    with Writer(path, version=9, storage_plugin=storage) as writer:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=TYPESTORE) for topic, msgtype in (
            ("/left/camera_info", "sensor_msgs/msg/CameraInfo"), ("/right/camera_info", "sensor_msgs/msg/CameraInfo"),
            ("/left/image_rect", "sensor_msgs/msg/Image"), ("/right/image_rect", "sensor_msgs/msg/Image"),
            ("/chatter", "std_msgs/msg/String"))}

        def write(topic, msg, log_ns):
            raw = bytes(TYPESTORE.serialize_cdr(msg, msg.__msgtype__))
            writer.write(conns[topic], log_ns, raw)
            written.setdefault(topic, []).append(raw)

        write("/chatter", T["std_msgs/msg/String"](data="hello"), 900_000_000)
        for index, (stamp, encoding) in enumerate(PAIRS):
            left, right = pair_pixels(index, encoding)
            write("/left/camera_info", info_msg(p_left, stamp), stamp + 1000)
            write("/right/camera_info", info_msg(p_right, stamp), stamp + 2000)
            write("/left/image_rect", image_msg(left, encoding, stamp), stamp + 3000)
            write("/right/image_rect", image_msg(right, encoding, stamp), stamp + 4000)
        left, _ = pair_pixels(0, "rgb8")
        write("/left/image_rect", image_msg(left, "rgb8", UNMATCHED_STAMP), UNMATCHED_STAMP + 3000)
    return written


def read_bag(path) -> dict[str, list[tuple[int, str, bytes]]]:
    with Reader(path) as reader:
        messages: dict[str, list] = {}
        for conn, log_ns, raw in reader.messages():
            messages.setdefault(conn.topic, []).append((log_ns, conn.msgtype, bytes(raw)))
        return messages


def check_output(messages, written, estimator: StereoEstimator, use_color: bool = True) -> None:
    for topic, raws in written.items():  # input copied unchanged
        assert [raw for _, _, raw in messages[topic]] == raws
    disparities, clouds = messages["/disparity"], messages["/points2"]
    assert len(disparities) == len(clouds) == len(PAIRS)
    for index, (stamp, encoding) in enumerate(PAIRS):
        log_ns, msgtype, raw = disparities[index]
        assert msgtype == "stereo_msgs/msg/DisparityImage"
        assert log_ns == stamp + 4000  # logged when the right image completed the pair
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        assert payloads.stamp_to_ns(msg.header.stamp) == stamp and msg.header.frame_id == FRAME
        left, right = pair_pixels(index, encoding)
        expected = estimator.predict(left, right).disparity  # the estimator run directly
        assert (msg.image.encoding, msg.image.height, msg.image.width, msg.image.step) == (
            "32FC1", HEIGHT, WIDTH, WIDTH * 4)
        assert msg.f == pytest.approx(80.0) and msg.t == pytest.approx(0.12)
        offset = GEOMETRY.disparity_offset  # -2: published values are d - offset
        assert msg.min_disparity == pytest.approx(0.0 - offset)
        assert msg.max_disparity == pytest.approx(MAX_DISPARITY - 1 - offset)
        assert msg.delta_d == pytest.approx(1 / 16)
        values = np.frombuffer(msg.image.data, dtype="<f4").reshape(HEIGHT, WIDTH)
        published = payloads.disparity_from_payload(values, msg.min_disparity) + np.float32(offset)
        np.testing.assert_array_equal(np.isnan(published), np.isnan(expected))
        np.testing.assert_allclose(published, expected, rtol=0, atol=1e-5)
        valid = np.isfinite(expected)
        assert valid.mean() > 0.25 and np.median(expected[valid]) == pytest.approx(SHIFT_PX, abs=0.5)
        rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
        roi = msg.valid_window
        assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (
            cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)

        log_ns, msgtype, raw = clouds[index]
        assert msgtype == "sensor_msgs/msg/PointCloud2" and log_ns == stamp + 4000
        cloud = TYPESTORE.deserialize_cdr(raw, msgtype)
        names = ["x", "y", "z", "rgb"] if use_color else ["x", "y", "z"]
        assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
            (name, 4 * i, 7, 1) for i, name in enumerate(names)]
        assert (cloud.height, cloud.width, cloud.point_step, cloud.row_step) == (
            HEIGHT, WIDTH, 4 * len(names), 4 * len(names) * WIDTH)
        assert not cloud.is_dense and not cloud.is_bigendian
        values = payloads.point_cloud_values(cloud.data, cloud.height, cloud.width, cloud.point_step)
        np.testing.assert_allclose(values[..., :3], GEOMETRY.points_from_disparity(expected), rtol=1e-6, atol=1e-6,
                                   equal_nan=True)
        # Hand check of one pixel: Z = f * B / (d - offset), X = (u - cx) * Z / f.
        v, u = rows[0] + 5, cols[0] + 5
        z = 80.0 * 0.12 / (expected[v, u] - offset)
        assert values[v, u, 2] == pytest.approx(z, rel=1e-5)
        assert values[v, u, 0] == pytest.approx((u - 47.5) * z / 80.0, rel=1e-5)
        if use_color:
            rgb = payloads.unpack_rgb(values[..., 3])
            expected_rgb = left if left.ndim == 3 else np.repeat(left[..., None], 3, axis=2)
            np.testing.assert_array_equal(rgb, expected_rgb)


@pytest.mark.parametrize("storage", [StoragePlugin.SQLITE3, StoragePlugin.MCAP], ids=["sqlite3", "mcap"])
def test_run_bag_round_trip(tmp_path, storage):
    written = write_input_bag(tmp_path / "in", storage)
    summary = run_bag(tmp_path / "in", tmp_path / "out", model="sgbm", device="cpu", max_disparity=MAX_DISPARITY)
    assert summary["pairs_processed"] == 3
    assert summary["skipped"] == {"unmatched_image": 1}
    assert summary["messages_copied"] == sum(len(v) for v in written.values()) == 14
    assert summary["storage"] == ("mcap" if storage == StoragePlugin.MCAP else "sqlite3")
    out_files = sorted(p.suffix for p in (tmp_path / "out").iterdir())
    assert (".mcap" if storage == StoragePlugin.MCAP else ".db3") in out_files
    estimator = StereoEstimator.load("sgbm", device="cpu", max_disparity=MAX_DISPARITY)
    check_output(read_bag(tmp_path / "out"), written, estimator)


def test_cli_bag_converts_storage_and_limits_pairs(tmp_path, capsys):
    written = write_input_bag(tmp_path / "in", StoragePlugin.SQLITE3)
    code = cli_main(["bag", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", "sgbm",
                     "--device", "cpu", "--max-disparity", str(MAX_DISPARITY), "--storage", "mcap",
                     "--no-color", "--json", str(tmp_path / "summary.json"),
                     "--animation", str(tmp_path / "panels.gif")])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["storage"] == "mcap" and summary["pairs_processed"] == 3
    from PIL import Image

    with Image.open(summary["animation"]) as gif:  # one result panel per processed pair
        assert gif.format == "GIF" and gif.n_frames == 3
    assert any(p.suffix == ".mcap" for p in (tmp_path / "out").iterdir())
    estimator = StereoEstimator.load("sgbm", device="cpu", max_disparity=MAX_DISPARITY)
    check_output(read_bag(tmp_path / "out"), written, estimator, use_color=False)

    summary = run_bag(tmp_path / "in", tmp_path / "out2", device="cpu", max_disparity=MAX_DISPARITY,
                      max_pairs=1, disparity_topic="/stereo/disparity", points_topic="/stereo/points2")
    assert summary["pairs_processed"] == 1 and summary["skipped"] == {"max_pairs": 2, "unmatched_image": 1}
    messages = read_bag(tmp_path / "out2")
    assert len(messages["/stereo/disparity"]) == len(messages["/stereo/points2"]) == 1
    assert "/disparity" not in messages

    assert cli_main(["bag", str(tmp_path / "in"), "--out", str(tmp_path / "out3"),
                     "--left-image-topic", "/nope"]) == 2
    assert "no topic '/nope'" in capsys.readouterr().err


def test_pairs_without_camera_info_are_skipped(tmp_path):
    left, right = textured_pair(0)
    with Writer(tmp_path / "in", version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conns = [writer.add_connection(topic, msgtype, typestore=TYPESTORE) for topic, msgtype in (
            ("/left/image_rect", "sensor_msgs/msg/Image"), ("/right/image_rect", "sensor_msgs/msg/Image"),
            ("/left/camera_info", "sensor_msgs/msg/CameraInfo"), ("/right/camera_info", "sensor_msgs/msg/CameraInfo"))]
        writer.write(conns[0], 10, bytes(TYPESTORE.serialize_cdr(image_msg(left, "rgb8", 5), "sensor_msgs/msg/Image")))
        writer.write(conns[1], 11, bytes(TYPESTORE.serialize_cdr(image_msg(right, "rgb8", 5), "sensor_msgs/msg/Image")))
        p_left, _ = GEOMETRY.projection_matrices()
        for conn in conns[2:]:  # both sides with the left projection: zero baseline
            writer.write(conn, 12, bytes(TYPESTORE.serialize_cdr(info_msg(p_left, 6), "sensor_msgs/msg/CameraInfo")))
        writer.write(conns[0], 13, bytes(TYPESTORE.serialize_cdr(image_msg(left, "rgb8", 7), "sensor_msgs/msg/Image")))
        writer.write(conns[1], 14, bytes(TYPESTORE.serialize_cdr(image_msg(right, "rgb8", 7), "sensor_msgs/msg/Image")))
    summary = run_bag(tmp_path / "in", tmp_path / "out", device="cpu", max_disparity=MAX_DISPARITY)
    assert summary["pairs_processed"] == 0
    assert summary["skipped"] == {"missing_camera_info": 1, "bad_camera_info": 1}


def test_payloads_match_the_node_conversions():
    """The offline payloads are byte-identical to the messages the node publishes."""
    from std_msgs.msg import Header

    from stereo_kd_ros import conversions

    rng = np.random.default_rng(3)
    disparity = rng.uniform(-1, 20, size=(HEIGHT, WIDTH)).astype(np.float32)
    disparity[rng.random((HEIGHT, WIDTH)) < 0.2] = np.nan
    color = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    ros_header = Header(frame_id=FRAME)
    node_msg = conversions.disparity_image(disparity, ros_header, GEOMETRY, 0.0, 15.0, 1 / 16)
    payload = payloads.disparity_payload(disparity, GEOMETRY, 0.0, 15.0)
    assert bytes(node_msg.image.data) == payload.values.tobytes()
    assert (node_msg.f, node_msg.t, node_msg.min_disparity, node_msg.max_disparity, node_msg.delta_d) == (
        payload.f, payload.t, payload.min_disparity, payload.max_disparity, payload.delta_d)
    window = node_msg.valid_window
    assert (window.x_offset, window.y_offset, window.width, window.height) == tuple(
        getattr(payload.valid_window, k) for k in ("x_offset", "y_offset", "width", "height"))
    points = GEOMETRY.points_from_disparity(disparity)
    for cloud_color, dense in ((color, False), (None, False), (color, True)):
        node_cloud = conversions.point_cloud(points, ros_header, cloud_color, dense=dense)
        cloud = payloads.point_cloud_payload(points, cloud_color, dense=dense)
        assert bytes(node_cloud.data) == cloud.values.tobytes()
        assert [f.name for f in node_cloud.fields] == list(cloud.field_names)
        assert (node_cloud.height, node_cloud.width, node_cloud.point_step, node_cloud.row_step,
                node_cloud.is_dense) == (*cloud.values.shape[:2], cloud.point_step, cloud.row_step, cloud.is_dense)
    image = conversions.numpy_to_image(color, "rgb8", ros_header)
    np.testing.assert_array_equal(payloads.image_to_rgb(image), color)
    assert bytes(image.data) == payloads.image_payload(color, "rgb8").data.tobytes()
