"""Node throughput: a 640x480 stereo stream at 30 Hz into stereo_kd_node for a fixed time.

The node runs as its own process (`python -m stereo_kd_ros`), exactly as deployed; this
process publishes the stream (the Middlebury Motorcycle pair cropped to 640x480, with its
real calibration, fresh stamps every frame) and subscribes to `disparity` and `points2` like
a visualiser would. Reports the rate the node publishes at, what happened to every frame
(received, processed, dropped by latest-wins, rejected, lost in transport), the end-to-end
latency (stamp to points2 received) per time window, and whether a backlog grows.

    python benchmarks/node_throughput.py --model sgbm --input-scale 0.5 --duration 30 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Loopback-only DDS; must be set before rclpy is imported (inherited by the node process).
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO_ROOT / "config" / "fastdds_localhost.xml")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

WIDTH, HEIGHT = 640, 480
DOMAIN_ID = 187
WINDOW_S = 5.0  # latency and rate are reported per window of this length


def motorcycle_640x480():
    """(left, right, StereoGeometry): Middlebury Motorcycle (skimage.data), centre crop to 640x480."""
    import dataclasses

    from skimage.data import stereo_motorcycle

    from stereo_kd_core.evaluate import motorcycle_geometry

    left, right, _ = stereo_motorcycle()  # (500, 741, 3) RGB
    x0, y0 = (left.shape[1] - WIDTH) // 2, (left.shape[0] - HEIGHT) // 2
    crop = (slice(y0, y0 + HEIGHT), slice(x0, x0 + WIDTH))
    full = motorcycle_geometry()  # a crop shifts the principal points
    geometry = dataclasses.replace(full, cx_left=full.cx_left - x0, cx_right=full.cx_right - x0, cy=full.cy - y0)
    return np.ascontiguousarray(left[crop]), np.ascontiguousarray(right[crop]), geometry


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


class NodeSession:
    """stereo_kd_node in a subprocess, fed and watched from this process over loopback DDS.

    `parameters` are node parameters (-p name:=value); `parameters=None` starts no node (one
    already running on the domain is fed). Call start(), publish for a while with stream(), then
    stop(); `node_rss_kib()` samples the node's resident memory at any time.
    """

    def __init__(self, parameters: dict[str, object] | None, domain_id: int = DOMAIN_ID,
                 rate_hz: float = 30.0):
        self.parameters = parameters
        self.domain_id = domain_id
        self.rate_hz = rate_hz
        self.published = 0
        self.arrivals: list[tuple[float, float]] = []  # (monotonic receive time, latency ms) per points2
        self.disparity_count = 0
        self.diagnostics: dict[str, str] = {}
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    # -- set-up ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from std_msgs.msg import Header
        from stereo_msgs.msg import DisparityImage

        from stereo_kd_ros.conversions import numpy_to_image

        if self.parameters is not None:
            command = [sys.executable, "-m", "stereo_kd_ros", "--ros-args"]
            for name, value in self.parameters.items():
                command += ["-p", f"{name}:={str(value).lower() if isinstance(value, bool) else value}"]
            env = {**os.environ, "ROS_DOMAIN_ID": str(self.domain_id), "PYTHONPATH": str(REPO_ROOT)}
            # A file, not a pipe: nobody reads a pipe during the run, and a full pipe (64 KiB of
            # the node's log lines) would block the node.
            self._output = tempfile.TemporaryFile(mode="w+")
            self.process = subprocess.Popen(command, env=env, stdout=self._output,
                                            stderr=subprocess.STDOUT, text=True)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.io = rclpy.create_node("stereo_kd_throughput_io", context=self.context)
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        left, right, geometry = motorcycle_640x480()
        self._messages = []
        for side, pixels, projection in (("left", left, geometry.projection_matrices()[0]),
                                         ("right", right, geometry.projection_matrices()[1])):
            header = Header(frame_id=f"{side}_optical")
            self._messages.append((self.io.create_publisher(CameraInfo, f"{side}/camera_info", reliable),
                                   CameraInfo(header=header, width=WIDTH, height=HEIGHT,
                                              p=[float(v) for v in projection.ravel()])))
            self._messages.append((self.io.create_publisher(Image, f"{side}/image_rect", reliable),
                                   numpy_to_image(pixels, "rgb8", header)))
        self.io.create_subscription(PointCloud2, "points2", self._on_points, reliable)
        self.io.create_subscription(DisparityImage, "disparity", self._on_disparity, reliable)
        self.io.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.io)
        self._spinner = threading.Thread(target=self._executor.spin, daemon=True)
        self._spinner.start()
        deadline = time.monotonic() + timeout_s
        while not (all(pub.get_subscription_count() for pub, _ in self._messages)
                   and self.io.count_publishers("points2") and self.diagnostics):
            if (self.process is not None and self.process.poll() is not None) or time.monotonic() > deadline:
                output = self.stop()
                raise RuntimeError(f"stereo_kd_node did not come up:\n{output}")
            time.sleep(0.05)

    def _on_points(self, msg) -> None:
        from stereo_kd_ros.conversions import stamp_to_ns

        latency_ms = (time.time_ns() - stamp_to_ns(msg.header.stamp)) * 1e-6
        with self._lock:
            self.arrivals.append((time.monotonic(), latency_ms))

    def _on_disparity(self, msg) -> None:
        with self._lock:
            self.disparity_count += 1

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith("stereo_kd_node: stereo"):
                with self._lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}

    # -- running --------------------------------------------------------------------------

    def stream(self, duration_s: float, on_second=None) -> None:
        """Publish pairs at `rate_hz` for `duration_s` (camera_info, then image, per side);
        `on_second(elapsed_s)` is called about once a second."""
        period = 1.0 / self.rate_hz
        start = time.monotonic()
        next_tick, next_second = start, start + 1.0
        while (now := time.monotonic()) < start + duration_s:
            if now >= next_second and on_second is not None:
                on_second(now - start)
                next_second += 1.0
            if now < next_tick:
                time.sleep(min(next_tick - now, 0.005))
                continue
            next_tick += period
            stamp_ns = time.time_ns()
            for publisher, msg in self._messages:
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
                publisher.publish(msg)
            self.published += 1

    def settle(self, timeout_s: float = 10.0) -> dict[str, str]:
        """Wait until the node has finished every pair it took, then return its final diagnostics."""
        deadline = time.monotonic() + timeout_s
        values: dict[str, str] = {}
        while time.monotonic() < deadline:
            time.sleep(0.5)
            with self._lock:
                values = dict(self.diagnostics)
            finished = sum(int(values.get(key, 0)) for key in ("processed", "dropped", "rejected",
                                                               "discarded_at_shutdown"))
            if values and finished == int(values["pairs"]):
                time.sleep(float((self.parameters or {}).get("diagnostics_period_s", 1.0)) + 0.2)
                with self._lock:
                    return dict(self.diagnostics)
        return values

    def node_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS for the node process")

    def stop(self) -> str:
        """SIGINT the node; its output (raises if it did not exit cleanly with code 0)."""
        output = ""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a hung shutdown is a finding: keep its log, end it
                self.process.kill()
                self.process.wait()
                print("stereo_kd_node did not exit within 30 s of SIGINT; killed", file=sys.stderr)
            self._output.seek(0)
            output = self._output.read()
            self._output.close()
        if hasattr(self, "_executor"):
            self._executor.shutdown()
            self.io.destroy_node()
            self.context.try_shutdown()
        self.returncode = None if self.process is None else self.process.returncode
        return output

    # -- figures --------------------------------------------------------------------------

    def windows(self, start: float, duration_s: float) -> list[dict[str, float | None]]:
        """Output rate and latency percentiles per WINDOW_S window since monotonic `start`."""
        with self._lock:
            arrivals = list(self.arrivals)
        figures = []
        for index in range(max(1, int(duration_s // WINDOW_S))):
            low, high = start + index * WINDOW_S, start + (index + 1) * WINDOW_S
            latencies = [latency for t, latency in arrivals if low <= t < high]
            figures.append({"t_s": index * WINDOW_S, "rate_hz": len(latencies) / WINDOW_S,
                            **{f"latency_{k}_ms": v for k, v in _percentiles(latencies).items()}})
        return figures

    def accounting(self, values: dict[str, str]) -> dict[str, int]:
        """Where every published pair went, from the node's final diagnostics."""
        counts = {key: int(values.get(key, 0)) for key in (
            "received_left_images", "received_right_images", "pairs", "processed", "dropped", "rejected",
            "discarded_at_shutdown", "unmatched_images")}
        counts["published"] = self.published
        counts["lost_in_transport"] = 2 * self.published - counts["received_left_images"] - counts[
            "received_right_images"]
        counts["unaccounted_pairs"] = counts["pairs"] - (counts["processed"] + counts["dropped"]
                                                         + counts["rejected"] + counts["discarded_at_shutdown"])
        counts.update({key: int(value) for key, value in values.items() if key.startswith("rejected_")})
        return counts


