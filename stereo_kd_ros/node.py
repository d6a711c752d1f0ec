"""stereo_kd_node: rectified stereo pair in, DisparityImage / PointCloud2 (and optional depth,
confidence, colour cameras) out, with the estimator from stereo_kd_core running on a worker thread.

Subscribed: left/image_rect, right/image_rect, left/camera_info, right/camera_info; with `rectify`,
left/image_raw and right/image_raw instead of the image_rect topics (rectified in the node, and the
rectified left image published on left/image_rect_color).
Published: disparity, points2, /diagnostics, and as cameras (image + camera_info of the published
resolution, one header): [depth/image_rect, depth/camera_info], [confidence/image_rect,
confidence/camera_info], [rgb/image_rect, rgb/camera_info]; deprecated: [depth], [confidence].
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from stereo_msgs.msg import DisparityImage

from stereo_kd_core import StereoEstimator, StereoPrediction
from stereo_kd_core.checkpoint import CheckpointError
from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE
from stereo_kd_core.estimator import NetworkEstimator
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.rectification import (
    CalibrationError,
    CameraCalibration,
    RectificationMaps,
    StereoRectifier,
    input_size,
    resize_pair,
)
from stereo_kd_core.registry import default_model
from stereo_kd_ros import conversions
from stereo_kd_ros.sync import subscribe_synchronized

NODE_NAME = "stereo_kd_node"
WARNING_INTERVAL_S = 5.0  # per rejection reason
STATS_WINDOW = 200        # frames kept for latency percentiles
# Sub-pixel step reported in DisparityImage.delta_d, as stereo_image_proc does (SGBM's 4
# fractional bits); network outputs are continuous and at least this fine.
DISPARITY_STEP = 1.0 / 16.0
MIN_IMAGE_SIZE = 2  # rows and columns every estimator needs
# A stamp this far behind the previous pair's is a time reset (sim time restart, bag loop), not a
# reordered pair: the node starts over instead of rejecting every later pair.
TIME_RESET_THRESHOLD_S = 1.0
# A pair that arrives before the first camera_infos waits this long for them (then is rejected).
AWAIT_CAMERA_INFO_S = 1.0
MIN_SHUTDOWN_WAIT_S = 5.0  # close() waits at least this long (and 2x the slowest inference) for the worker
SGBM_RANGE_STEP = 16       # OpenCV SGBM's numDisparities is a multiple of 16
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
RECTIFY_ON_CHOICES = ("auto", "cpu", "estimator")


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any
    description: str
    read_only: bool = True  # structural: fixed for the life of the node
    value_range: tuple[float, float, float] | None = None  # (from, to, step); step 0 = any


PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("model", default_model(), f"Estimator: a shipped model name (default {default_model()}: the "
                  "registry's default student, weights in the package), 'sgbm' (OpenCV SGBM), a checkpoint path, "
                  "or an ONNX model path (*.onnx, run in onnxruntime)."),
    ParameterSpec("device", "auto", "Inference device: auto (CUDA when available), cpu, cuda or cuda:N."),
    ParameterSpec("precision", "auto", "Network precision: auto (fp16 on CUDA; on the CPU the shipped model's "
                  "measured default, bf16 where the CPU has AMX/AVX-512 BF16, else fp32), fp32, fp16 or bf16."),
    ParameterSpec("max_disparity", 192, "Disparity search range in pixels (multiple of 16).",
                  value_range=(16, 1024, 16)),
    ParameterSpec("approximate_sync", False, "Pair left/right images by nearest stamps instead of equal stamps."),
    ParameterSpec("approximate_sync_tolerance_seconds", 0.01,
                  "Largest stamp difference paired by approximate sync (> 0).", value_range=(0.0, 10.0, 0)),
    ParameterSpec("queue_size", 5, "Per-topic synchronizer queue and subscription depth.",
                  value_range=(1, 1000, 1)),
    ParameterSpec("use_system_default_qos", False,
                  "Subscribe with reliable QoS instead of sensor-data (best effort) QoS."),
    ParameterSpec("rectify", False,
                  "Subscribe left/image_raw and right/image_raw and rectify them with the camera_infos' K, D, "
                  "R, P (plumb_bob, rational_polynomial or equidistant; maps rebuilt only when a camera_info "
                  "changes) instead of taking left/image_rect and right/image_rect."),
    ParameterSpec("rectify_on", "auto",
                  "With rectify: where raw images are rectified and resized. auto: on the estimator's GPU when "
                  "the model is a network on CUDA (torch grid_sample; the raw pair is copied to the GPU as it "
                  "came), else the CPU; cpu: OpenCV remap on the CPU; estimator: on the estimator's device "
                  "(networks only; others rectify on the CPU)."),
    ParameterSpec("use_color", True, "Add packed rgb from the left image to points2.", read_only=False),
    ParameterSpec("publish_depth", False,
                  "Publish 'depth/image_rect' and 'depth/camera_info' (and the deprecated 'depth', 32FC1)."),
    ParameterSpec("depth_encoding", "32FC1",
                  "depth/image_rect encoding: 32FC1 (metres, NaN invalid; REP 118) or 16UC1 "
                  "(millimetres, 0 invalid; OpenNI/RealSense)."),
    ParameterSpec("publish_confidence", False,
                  "Publish 'confidence/image_rect' (32FC1 in [0, 1]) and 'confidence/camera_info' "
                  "(and the deprecated 'confidence')."),
    ParameterSpec("publish_rgb", False,
                  "Publish 'rgb/image_rect' (the left image as the estimator saw it: mono8, mono16 or "
                  "rgb8, at the published resolution) and 'rgb/camera_info', for RGB-D consumers."),
    ParameterSpec("dense_points", False,
                  "points2 holds only valid points in one row (is_dense) instead of an organized cloud.",
                  read_only=False),
    ParameterSpec("confidence_threshold", DEFAULT_MIN_CONFIDENCE, "Pixels below this confidence: invalid everywhere.",
                  read_only=False, value_range=(0.0, 1.0, 0)),
    ParameterSpec("min_depth_m", 0.0, "Points nearer than this are invalid in points2 and depth.",
                  read_only=False, value_range=(0.0, 10000.0, 0)),
    ParameterSpec("max_depth_m", 0.0, "Points farther than this are invalid in points2 and depth; 0 = no limit.",
                  read_only=False, value_range=(0.0, 10000.0, 0)),
    ParameterSpec("input_scale", 1.0,
                  "Both images are resized by this factor (area interpolation) before the estimator; "
                  "disparity, points2, depth and confidence are published at the reduced size, with the "
                  "camera geometry scaled to match.", read_only=False, value_range=(0.1, 1.0, 0)),
    ParameterSpec("diagnostics_period_s", 1.0, "Period of /diagnostics (rate, latency, counters).",
                  value_range=(0.1, 60.0, 0)),
    ParameterSpec("status_log_period_s", 60.0,
                  "The one-line status log is written when the status (running, rejecting pairs, no "
                  "input) changes, and otherwise once per this period.", value_range=(0.1, 3600.0, 0)),
)
PARAMETER_NAMES = tuple(spec.name for spec in PARAMETERS)


def scaled_search_range(max_disparity: int, input_scale: float) -> int:
    """SGBM search range for images resized by `input_scale`: the full range in resized pixels,
    rounded up to SGBM's step (at least one step)."""
    steps = math.ceil(round(max_disparity * input_scale / SGBM_RANGE_STEP, 9))
    return max(SGBM_RANGE_STEP, steps * SGBM_RANGE_STEP)


