"""Per-frame overhead of stereo_kd_node at 640x480: everything except the estimator.

Times, per frame, the node's own work on a real node with real publishers and a real
subscriber on the outputs (loopback DDS): synchronization of the two images, validation and
decoding (`prepare`), then building and publishing DisparityImage and the organized colour
PointCloud2 from a fixed disparity map (`publish_outputs`). The estimator is not called.

    python benchmarks/node_overhead.py [--frames 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO_ROOT / "config" / "fastdds_localhost.xml")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

WIDTH, HEIGHT = 640, 480
DOMAIN_ID = 188


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="Timed frames (after 10 warm-up frames).")
    parser.add_argument("--encoding", default="bgr8", help="Input image encoding (bgr8, rgb8, mono8, ...).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)

    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Header
    from stereo_msgs.msg import DisparityImage

    from stereo_kd_core import StereoPrediction
    from stereo_kd_core.geometry import StereoGeometry
    from stereo_kd_ros.conversions import numpy_to_image
    from stereo_kd_ros.node import StereoNode
    from stereo_kd_ros.player import camera_info

    rclpy.init(domain_id=DOMAIN_ID)
    node = StereoNode(parameter_overrides=[Parameter("use_color", value=True)])
    node.close()  # frames are driven by hand below; the worker thread is not used
    listener = rclpy.create_node("node_overhead_listener")
    received = {"disparity": 0, "points2": 0}
    qos = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)
    listener.create_subscription(DisparityImage, "disparity", lambda m: received.__setitem__(
        "disparity", received["disparity"] + 1), qos)
    listener.create_subscription(PointCloud2, "points2", lambda m: received.__setitem__(
        "points2", received["points2"] + 1), qos)
    deadline = time.monotonic() + 10
    while node.points_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        rclpy.spin_once(listener, timeout_sec=0.05)

    rng = np.random.default_rng(0)
    channels = 1 if args.encoding.startswith("mono") else 3
    pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, channels), dtype=np.uint8).squeeze()
    geometry = StereoGeometry.from_intrinsics(525.0, 319.5, 239.5, 0.12)
    p_left, p_right = geometry.projection_matrices()
    # A valid map over most of the image, NaN on SGBM's empty left band.
    disparity = rng.uniform(2, 100, size=(HEIGHT, WIDTH)).astype(np.float32)
    disparity[:, :64] = np.nan
    prediction = StereoPrediction(disparity=disparity, confidence=np.isfinite(disparity).astype(np.float32))
    pairs = []
    node.on_images = lambda left, right: pairs.append(node.prepare(left, right))  # sync -> prepare
    node.image_sync.synchronizer.callback = node.on_images

    timings_ms = []
    for frame in range(args.frames + 10):
        stamp = Time(sec=1 + frame)
        left_header, right_header = Header(stamp=stamp, frame_id="left"), Header(stamp=stamp, frame_id="right")
        node.camera_infos["left"] = camera_info(p_left, WIDTH, HEIGHT, left_header)
        node.camera_infos["right"] = camera_info(p_right, WIDTH, HEIGHT, right_header)
        left_msg = numpy_to_image(pixels, args.encoding, left_header)
        right_msg = numpy_to_image(pixels, args.encoding, right_header)
        start = time.perf_counter()
        node.image_sync.synchronizer.add(0, left_msg)
        node.image_sync.synchronizer.add(1, right_msg)
        node.publish_outputs(pairs.pop(), prediction)
        timings_ms.append((time.perf_counter() - start) * 1e3)
        rclpy.spin_once(listener, timeout_sec=0)
    timings = np.array(timings_ms[10:])
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        rclpy.spin_once(listener, timeout_sec=0.05)
    figures = {
        "image": f"{WIDTH}x{HEIGHT} {args.encoding}",
        "frames": args.frames,
        "overhead_ms_median": float(np.median(timings)),
        "overhead_ms_p95": float(np.percentile(timings, 95)),
        "overhead_ms_min": float(timings.min()),
        "outputs_received": received,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    node.destroy_node()
    listener.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