def backlog_grows(windows: list[dict], inference_ms: float) -> bool:
    """A growing backlog shows as latency rising window after window: the last window's median
    exceeds the first's by more than one inference time plus 50 ms."""
    measured = [w["latency_p50_ms"] for w in windows if w["latency_p50_ms"] is not None]
    if len(measured) < 2:
        return False
    return measured[-1] > measured[0] + inference_ms + 50.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sgbm", help="Node 'model' parameter (sgbm, a shipped name, a path).")
    parser.add_argument("--device", default="auto", help="Node 'device' parameter.")
    parser.add_argument("--input-scale", type=float, default=1.0, help="Node 'input_scale' parameter (0.1..1).")
    parser.add_argument("--max-disparity", type=int, default=0,
                        help="Node 'max_disparity' parameter (0: the model's own).")
    parser.add_argument("--best-effort", action="store_true",
                        help="Leave the node's subscriptions on sensor-data (best effort) QoS; by default "
                             "they are reliable (use_system_default_qos), because best-effort 640x480 images "
                             "over the loopback-UDP-only DDS profile lose most frames to fragment loss.")
    parser.add_argument("--rate", type=float, default=30.0, help="Input frames per second.")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of streaming.")
    parser.add_argument("--compile", action="store_true",
                        help="Node 'compile' parameter: the first pair compiles; the rate is taken from the "
                             "windows after the first one with output (give --duration room for the compile).")
    parser.add_argument("--precision", default="auto", help="Node 'precision' parameter (auto, fp32, bf16, int8).")
    parser.add_argument("--skip-s", type=float, default=0.0,
                        help="Seconds of streaming left out of the steady rate (a compile or int8 build runs in "
                             "the background while the eager network publishes: give it this long).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument("--node-log", type=Path, help="Write the node's console output to this file.")
    args = parser.parse_args(argv)

    session = NodeSession({"model": args.model, "device": args.device, "input_scale": args.input_scale,
                           "max_disparity": args.max_disparity, "use_system_default_qos": not args.best_effort,
                           "diagnostics_period_s": 1.0, "compile": args.compile, "precision": args.precision},
                          rate_hz=args.rate)
    session.start()
    try:
        start = time.monotonic()
        session.stream(args.duration)
        values = session.settle()
    finally:
        output = session.stop()
        if args.node_log:
            args.node_log.write_text(output)
    windows = session.windows(start, args.duration)
    inference_ms = float(values.get("inference_p50_ms", "nan"))
    first_output = next((i for i, w in enumerate(windows) if w["rate_hz"] > 0), 0)
    skipped = sum(1 for w in windows if w["t_s"] < args.skip_s)
    # the first window with output includes start-up; --skip-s leaves out a background build as well
    steady = windows[max(first_output + 1, skipped):] or windows
    figures = {
        "model": values.get("model"), "device": values.get("device"), "input_scale": args.input_scale,
        "compile": args.compile, "precision": args.precision, "skip_s": args.skip_s,
        "output_rate_hz_all_windows": float(np.mean([w["rate_hz"] for w in windows[first_output:]] or [0.0])),
        "image": f"{WIDTH}x{HEIGHT} rgb8", "reliable_input": not args.best_effort, "input_rate_hz": args.rate,
        "duration_s": args.duration,
        "output_rate_hz": float(np.mean([w["rate_hz"] for w in steady])),
        "inference_p50_ms": inference_ms,
        "node_overhead_p50_ms": float(values.get("overhead_p50_ms", "nan")),
        "frames": session.accounting(values),
        "windows": windows,
        "backlog_growing": backlog_grows(windows, inference_ms),
        "node_exit_code": session.returncode,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average": os.getloadavg(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if session.returncode != 0:
        print(output, file=sys.stderr)
    return 0 if session.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
