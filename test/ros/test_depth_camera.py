"""The node's image outputs as cameras, over real DDS, the way RGB-D consumers (nvblox, RTAB-Map,
depth_image_proc) take them: depth/image_rect + depth/camera_info (+ rgb/image_rect,
rgb/camera_info, confidence/camera_info) with one header, at the published resolution."""

import threading

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, RosoutRecorder, wait_until
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image
from stereo_scene import make_scene

from stereo_kd_ros.conversions import image_to_numpy, point_cloud_to_numpy, stamp_to_ns
from stereo_kd_ros.parameters import PARAMETERS, ParameterError, validate_parameters
from stereo_kd_ros.sync import ExactTimeSynchronizer

ROS_DOMAIN_ID = 149 + TEST_DOMAIN_OFFSET
CX_OFFSET = 2.0  # cx_left - cx_right: the depth camera is the left one, whose cx is not the right's
WIDTH, HEIGHT = 192, 128
FRAMES = 4
RGBD = {"publish_depth": True, "publish_rgb": True, "publish_confidence": True, "max_disparity": 48}
TOLERANCE_M = 1e-3


@pytest.fixture(scope="module")
def scene():
    # Plane at f B / (12 - 2) = 1 m, box at f B / (24 - 2) = 0.4545 m.
    return make_scene(width=WIDTH, height=HEIGHT, plane_disparity=12, box_disparity=24, max_disparity=48,
                      cx_offset=CX_OFFSET)


class RGBDConsumer:
    """What nvblox / RTAB-Map do: depth/image_rect, depth/camera_info and rgb/image_rect matched by
    exact stamp (message_filters' ExactTime semantics)."""

    TOPICS = (("depth/image_rect", Image), ("depth/camera_info", CameraInfo), ("rgb/image_rect", Image))

    def __init__(self, harness):
        self.triples: list[tuple[Image, CameraInfo, Image]] = []
        self._lock = threading.Lock()
        self._sync = ExactTimeSynchronizer(len(self.TOPICS), queue_size=10, callback=self._on_triple)
        for index, (topic, msg_type) in enumerate(self.TOPICS):
            harness.io.create_subscription(msg_type, topic, lambda msg, i=index: self._sync.add(i, msg), 10)
        node = harness.node
        # The harness records these topics too: the consumer's subscriptions make it two each.
        assert wait_until(lambda: all(pub.get_subscription_count() >= 2
                                      for pub in (node.outputs.depth_pub, node.outputs.depth_info_pub,
                                                  node.outputs.rgb_pub)))

    def _on_triple(self, depth: Image, info: CameraInfo, rgb: Image) -> None:
        with self._lock:
            self.triples.append((depth, info, rgb))

    def count(self) -> int:
        with self._lock:
            return len(self.triples)


def by_stamp(harness, topic: str) -> dict[int, object]:
    with harness._lock:
        return {stamp_to_ns(msg.header.stamp): msg for msg in harness.received[topic]}


def send_pair(harness, scene, stamp: Time, encoding: str = "rgb8") -> None:
    harness.send_infos(*scene.camera_infos(stamp))
    harness.send_images(*scene.images(stamp, encoding=encoding))


def back_project(depth_msg: Image, info: CameraInfo) -> np.ndarray:
    """depth_image_proc's point_cloud_xyz: the pinhole model of the camera_info's P, 16UC1 in mm."""
    depth = image_to_numpy(depth_msg).astype(np.float64)
    if depth_msg.encoding == "16UC1":
        depth = np.where(depth == 0, np.nan, depth * 1e-3)
    fx, cx, fy, cy = info.p[0], info.p[2], info.p[5], info.p[6]
    u, v = np.meshgrid(np.arange(info.width), np.arange(info.height))
    return np.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], axis=-1)  # (H, W, 3)


