"""Soak: stereo_kd_node under a steady 30 Hz 640x480 stream for minutes.

Reports the node process's resident memory over time and its growth after warm-up (target
under 5 %), the end-to-end latency per window (is p95 stable?), and where every published
frame went: published = received pairs + lost in transport (+ unpaired images), and
pairs = processed + dropped (latest wins) + rejected + discarded at shutdown.

    python benchmarks/soak.py [--minutes 10] [--model sgbm] [--input-scale 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from node_throughput import HEIGHT, WIDTH, NodeSession, backlog_grows  # noqa: E402

DOMAIN_ID = 189
MEMORY_GROWTH_TARGET = 0.05


def soak(duration_s: float, parameters: dict[str, object], domain_id: int = DOMAIN_ID,
         rate_hz: float = 30.0, warmup_s: float | None = None) -> dict:
    """Run the node for `duration_s` under the stream; the figures as a dict (see module doc)."""
    warmup_s = min(60.0, duration_s / 4) if warmup_s is None else warmup_s
    session = NodeSession({"diagnostics_period_s": 1.0, **parameters}, domain_id=domain_id, rate_hz=rate_hz)
    session.start()
    memory: list[tuple[float, int]] = []  # (seconds since start, RSS KiB)
    try:
        start = time.monotonic()
        memory.append((0.0, session.node_rss_kib()))
        session.stream(duration_s, on_second=lambda t: memory.append((t, session.node_rss_kib())))
        memory.append((duration_s, session.node_rss_kib()))
        values = session.settle()
    finally:
        output = session.stop()
    after_warmup = [rss for t, rss in memory if t >= warmup_s]
    # Median of the first and last 10 % of the post-warm-up samples: robust to one-off spikes.
    span = max(1, len(after_warmup) // 10)
    baseline, final = float(np.median(after_warmup[:span])), float(np.median(after_warmup[-span:]))
    windows = session.windows(start, duration_s)
    inference_ms = float(values.get("inference_p50_ms", "nan"))
    return {
        "duration_s": duration_s, "warmup_s": warmup_s, "input_rate_hz": rate_hz,
        "image": f"{WIDTH}x{HEIGHT} rgb8", "parameters": parameters,
        "model": values.get("model"), "device": values.get("device"),
        "memory": {"rss_start_mib": memory[0][1] / 1024, "rss_after_warmup_mib": baseline / 1024,
                   "rss_end_mib": final / 1024, "growth_after_warmup": (final - baseline) / baseline,
                   "peak_mib": max(rss for _, rss in memory) / 1024,
                   "samples": [(round(t, 1), rss) for t, rss in memory]},
        "memory_growth_within_target": (final - baseline) / baseline < MEMORY_GROWTH_TARGET,
        "frames": session.accounting(values),
        "inference_p50_ms": inference_ms,
        "windows": windows,
        "backlog_growing": backlog_grows(windows, inference_ms),
        "node_exit_code": session.returncode,
        "node_output_tail": output[-2000:],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="Length of the stream.")
    parser.add_argument("--model", default="sgbm", help="Node 'model' parameter.")
    parser.add_argument("--device", default="auto", help="Node 'device' parameter.")
    parser.add_argument("--input-scale", type=float, default=1.0, help="Node 'input_scale' parameter.")
    parser.add_argument("--max-disparity", type=int, default=128, help="Node 'max_disparity' parameter.")
    parser.add_argument("--best-effort", action="store_true",
                        help="Keep the node's sensor-data (best effort) subscriptions instead of reliable ones.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    figures = soak(args.minutes * 60, {
        "model": args.model, "device": args.device, "input_scale": args.input_scale,
        "max_disparity": args.max_disparity, "use_system_default_qos": not args.best_effort})
    printable = {**figures, "memory": {k: v for k, v in figures["memory"].items() if k != "samples"}}
    printable.pop("node_output_tail")
    print(json.dumps(printable, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    frames = figures["frames"]
    ok = (figures["node_exit_code"] == 0 and frames["unaccounted_pairs"] == 0
          and figures["memory_growth_within_target"] and not figures["backlog_growing"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
