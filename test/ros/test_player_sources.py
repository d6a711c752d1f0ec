"""stereo_kd_player sources over real rclpy/DDS: what arrives equals the files and the bag, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DOMAIN_OFFSET = int(os.environ.get("STEREO_KD_TEST_DOMAIN_OFFSET", "0"))  # as conftest's
ROS_DOMAIN_ID = 167 + TEST_DOMAIN_OFFSET
SIGNAL_TEST_DOMAIN_ID = 168 + TEST_DOMAIN_OFFSET
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO_ROOT / "config" / "fastdds_localhost.xml")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(ROS_DOMAIN_ID)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rclpy  # noqa: E402
from conftest import same_message  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from rclpy.time import Time  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from stereo_kd_core.data.io import write_middlebury_calib  # noqa: E402
from stereo_kd_core.rectification import CameraCalibration, distort  # noqa: E402
from stereo_kd_ros.player import (  # noqa: E402
    BAG_PAIRING_QUEUE,
    TOPIC_KEYS,
    StereoPlayer,
    bag_frames,
    folder_frames,
    geometry_from_yaml,
    raw_calibration_from_yaml,
    raw_source,
)

TOPICS = {"left_info": "left/camera_info", "left_image": "left/image_rect",
          "right_info": "right/camera_info", "right_image": "right/image_rect"}


def play(frames_factory, frames: int, **player_options) -> dict[str, list[tuple[float, object]]]:
    """Run a player in its own context until it has published `frames` frames; (receive time, msg) per topic.

    The recorder lives in a context of its own, so it keeps receiving the last frame after the
    player has shut its context down."""
    player_context, recorder_context = rclpy.Context(), rclpy.Context()
    rclpy.init(context=player_context, domain_id=ROS_DOMAIN_ID)
    rclpy.init(context=recorder_context, domain_id=ROS_DOMAIN_ID)
    received: dict[str, list] = {key: [] for key in TOPIC_KEYS}
    lock = threading.Lock()
    recorder = Node("player_test_recorder", context=recorder_context)
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)

    def record(key: str, msg) -> None:
        with lock:
            received[key].append((time.monotonic(), msg))

    for key, topic in TOPICS.items():
        recorder.create_subscription(CameraInfo if key.endswith("info") else Image, topic,
                                     lambda msg, key=key: record(key, msg), qos)
    player = StereoPlayer(frames_factory, frames=frames, context=player_context, **player_options)
    player_executor = SingleThreadedExecutor(context=player_context)
    player_executor.add_node(player)
    recorder_executor = SingleThreadedExecutor(context=recorder_context)
    recorder_executor.add_node(recorder)
    spinning = threading.Event()
    spinning.set()

    def spin_recorder() -> None:
        while spinning.is_set():
            recorder_executor.spin_once(timeout_sec=0.02)

    recorder_thread = threading.Thread(target=spin_recorder, daemon=True)
    recorder_thread.start()
    deadline = time.monotonic() + 30
    try:
        while player_context.ok() and time.monotonic() < deadline:  # the player shuts its context down when done
            player_executor.spin_once(timeout_sec=0.05)
        # the last frame may still be in flight: wait for every image the player published
        settle = time.monotonic() + 5.0
        while time.monotonic() < settle and any(len(received[key]) < player.published
                                                for key in ("left_image", "right_image")):
            time.sleep(0.02)
    finally:
        spinning.clear()
        recorder_thread.join(timeout=5)
        player.close()
        player_executor.shutdown()
        recorder_executor.shutdown()
        player.destroy_node()
        recorder.destroy_node()
        player_context.try_shutdown()
        recorder_context.try_shutdown()
    assert player.published == frames, "player did not finish in time"
    return received


def random_image(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels if pixels.ndim == 2 else pixels[..., ::-1])  # RGB -> file


def test_middlebury_folder(tmp_path):
    rng = np.random.default_rng(1)
    cases = {"a_colour": random_image(rng, (2, 24, 32, 3)), "b_grey": random_image(rng, (2, 24, 32))}
    for name, (left, right) in cases.items():
        write_png(tmp_path / name / "im0.png", left)
        write_png(tmp_path / name / "im1.png", right)
    write_middlebury_calib(tmp_path / "a_colour" / "calib.txt", focal_px=100.0, cx0=15.5, cx1=19.5, cy=11.5,
                           baseline_mm=120.0, width=32, height=24, ndisp=16)
    write_middlebury_calib(tmp_path / "b_grey" / "calib.txt", focal_px=90.0, cx0=16.0, cx1=16.0, cy=12.0,
                           baseline_mm=60.0, width=32, height=24, ndisp=16)
    received = play(folder_frames(tmp_path), frames=2, rate_hz=20.0)
    expected_p = {  # (left P, right P) from calib.txt by hand: P_right[0, 3] = -f * baseline_m
        "a_colour": ([100, 0, 15.5, 0, 0, 100, 11.5, 0, 0, 0, 1, 0],
                     [100, 0, 19.5, -12.0, 0, 100, 11.5, 0, 0, 0, 1, 0]),
        "b_grey": ([90, 0, 16, 0, 0, 90, 12, 0, 0, 0, 1, 0], [90, 0, 16, -5.4, 0, 90, 12, 0, 0, 0, 1, 0]),
    }
    for index, (name, (left, right)) in enumerate(cases.items()):
        for side, pixels, p in (("left", left, expected_p[name][0]), ("right", right, expected_p[name][1])):
            image = received[f"{side}_image"][index][1]
            assert image.encoding == ("rgb8" if pixels.ndim == 3 else "mono8")
            assert (image.height, image.width, image.step) == (24, 32, 32 * (3 if pixels.ndim == 3 else 1))
            assert bytes(image.data) == pixels.tobytes()
            info = received[f"{side}_info"][index][1]
            np.testing.assert_allclose(info.p, p, rtol=1e-12, atol=1e-12)
            assert (info.width, info.height) == (32, 24)
            assert info.header.stamp == image.header.stamp  # one fresh stamp for the whole frame
        assert received["left_image"][index][1].header.stamp == received["right_image"][index][1].header.stamp


@pytest.mark.parametrize("layout", ["kitti2015", "kitti2012"])
def test_kitti_folder(tmp_path, layout):
    rng = np.random.default_rng(2)
    left, right = random_image(rng, (2, 20, 40, 3))
    image_dirs, calib_dir, keys = {
        "kitti2015": (("image_2", "image_3"), "calib_cam_to_cam", ("P_rect_02", "P_rect_03")),
        "kitti2012": (("colored_0", "colored_1"), "calib", ("P2", "P3"))}[layout]
    write_png(tmp_path / image_dirs[0] / "000007_10.png", left)
    write_png(tmp_path / image_dirs[1] / "000007_10.png", right)
    # KITTI projections are relative to camera 0 (values of a real KITTI 2015 calibration).
    (tmp_path / calib_dir).mkdir()
    (tmp_path / calib_dir / "000007.txt").write_text(
        "calib_time: 09-Jan-2012 13:57:47\n"
        f"{keys[0]}: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 "
        "1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\n"
        f"{keys[1]}: 7.215377e+02 0.000000e+00 6.095593e+02 -3.395242e+02 0.000000e+00 7.215377e+02 "
        "1.728540e+02 2.199936e+00 0.000000e+00 0.000000e+00 1.000000e+00 2.729905e-03\n")
    received = play(folder_frames(tmp_path), frames=1, rate_hz=20.0)
    assert bytes(received["left_image"][0][1].data) == left.tobytes()
    assert bytes(received["right_image"][0][1].data) == right.tobytes()
    left_p = [721.5377, 0, 609.5593, 0, 0, 721.5377, 172.854, 0, 0, 0, 1, 0]
    right_p = list(left_p)
    right_p[3] = -(44.85728 + 339.5242)  # -fx * baseline, baseline = (P2[0,3] - P3[0,3]) / fx = 0.5327 m
    np.testing.assert_allclose(received["left_info"][0][1].p, left_p, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(received["right_info"][0][1].p, right_p, rtol=1e-12, atol=1e-9)


def test_yaml_calibration(tmp_path):
    (tmp_path / "calib.yaml").write_text("fx: 50.0\ncy: 9.5\ncx_left: 20.0\ncx_right: 22.0\nbaseline_m: 0.1\n")
    geometry = geometry_from_yaml(tmp_path / "calib.yaml")
    assert (geometry.fx, geometry.fy, geometry.cx_left, geometry.cx_right, geometry.cy, geometry.baseline_m) == (
        50.0, 50.0, 20.0, 22.0, 9.5, 0.1)
    (tmp_path / "bad.yaml").write_text("fx: 50.0\ncy: 9.5\nbaseline: 0.1\n")
    with pytest.raises(ValueError, match="missing.*cx_left.*unknown.*baseline"):
        geometry_from_yaml(tmp_path / "bad.yaml")
    rng = np.random.default_rng(3)
    left, right = random_image(rng, (2, 20, 40, 3))
    write_png(tmp_path / "pairs" / "x" / "im0.png", left)
    write_png(tmp_path / "pairs" / "x" / "im1.png", right)
    with pytest.raises(ValueError, match="no calib.txt"):
        folder_frames(tmp_path / "pairs")
    received = play(folder_frames(tmp_path / "pairs", geometry), frames=1, rate_hz=20.0)
    np.testing.assert_allclose(received["right_info"][0][1].p, [50, 0, 22, -5, 0, 50, 9.5, 0, 0, 0, 1, 0])


RAW_CALIBRATION = """
left:
  distortion_model: plumb_bob
  k: [52.0, 0.0, 20.5, 0.0, 51.0, 9.0, 0.0, 0.0, 1.0]
  d: [-0.1, 0.02, 0.001, -0.001, 0.0]
  r: [0.99985, -0.0052, 0.0163, 0.0054, 0.99991, -0.0122, -0.01624, 0.01229, 0.99979]