def assert_camera_info_of_published_resolution(info: CameraInfo, scene, scale: float) -> None:
    height, width = round(HEIGHT * scale), round(WIDTH * scale)
    assert (info.width, info.height) == (width, height)
    fx = scene.focal_px * scale
    cx, cy = (scene.cx_left + 0.5) * scale - 0.5, (scene.cy + 0.5) * scale - 0.5  # pixel centres kept
    np.testing.assert_allclose(np.reshape(info.k, (3, 3)), [[fx, 0, cx], [0, fx, cy], [0, 0, 1]], rtol=1e-12)
    np.testing.assert_allclose(np.reshape(info.p, (3, 4)), [[fx, 0, cx, 0], [0, fx, cy, 0], [0, 0, 1, 0]],
                               rtol=1e-12)  # Tx = 0: the depth camera is its own reference
    assert list(info.d) == [0.0] * 5 and info.distortion_model == "plumb_bob"
    np.testing.assert_array_equal(np.reshape(info.r, (3, 3)), np.eye(3))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_rgbd_consumer_gets_every_triple_and_depth_back_projects_to_points2(make_harness, scene, scale):
    harness = make_harness(input_scale=scale, **RGBD)
    consumer = RGBDConsumer(harness)
    stamps = [Time(sec=10 + i, nanosec=250_000 * i) for i in range(FRAMES)]
    for index, stamp in enumerate(stamps):
        send_pair(harness, scene, stamp)
        # One pair at a time (the node keeps only the newest waiting pair): every pair is published.
        assert wait_until(lambda n=index + 1, ns=stamp_to_ns(stamp): consumer.count() == n
                          and ns in by_stamp(harness, "points2")), f"frame {index}"
    assert consumer.count() == FRAMES  # every triple, each once

    height, width = round(HEIGHT * scale), round(WIDTH * scale)
    clouds = by_stamp(harness, "points2")
    assert wait_until(lambda: all(len(by_stamp(harness, topic)) == FRAMES for topic in
                                  ("rgb/camera_info", "confidence/image_rect", "confidence/camera_info")))
    rgb_infos, confidences = by_stamp(harness, "rgb/camera_info"), by_stamp(harness, "confidence/image_rect")
    confidence_infos = by_stamp(harness, "confidence/camera_info")
    expected_rgb = np.repeat(scene.left[..., None], 3, axis=2)
    if scale != 1.0:
        expected_rgb = cv2.resize(expected_rgb, (width, height), interpolation=cv2.INTER_AREA)
    for (depth_msg, info, rgb_msg), stamp in zip(consumer.triples, stamps, strict=True):
        stamp_ns = stamp_to_ns(stamp)
        messages = (depth_msg, info, rgb_msg, rgb_infos[stamp_ns], confidences[stamp_ns],
                    confidence_infos[stamp_ns], clouds[stamp_ns])
        assert {stamp_to_ns(m.header.stamp) for m in messages} == {stamp_ns}
        assert {m.header.frame_id for m in messages} == {"left_optical"}
        # Sizes agree everywhere: camera_info, depth, colour, confidence and the organized cloud.
        for image in (depth_msg, rgb_msg, confidences[stamp_ns]):
            assert (image.width, image.height) == (info.width, info.height) == (width, height)
        assert (clouds[stamp_ns].width, clouds[stamp_ns].height) == (width, height)
        assert_camera_info_of_published_resolution(info, scene, scale)
        for other in (rgb_infos[stamp_ns], confidence_infos[stamp_ns]):  # one camera for all
            assert (other.width, other.height, list(other.k), list(other.p), list(other.d), list(other.r)) == (
                info.width, info.height, list(info.k), list(info.p), list(info.d), list(info.r))
        assert depth_msg.encoding == "32FC1" and rgb_msg.encoding == "rgb8"
        np.testing.assert_array_equal(image_to_numpy(rgb_msg), expected_rgb)  # what the estimator saw

        # depth_image_proc's back-projection with depth/camera_info reproduces points2.
        points = back_project(depth_msg, info)
        cloud = point_cloud_to_numpy(clouds[stamp_ns])[..., :3]
        valid = np.isfinite(points[..., 2])
        np.testing.assert_array_equal(valid, np.isfinite(cloud[..., 2]))
        assert valid.mean() > 0.5
        assert np.max(np.abs(points[valid] - cloud[valid])) < TOLERANCE_M
        # and against the analytic scene (nearest full-size pixel of each published one)
        rows = np.minimum((np.arange(height) + 0.5) / scale, HEIGHT - 1).astype(int)
        cols = np.minimum((np.arange(width) + 0.5) / scale, WIDTH - 1).astype(int)
        truth, comparable = scene.disparity[np.ix_(rows, cols)], scene.comparable[np.ix_(rows, cols)]
        depth = image_to_numpy(depth_msg)
        for disparity, depth_m in ((12, 1.0), (24, 10.0 / 22)):
            assert np.nanmedian(depth[comparable & (truth == disparity)]) == pytest.approx(depth_m, rel=0.03)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_16uc1_depth_is_rounded_millimetres_with_0_invalid(make_harness, scene, scale):
    stamp = Time(sec=3, nanosec=7)
    depth_msgs, clouds, infos = {}, {}, {}
    for encoding in ("32FC1", "16UC1"):  # the same pair through two nodes (SGBM is deterministic)
        harness = make_harness(input_scale=scale, depth_encoding=encoding, **RGBD)
        send_pair(harness, scene, stamp)
        assert wait_until(lambda h=harness: h.count("depth/image_rect") and h.count("points2")
                          and h.count("depth/camera_info"))
        depth_msgs[encoding], clouds[encoding] = harness.last("depth/image_rect"), harness.last("points2")
        infos[encoding] = harness.last("depth/camera_info")
        harness.close()
    metres, millimetres = depth_msgs["32FC1"], depth_msgs["16UC1"]
    assert (millimetres.encoding, millimetres.step, millimetres.is_bigendian) == ("16UC1", 2 * millimetres.width, 0)
    assert (millimetres.width, millimetres.height) == (metres.width, metres.height)
    assert (infos["16UC1"].width, infos["16UC1"].height) == (millimetres.width, millimetres.height)
    assert list(infos["16UC1"].p) == list(infos["32FC1"].p)

    depth_m = image_to_numpy(metres)
    expected = np.where(np.isnan(depth_m), 0, np.rint(depth_m.astype(np.float64) * 1000.0)).astype(np.uint16)
    values = image_to_numpy(millimetres)
    np.testing.assert_array_equal(values, expected)
    invalid = values == 0
    assert invalid.any() and not invalid.all()  # SGBM leaves its first search-range columns empty
    np.testing.assert_array_equal(invalid, np.isnan(depth_m))
    # The same frame's points2: z in mm, and a back-projection of the 16UC1 image within 1 mm.
    z_m = point_cloud_to_numpy(clouds["16UC1"])[..., 2]
    np.testing.assert_array_equal(values, np.where(np.isnan(z_m), 0, np.rint(z_m.astype(np.float64) * 1000.0)))
    points = back_project(millimetres, infos["16UC1"])
    cloud = point_cloud_to_numpy(clouds["16UC1"])[..., :3]
    valid = ~invalid
    assert np.max(np.abs(points[valid] - cloud[valid])) < TOLERANCE_M


