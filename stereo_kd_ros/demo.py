"""stereo_kd_demo (what `make demo` runs): node and player as two processes over DDS.

Plays the bundled Motorcycle pair for a fixed number of frames, records the node's outputs
and writes into the output folder: disparity.png (colourised), panel.png (left image, disparity
with scale bar, confidence, rendered point cloud), points.ply, summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from stereo_kd_core.registry import default_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stereo_kd_ros"
NODE_STOP_WAIT_S = 30.0


def config_file(name: str) -> Path | None:
    """config/NAME from the installed package's share directory, else from the source tree, else None."""
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            candidates.append(Path(get_package_share_directory(PACKAGE)) / "config" / name)
        except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH (not sourced)
            pass
    except ImportError:
        pass
    candidates.append(REPO_ROOT / "config" / name)
    return next((path for path in candidates if path.is_file()), None)


LOOPBACK_PROFILE = config_file("fastdds_localhost.xml")


def ros_environment(domain_id: int) -> dict[str, str]:
    """Loopback-only DDS on its own domain (for this process and the children)."""
    env = dict(os.environ)
    if LOOPBACK_PROFILE is not None:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(LOOPBACK_PROFILE)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id)
    return env


def stop_node(process: subprocess.Popen, graceful: bool) -> int:
    """SIGINT (graceful) or kill the node process; its exit code. A node that ignores SIGINT for
    NODE_STOP_WAIT_S is killed."""
    if process.poll() is None:
        if graceful:
            process.send_signal(signal.SIGINT)
            try:
                return process.wait(timeout=NODE_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                print("stereo_kd_demo: the node did not stop on SIGINT: killed", file=sys.stderr)
        process.kill()
    return process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stereo_kd_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30, help="Frames the player publishes.")
    parser.add_argument("--rate", type=float, default=10.0, help="Player rate in Hz.")
    parser.add_argument("--model", default=default_model(),
                        help="Node 'model' parameter (default: the shipped default student).")
    parser.add_argument("--device", default="auto", help="Node 'device' parameter.")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="Output folder.")
    parser.add_argument("--domain-id", type=int, default=77, help="ROS_DOMAIN_ID used by all three processes.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Give up after this many seconds.")
    args = parser.parse_args(argv)

    os.environ.update(ros_environment(args.domain_id))
    import rclpy  # after the DDS environment is in place
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2
    from stereo_msgs.msg import DisparityImage

    from stereo_kd_core.viz import colorize_disparity, stereo_panel, write_ply
    from stereo_kd_ros.conversions import (
        disparity_from_msg,
        image_to_numpy,
        point_cloud_to_numpy,
        stamp_to_ns,
        unpack_rgb,
    )
    from stereo_kd_ros.player import motorcycle_pair

    args.out.mkdir(parents=True, exist_ok=True)
    env = ros_environment(args.domain_id)
    params_file = config_file("stereo.yaml")
    if params_file is None:
        print("stereo_kd_demo: config/stereo.yaml not found (installed share or source tree): "
              "running the node with its default parameters", file=sys.stderr)
    node_process = subprocess.Popen(
        [sys.executable, "-m", "stereo_kd_ros", "--ros-args",
         *(["--params-file", str(params_file)] if params_file is not None else []),
         "-p", f"model:={args.model}", "-p", f"device:={args.device}",
         # Reliable input: megabyte images as best-effort UDP fragments get lost on a busy CPU.
         "-p", "use_system_default_qos:=true", "-p", "publish_confidence:=true"],
        env=env)
    rclpy.init()
    collector = rclpy.create_node("stereo_kd_demo_collector")
    received: dict[str, list] = {"disparity": [], "points2": [], "confidence": [], "latency_ms": [],
                                 "diagnostics": []}
    lock = threading.Lock()

    def on_output(topic: str, msg) -> None:
        with lock:
            received[topic].append(msg)
            if topic == "disparity":
                received["latency_ms"].append((time.time_ns() - stamp_to_ns(msg.header.stamp)) * 1e-6)

    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    collector.create_subscription(DisparityImage, "disparity", lambda m: on_output("disparity", m), qos)
    collector.create_subscription(PointCloud2, "points2", lambda m: on_output("points2", m), qos)
    collector.create_subscription(Image, "confidence/image_rect", lambda m: on_output("confidence", m), qos)
    collector.create_subscription(DiagnosticArray, "/diagnostics", lambda m: on_output("diagnostics", m), 10)
    executor = SingleThreadedExecutor()
    executor.add_node(collector)
    threading.Thread(target=executor.spin, daemon=True).start()

    deadline = time.monotonic() + args.timeout
    player_process = None
    failure = None
    try:
        while collector.count_publishers("disparity") == 0:  # the node is up (model loaded)
            if node_process.poll() is not None:
                failure = f"the node exited with code {node_process.returncode} before it started"
                break
            if time.monotonic() > deadline:
                failure = f"the node did not start within --timeout {args.timeout:g} s"
                break
            time.sleep(0.1)
        if failure is None:
            player_process = subprocess.Popen(
                [sys.executable, "-m", "stereo_kd_ros.player", "--frames", str(args.frames),
                 "--rate", str(args.rate)], env=env)
            try:
                player_process.wait(timeout=max(deadline - time.monotonic(), 1))
                time.sleep(1.0)  # the last pair may still be in the estimator
            except subprocess.TimeoutExpired:
                failure = f"the player did not finish {args.frames} frames within --timeout {args.timeout:g} s"
    finally:
        if player_process is not None and player_process.poll() is None:
            player_process.kill()
            player_process.wait()
        node_exit = stop_node(node_process, graceful=failure is None)
        executor.shutdown()
        collector.destroy_node()
        rclpy.try_shutdown()
    if failure is not None:
        print(f"stereo_kd_demo: {failure}; node stopped", file=sys.stderr)
        return 1

    with lock:
        disparities, clouds, latencies = received["disparity"], received["points2"], received["latency_ms"]
        diagnostics = received["diagnostics"]
        confidences = {stamp_to_ns(m.header.stamp): m for m in received["confidence"]}
    if not disparities or not clouds:
        print("stereo_kd_demo: no output received from the node", file=sys.stderr)
        return 1
    disparity = disparity_from_msg(disparities[-1])
    valid_disparity = disparity[np.isfinite(disparity)]
    if valid_disparity.size:
        colour_max = float(valid_disparity.max())
    else:
        print("stereo_kd_demo: the last disparity has no valid pixel", file=sys.stderr)
        colour_max = max(float(disparities[-1].max_disparity), 1.0)
    from PIL import Image as PILImage  # scikit-image's dependency

    PILImage.fromarray(colorize_disparity(disparity, max_disparity=colour_max)).save(args.out / "disparity.png")
    cloud = point_cloud_to_numpy(clouds[-1])
    rgb = unpack_rgb(cloud[..., 3]) if cloud.shape[-1] == 4 else None
    points_written = write_ply(args.out / "points.ply", cloud[..., :3], rgb)
    confidence_msg = confidences.get(stamp_to_ns(disparities[-1].header.stamp))
    confidence = image_to_numpy(confidence_msg, ("32FC1",)) if confidence_msg is not None else None
    panel = stereo_panel(motorcycle_pair().left, disparity, confidence, cloud[..., :3],
                         max_disparity=colour_max)
    PILImage.fromarray(panel).save(args.out / "panel.png")
    stamps = sorted(stamp_to_ns(m.header.stamp) for m in disparities)
    depth = cloud[..., 2]
    node_values = ({kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {})
    summary = {
        "input": "middlebury-motorcycle 741x500 (skimage.data.stereo_motorcycle)",
        "frames_published": args.frames,
        "frames_received": len(disparities),
        "output_rate_hz": (len(stamps) - 1) / ((stamps[-1] - stamps[0]) * 1e-9) if len(stamps) > 1 else None,
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "valid_fraction": float(np.isfinite(disparity).mean()),
        "depth_m_median": (float(np.median(depth[np.isfinite(depth)])) if np.isfinite(depth).any() else None),
        "points_written": points_written,
        "node": node_values,
        "node_exit_code": node_exit,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if node_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