right:
  distortion_model: equidistant
  k: [50.0, 0.0, 21.0, 0.0, 50.0, 10.0, 0.0, 0.0, 1.0]
  d: [0.02, -0.01, 0.0, 0.0]
  r: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
"""


def test_raw_calibration_publishes_redistorted_frames(tmp_path):
    (tmp_path / "calib.yaml").write_text("fx: 50.0\ncy: 9.5\ncx_left: 20.0\ncx_right: 22.0\nbaseline_m: 0.1\n")
    (tmp_path / "raw.yaml").write_text(RAW_CALIBRATION)
    rng = np.random.default_rng(4)
    rectified = {"left": random_image(rng, (20, 40, 3)), "right": random_image(rng, (20, 40, 3))}
    write_png(tmp_path / "pairs" / "x" / "im0.png", rectified["left"])
    write_png(tmp_path / "pairs" / "x" / "im1.png", rectified["right"])
    raw_calibration = raw_calibration_from_yaml(tmp_path / "raw.yaml")
    source = raw_source(folder_frames(tmp_path / "pairs", geometry_from_yaml(tmp_path / "calib.yaml")),
                        raw_calibration)
    received = play(source, frames=1, rate_hz=20.0)
    for side, p in (("left", [50, 0, 20, 0, 0, 50, 9.5, 0, 0, 0, 1, 0]),
                    ("right", [50, 0, 22, -5, 0, 50, 9.5, 0, 0, 0, 1, 0])):
        info, image = received[f"{side}_info"][0][1], received[f"{side}_image"][0][1]
        camera = raw_calibration[side]
        assert info.distortion_model == camera["distortion_model"]
        assert (list(info.k), list(info.d), list(info.r)) == (camera["k"], camera["d"], camera["r"])
        np.testing.assert_allclose(info.p, p)  # the source's rectified projection
        calibration = CameraCalibration.from_camera_info(info)
        raw = np.frombuffer(image.data, np.uint8).reshape(20, 40, 3)
        np.testing.assert_array_equal(raw, distort(rectified[side], calibration))
        assert image.encoding == "rgb8" and info.header.stamp == image.header.stamp
    (tmp_path / "bad.yaml").write_text(RAW_CALIBRATION.replace("d: [0.02, -0.01, 0.0, 0.0]", "d: [0.02]"))
    with pytest.raises(ValueError, match="'right'.*equidistant needs 4 distortion coefficients, D has 1"):
        raw_calibration_from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("left: {}\n")
    with pytest.raises(ValueError, match="needs exactly a 'left' and a 'right'"):
        raw_calibration_from_yaml(tmp_path / "bad.yaml")


def write_bag(path: Path, period_ns: int, image_stamps: list[tuple[str, int]] | None = None) -> dict[str, list[bytes]]:
    """Two stereo pairs `period_ns` apart (camera_info once per side), recorded under /cam/... topics;
    or, with `image_stamps`, one image per (key, stamp ns) in that order."""
    typestore = get_typestore(Stores.ROS2_KILTED)
    types = typestore.types
    rng = np.random.default_rng(4)
    written: dict[str, list[bytes]] = {}

    def header(stamp_ns: int):
        return types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](
            sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id="cam")

    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {key: writer.add_connection(
            f"/cam/{key}", f"sensor_msgs/msg/{'CameraInfo' if 'info' in key else 'Image'}", typestore=typestore)
            for key in TOPIC_KEYS}

        def write(key: str, msg, log_ns: int) -> None:
            raw = bytes(typestore.serialize_cdr(msg, msg.__msgtype__))
            writer.write(conns[key], log_ns, raw)
            written.setdefault(key, []).append(raw)

        roi = types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        for key, tx in (("left_info", 0.0), ("right_info", -6.0)):
            p = np.array([60, 0, 15, tx, 0, 60, 10, 0, 0, 0, 1, 0], dtype=np.float64)
            write(key, types["sensor_msgs/msg/CameraInfo"](
                header=header(5), height=20, width=30, distortion_model="plumb_bob", d=np.zeros(5),
                k=p.reshape(3, 4)[:, :3].ravel(), r=np.eye(3).ravel(), p=p, binning_x=0, binning_y=0, roi=roi), 10)
        recorded_at_stamp = image_stamps is None  # else recorded 1 us apart in the given order
        if recorded_at_stamp:  # right recorded first
            image_stamps = [(key, 1_000_000_000 + index * period_ns) for index in range(2)
                            for key in ("right_image", "left_image")]
        for order, (key, stamp) in enumerate(image_stamps):
            pixels = random_image(rng, (20, 30))
            write(key, types["sensor_msgs/msg/Image"](header=header(stamp), height=20, width=30, encoding="mono8",
                                                      is_bigendian=0, step=30, data=pixels.ravel()),
                  (stamp if recorded_at_stamp else 1_000_000_000) + order * 1000)
    return written


def test_bag_source_recorded_timing_and_restamp(tmp_path):
    period_ns = 1_000_000_000  # long against delivery jitter on a loaded 2-core machine
    written = write_bag(tmp_path / "bag", period_ns)
    bag_topics = {key: f"/cam/{key}" for key in TOPIC_KEYS}
    received = play(bag_frames(tmp_path / "bag", bag_topics), frames=2, recorded_timing=True)
    # Field by field (NaN equal): a received copy's CDR padding bytes are not guaranteed to match.
    for key, message_type in (("left_image", Image), ("right_image", Image)):
        expected = [deserialize_message(raw, message_type) for raw in written[key]]
        got = [msg for _, msg in received[key]]
        assert len(got) == len(expected) and all(map(same_message, got, expected))
    for key in ("left_info", "right_info"):  # the latest camera_info goes with every pair
        expected = [deserialize_message(raw, CameraInfo) for raw in written[key]] * 2
        got = [msg for _, msg in received[key]]
        assert len(got) == len(expected) and all(map(same_message, got, expected))
    gap_s = received["left_image"][1][0] - received["left_image"][0][0]
    assert 0.75 < gap_s < 1.6  # the recorded 1.0 s (receipt times: allow for delivery jitter)

    for restamp in (True, False):  # looping restamps by itself: recorded stamps would go back at each pass
        before_ns = time.time_ns()
        received = play(bag_frames(tmp_path / "bag", bag_topics), frames=3, loop=True, restamp=restamp,
                        rate_hz=20.0)
        stamps = [Time.from_msg(msg.header.stamp).nanoseconds for _, msg in received["left_image"]]
        assert all(stamp > before_ns for stamp in stamps) and stamps == sorted(set(stamps))
        assert [Time.from_msg(msg.header.stamp).nanoseconds for _, msg in received["right_info"]] == stamps
        assert bytes(received["left_image"][2][1].data) == bytes(received["left_image"][0][1].data)  # looped

    with pytest.raises(ValueError, match="no topic /left/image_rect"):
        bag_frames(tmp_path / "bag", {**bag_topics, "left_image": "/left/image_rect"})


def test_bag_source_as_raw_images(tmp_path):
    """--raw-calibration on a bag: each recorded rectified frame is re-distorted (mono8 stays
    mono8), its header kept, and the camera_infos carry the raw K, D, R with the recorded P."""
    written = write_bag(tmp_path / "bag", 200_000_000)
    (tmp_path / "raw.yaml").write_text(RAW_CALIBRATION)
    raw_calibration = raw_calibration_from_yaml(tmp_path / "raw.yaml")
    source = raw_source(bag_frames(tmp_path / "bag", {key: f"/cam/{key}" for key in TOPIC_KEYS}), raw_calibration)
    received = play(source, frames=2, rate_hz=20.0)
    for side in ("left", "right"):
        recorded_info = deserialize_message(written[f"{side}_info"][0], CameraInfo)
        recorded_images = [deserialize_message(raw, Image) for raw in written[f"{side}_image"]]
        camera = raw_calibration[side]
        assert len(received[f"{side}_image"]) == 2
        for (_, info), (_, image), recorded in zip(received[f"{side}_info"], received[f"{side}_image"],
                                                   recorded_images, strict=True):
            assert info.distortion_model == camera["distortion_model"]
            assert (list(info.k), list(info.d), list(info.r)) == (camera["k"], camera["d"], camera["r"])
            assert list(info.p) == list(recorded_info.p) and (info.width, info.height) == (30, 20)
            assert image.header == recorded.header and image.encoding == "mono8"
            rectified = np.frombuffer(recorded.data, np.uint8).reshape(20, 30)
            expected = distort(rectified, CameraCalibration.from_camera_info(info))
            np.testing.assert_array_equal(np.frombuffer(image.data, np.uint8).reshape(20, 30), expected)
            if side == "right":  # an equidistant camera with identity R: a visible change, not a copy
                assert not np.array_equal(expected, rectified)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_player_stops_cleanly_on_signal(tmp_path, signum):
    rng = np.random.default_rng(5)
    left, right = random_image(rng, (2, 24, 32, 3))
    write_png(tmp_path / "case" / "im0.png", left)
    write_png(tmp_path / "case" / "im1.png", right)
    write_middlebury_calib(tmp_path / "case" / "calib.txt", 100.0, 15.5, 15.5, 11.5, 100.0, 32, 24, 16)
    env = {**os.environ, "ROS_DOMAIN_ID": str(SIGNAL_TEST_DOMAIN_ID), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "stereo_kd_ros.player", "--source", str(tmp_path),
                                "--loop", "--rate", "50"], env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:  # the player logs one line when it starts publishing
            lines.append(line)
            if "publishing folder" in line:
                break
        time.sleep(0.5)  # some frames out, then the signal lands at any point of the loop
        process.send_signal(signum)
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + process.stderr.read()
    assert code == 0, output
    assert "Traceback" not in output


def test_bag_pairing_keeps_a_bounded_number_of_unmatched_images(tmp_path):
    unmatched = BAG_PAIRING_QUEUE + 36
    second = 1_000_000_000
    image_stamps = ([("left_image", second * (10 + i)) for i in range(unmatched)]
                    + [("right_image", second * (10 + i) + 500) for i in range(unmatched)]
                    # A pair whose right image comes BAG_PAIRING_QUEUE - 1 images after its left: still paired.
                    + [("left_image", second * 5000)]
                    + [("left_image", second * (6000 + i)) for i in range(BAG_PAIRING_QUEUE - 1)]
                    + [("right_image", second * 5000)])
    write_bag(tmp_path / "bag", 0, image_stamps)
    source = bag_frames(tmp_path / "bag", {key: f"/cam/{key}" for key in TOPIC_KEYS})
    frames = list(source())
    assert [Time.from_msg(frame.messages["left_image"].header.stamp).nanoseconds for frame in frames] == [
        second * 5000]
    # Each side holds at most BAG_PAIRING_QUEUE: the extra unmatched ones are evicted (the 5000 s left is the
    # 64th newest when its right arrives, so it is still there).
    assert source.evicted == 2 * (unmatched - BAG_PAIRING_QUEUE) + (BAG_PAIRING_QUEUE - 1) + 1