def test_nothing_is_built_for_outputs_nobody_subscribes_to(make_harness, scene):
    harness = make_harness(record=("disparity",), **RGBD)
    node = harness.node
    send_pair(harness, scene, Time(sec=1))
    assert wait_until(lambda: harness.count("disparity") == 1)
    outputs = node.outputs
    unbuilt = (outputs.cloud_msg, outputs.depth_msg, outputs.depth_alias_msg, outputs.confidence_msg, outputs.rgb_msg)
    assert all(len(msg.data) == 0 for msg in unbuilt)
    assert node.outputs.camera_info_msg.width == 0

    # A camera_info subscriber alone gets camera_infos; the images stay unbuilt.
    infos = []
    harness.io.create_subscription(CameraInfo, "rgb/camera_info", infos.append, 10)
    assert wait_until(lambda: node.outputs.rgb_info_pub.get_subscription_count() == 1)
    send_pair(harness, scene, Time(sec=2))
    assert wait_until(lambda: len(infos) == 1 and harness.count("disparity") == 2)
    assert (infos[0].width, infos[0].height) == (WIDTH, HEIGHT)
    assert all(len(msg.data) == 0 for msg in unbuilt)


def test_deprecated_depth_and_confidence_topics_still_work_and_warn_once(make_harness, scene):
    harness = make_harness(record=("depth", "confidence", "depth/image_rect", "confidence/image_rect"),
                           depth_encoding="16UC1", **RGBD)
    log = RosoutRecorder(harness)
    log.wait_connected()
    for second in (1, 2):
        send_pair(harness, scene, Time(sec=second))
        assert wait_until(lambda n=second: all(harness.count(t) == n for t in harness.received))
    for topic, replacement in (("depth", "depth/image_rect"), ("confidence", "confidence/image_rect")):
        old, new = harness.last(topic), harness.last(replacement)
        assert old.header == new.header and old.encoding == "32FC1"  # the old contract: 32FC1 metres
        assert wait_until(lambda t=topic: log.matching(f"topic '{t}' is deprecated"))
        warnings = log.matching(f"topic '{topic}' is deprecated")
        assert len(warnings) == 1 and f"'{replacement}'" in warnings[0]
    depth_m = image_to_numpy(harness.last("depth"))
    millimetres = image_to_numpy(harness.last("depth/image_rect"))
    np.testing.assert_array_equal(millimetres, np.where(np.isnan(depth_m), 0, np.rint(depth_m * 1000.0)))
    assert bytes(harness.last("confidence").data) == bytes(harness.last("confidence/image_rect").data)