class ParameterError(ValueError):
    """A parameter value the node cannot run with."""


def _descriptor(spec: ParameterSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(
        name=spec.name, type=Parameter.Type.from_parameter_value(spec.default).value,
        description=spec.description, read_only=spec.read_only,
    )
    if spec.value_range is not None:
        low, high, step = spec.value_range
        if isinstance(spec.default, int) and not isinstance(spec.default, bool):
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=int(step))]
        else:
            descriptor.floating_point_range = [FloatingPointRange(from_value=low, to_value=high, step=float(step))]
    return descriptor


def validate_parameters(values: dict[str, Any]) -> None:
    """Checks beyond the descriptors' ranges; raises ParameterError naming the parameter."""
    device = values["device"]
    if device not in DEVICE_CHOICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ParameterError(f"device: expected one of {', '.join(DEVICE_CHOICES)} or cuda:N, got '{device}'")
    if values["precision"] not in PRECISION_CHOICES:
        raise ParameterError(f"precision: expected one of {', '.join(PRECISION_CHOICES)}, got '{values['precision']}'")
    if values["rectify_on"] not in RECTIFY_ON_CHOICES:
        raise ParameterError(f"rectify_on: expected one of {', '.join(RECTIFY_ON_CHOICES)}, "
                             f"got '{values['rectify_on']}'")
    if values["depth_encoding"] not in conversions.DEPTH_ENCODINGS:
        raise ParameterError(f"depth_encoding: expected one of {', '.join(conversions.DEPTH_ENCODINGS)}, "
                             f"got '{values['depth_encoding']}'")
    if not values["model"].strip():
        raise ParameterError("model: must not be empty (use 'sgbm' for the classical matcher)")
    if values["approximate_sync_tolerance_seconds"] <= 0:
        raise ParameterError("approximate_sync_tolerance_seconds: must be > 0")
    if values["max_depth_m"] != 0 and values["max_depth_m"] <= values["min_depth_m"]:
        raise ParameterError(
            f"max_depth_m ({values['max_depth_m']}) must be 0 (no limit) or larger than "
            f"min_depth_m ({values['min_depth_m']})"
        )


