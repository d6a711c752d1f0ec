"""config/stereo.yaml vs the node's parameters, and the console entry point
as a subprocess (params file, remaps, clean exit on SIGINT/SIGTERM, clear config errors)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from builtin_interfaces.msg import Time
from conftest import RELIABLE, REPO_ROOT, TEST_DOMAIN_OFFSET, wait_until
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import CameraInfo, Image
from stereo_msgs.msg import DisparityImage
from stereo_scene import make_scene

from stereo_kd_ros.node import NODE_NAME, PARAMETER_NAMES, StereoNode

ROS_DOMAIN_ID = 144 + TEST_DOMAIN_OFFSET
CONFIG_FILE = REPO_ROOT / "config" / "stereo.yaml"
CONFIG_KEY = f"/**/{NODE_NAME}"  # any namespace: the launch file's namespace:=X must not lose the file


def test_config_keys_are_exactly_the_declared_parameters(ros_context):
    config = yaml.safe_load(CONFIG_FILE.read_text())
    assert list(config) == [CONFIG_KEY]
    keys = set(config[CONFIG_KEY]["ros__parameters"])
    node = StereoNode(context=ros_context)
    try:
        declared = {name for name in node._parameters
                    if not name.startswith("qos_overrides.") and name not in ("use_sim_time",
                                                                               "start_type_description_service")}
        assert keys == declared == set(PARAMETER_NAMES)
        # The shipped values are the node's defaults.
        for name, value in config[CONFIG_KEY]["ros__parameters"].items():
            assert node.get_parameter(name).value == value, name
    finally:
        node.close()
        node.destroy_node()


def node_command(*ros_args: str, params_file=CONFIG_FILE) -> list[str]:
    return [sys.executable, "-m", "stereo_kd_ros", "--ros-args", "--params-file", str(params_file), *ros_args]


def node_env() -> dict[str, str]:
    return {**os.environ, "ROS_DOMAIN_ID": str(ROS_DOMAIN_ID), "PYTHONPATH": str(REPO_ROOT),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_console_node_with_remaps_processes_a_pair_and_exits_cleanly(ros_context, stop_signal):
    process = subprocess.Popen(
        node_command("-p", "max_disparity:=32", "-r", "left/image_rect:=cam/left/image",
                     "-r", "right/image_rect:=cam/right/image", "-r", "disparity:=out/disparity"),
        env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    io = Node("cli_test_io", context=ros_context)
    outputs = []
    io.create_subscription(DisparityImage, "out/disparity", outputs.append, RELIABLE)
    pubs = {topic: io.create_publisher(msg_type, topic, RELIABLE) for topic, msg_type in (
        ("cam/left/image", Image), ("cam/right/image", Image),
        ("left/camera_info", CameraInfo), ("right/camera_info", CameraInfo))}
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(io)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        assert wait_until(lambda: all(p.get_subscription_count() for p in pubs.values())
                          and io.count_publishers("out/disparity") > 0, timeout_s=30), "node did not start"
        scene = make_scene(width=96, height=64, plane_disparity=6, box_disparity=12)
        stamp = Time(sec=7)
        left_info, right_info = scene.camera_infos(stamp)
        left, right = scene.images(stamp)
        for attempt in range(20):  # camera_info and images travel on separate topics
            stamp = Time(sec=7 + attempt)
            for msg in (left_info, right_info, left, right):
                msg.header.stamp = stamp
            pubs["left/camera_info"].publish(left_info)
            pubs["right/camera_info"].publish(right_info)
            pubs["cam/left/image"].publish(left)
            pubs["cam/right/image"].publish(right)
            if wait_until(lambda: outputs, timeout_s=0.5):
                break
        assert outputs and outputs[0].f == pytest.approx(scene.focal_px)
    finally:
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=20)
        executor.shutdown()
        io.destroy_node()
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_console_node_rejects_bad_parameter_clearly():
    result = subprocess.run(node_command("-p", "precision:=fp64"), env=node_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "precision" in result.stderr and "fp64" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(node_command("-p", "confidence_threshold:=2.0"), env=node_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "confidence_threshold" in result.stderr


def test_params_file_applies_to_a_node_in_a_namespace(ros_context, tmp_path):
    config = yaml.safe_load(CONFIG_FILE.read_text())
    changed = {"max_disparity": 48, "confidence_threshold": 0.25}
    assert all(config[CONFIG_KEY]["ros__parameters"][name] != value for name, value in changed.items())
    config[CONFIG_KEY]["ros__parameters"].update(changed)
    params_file = tmp_path / "stereo.yaml"
    params_file.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(node_command("-r", "__ns:=/rig_a/front", params_file=params_file),
                               env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    io = Node("params_test_io", context=ros_context)
    client = AsyncParameterClient(io, f"/rig_a/front/{NODE_NAME}")
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(io)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        assert client.wait_for_services(timeout_sec=30), "node did not start in /rig_a/front"
        future = client.get_parameters(["max_disparity", "confidence_threshold", "queue_size"])
        deadline = time.monotonic() + 10
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        values = [value.integer_value if value.type == 2 else value.double_value
                  for value in future.result().values]
        assert values == [48, 0.25, config[CONFIG_KEY]["ros__parameters"]["queue_size"]]
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
        executor.shutdown()
        io.destroy_node()
    assert process.returncode == 0, output