def test_depth_encoding_is_validated_and_read_only(make_harness):
    # The check the node runs on its parameters at start (a failing constructor is left to the
    # subprocess tests: a half-built node would keep this module's /rosout logger).
    defaults = {spec.name: spec.default for spec in PARAMETERS}
    validate_parameters(defaults)
    with pytest.raises(ParameterError, match="depth_encoding: expected one of 32FC1, 16UC1, got 'mono16'"):
        validate_parameters({**defaults, "depth_encoding": "mono16"})
    harness = make_harness(record=("disparity",), publish_depth=True)
    refused = harness.node.set_parameters([Parameter("depth_encoding", value="16UC1")])
    assert not refused[0].successful
    descriptor = harness.node.describe_parameter("depth_encoding")
    assert descriptor.read_only and "16UC1" in descriptor.description


def test_camera_info_follows_input_scale_changed_at_run_time(make_harness, scene):
    harness = make_harness(**RGBD)
    for second, scale in enumerate((1.0, 0.5, 0.25, 1.0), start=1):
        assert harness.node.set_parameters([Parameter("input_scale", value=scale)])[0].successful
        send_pair(harness, scene, Time(sec=second))
        assert wait_until(lambda n=second: all(harness.count(topic) == n for topic in
                                               ("depth/image_rect", "depth/camera_info", "rgb/image_rect")))
        stamp_ns = second * 1_000_000_000
        depth, info = by_stamp(harness, "depth/image_rect")[stamp_ns], by_stamp(harness, "depth/camera_info")[stamp_ns]
        rgb = by_stamp(harness, "rgb/image_rect")[stamp_ns]
        assert (depth.width, depth.height) == (rgb.width, rgb.height) == (info.width, info.height)
        assert_camera_info_of_published_resolution(info, scene, scale)
