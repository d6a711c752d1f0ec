"""The pair pipeline of stereo_kd_node: synchronized input pairs are checked and decoded on the
executor thread, handed to one inference worker thread (latest wins: at most one pair waits), and
the worker runs the estimator and publishes through the node's outputs."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from stereo_kd_core import StereoEstimator
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.rectification import (
    CalibrationError,
    CameraCalibration,
    RectificationMaps,
    StereoRectifier,
    input_size,
    resize_pair,
)
from stereo_kd_core.row_alignment import RowShift, RowTracker, onto_left_rows
from stereo_kd_ros import conversions
from stereo_kd_ros.outputs import StereoOutputs
from stereo_kd_ros.parameters import OutputSettings
from stereo_kd_ros.sync import subscribe_synchronized

WARNING_INTERVAL_S = 5.0  # per rejection reason
STATS_WINDOW = 200        # frames kept for latency percentiles
MIN_IMAGE_SIZE = 2  # rows and columns every estimator needs
# A stamp this far behind the previous pair's is a time reset (sim time restart, bag loop), not a
# reordered pair: the node starts over instead of rejecting every later pair.
TIME_RESET_THRESHOLD_S = 1.0
# A pair stamped more than this before the node's clock, or more than TIME_RESET_THRESHOLD_S after it,
# was not stamped on this clock (a recording replayed without use_sim_time, a camera's own clock):
# its stamp-to-output time is no latency and is left out of the latency figures.
MAX_LATENCY_S = 60.0
OFF_CLOCK_WARNING_INTERVAL_S = 60.0  # also for rows off and swapped views (`_due_warning`'s default)
ROW_SHIFT_WARN_PX = 1.0  # rows moved this far somewhere in the image: warned of (and corrected)
# A pair that arrives before the first camera_infos waits this long for them (then is rejected).
AWAIT_CAMERA_INFO_S = 1.0
# A camera_info larger than this on a side starts no compile ahead of its pairs (a corrupt one
# must not allocate gigabytes; a real camera's first pair still builds its graph).
MAX_PREPARED_SIDE = 8192
MIN_SHUTDOWN_WAIT_S = 5.0  # close() waits at least this long (and 2x the slowest inference) for the worker


class RejectedPairError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class StereoPair:
    """A synchronized, validated pair ready for the estimator."""

    header: Header              # left stamp, left camera frame
    left: np.ndarray            # (H, W) or (H, W, 3) RGB uint8/uint16 (views of the messages where possible)
    right: np.ndarray
    geometry: StereoGeometry
    prepare_s: float = 0.0      # node time spent validating and decoding
    rectification: tuple[RectificationMaps, RectificationMaps] | None = None  # raw input: left, right maps


def scaled_geometry(geometry: StereoGeometry, width: int, height: int, size: tuple[int, int]) -> StereoGeometry:
    """The geometry of a width x height pair resized to `size` (W', H'): the per-axis factors are
    those of the rounded sizes, so pixels stay consistent."""
    if size == (width, height):
        return geometry
    return geometry.scaled(size[0] / width, size[1] / height)


@dataclass
class PipelineStats:
    """Counters and recent timings; updated from both threads under one lock.

    A pair is counted in `processed` after its outputs are published, so a subscriber may
    receive an output before the count includes it.
    """

    pairs: int = 0
    processed: int = 0
    discarded: int = 0  # accepted pairs not finished because the node was stopping
    dropped: int = 0
    time_resets: int = 0
    off_clock: int = 0  # processed pairs whose stamps are not on the node's clock (no latency)
    longest_inference_s: float = 0.0
    row_shift: RowShift | None = None  # where the right camera's rows lie, running (None: not measured)
    views_swapped: bool | None = None  # the last row measurement found the views swapped (None: none yet)
    rejected: Counter = field(default_factory=Counter)
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    overhead_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    lock: threading.Lock = field(default_factory=threading.Lock)


class PairPipeline:
    """Input subscriptions, pair checks, the hand-off and the inference worker of a node.

    current: returns the (estimator, settings) to use; read once per frame, so a parameter
    change applies from the next frame on.
    """

    def __init__(self, node: Node, outputs: StereoOutputs, current: Callable[[], tuple[StereoEstimator,
                 OutputSettings]], input_qos: QoSProfile, overrides: QoSOverridingOptions, queue_size: int,
                 tolerance_s: float | None, rectify: bool, points_on_estimator: bool, align_rows_every: int = 0):
        self.node, self.outputs, self.current = node, outputs, current
        # the right view brought onto the left's rows by the cameras' running row shift (raw input: folded
        # into the right camera's rectification maps, cached here with the shift they were moved by)
        self.rows = RowTracker(every=align_rows_every) if align_rows_every > 0 else None
        self._rows_of: tuple | None = None  # (image shape, raw maps) the tracker measures for
        self._moved_maps: tuple[RectificationMaps, RowShift, RectificationMaps] | None = None
        self.points_on_estimator = points_on_estimator  # reprojection where the estimator runs (a GPU)
        self.stats = PipelineStats()
        self._last_warning: dict[str, float] = {}
        self._suppressed: Counter = Counter()
        self._last_stamp_ns: int | None = None
        self._geometry_cache: tuple[tuple, StereoGeometry] | None = None
        self.rectifier = StereoRectifier() if rectify else None
        self.camera_infos: dict[str, CameraInfo] = {}
        self._prepared_sizes: set[tuple[int, int]] = set()  # input sizes the estimator was asked to build
        # The latest pair that arrived before both camera_infos (at start-up the images often win
        # the race): processed when the infos arrive, if still fresh; (left, right, arrival s).
        self._awaiting_info: tuple[Image, Image, float] | None = None

        self.waiting: StereoPair | None = None  # at most one pair waits for the worker
        self._wake = threading.Condition()
        # Held while the worker touches publishers; close() sets _stopping under it, so a result
        # that arrives after close() is dropped without touching a destroyed node.
        self._output_lock = threading.Lock()
        self._stopping = False
        self.worker = threading.Thread(target=self._work, name="stereo_kd_inference", daemon=True)
        self.worker.start()

        for side in ("left", "right"):
            node.create_subscription(CameraInfo, f"{side}/camera_info",
                                     lambda msg, side=side: self.on_camera_info(side, msg),
                                     input_qos, qos_overriding_options=overrides)
        image_topic = "image_raw" if rectify else "image_rect"
        self.image_sync = subscribe_synchronized(
            node, Image, [f"left/{image_topic}", f"right/{image_topic}"], input_qos, queue_size,
            tolerance_s, self.on_images, qos_overriding_options=overrides)

    # -- input (executor thread) -------------------------------------------------------------

    def on_camera_info(self, side: str, msg: CameraInfo) -> None:
        """Keep the latest camera_info per side; release a pair that was waiting for them."""
        self.camera_infos[side] = msg
        if side == "left":
            self._prepare_estimator(msg)
        awaiting = self._awaiting_info
        if awaiting is None or len(self.camera_infos) < 2:
            return
        self._awaiting_info = None
        left, right, arrived_s = awaiting
        if time.monotonic() - arrived_s > AWAIT_CAMERA_INFO_S:
            self.reject("missing_camera_info", "no camera_info arrived within "
                        f"{AWAIT_CAMERA_INFO_S:g} s of the pair")
            return
        self._submit(left, right)

    def _prepare_estimator(self, info: CameraInfo) -> None:
        """A compiled network starts building its graph for the camera's input size as soon as a
        camera_info gives that size (CPU: in the background), not at the first pair: by the time
        images flow the graph is often ready. Once per size; sizes no pair could have are skipped."""
        estimator, settings = self.current()
        prepare_size = getattr(estimator, "prepare_size", None)
        if prepare_size is None or not (MIN_IMAGE_SIZE <= info.width <= MAX_PREPARED_SIDE
                                        and MIN_IMAGE_SIZE <= info.height <= MAX_PREPARED_SIDE):
            return
        width, height = input_size(info.width, info.height, settings.input_scale)
        if (width, height) in self._prepared_sizes or min(width, height) < MIN_IMAGE_SIZE:
            return
        self._prepared_sizes.add((width, height))
        try:
            started = prepare_size(height, width)
        except Exception as error:  # noqa: BLE001 - the first pair builds it then, as without this
            self.node.get_logger().warning(f"could not start compiling for {width}x{height}: {error}")
            return
        if started:
            self.node.get_logger().info(
                f"compiling '{estimator.name}' for {width}x{height} input pairs (camera {info.width}x{info.height}, "
                f"input_scale {settings.input_scale:g}) in the background; eager until it is ready")

    def on_images(self, left: Image, right: Image) -> None:
        """Synchronized pair: validate, then hand it to the worker (latest wins)."""
        with self.stats.lock:
            self.stats.pairs += 1
        if len(self.camera_infos) < 2:
            # Before the first camera_infos: hold the latest pair briefly instead of rejecting it.
            if self._awaiting_info is not None:
                self.reject("missing_camera_info", "a newer pair arrived before any camera_info")
            self._awaiting_info = (left, right, time.monotonic())
            return
        self._submit(left, right)

    def expire_awaiting_pair(self) -> None:
        """A pair held for camera_infos that did not come in time is rejected (and counted)."""
        awaiting = self._awaiting_info
        if awaiting is not None and time.monotonic() - awaiting[2] > AWAIT_CAMERA_INFO_S:
            self._awaiting_info = None
            missing = " and ".join(side for side in ("left", "right") if side not in self.camera_infos)
            self.reject("missing_camera_info", f"no camera_info received yet on {missing}/camera_info")

    def _submit(self, left: Image, right: Image) -> None:
        if self._stopping:
            return
        try:
            pair = self.prepare(left, right)
        except RejectedPairError as rejection:
            self.reject(rejection.reason, str(rejection))
            return
        with self._wake:
            if self.waiting is not None:
                with self.stats.lock:
                    self.stats.dropped += 1
            self.waiting = pair
            self._wake.notify()

    def prepare(self, left: Image, right: Image) -> StereoPair:
        """Checks a pair and decodes it (views); raises RejectedPairError with a reason key."""
        start = time.perf_counter()
        left_info = self.camera_infos.get("left")
        right_info = self.camera_infos.get("right")
        if left_info is None or right_info is None:
            missing = " and ".join(s for s, i in (("left", left_info), ("right", right_info)) if i is None)
            raise RejectedPairError("missing_camera_info", f"no camera_info received yet on {missing}/camera_info")
        stamp = conversions.stamp_to_ns(left.header.stamp)
        if self._last_stamp_ns is not None and stamp <= self._last_stamp_ns:
            jump_ns = self._last_stamp_ns - stamp
            if jump_ns <= TIME_RESET_THRESHOLD_S * 1e9:
                raise RejectedPairError("stamp_out_of_order",
                                        f"left stamp {stamp * 1e-9:.6f} s is not after the previous pair's "
                                        f"{self._last_stamp_ns * 1e-9:.6f} s")
            self.node.get_logger().warning(f"time jumped back by {jump_ns * 1e-9:.3f} s: resetting")
            self._last_stamp_ns = None
            with self.stats.lock:
                self.stats.time_resets += 1
        for side, image, info in (("left", left, left_info), ("right", right, right_info)):
            if image.header.frame_id != info.header.frame_id:
                raise RejectedPairError("frame_mismatch",
                                        f"{side} image frame '{image.header.frame_id}' differs from its "
                                        f"camera_info frame '{info.header.frame_id}'")
        try:
            left_rgb = conversions.image_to_rgb(left)
            right_rgb = conversions.image_to_rgb(right)
        except conversions.ImageFormatError as error:
            raise RejectedPairError(error.reason, str(error)) from error
        if left_rgb.shape != right_rgb.shape or left_rgb.dtype != right_rgb.dtype:
            raise RejectedPairError("size_mismatch",
                                    f"left {left.width}x{left.height} {left.encoding} and right "
                                    f"{right.width}x{right.height} {right.encoding} differ")
        for side, image, info in (("left", left, left_info), ("right", right, right_info)):
            if info.width and info.height and (info.width, info.height) != (image.width, image.height):
                raise RejectedPairError("size_mismatch",
                                        f"{side} image is {image.width}x{image.height} but its camera_info "
                                        f"says {info.width}x{info.height}")
        rectification = None
        if self.rectifier is not None:  # first: an uncalibrated camera is named as such
            rectification = (self._rectification_maps("left", left_info),
                             self._rectification_maps("right", right_info))
        geometry = self._geometry(left_info, right_info)
        self._last_stamp_ns = stamp
        header = Header(stamp=left.header.stamp, frame_id=left.header.frame_id)
        return StereoPair(header, left_rgb, right_rgb, geometry, time.perf_counter() - start, rectification)

    def _rectification_maps(self, side: str, info: CameraInfo) -> RectificationMaps:
        """The cached maps of a raw camera (built for a new calibration); rejects an uncalibrated one."""
        try:
            return self.rectifier.maps(side, CameraCalibration.from_camera_info(info))
        except CalibrationError as error:
            raise RejectedPairError(error.reason, f"{side}/camera_info cannot rectify: {error}") from error

    def _geometry(self, left_info: CameraInfo, right_info: CameraInfo) -> StereoGeometry:
        key = (tuple(left_info.p), tuple(right_info.p))
        if self._geometry_cache is not None and self._geometry_cache[0] == key:
            return self._geometry_cache[1]
        try:
            geometry = conversions.geometry_from_camera_infos(left_info, right_info)
        except ValueError as error:
            raise RejectedPairError("bad_camera_info", str(error)) from error
        self._geometry_cache = (key, geometry)
        return geometry

    def reject(self, reason: str, message: str) -> None:
        """Count a rejected pair; warn once per reason and WARNING_INTERVAL_S."""
        with self.stats.lock:
            self.stats.rejected[reason] += 1
        if not self._due_warning(reason, WARNING_INTERVAL_S):
            self._suppressed[reason] += 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        self.node.get_logger().warning(f"skipping stereo pair [{reason}]: {message}{more}")

    # -- inference and output (worker thread) ------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while self.waiting is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                pair, self.waiting = self.waiting, None
            try:
                self.process(pair)
            except RejectedPairError as rejection:
                self.reject(rejection.reason, str(rejection))
            except Exception as error:  # a failing frame must not end the worker
                if self._stopping or not self.node.context.ok():
                    with self.stats.lock:
                        self.stats.discarded += 1
                    return  # shutting down: the frame in flight is dropped
                self.reject("estimator_error", f"{type(error).__name__}: {error}")

    def process(self, pair: StereoPair) -> None:
        """Estimator and outputs for one pair (worker thread)."""
        start = time.perf_counter()
        estimator, settings = self.current()  # one of each for the whole frame
        full_height, full_width = pair.left.shape[:2]  # rectified images have the raw images' size
        size = input_size(full_width, full_height, settings.input_scale)
        geometry = scaled_geometry(pair.geometry, full_width, full_height, size)
        width, height = size
        # OpenCV's SGBM fails, or crashes the process, on images no wider than its search range.
        min_width = getattr(estimator, "min_input_width", 2)
        if height < MIN_IMAGE_SIZE or width < max(min_width, MIN_IMAGE_SIZE):
            raise RejectedPairError(
                "image_too_small",
                f"{width}x{height} estimator input (input_scale {settings.input_scale:g}) is too small: "
                f"'{estimator.name}' needs at least {max(min_width, MIN_IMAGE_SIZE)}x{MIN_IMAGE_SIZE}")
        with self._output_lock:
            if self._discard_if_stopping():
                return
            wants_points = self.outputs.wants_points()
            wants_rectified_left = self.outputs.wants_rectified_left()
        points_geometry = geometry if wants_points and self.points_on_estimator else None
        rectified_left = None
        if pair.rectification is None:
            left, right = resize_pair(pair.left, pair.right, size)
            right = self._on_left_rows(pair, right, height / full_height)
            scaled = time.perf_counter()
            prediction = estimator.predict(left, right, geometry=points_geometry)
        else:  # raw input: rectified and resized where the estimator says (CPU or its device), timed with it
            rectification = self._maps_onto_left_rows(pair)
            scaled = time.perf_counter()
            raw = estimator.predict_raw(pair.left, pair.right, rectification, size, geometry=points_geometry,
                                        rectified_left=wants_rectified_left)
            prediction, left, rectified_left = raw.prediction, raw.left, raw.rectified_left
        inferred = time.perf_counter()
        with self.stats.lock:
            self.stats.longest_inference_s = max(self.stats.longest_inference_s, inferred - scaled)
        with self._output_lock:
            if self._discard_if_stopping():
                return
            if rectified_left is not None:
                self.outputs.publish_rectified_left(rectified_left, pair.header)
            self.outputs.publish(pair.header, left, geometry, prediction, settings, estimator)
            now_ns = self.node.get_clock().now().nanoseconds
        done = time.perf_counter()
        latency_ns = now_ns - conversions.stamp_to_ns(pair.header.stamp)
        on_clock = -TIME_RESET_THRESHOLD_S * 1e9 <= latency_ns <= MAX_LATENCY_S * 1e9
        with self.stats.lock:
            self.stats.processed += 1
            if on_clock:
                self.stats.latency_ms.append(latency_ns * 1e-6)
            else:
                self.stats.off_clock += 1
            self.stats.inference_ms.append((inferred - scaled) * 1e3)
            self.stats.overhead_ms.append((done - inferred + scaled - start + pair.prepare_s) * 1e3)
        if not on_clock:
            self._warn_off_clock(latency_ns * 1e-9)

    def _on_left_rows(self, pair: StereoPair, right: np.ndarray, scale: float) -> np.ndarray:
        """Rectified input: `right` (the pair's right view at `scale`) brought onto the left view's rows
        by the cameras' running row shift (stereo_kd_core.row_alignment: measured at full size on the
        first pair and every align_rows_every-th after it); as it is without one."""
        if self.rows is None:
            return right
        self._rows_for(pair.left.shape)
        shift = self._note_rows(self.rows.update(pair.left, pair.right))
        return onto_left_rows(right, shift.scaled(scale))

    def _maps_onto_left_rows(self, pair: StereoPair) -> tuple[RectificationMaps, RectificationMaps]:
        """Raw input: the pair's maps, the right camera's moved by the running row shift (measured on
        both views rectified with the maps as calibrated, when due), rebuilt only when it changes."""
        left_maps, right_maps = pair.rectification
        if self.rows is None:
            return left_maps, right_maps
        self._rows_for(pair.left.shape, left_maps, right_maps)
        shift = self._note_rows(self.rows.update_lazily(lambda: (left_maps.remap(pair.left),
                                                                 right_maps.remap(pair.right))))
        cached = self._moved_maps
        if cached is None or cached[0] is not right_maps or cached[1] != shift:
            cached = self._moved_maps = (right_maps, shift, right_maps.with_rows_moved(shift))
        return left_maps, cached[2]

    def _rows_for(self, size: tuple, *maps: RectificationMaps) -> None:
        """Start measuring afresh when the cameras' image size or (raw input) calibration changes: what
        was measured for the others says nothing of these."""
        old = self._rows_of
        if old is not None and (old[0] != size or len(old[1]) != len(maps)
                                or any(a is not b for a, b in zip(old[1], maps, strict=True))):
            self.rows = RowTracker(every=self.rows.every, window=self.rows.measured.maxlen)
        self._rows_of = (size, maps)

    def _note_rows(self, shift: RowShift) -> RowShift:
        """Record the running measurement for /diagnostics and warn (once a minute each) of rows moved
        by ROW_SHIFT_WARN_PX or more and of views that look swapped; returns `shift`."""
        last = self.rows.last
        swapped = None if last is None else last.swapped
        with self.stats.lock:
            self.stats.row_shift = self.rows.shift
            if last is not None:
                self.stats.views_swapped = swapped
        worst = abs(shift.offset_px) + abs(shift.tilt_px) + abs(shift.scale_px)  # the most a row moves
        if worst >= ROW_SHIFT_WARN_PX and self._due_warning("row_shift"):
            self.node.get_logger().warning(
                f"the right camera's rows lie off the left's (full size: {shift.offset_px:+.2f} px at the centre, "
                f"tilt {shift.tilt_px:+.2f} px, stretch {shift.scale_px:+.2f} px at the edges): corrected from a "
                f"running measurement; recalibrate the pair")
        if swapped and self._due_warning("views_swapped"):
            self.node.get_logger().warning(
                "left and right look swapped: the left image's corners lie to the right in the right image, so "
                "the disparity is meaningless; check the remapping of left/* and right/* topics")
        return shift

    def _due_warning(self, key: str, interval_s: float = OFF_CLOCK_WARNING_INTERVAL_S) -> bool:
        """True (and noted) when the warning `key` was not given in the last `interval_s`."""
        now = time.monotonic()
        last = self._last_warning.get(key)
        if last is not None and now - last < interval_s:
            return False
        self._last_warning[key] = now
        return True

    def _warn_off_clock(self, latency_s: float) -> None:
        """Once per OFF_CLOCK_WARNING_INTERVAL_S: the pairs' stamps are not on this node's clock."""
        if not self._due_warning("off_clock"):
            return
        where = f"{latency_s:.1f} s behind" if latency_s > 0 else f"{-latency_s:.1f} s ahead of"
        self.node.get_logger().warning(
            f"input stamps are {where} this node's clock: their latency is not measured (replaying a "
            f"recording? start the node with use_sim_time:=true)")

    def _discard_if_stopping(self) -> bool:
        if self._stopping:
            with self.stats.lock:
                self.stats.discarded += 1
        return self._stopping

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown_wait_s(self) -> float:
        """How long close() waits for the worker: covers the slowest inference seen so far."""
        with self.stats.lock:
            return max(MIN_SHUTDOWN_WAIT_S, 2.0 * self.stats.longest_inference_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop taking pairs and stop the worker: a frame in flight is not published. Waits up to
        `timeout_s` (default shutdown_wait_s()) for it; a result arriving later is dropped without
        touching the node. Returns whether the worker has ended."""
        with self._output_lock, self._wake:
            self._stopping = True
            if self.waiting is not None:
                self.waiting = None
                with self.stats.lock:
                    self.stats.discarded += 1
            self._wake.notify()
        wait_s = self.shutdown_wait_s() if timeout_s is None else timeout_s
        self.worker.join(wait_s)
        if self.worker.is_alive():
            self.node.get_logger().warning(
                f"inference still running after {wait_s:.1f} s: its result will be dropped")
            return False
        return True