@dataclass(frozen=True)
class OutputSettings:
    """The parameters that may change while running; replaced as a whole, read once per frame."""

    confidence_threshold: float
    min_depth_m: float
    max_depth_m: float
    use_color: bool
    dense_points: bool
    input_scale: float


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
    longest_inference_s: float = 0.0
    rejected: Counter = field(default_factory=Counter)
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    overhead_ms: deque = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    lock: threading.Lock = field(default_factory=threading.Lock)


def _subscribed(publisher: Any) -> bool:
    """An enabled output somebody listens to (the outputs are built only then)."""
    return publisher is not None and publisher.get_subscription_count() > 0


def _percentile(values: deque, q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else float("nan")


class StereoNode(Node):
    """The ROS glue around StereoEstimator; see the module docstring for topics.

    estimator: a ready estimator to run instead of loading the `model` parameter's (embedding
    the node in a larger program, benchmarks); `model`, `device`, `precision` and
    `max_disparity` are then not used.

    With `model` 'sgbm' the matcher searches max_disparity full-size pixels: at input_scale s it
    is built with scaled_search_range(max_disparity, s) and rebuilt when input_scale changes.
    """

    def __init__(self, estimator: StereoEstimator | None = None, **node_options: Any):
        super().__init__(NODE_NAME, **node_options)
        values = self._declare_parameters()
        validate_parameters(values)
        self.settings = self._settings_from(values)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        # SGBM is rebuilt for each input_scale (cheap); networks keep the range they were built for.
        self._sgbm_max_disparity = (values["max_disparity"] if estimator is None and values["model"] == "sgbm"
                                    else None)
        if estimator is not None:
            self.estimator = estimator
        elif self._sgbm_max_disparity is not None:
            self.estimator = self._sgbm_for(values["input_scale"])
        else:
            self.estimator = StereoEstimator.load(values["model"], device=values["device"],
                                                  precision=values["precision"],
                                                  max_disparity=values["max_disparity"])
        # Reprojection runs where the estimator runs when that is a GPU (one copy back for all).
        self._points_on_estimator = self.estimator.device.startswith("cuda")
        if values["rectify"]:
            self._choose_rectification_device(values["rectify_on"])
        # Output messages rewritten in place frame after frame (worker thread only).
        self._disparity_msg = DisparityImage()
        self._cloud_msg = PointCloud2()
        self._depth_msg = Image()
        self._depth_alias_msg = Image()  # 32FC1 for the deprecated 'depth' while depth/image_rect is 16UC1
        self._confidence_msg = Image()
        self._rgb_msg = Image()
        self._camera_info_msg = CameraInfo()  # of the published resolution: depth, confidence and rgb share it
        self._depth_encoding = values["depth_encoding"]
        self._deprecation_warned: set[str] = set()
        self.stats = PipelineStats()
        self._last_warning: dict[str, float] = {}
        self._suppressed: Counter = Counter()
        self._last_stamp_ns: int | None = None
        self._geometry_cache: tuple[tuple, StereoGeometry] | None = None
        self._rectifier = StereoRectifier() if values["rectify"] else None
        self._rect_color_msg = Image()
        self.camera_infos: dict[str, CameraInfo] = {}

        overrides = QoSOverridingOptions.with_default_policies()
        if values["use_system_default_qos"]:
            input_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=values["queue_size"],
                                   reliability=ReliabilityPolicy.RELIABLE)
        else:
            input_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=values["queue_size"],
                                   reliability=qos_profile_sensor_data.reliability,
                                   durability=qos_profile_sensor_data.durability)
        output_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2,
                                reliability=ReliabilityPolicy.RELIABLE)
        self.disparity_pub = self.create_publisher(DisparityImage, "disparity", output_qos,
                                                   qos_overriding_options=overrides)
        self.points_pub = self.create_publisher(PointCloud2, "points2", output_qos,
                                                qos_overriding_options=overrides)

        def optional_publisher(msg_type: type, topic: str, enabled: bool) -> Any:
            return (self.create_publisher(msg_type, topic, output_qos, qos_overriding_options=overrides)
                    if enabled else None)

        # Image outputs are cameras, as RGB-D drivers publish them (<name>/image_rect and
        # <name>/camera_info with one header): what nvblox, RTAB-Map and depth_image_proc consume.
        self.depth_pub = optional_publisher(Image, "depth/image_rect", values["publish_depth"])
        self.depth_info_pub = optional_publisher(CameraInfo, "depth/camera_info", values["publish_depth"])
        self.confidence_pub = optional_publisher(Image, "confidence/image_rect", values["publish_confidence"])
        self.confidence_info_pub = optional_publisher(CameraInfo, "confidence/camera_info",
                                                      values["publish_confidence"])
        self.rgb_pub = optional_publisher(Image, "rgb/image_rect", values["publish_rgb"])
        self.rgb_info_pub = optional_publisher(CameraInfo, "rgb/camera_info", values["publish_rgb"])
        # The names before the camera layout (32FC1, no camera_info): kept, with a warning, until removed.
        self.depth_alias_pub = optional_publisher(Image, "depth", values["publish_depth"])
        self.confidence_alias_pub = optional_publisher(Image, "confidence", values["publish_confidence"])
        self.rect_color_pub = optional_publisher(Image, "left/image_rect_color", values["rectify"])
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        # The latest pair that arrived before both camera_infos (at start-up the images often win
        # the race): processed when the infos arrive, if still fresh; (left, right, arrival s).
        self._awaiting_info: tuple[Image, Image, float] | None = None
        for side in ("left", "right"):
            self.create_subscription(CameraInfo, f"{side}/camera_info",
                                     lambda msg, side=side: self.on_camera_info(side, msg),
                                     input_qos, qos_overriding_options=overrides)
        tolerance = values["approximate_sync_tolerance_seconds"] if values["approximate_sync"] else None
        image_topic = "image_raw" if values["rectify"] else "image_rect"
        self.image_sync = subscribe_synchronized(
            self, Image, [f"left/{image_topic}", f"right/{image_topic}"], input_qos, values["queue_size"],
            tolerance, self.on_images, qos_overriding_options=overrides)

        self._waiting: StereoPair | None = None  # at most one pair waits for the worker
        self._wake = threading.Condition()
        # Held while the worker touches publishers; close() sets _stopping under it, so a result
        # that arrives after close() is dropped without touching a destroyed node.
        self._output_lock = threading.Lock()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="stereo_kd_inference", daemon=True)
        self._worker.start()

        self._period_s = values["diagnostics_period_s"]
        self._period_start = (time.monotonic(), 0, 0, 0)  # (t, processed, pairs, rejected)
        self._status_log_period_s = values["status_log_period_s"]
        self._logged_status: tuple[str, float] | None = None  # (state, monotonic s) of the last status log
        self.create_timer(self._period_s, self._report)
        self.get_logger().info(
            f"model '{self.estimator.name}' ({self.estimator.backend}) on {self.estimator.device} "
            f"({self.estimator.precision}), "
            f"max_disparity {self.estimator.max_disparity}, "
            f"{'approximate' if tolerance else 'exact'} sync"
            f"{' via message_filters' if self.image_sync.uses_message_filters else ''}"
        )

    # -- parameters -------------------------------------------------------------------------

    def _declare_parameters(self) -> dict[str, Any]:
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        return {name: self.get_parameter(name).value for name in PARAMETER_NAMES}

    @staticmethod
    def _settings_from(values: dict[str, Any]) -> OutputSettings:
        return OutputSettings(
            confidence_threshold=values["confidence_threshold"], min_depth_m=values["min_depth_m"],
            max_depth_m=values["max_depth_m"], use_color=values["use_color"],
            dense_points=values["dense_points"], input_scale=values["input_scale"],
        )

    def _merged_values(self, changes: list[Parameter]) -> dict[str, Any]:
        values = {name: self.get_parameter(name).value for name in PARAMETER_NAMES}
        values.update({p.name: p.value for p in changes if p.name in values})
        return values

    def _on_set_parameters(self, changes: list[Parameter]) -> SetParametersResult:
        try:
            validate_parameters(self._merged_values(changes))
        except ParameterError as error:
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, changes: list[Parameter]) -> None:
        settings = self._settings_from(self._merged_values(changes))
        if self._sgbm_max_disparity is not None and settings.input_scale != self.settings.input_scale:
            self.estimator = self._sgbm_for(settings.input_scale)  # the worker reads it once per frame
        self.settings = settings

    def _choose_rectification_device(self, rectify_on: str) -> None:
        """Raw input is rectified on the estimator's device (`predict_raw`) where that is asked
        for, or by auto where the estimator is a network on CUDA; otherwise with OpenCV."""
        on_device = isinstance(self.estimator, NetworkEstimator) and (
            rectify_on == "estimator" or (rectify_on == "auto" and self.estimator.device.startswith("cuda")))
        if rectify_on == "estimator" and not on_device:
            self.get_logger().warning(f"rectify_on 'estimator': '{self.estimator.name}' is not a PyTorch "
                                      "network; rectifying on the CPU (OpenCV)")
        if isinstance(self.estimator, NetworkEstimator):
            self.estimator.rectifies_on_device = on_device
        self._rectification_device = self.estimator.device if on_device else "cpu"

    def _sgbm_for(self, input_scale: float) -> StereoEstimator:
        return StereoEstimator.load("sgbm", max_disparity=scaled_search_range(self._sgbm_max_disparity,
                                                                              input_scale))

    # -- input (executor thread) -------------------------------------------------------------

    def on_camera_info(self, side: str, msg: CameraInfo) -> None:
        """Keep the latest camera_info per side; release a pair that was waiting for them."""
        self.camera_infos[side] = msg
        awaiting = self._awaiting_info
        if awaiting is None or len(self.camera_infos) < 2:
            return
        self._awaiting_info = None
        left, right, arrived_s = awaiting
        if time.monotonic() - arrived_s > AWAIT_CAMERA_INFO_S:
            self._reject("missing_camera_info", "no camera_info arrived within "
                         f"{AWAIT_CAMERA_INFO_S:g} s of the pair")
            return
        self._submit(left, right)

    def on_images(self, left: Image, right: Image) -> None:
        """Synchronized pair: validate, then hand it to the worker (latest wins)."""
        with self.stats.lock:
            self.stats.pairs += 1
        if len(self.camera_infos) < 2:
            # Before the first camera_infos: hold the latest pair briefly instead of rejecting it.
            if self._awaiting_info is not None:
                self._reject("missing_camera_info", "a newer pair arrived before any camera_info")
            self._awaiting_info = (left, right, time.monotonic())
            return
        self._submit(left, right)

    def _submit(self, left: Image, right: Image) -> None:
        try:
            pair = self.prepare(left, right)
        except RejectedPairError as rejection:
            self._reject(rejection.reason, str(rejection))
            return
        with self._wake:
            if self._waiting is not None:
                with self.stats.lock:
                    self.stats.dropped += 1
            self._waiting = pair
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
            self.get_logger().warning(f"time jumped back by {jump_ns * 1e-9:.3f} s: resetting")
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
        if self._rectifier is not None:  # first: an uncalibrated camera is named as such
            rectification = (self._rectification_maps("left", left_info),
                             self._rectification_maps("right", right_info))
        geometry = self._geometry(left_info, right_info)
        self._last_stamp_ns = stamp
        header = Header(stamp=left.header.stamp, frame_id=left.header.frame_id)
        return StereoPair(header, left_rgb, right_rgb, geometry, time.perf_counter() - start, rectification)

    def _rectification_maps(self, side: str, info: CameraInfo) -> RectificationMaps:
        """The cached maps of a raw camera (built for a new calibration); rejects an uncalibrated one."""
        try:
            return self._rectifier.maps(side, CameraCalibration.from_camera_info(info))
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

    def _reject(self, reason: str, message: str) -> None:
        with self.stats.lock:
            self.stats.rejected[reason] += 1
        now = time.monotonic()
        last = self._last_warning.get(reason)
        if last is not None and now - last < WARNING_INTERVAL_S:
            self._suppressed[reason] += 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        self._last_warning[reason] = now
        self.get_logger().warning(f"skipping stereo pair [{reason}]: {message}{more}")

    # -- inference and output (worker thread) ------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while self._waiting is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                pair, self._waiting = self._waiting, None
            try:
                self.process(pair)
            except RejectedPairError as rejection:
                self._reject(rejection.reason, str(rejection))
            except Exception as error:  # a failing frame must not end the worker
                if self._stopping or not self.context.ok():
                    with self.stats.lock:
                        self.stats.discarded += 1
                    return  # shutting down: the frame in flight is dropped
                self._reject("estimator_error", f"{type(error).__name__}: {error}")

    def process(self, pair: StereoPair) -> None:
        """Estimator and outputs for one pair (worker thread)."""
        start = time.perf_counter()
        settings, estimator = self.settings, self.estimator  # one of each for the whole frame
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
            wants_points = (self.points_pub.get_subscription_count() > 0
                            or _subscribed(self.depth_pub) or _subscribed(self.depth_alias_pub))
            wants_rectified_left = _subscribed(self.rect_color_pub)
        points_geometry = geometry if wants_points and self._points_on_estimator else None
        rectified_left = None
        if pair.rectification is None:
            left, right = resize_pair(pair.left, pair.right, size)
            scaled = time.perf_counter()
            prediction = estimator.predict(left, right, geometry=points_geometry)
        else:  # raw input: rectified and resized where the estimator says (CPU or its device), timed with it
            scaled = time.perf_counter()
            raw = estimator.predict_raw(pair.left, pair.right, pair.rectification, size, geometry=points_geometry,
                                        rectified_left=wants_rectified_left)
            prediction, left, rectified_left = raw.prediction, raw.left, raw.rectified_left
        inferred = time.perf_counter()
        with self.stats.lock:
            self.stats.longest_inference_s = max(self.stats.longest_inference_s, inferred - scaled)
        with self._output_lock:
            if self._discard_if_stopping():
                return
            if rectified_left is not None and _subscribed(self.rect_color_pub):
                self.rect_color_pub.publish(conversions.numpy_to_image(
                    rectified_left, conversions.estimator_image_encoding(rectified_left), pair.header,
                    msg=self._rect_color_msg))
            self.publish_outputs(pair.header, left, geometry, prediction, settings, estimator)
            now_ns = self.get_clock().now().nanoseconds
        done = time.perf_counter()
        latency_ns = now_ns - conversions.stamp_to_ns(pair.header.stamp)
        with self.stats.lock:
            self.stats.processed += 1
            self.stats.latency_ms.append(latency_ns * 1e-6)
            self.stats.inference_ms.append((inferred - scaled) * 1e3)
            self.stats.overhead_ms.append((done - inferred + scaled - start + pair.prepare_s) * 1e3)

    def _discard_if_stopping(self) -> bool:
        if self._stopping:
            with self.stats.lock:
                self.stats.discarded += 1
        return self._stopping

    def publish_outputs(self, header: Header, left: np.ndarray, geometry: StereoGeometry,
                        prediction: StereoPrediction, settings: OutputSettings,
                        estimator: StereoEstimator) -> None:
        """Build and publish every output somebody subscribes to, from `estimator`'s prediction
        for the (possibly resized) pair whose left image is `left` and geometry `geometry`."""
        disparity = prediction.disparity  # (H, W) float32, NaN invalid
        low_confidence = None
        if settings.confidence_threshold > 0:
            low_confidence = ~(prediction.confidence >= settings.confidence_threshold)
            disparity = np.where(low_confidence, np.float32(np.nan), disparity)
        if self.disparity_pub.get_subscription_count():
            self.disparity_pub.publish(conversions.disparity_image(
                disparity, header, geometry, min_disparity=estimator.min_disparity,
                max_disparity=estimator.min_disparity + estimator.max_disparity - 1,
                delta_d=DISPARITY_STEP, msg=self._disparity_msg))

        wants_cloud = self.points_pub.get_subscription_count() > 0
        wants_depth = _subscribed(self.depth_pub)
        wants_depth_alias = _subscribed(self.depth_alias_pub)
        if wants_cloud or wants_depth or wants_depth_alias:
            height, width = disparity.shape
            with_color = settings.use_color and wants_cloud
            cloud = conversions.organized_cloud(self._cloud_msg, header, height, width, with_color)
            points = cloud[..., :3]  # (H, W, 3) metres, a view of the message data
            if prediction.points is not None:
                conversions.write_points(cloud, prediction.points)
                if low_confidence is not None:
                    points[low_confidence] = np.nan
            else:
                geometry.points_from_disparity(disparity, out=points)
            depth = cloud[..., 2]
            if settings.min_depth_m > 0 or settings.max_depth_m > 0:
                with np.errstate(invalid="ignore"):
                    out_of_range = depth < settings.min_depth_m
                    if settings.max_depth_m > 0:
                        out_of_range |= depth > settings.max_depth_m
                points[out_of_range] = np.nan
            if wants_cloud:
                if with_color:
                    conversions.write_packed_rgb(cloud, left)
                self.points_pub.publish(conversions.dense_cloud(cloud, header) if settings.dense_points
                                        else self._cloud_msg)
            if wants_depth:
                self.depth_pub.publish(conversions.depth_image(depth, header, self._depth_encoding,
                                                               msg=self._depth_msg))
            if wants_depth_alias:
                self._warn_deprecated("depth", "depth/image_rect")
                self.depth_alias_pub.publish(
                    self._depth_msg if wants_depth and self._depth_encoding == "32FC1"
                    else conversions.float_image(depth, header, msg=self._depth_alias_msg))
        wants_confidence = _subscribed(self.confidence_pub)
        wants_confidence_alias = _subscribed(self.confidence_alias_pub)
        if wants_confidence or wants_confidence_alias:
            confidence_msg = conversions.float_image(prediction.confidence, header, msg=self._confidence_msg)
            if wants_confidence:
                self.confidence_pub.publish(confidence_msg)
            if wants_confidence_alias:
                self._warn_deprecated("confidence", "confidence/image_rect")
                self.confidence_alias_pub.publish(confidence_msg)
        if _subscribed(self.rgb_pub):
            self.rgb_pub.publish(conversions.numpy_to_image(
                left, conversions.estimator_image_encoding(left), header, msg=self._rgb_msg))
        info_pubs = [pub for pub in (self.depth_info_pub, self.confidence_info_pub, self.rgb_info_pub)
                     if _subscribed(pub)]
        if info_pubs:
            height, width = disparity.shape
            info = conversions.camera_info(geometry.left_camera(width, height), header,
                                           msg=self._camera_info_msg)
            for pub in info_pubs:
                pub.publish(info)

    def _warn_deprecated(self, topic: str, replacement: str) -> None:
        if topic not in self._deprecation_warned:
            self._deprecation_warned.add(topic)
            self.get_logger().warning(
                f"topic '{topic}' is deprecated and will be removed: subscribe to '{replacement}' and its "
                f"camera_info instead")

    # -- diagnostics -------------------------------------------------------------------------

    def diagnostic_values(self) -> dict[str, str]:
        """Current figures, as published on /diagnostics."""
        with self.stats.lock:
            stats = self.stats
            start_t, start_processed, _, _ = self._period_start
            elapsed = max(time.monotonic() - start_t, 1e-9)
            values = {
                "rate_hz": f"{(stats.processed - start_processed) / elapsed:.2f}",
                "latency_p50_ms": f"{_percentile(stats.latency_ms, 50):.1f}",
                "latency_p95_ms": f"{_percentile(stats.latency_ms, 95):.1f}",
                "inference_p50_ms": f"{_percentile(stats.inference_ms, 50):.1f}",
                "overhead_p50_ms": f"{_percentile(stats.overhead_ms, 50):.2f}",
                "pairs": str(stats.pairs),
                "processed": str(stats.processed),
                "dropped": str(stats.dropped),
                "rejected": str(sum(stats.rejected.values())),
                "discarded_at_shutdown": str(stats.discarded),
                "time_resets": str(stats.time_resets),
            }
            values.update({f"rejected_{reason}": str(count) for reason, count in sorted(stats.rejected.items())})
        values["received_left_images"], values["received_right_images"] = map(str, self.image_sync.received)
        evicted = self.image_sync.evicted
        if evicted is not None:
            values["unmatched_images"] = str(evicted)
        if self._rectifier is not None:
            values["rectification_map_builds"] = str(self._rectifier.builds)
            values["rectification_device"] = self._rectification_device
        values.update(model=self.estimator.name, device=self.estimator.device,
                      input_scale=f"{self.settings.input_scale:g}",
                      max_disparity=str(self.estimator.max_disparity))
        return values

    def _expire_awaiting_pair(self) -> None:
        """A pair held for camera_infos that did not come in time is rejected (and counted)."""
        awaiting = self._awaiting_info
        if awaiting is not None and time.monotonic() - awaiting[2] > AWAIT_CAMERA_INFO_S:
            self._awaiting_info = None
            missing = " and ".join(side for side in ("left", "right") if side not in self.camera_infos)
            self._reject("missing_camera_info", f"no camera_info received yet on {missing}/camera_info")

    def _report(self) -> None:
        self._expire_awaiting_pair()
        values = self.diagnostic_values()
        with self.stats.lock:
            _, _, start_pairs, start_rejected = self._period_start
            rejected_total = sum(self.stats.rejected.values())
            new_pairs, new_rejected = self.stats.pairs - start_pairs, rejected_total - start_rejected
            self._period_start = (time.monotonic(), self.stats.processed, self.stats.pairs, rejected_total)
        if new_rejected:
            state, level, summary = ("rejecting", DiagnosticStatus.WARN,
                                      f"{new_rejected} pairs rejected in the last period")
        elif new_pairs == 0:
            state, level, summary = "no_input", DiagnosticStatus.WARN, "no synchronized stereo input"
        else:
            state, level, summary = "running", DiagnosticStatus.OK, "running"
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: stereo",
                                  message=summary, hardware_id=f"{values['model']} on {values['device']}",
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)
        # A console line per period would flood a launch console: on change, else at a slow period.
        now = time.monotonic()
        if (self._logged_status is not None and self._logged_status[0] == state
                and now - self._logged_status[1] < self._status_log_period_s):
            return
        self._logged_status = (state, now)
        self.get_logger().info(
            f"{values['rate_hz']} Hz | latency p50 {values['latency_p50_ms']} ms "
            f"p95 {values['latency_p95_ms']} ms | inference p50 {values['inference_p50_ms']} ms | "
            f"overhead p50 {values['overhead_p50_ms']} ms | dropped {values['dropped']} | "
            f"rejected {values['rejected']} | {summary}"
        )

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown_wait_s(self) -> float:
        """How long close() waits for the worker: covers the slowest inference seen so far."""
        with self.stats.lock:
            return max(MIN_SHUTDOWN_WAIT_S, 2.0 * self.stats.longest_inference_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the worker: a frame in flight is not published. Waits up to `timeout_s` (default
        shutdown_wait_s()) for it; a result arriving later is dropped without touching the node."""
        with self._output_lock, self._wake:
            self._stopping = True
            self._wake.notify()
        wait_s = self.shutdown_wait_s() if timeout_s is None else timeout_s
        self._worker.join(wait_s)
        if self._worker.is_alive():
            self.get_logger().warning(f"inference still running after {wait_s:.1f} s: its result will be dropped")


CONFIGURATION_ERRORS = (ParameterError, InvalidParameterValueException, InvalidParameterTypeException,
                        FileNotFoundError, CheckpointError, ValueError)


def run(node_factory: Callable[[], Node], argv: list[str] | None = None) -> int:
    """Spin one node until SIGINT/SIGTERM; 0 on a clean stop, 2 on a configuration error.

    rclpy's signal handlers shut the context down, which ends the spin; a frame in flight is
    dropped. Further signals are ignored while the node is torn down (bounded by close()'s
    wait) so that a second Ctrl-C cannot leave a traceback half way through.
    """
    rclpy.init(args=argv)
    try:
        node = node_factory()
    except CONFIGURATION_ERRORS as error:
        print(f"{NODE_NAME}: configuration error: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    except KeyboardInterrupt:  # stopped while starting (e.g. loading a model)
        rclpy.try_shutdown()
        return 0
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # A signal that shuts the context down between the spin's check of it and its next wait
        # set makes rclpy raise "the given context is not valid": that is a stop, not a failure.
        if rclpy.ok():
            raise
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)
        if hasattr(node, "close"):
            node.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script `stereo_kd_node` (ROS arguments after --ros-args as usual)."""
    return run(StereoNode, argv)


if __name__ == "__main__":
    sys.exit(main())
