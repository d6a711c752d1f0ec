"""Start/stop stress of stereo_kd_node: many node processes, each stopped by SIGINT or SIGTERM at a
seeded random moment, half of them while starting and half after their first frames, some with a
second signal soon after.

Odd cycles wait for no inference at the stop (as if the inference outlived the shutdown wait), so
that the process ends while its worker thread may be inside the estimator. Each node, and the
process publishing the pairs, is a fork of this process taken after the heavy imports (PyTorch, OpenCV;
rclpy starts threads, so it comes after the fork), so a
cycle costs a node's start-up, not an interpreter's; the child then runs the console script's own
path (stop handlers, runner.run) and leaves through the normal interpreter exit. One JSON line per
cycle on stdout: seed, delay, signals, exit code, whether frames were flowing, whether a traceback
was printed.

    python stop_stress_driver.py --cycles 32 --parallel 4 --seed 0
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import os
import random
import signal
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS thread pool: this process stays single-threaded

import stereo_kd_core  # noqa: E402, F401 - PyTorch, OpenCV: the heavy imports, once, before any fork
from stereo_kd_ros import entry  # noqa: E402

HANG_S = float(os.environ.get("STOP_STRESS_HANG_S", "40"))  # a node not gone this long after its last signal is hung
PR_SET_PDEATHSIG = 1  # prctl option (Linux)
FLOWING_TIMEOUT_S = 60.0  # a node that processed no pair by then is signalled anyway (and reported)


def die_with_parent() -> None:
    """A forked child gets SIGKILL when the driver ends (a driver killed on a timeout leaves no node)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def node_argv(index: int) -> list[str]:
    return ["stereo_kd_node", "--ros-args", "-r", f"__node:=stress_{index}", "-p", "model:=sgbm",
            "-p", "max_disparity:=32", "-p", "use_system_default_qos:=true",
            "-p", "diagnostics_period_s:=0.1", "-p", "status_log_period_s:=0.1"]


def start_node(index: int, log_path: str) -> int:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # before the fork: read at once
    pid = os.fork()
    if pid:
        os.close(log)
        return pid
    # Child: output to the log, then the console script's path and the normal interpreter exit.
    die_with_parent()
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung node shows its stacks

    def start() -> int:  # as the console script's entry.node_main, with the node's own arguments
        import stereo_kd_ros.node as node_module  # rclpy starts threads: imported after the fork
        import stereo_kd_ros.pipeline as pipeline_module

        if index % 2:  # a wait shorter than any inference: the process ends under a busy worker
            pipeline_module.PairPipeline.shutdown_wait_s = lambda self: 0.0
        return node_module.main(node_argv(index))

    sys.exit(entry.run_guarded(start))


