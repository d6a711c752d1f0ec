"""Per-frame overhead of stereo_kd_node at 640x480: everything except the estimator.

The node runs in this process with a stand-in estimator that returns a fixed disparity map
(SGBM's output for the first pair, computed once up front) at no cost, so what is timed is the
node's own work: validation and decoding of the synchronized pair, building the
DisparityImage and the organized colour PointCloud2, and publishing them. A second process
(spawned) publishes the 640x480 stream over loopback DDS and subscribes to `disparity` and
`points2`, as a visualiser would; every output is built because somebody listens.

Reports, per frame: the node's own time (its `overhead` figure: the executor-thread work on
the pair plus output building and publishing) and the end-to-end latency from the input stamp
to points2 received by the other process (adds DDS transport both ways and deserialisation).

    python benchmarks/node_overhead.py [--frames 200] [--rate 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO_ROOT / "config" / "fastdds_localhost.xml")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from node_throughput import HEIGHT, WIDTH, NodeSession, motorcycle_640x480  # noqa: E402

from stereo_kd_core import StereoEstimator, StereoPrediction  # noqa: E402
from stereo_kd_core.allocator import keep_freed_memory  # noqa: E402

DOMAIN_ID = 188
WARMUP_FRAMES = 10


class FixedDisparityEstimator(StereoEstimator):
    """Returns the same prediction for every pair, instantly: isolates the node's own cost."""

    def __init__(self, prediction: StereoPrediction, max_disparity: int):
        self.name, self.device, self.precision = "fixed", "cpu", "fp32"
        self.max_disparity, self.min_disparity = max_disparity, 0.0
        self.prediction = prediction

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        return self.prediction


def _stream(frames: int, rate_hz: float, results) -> None:
    """Child process: publish `frames` pairs, report what came back."""
    session = NodeSession(None, domain_id=DOMAIN_ID, rate_hz=rate_hz)
    try:
        session.start()
        session.stream(frames / rate_hz)
        time.sleep(1.0)  # last outputs in flight
        latencies = [latency for _, latency in session.arrivals]
        results.put({"published": session.published, "points2_received": len(latencies),
                     "disparity_received": session.disparity_count, "latency_ms": latencies})
    finally:
        session.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200,
                        help=f"Frames to time (after {WARMUP_FRAMES} warm-up frames); at most 200 are kept.")
    parser.add_argument("--rate", type=float, default=15.0, help="Input frames per second.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument("--align-rows-every", type=int, default=30,
                        help="The node's align_rows_every (default 30, the node's default; 0: off).")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="Leave glibc's malloc as it is (the node's console script keeps freed memory "
                             "for reuse: stereo_kd_core.allocator).")
    args = parser.parse_args(argv)
    kept_freed_memory = False if args.glibc_defaults else keep_freed_memory()

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from stereo_kd_ros.node import StereoNode
    from stereo_kd_ros.pipeline import STATS_WINDOW

    left, right, _ = motorcycle_640x480()
    max_disparity = 192
    prediction = StereoEstimator.load("sgbm", max_disparity=max_disparity, align_rows=False).predict(left, right)
    estimator = FixedDisparityEstimator(prediction, max_disparity)

    rclpy.init(domain_id=DOMAIN_ID)
    # Reliable input: best-effort 640x480 images over the loopback-UDP-only profile lose most frames.
    node = StereoNode(estimator=estimator, parameter_overrides=[
        Parameter("use_color", value=True), Parameter("use_system_default_qos", value=True),
        Parameter("diagnostics_period_s", value=0.5), Parameter("align_rows_every", value=args.align_rows_every)])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    results = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_stream, args=(args.frames + WARMUP_FRAMES, args.rate, results))
    child.start()
    streamed = results.get(timeout=120 + (args.frames + WARMUP_FRAMES) / args.rate)
    child.join(30)
    with node.stats.lock:
        overhead = np.array(node.stats.overhead_ms)[-min(args.frames, STATS_WINDOW):]
        counts = {"pairs": node.stats.pairs, "processed": node.stats.processed, "dropped": node.stats.dropped,
                  "rejected": sum(node.stats.rejected.values())}
    latency = np.array(streamed.pop("latency_ms")[WARMUP_FRAMES:])
    figures = {
        "image": f"{WIDTH}x{HEIGHT} rgb8 in, DisparityImage + organized x y z rgb PointCloud2 out",
        "frames_timed": int(overhead.size),
        "overhead_ms_median": float(np.median(overhead)),
        "overhead_ms_p95": float(np.percentile(overhead, 95)),
        "overhead_ms_min": float(overhead.min()),
        "end_to_end_ms_median": float(np.median(latency)) if latency.size else None,
        "end_to_end_ms_p95": float(np.percentile(latency, 95)) if latency.size else None,
        "node_counts": counts,
        "stream": streamed,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "kept_freed_memory": kept_freed_memory,
        "align_rows_every": args.align_rows_every,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    executor.shutdown()
    node.close()
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
