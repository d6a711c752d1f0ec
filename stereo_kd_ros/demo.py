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

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_PROFILE = REPO_ROOT / "config" / "fastdds_localhost.xml"


def ros_environment(domain_id: int) -> dict[str, str]:
    """Loopback-only DDS on its own domain (for this process and the children)."""
    env = dict(os.environ)
    if LOOPBACK_PROFILE.is_file():
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(LOOPBACK_PROFILE)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stereo_kd_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30, help="Frames the player publishes.")
    parser.add_argument("--rate", type=float, default=10.0, help="Player rate in Hz.")
    parser.add_argument("--model", default="sgbm", help="Node 'model' parameter.")
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
    node_process = subprocess.Popen(
        [sys.executable, "-m", "stereo_kd_ros", "--ros-args", "--params-file",
         str(REPO_ROOT / "config" / "stereo.yaml"), "-p", f"model:={args.model}", "-p", f"device:={args.device}",
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
    collector.create_subscription(Image, "confidence", lambda m: on_output("confidence", m), qos)
    collector.create_subscription(DiagnosticArray, "/diagnostics", lambda m: on_output("diagnostics", m), 10)
    executor = SingleThreadedExecutor()
    executor.add_node(collector)
    threading.Thread(target=executor.spin, daemon=True).start()

    deadline = time.monotonic() + args.timeout
    player_process = None
    try:
        while collector.count_publishers("disparity") == 0:  # the node is up (model loaded)
            if node_process.poll() is not None or time.monotonic() > deadline:
                print("stereo_kd_demo: the node did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        player_process = subprocess.Popen(
            [sys.executable, "-m", "stereo_kd_ros.player", "--frames", str(args.frames), "--rate", str(args.rate)],
            env=env)
        player_process.wait(timeout=max(deadline - time.monotonic(), 1))
        time.sleep(1.0)  # the last pair may still be in the estimator
    finally:
        if player_process is not None and player_process.poll() is None:
            player_process.kill()
        node_process.send_signal(signal.SIGINT)
        node_exit = node_process.wait(timeout=30)
        executor.shutdown()
        collector.destroy_node()
        rclpy.try_shutdown()

    with lock:
        disparities, clouds, latencies = received["disparity"], received["points2"], received["latency_ms"]
        diagnostics = received["diagnostics"]
        confidences = {stamp_to_ns(m.header.stamp): m for m in received["confidence"]}
    if not disparities or not clouds:
        print("stereo_kd_demo: no output received from the node", file=sys.stderr)
        return 1
    disparity = disparity_from_msg(disparities[-1])
    valid_disparity = disparity[np.isfinite(disparity)]
    from PIL import Image as PILImage  # scikit-image's dependency

    PILImage.fromarray(colorize_disparity(disparity, max_disparity=float(valid_disparity.max()))).save(
        args.out / "disparity.png")
    cloud = point_cloud_to_numpy(clouds[-1])
    rgb = unpack_rgb(cloud[..., 3]) if cloud.shape[-1] == 4 else None
    points_written = write_ply(args.out / "points.ply", cloud[..., :3], rgb)
    confidence_msg = confidences.get(stamp_to_ns(disparities[-1].header.stamp))
    confidence = image_to_numpy(confidence_msg, ("32FC1",)) if confidence_msg is not None else None
    panel = stereo_panel(motorcycle_pair().left, disparity, confidence, cloud[..., :3],
                         max_disparity=float(valid_disparity.max()))
    PILImage.fromarray(panel).save(args.out / "panel.png")
    stamps = sorted(stamp_to_ns(m.header.stamp) for m in disparities)
    node_values = ({kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {})
    summary = {
        "input": "middlebury-motorcycle 741x500 (skimage.data.stereo_motorcycle)",
        "frames_published": args.frames,
        "frames_received": len(disparities),
        "output_rate_hz": (len(stamps) - 1) / ((stamps[-1] - stamps[0]) * 1e-9) if len(stamps) > 1 else None,
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "valid_fraction": float(np.isfinite(disparity).mean()),
        "depth_m_median": float(np.nanmedian(cloud[..., 2])),
        "points_written": points_written,
        "node": node_values,
        "node_exit_code": node_exit,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if node_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