def start_publisher(rate_hz: float, width: int, height: int) -> int:
    """A forked process publishing textured stereo pairs (shifted 8 px) and camera_infos until SIGKILL."""
    pid = os.fork()
    if pid:
        return pid
    die_with_parent()
    import numpy as np
    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header

    from stereo_kd_ros.conversions import numpy_to_image

    rclpy.init(signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    node = rclpy.create_node("stop_stress_publisher")
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    pubs = {topic: node.create_publisher(msg_type, topic, qos) for topic, msg_type in (
        ("left/camera_info", CameraInfo), ("right/camera_info", CameraInfo),
        ("left/image_rect", Image), ("right/image_rect", Image))}
    texture = np.random.default_rng(0).integers(0, 256, size=(height, width + 8), dtype=np.uint8)
    images = {"left": texture[:, 8:], "right": texture[:, :-8]}  # disparity 8 px everywhere
    for count in range(1, 1_000_000):
        stamp = Time(sec=count // 1000, nanosec=(count % 1000) * 1_000_000)
        for side, tx in (("left", 0.0), ("right", -10.0)):
            header = Header(stamp=stamp, frame_id=side)
            info = CameraInfo(header=header, width=width, height=height)
            info.p = [100.0, 0.0, width / 2, tx, 0.0, 100.0, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
            pubs[f"{side}/camera_info"].publish(info)
            pubs[f"{side}/image_rect"].publish(numpy_to_image(np.ascontiguousarray(images[side]), "mono8", header))
        time.sleep(1.0 / rate_hz)
    os._exit(0)


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (the entry point's stop handlers)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def wait_exit(pid: int, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=32, help="Node processes to start and stop.")
    parser.add_argument("--parallel", type=int, default=4, help="Nodes alive at once.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the signal moments.")
    parser.add_argument("--max-delay", type=float, default=1.0,
                        help="Latest first signal, s after the start or after the first frames.")
    parser.add_argument("--rate", type=float, default=5.0, help="Published pairs per second.")
    args = parser.parse_args()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SystemExit(f"{threads} threads before forking: a fork would copy their locks mid-use")
    rng = random.Random(args.seed)
    # (while frames flow?, first signal s after the start or the first frames, signal, second SIGINT s later)
    plans = [(index % 4 >= 2, rng.uniform(0.0, args.max_delay), rng.choice([signal.SIGINT, signal.SIGTERM]),
              rng.uniform(0.02, 0.5) if rng.random() < 0.3 else None) for index in range(args.cycles)]
    logs = tempfile.mkdtemp(prefix="stop_stress_")
    publisher = start_publisher(args.rate, 160, 120)
    for first in range(0, args.cycles, args.parallel):
        batch = range(first, min(first + args.parallel, args.cycles))
        paths = {index: os.path.join(logs, f"{index}.log") for index in batch}
        start = time.monotonic()
        pids = {index: start_node(index, paths[index]) for index in batch}
        due: dict[int, list[tuple[float, int]]] = {}  # index -> [(monotonic s, signal)], once known
        flowing_at: dict[int, float] = {}  # monotonic s from which a node's delay counts
        while any(due.get(index, True) for index in batch):
            now = time.monotonic()
            for index in batch:
                after_frames, delay_s, stop_signal, second_s = plans[index]
                if index not in due:
                    # The first moment that counts is the entry point's first line (its stop handlers):
                    # before it, the child still runs this driver's code, as a process before its
                    # interpreter reaches the entry point.
                    if index not in flowing_at:
                        text = open(paths[index], errors="replace").read() if after_frames else ""
                        if (("| running" in text) if after_frames else handles_sigterm(pids[index])) \
                                or now - start > FLOWING_TIMEOUT_S:
                            flowing_at[index] = now
                        continue
                    origin = flowing_at[index]
                    due[index] = [(origin + delay_s, stop_signal)] + (
                        [(origin + delay_s + second_s, signal.SIGINT)] if second_s else [])
                while due[index] and due[index][0][0] <= now:
                    os.kill(pids[index], due[index].pop(0)[1])
            time.sleep(0.01)
        for index in batch:
            code = wait_exit(pids[index], HANG_S)
            if code is None:
                os.kill(pids[index], signal.SIGUSR1)
                time.sleep(1.0)
                os.kill(pids[index], signal.SIGKILL)
                os.waitpid(pids[index], 0)
            output = open(paths[index], errors="replace").read()
            after_frames, delay_s, stop_signal, second_s = plans[index]
            print(json.dumps({"cycle": index, "after_frames": after_frames, "delay_s": round(delay_s, 3),
                              "signal": signal.Signals(stop_signal).name,
                              "second_signal_after_s": second_s and round(second_s, 3), "exit_code": code,
                              "frames_flowed": "| running" in output, "traceback": "Traceback" in output,
                              "output_tail": output[-600:] if code != 0 or "Traceback" in output else ""}),
                  flush=True)
    os.kill(publisher, signal.SIGKILL)
    os.waitpid(publisher, 0)


if __name__ == "__main__":
    main()
