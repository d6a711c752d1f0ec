"""Shared set-up for node tests: loopback-only DDS, one ROS domain per test module, and a
harness running the node in-process next to a test node over real rclpy/Fast DDS."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Must be in place before any DDS participant is created in this process (and inherited
# by the node subprocesses some tests start).
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO_ROOT / "config" / "fastdds_localhost.xml")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.time import Time as RosTime  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from stereo_msgs.msg import DisparityImage  # noqa: E402

from stereo_kd_ros.node import NODE_NAME, StereoNode  # noqa: E402

RELIABLE = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
# The node's outputs a harness can record, and their types.
OUTPUT_TYPES = {"disparity": DisparityImage, "points2": PointCloud2,
                "depth/image_rect": Image, "depth/camera_info": CameraInfo,
                "confidence/image_rect": Image, "confidence/camera_info": CameraInfo,
                "rgb/image_rect": Image, "rgb/camera_info": CameraInfo, "left/image_rect_color": Image,
                "depth": Image, "confidence": Image,  # deprecated names
                "/diagnostics": DiagnosticArray}
# Recorded unless a test says otherwise: every current output (subscribing is what makes the node
# build an output), not the deprecated names.
DEFAULT_RECORDED = tuple(topic for topic in OUTPUT_TYPES if topic not in ("depth", "confidence"))


# Added to every module's ROS_DOMAIN_ID: lets two checkouts run the DDS tests at once without
# hearing each other (domain ids stay below Fast DDS's limit of 232 for offsets up to 60).
TEST_DOMAIN_OFFSET = int(os.environ.get("STEREO_KD_TEST_DOMAIN_OFFSET", "0"))


@pytest.fixture(scope="module")
def ros_context(request):
    """An initialised rclpy context on the module's own ROS_DOMAIN_ID (module constant)."""
    domain_id = request.module.ROS_DOMAIN_ID
    os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    yield context
    context.try_shutdown()


