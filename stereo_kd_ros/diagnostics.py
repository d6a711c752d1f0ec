"""stereo_kd_node's /diagnostics report and its one-line status log."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from stereo_kd_ros.pipeline import PairPipeline

# A status holds this long (and at least two periods) after the last pair, or the last rejected
# pair, before it changes: input slower than the period (a loaded link, a slow camera) reads
# "running", not "running" and "no input" in turn.
STATUS_HOLD_S = 3.0


def row_shift_values(shift) -> dict[str, str]:
    """/diagnostics' row_offset_px, row_tilt_px, row_stretch_px of the running RowShift ("nan": none)."""
    terms = ("nan",) * 3 if shift is None else (f"{value:+.2f}" for value in
                                                  (shift.offset_px, shift.tilt_px, shift.scale_px))
    return dict(zip(("row_offset_px", "row_tilt_px", "row_stretch_px"), terms, strict=True))


def percentile(values: deque, q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else float("nan")


class StereoDiagnostics:
    """Publishes /diagnostics every `period_s` (rate, latency, counters of the last period) and
    logs a status line when the status changes, otherwise once per `status_log_period_s`.

    The status (running, rejecting pairs, no input) changes with hysteresis: "no input" once no
    pair came for STATUS_HOLD_S, "rejecting" until no pair was rejected for STATUS_HOLD_S.

    described: the node's own figures (model, device, ...) added to the pipeline's.
    """

    def __init__(self, node: Node, pipeline: PairPipeline, described: Callable[[], dict[str, str]],
                 period_s: float, status_log_period_s: float):
        self.node, self.pipeline, self.described = node, pipeline, described
        self.publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._period_start = (time.monotonic(), 0, 0, 0)  # (t, processed, pairs, rejected)
        self._status_log_period_s = status_log_period_s
        self._hold_s = max(STATUS_HOLD_S, 2.0 * period_s)
        self._last_pair_s: float | None = None      # monotonic s of the last period with pairs
        self._last_rejected_s: float | None = None  # ... with rejected pairs
        self._logged_status: tuple[str, float] | None = None  # (state, monotonic s) of the last status log
        node.create_timer(period_s, self.report)

    def values(self) -> dict[str, str]:
        """Current figures, as published on /diagnostics."""
        pipeline = self.pipeline
        with pipeline.stats.lock:
            stats = pipeline.stats
            start_t, start_processed, _, _ = self._period_start
            elapsed = max(time.monotonic() - start_t, 1e-9)
            values = {
                "rate_hz": f"{(stats.processed - start_processed) / elapsed:.2f}",
                "latency_p50_ms": f"{percentile(stats.latency_ms, 50):.1f}",
                "latency_p95_ms": f"{percentile(stats.latency_ms, 95):.1f}",
                "inference_p50_ms": f"{percentile(stats.inference_ms, 50):.1f}",
                "overhead_p50_ms": f"{percentile(stats.overhead_ms, 50):.2f}",
                "pairs": str(stats.pairs),
                "processed": str(stats.processed),
                "dropped": str(stats.dropped),
                "rejected": str(sum(stats.rejected.values())),
                "discarded_at_shutdown": str(stats.discarded),
                "time_resets": str(stats.time_resets),
                "stamps_off_clock": str(stats.off_clock),
                **row_shift_values(stats.row_shift),
                "views_look_swapped": {None: "unknown", True: "yes", False: "no"}[stats.views_swapped],
            }
            values.update({f"rejected_{reason}": str(count) for reason, count in sorted(stats.rejected.items())})
        values["received_left_images"], values["received_right_images"] = map(str, pipeline.image_sync.received)
        evicted = pipeline.image_sync.evicted
        if evicted is not None:
            values["unmatched_images"] = str(evicted)
        values.update(self.described())
        return values

    def report(self) -> None:
        """One /diagnostics message (and the status line when due)."""
        self.pipeline.expire_awaiting_pair()
        values = self.values()
        stats = self.pipeline.stats
        with stats.lock:
            _, _, start_pairs, start_rejected = self._period_start
            rejected_total = sum(stats.rejected.values())
            new_pairs, new_rejected = stats.pairs - start_pairs, rejected_total - start_rejected
            self._period_start = (time.monotonic(), stats.processed, stats.pairs, rejected_total)
        now = time.monotonic()
        if new_pairs:
            self._last_pair_s = now
        if new_rejected:
            self._last_rejected_s = now
        if self._last_rejected_s is not None and now - self._last_rejected_s < self._hold_s:
            state, level, summary = ("rejecting", DiagnosticStatus.WARN,
                                     f"{new_rejected} pairs rejected in the last period" if new_rejected
                                     else f"pairs rejected in the last {self._hold_s:g} s")
        elif self._last_pair_s is None or now - self._last_pair_s >= self._hold_s:
            state, level, summary = "no_input", DiagnosticStatus.WARN, "no synchronized stereo input"
        else:
            state, level, summary = "running", DiagnosticStatus.OK, "running"
        status = DiagnosticStatus(level=level, name=f"{self.node.get_fully_qualified_name()}: stereo",
                                  message=summary, hardware_id=f"{values['model']} on {values['device']}",
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self.publisher.publish(array)
        # A console line per period would flood a launch console: on change, else at a slow period.
        if (self._logged_status is not None and self._logged_status[0] == state
                and now - self._logged_status[1] < self._status_log_period_s):
            return
        self._logged_status = (state, now)
        latency = (f"latency p50 {values['latency_p50_ms']} ms p95 {values['latency_p95_ms']} ms"
                   if values["latency_p50_ms"] != "nan" or values["stamps_off_clock"] == "0"
                   else "latency n/a (stamps not on this clock)")
        self.node.get_logger().info(
            f"{values['rate_hz']} Hz | {latency} | inference p50 {values['inference_p50_ms']} ms | "
            f"overhead p50 {values['overhead_p50_ms']} ms | dropped {values['dropped']} | "
            f"rejected {values['rejected']} | {summary}"
        )
