"""Real processes: SIGINT/SIGTERM while a frame is in flight end the node cleanly (exit 0, no
traceback, the frame dropped); configuration errors at start-up exit with code 2 and a message
naming the problem. In process: close() waits for an inference as slow as the slowest seen, and
a result that comes after close() is dropped. (The player's clean stop is tested in
test_player_sources.py.)"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import RELIABLE, REPO_ROOT, TEST_DOMAIN_OFFSET, StereoHarness, wait_until
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from stereo_msgs.msg import DisparityImage

import stereo_kd_ros.runner as runner_module
from stereo_kd_core import StereoEstimator
from stereo_kd_core.estimator import SGBMEstimator
from stereo_kd_ros.conversions import numpy_to_image
from stereo_kd_ros.pipeline import MIN_SHUTDOWN_WAIT_S

ROS_DOMAIN_ID = 147 + TEST_DOMAIN_OFFSET


def env() -> dict[str, str]:
    return {**os.environ, "ROS_DOMAIN_ID": str(ROS_DOMAIN_ID), "PYTHONPATH": str(REPO_ROOT),
            "OMP_NUM_THREADS": "1"}


def node_command(*parameters: str) -> list[str]:
    command = [sys.executable, "-m", "stereo_kd_ros", "--ros-args"]
    for parameter in parameters:
        command += ["-p", parameter]
    return command


class Watcher:
    """Test-side node: publishes inputs, records the node's disparity and diagnostics."""

    def __init__(self, context):
        self.node = Node("lifecycle_test_io", context=context)
        self.outputs, self.diagnostics = [], {}
        self.node.create_subscription(DisparityImage, "disparity", self.outputs.append, RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.pubs = {topic: self.node.create_publisher(msg_type, topic, RELIABLE) for topic, msg_type in (
            ("left/image_rect", Image), ("right/image_rect", Image),
            ("left/camera_info", CameraInfo), ("right/camera_info", CameraInfo))}
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _on_diagnostics(self, msg) -> None:
        self.diagnostics = {kv.key: kv.value for kv in msg.status[0].values}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_a_frame_is_in_flight_exits_cleanly(ros_context, stop_signal):
    # 1280x960 with a 256 px search range keeps SGBM busy for about 1 s: long enough to signal mid-frame.
    process = subprocess.Popen(node_command("model:=sgbm", "max_disparity:=256", "use_system_default_qos:=true",
                                            "diagnostics_period_s:=0.1"),
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = Watcher(ros_context)
    try:
        assert wait_until(lambda: all(p.get_subscription_count() for p in watcher.pubs.values())
                          and watcher.diagnostics, timeout_s=30), "node did not start"
        width, height, focal_px = 1280, 960, 1000.0
        texture = np.random.default_rng(0).integers(0, 256, size=(height, width), dtype=np.uint8)
        for attempt in range(1, 11):  # camera_info and images travel separately: retry until paired
            stamp = Time(sec=attempt)
            for side, tx in (("left", 0.0), ("right", -focal_px * 0.1)):
                info = CameraInfo(header=Header(stamp=stamp, frame_id=side), width=width, height=height)
                info.p = [focal_px, 0.0, width / 2, tx, 0.0, focal_px, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
                watcher.pubs[f"{side}/camera_info"].publish(info)
            wait_until(lambda: False, timeout_s=0.3)
            for side in ("left", "right"):
                watcher.pubs[f"{side}/image_rect"].publish(
                    numpy_to_image(texture, "mono8", Header(stamp=stamp, frame_id=side)))
            assert wait_until(lambda n=attempt: watcher.diagnostics.get("pairs") == str(n), timeout_s=10)
            if watcher.diagnostics["rejected"] == str(attempt - 1):
                break  # accepted: the worker is on it
        assert watcher.diagnostics["processed"] == "0"
        process.send_signal(stop_signal)  # the estimator is mid-frame
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        watcher.close()
    assert process.returncode == 0, output
    assert "Traceback" not in output and "Exception" not in output, output
    assert not watcher.outputs  # the frame in flight was dropped, not published half way


@pytest.mark.parametrize("parameter, expected", [
    ("model:=no_such_model", ["unknown model 'no_such_model'", "Known models:", "sgbm"]),
    ("model:=/nonexistent/student.pt", ["/nonexistent/student.pt"]),
    ("input_scale:=0.05", ["input_scale", "Min: 0.1", "Max: 1.0"]),
    ("depth_encoding:=mono16", ["depth_encoding: expected one of 32FC1, 16UC1, got 'mono16'"]),
])
def test_configuration_errors_exit_2_with_a_clear_message(parameter, expected):
    result = subprocess.run(node_command(parameter), env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)


class HeldEstimator(StereoEstimator):
    """SGBM whose predict() first sleeps `hold_s`, or, with hold_s None, waits for `release`."""

    def __init__(self):
        self.sgbm = SGBMEstimator(max_disparity=32)
        self.name, self.device, self.precision = "held-sgbm", "cpu", "fp32"
        self.max_disparity, self.min_disparity, self.min_input_width = 32, 0.0, self.sgbm.min_input_width
        self.hold_s: float | None = 0.0
        self.started, self.release = threading.Semaphore(0), threading.Event()

    def predict(self, left, right, geometry=None):
        self.started.release()
        if self.hold_s is None:
            self.release.wait(30)
        else:
            time.sleep(self.hold_s)
        return self.sgbm.predict(left, right)


def send_pair(harness, sec: int) -> None:
    texture = np.random.default_rng(sec).integers(0, 256, size=(24, 64), dtype=np.uint8)
    for side, tx in (("left", 0.0), ("right", -5.0)):
        info = CameraInfo(header=Header(stamp=Time(sec=sec), frame_id=side), width=64, height=24)
        info.p = [50.0, 0.0, 32.0, tx, 0.0, 50.0, 12.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        harness.pubs[f"{side}/camera_info"].publish(info)
    assert wait_until(lambda: all(harness.node.camera_infos.get(side) is not None
                                  and harness.node.camera_infos[side].header.stamp == Time(sec=sec)
                                  for side in ("left", "right")))
    harness.send_images(*(numpy_to_image(texture, "mono8", Header(stamp=Time(sec=sec), frame_id=side))
                          for side in ("left", "right")))


def test_close_waits_for_an_inference_as_slow_as_the_slowest_seen(ros_context):
    # 2x the slowest is well beyond the minimum wait (and the release), leaving a loaded machine time to finish.
    slowest_s = 0.8 * MIN_SHUTDOWN_WAIT_S
    estimator = HeldEstimator()
    harness = StereoHarness(ros_context, estimator=estimator, diagnostics_period_s=0.2)
    try:
        estimator.hold_s = slowest_s
        send_pair(harness, 1)
        assert wait_until(lambda: harness.count("disparity") == 1, timeout_s=20)
        assert harness.node.shutdown_wait_s() >= 2 * slowest_s
        estimator.hold_s = None
        send_pair(harness, 2)
        assert estimator.started.acquire(timeout=10) and estimator.started.acquire(timeout=10)
        # The frame in flight ends after the minimum wait but within 2x the slowest inference.
        release_after_s = 1.1 * MIN_SHUTDOWN_WAIT_S
        threading.Timer(release_after_s, estimator.release.set).start()
        start = time.monotonic()
        harness.node.close()
        waited_s = time.monotonic() - start
        assert release_after_s - 0.1 <= waited_s < 2 * slowest_s, waited_s
        assert not harness.node.pipeline.worker.is_alive()
        assert (harness.node.stats.processed, harness.node.stats.discarded) == (1, 1)
        time.sleep(0.3)
        assert harness.count("disparity") == 1  # the frame in flight was not published
    finally:
        estimator.release.set()
        harness.close()


def test_a_result_after_close_is_dropped_without_touching_the_node(ros_context):
    estimator = HeldEstimator()
    estimator.hold_s = None
    harness = StereoHarness(ros_context, estimator=estimator, diagnostics_period_s=0.2)
    errors = []
    previous_hook, threading.excepthook = threading.excepthook, errors.append
    try:
        send_pair(harness, 1)
        assert estimator.started.acquire(timeout=10)
        harness.node.close(timeout_s=0.1)
        assert harness.node.pipeline.worker.is_alive()  # still inside predict()
        harness.close()  # node destroyed under the running inference
        estimator.release.set()
        harness.node.pipeline.worker.join(10)
        assert not harness.node.pipeline.worker.is_alive()
        assert (harness.node.stats.processed, harness.node.stats.discarded) == (0, 1)
        assert not harness.node.stats.rejected and not errors
    finally:
        threading.excepthook = previous_hook
        estimator.release.set()


def test_a_shutdown_between_the_spins_check_and_its_wait_set_is_a_clean_stop(monkeypatch):
    """A clean-clone CI run saw the context shut down between rclpy's check of it and its next
    wait set: rclpy raised "the given context is not valid" and the player exited 1 with a
    traceback. Stop signals no longer shut the context down, but a node may (the player at its
    last frame): here the context is shut down at exactly that point."""
    raised = []

    class ShutdownUnderSpin(SingleThreadedExecutor):
        def spin_once(self, timeout_sec=None):
            assert self.context.ok()
            self.context.try_shutdown()  # what the player's last frame does
            try:
                super().spin_once(timeout_sec=0)  # the next wait set, on the shut-down context
            except Exception as error:
                raised.append(error)
                raise

    monkeypatch.setattr(runner_module, "SingleThreadedExecutor", ShutdownUnderSpin)
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert runner_module.run(lambda: Node("shutdown_race_probe")) == 0
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    assert raised and "context is not valid" in str(raised[0])  # rclpy's real error was raised, and absorbed