def wait_until(predicate, timeout_s: float = 10.0, period_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


class RosoutRecorder:
    """The node's /rosout messages, as any ROS tool sees them."""

    def __init__(self, harness):
        self.messages: list[str] = []
        self._lock = threading.Lock()
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        harness.io.create_subscription(Log, "/rosout", self._on_log, qos)

    def _on_log(self, msg: Log) -> None:
        if msg.name == NODE_NAME:
            with self._lock:
                self.messages.append(msg.msg)

    def matching(self, text: str) -> list[str]:
        with self._lock:
            return [message for message in self.messages if text in message]

    def wait_connected(self) -> None:
        """Wait until the node's start-up log line arrived (transient local, kept 10 s): later
        warnings cannot then be published before this subscription is matched."""
        assert wait_until(lambda: self.matching("model '")), "no /rosout from the node"


def same_message(a, b) -> bool:
    """Field-by-field equality of two ROS messages, NaN equal to NaN (a received copy of a sent
    message compares equal; serialized bytes may not, CDR padding is not guaranteed to match)."""
    if not hasattr(a, "get_fields_and_field_types"):
        if isinstance(a, (str, bytes, int, float, bool)) or a is None:
            return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")
    return type(a) is type(b) and all(same_message(getattr(a, name), getattr(b, name))
                                      for name in a.get_fields_and_field_types())


class StereoHarness:
    """The node under test plus a test node publishing its inputs and recording its outputs."""

    def __init__(self, context, estimator=None, record: tuple[str, ...] = DEFAULT_RECORDED, **parameters):
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        self.node = StereoNode(estimator, context=context, parameter_overrides=overrides)
        self.io = Node("stereo_kd_test_io", context=context)
        images = "image_raw" if parameters.get("rectify") else "image_rect"
        self.pubs = {key: self.io.create_publisher(msg_type, topic, RELIABLE) for key, topic, msg_type in (
            ("left/image", f"left/{images}", Image), ("right/image", f"right/{images}", Image),
            ("left/camera_info", "left/camera_info", CameraInfo),
            ("right/camera_info", "right/camera_info", CameraInfo))}
        self.received: dict[str, list] = {topic: [] for topic in record}
        self._lock = threading.Lock()
        for topic in record:
            self.io.create_subscription(OUTPUT_TYPES[topic], topic,
                                        lambda msg, topic=topic: self._record(topic, msg), RELIABLE)
        self.executor = MultiThreadedExecutor(num_threads=2, context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.io)
        self._closed = False
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()
        # The node's publishers of the recorded topics (those it has: optional outputs may be off).
        recorded = {self.node.resolve_topic_name(topic) for topic in record}
        outputs = [pub for pub in self.node.publishers if pub.topic_name in recorded]
        assert wait_until(lambda: all(p.get_subscription_count() > 0 for p in self.pubs.values())
                          and all(p.get_subscription_count() > 0 for p in outputs)), "DDS discovery timed out"

    def _record(self, topic: str, msg) -> None:
        with self._lock:
            self.received[topic].append(msg)

    def count(self, topic: str) -> int:
        with self._lock:
            return len(self.received[topic])

    def last(self, topic: str):
        with self._lock:
            return self.received[topic][-1]

    def send_infos(self, left_info: CameraInfo, right_info: CameraInfo) -> None:
        """Publish camera infos and wait until the node holds these very messages: every field
        compared, so infos that differ from the held ones only in size, K or stamp do not pass
        for received."""
        self.pubs["left/camera_info"].publish(left_info)
        self.pubs["right/camera_info"].publish(right_info)
        assert wait_until(lambda: all(
            same_message(self.node.camera_infos.get(side), info)
            for side, info in (("left", left_info), ("right", right_info)))), "camera_info not received"

    def send_images(self, left: Image, right: Image) -> None:
        self.pubs["left/image"].publish(left)
        self.pubs["right/image"].publish(right)

    def diagnostics(self, until=None, timeout_s: float = 10.0) -> dict[str, str]:
        """Values of the node's first /diagnostics report made after this call (a report already
        in flight when it is called does not count: its stamp is older). With `until`, the first
        such report whose values satisfy it: the node counts a pair as processed just after it
        publishes its outputs, so a report made in between may not count a pair seen already."""
        since = self.node.get_clock().now().nanoseconds

        def fresh_values():
            with self._lock:
                reports = [msg for msg in self.received["/diagnostics"]
                           if RosTime.from_msg(msg.header.stamp).nanoseconds >= since]
            if not reports:
                return None
            values = {kv.key: kv.value for kv in reports[-1].status[0].values}
            return values if until is None or until(values) else None

        assert wait_until(lambda: fresh_values() is not None, timeout_s=timeout_s), (
            f"no /diagnostics report satisfying the condition; the last: {self.last_values()}")
        return fresh_values()

    def last_values(self) -> dict[str, str] | None:
        with self._lock:
            reports = self.received["/diagnostics"]
            return {kv.key: kv.value for kv in reports[-1].status[0].values} if reports else None

    def close(self) -> None:
        """Stop spinning and destroy both nodes, completely, before returning (idempotent).

        The spin thread must have ended first: rclpy defers destroying a node whose handle a
        wait set still holds, and a stereo_kd_node destroyed late unregisters the /rosout
        publisher of the next node of that name, whose log then never reaches /rosout.
        """
        if self._closed:
            return
        self._closed = True
        self.executor.shutdown()
        self._spinner.join(timeout=30)
        assert not self._spinner.is_alive(), "executor did not stop spinning"
        self.node.close()
        self.node.destroy_node()
        self.io.destroy_node()


@pytest.fixture
def make_harness(ros_context):
    """Factory: make_harness(estimator=None, **node_parameters) -> StereoHarness, closed after the test."""
    harnesses = []

    def make(record: tuple[str, ...] = DEFAULT_RECORDED, estimator=None, **parameters) -> StereoHarness:
        # The analytic scenes and thresholds of these tests are SGBM's (exact integer shifts, its
        # valid window and search range): pin it. The shipped default model has its own test.
        defaults = {"model": "sgbm", "diagnostics_period_s": 0.2, "max_disparity": 32}
        harness = StereoHarness(ros_context, estimator=estimator, record=record, **{**defaults, **parameters})
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.close()
