"""stereo_kd_node's parameters: their specs (defaults, descriptions, ranges), the checks beyond the
descriptors' ranges, and the settings that may change while the node runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter

from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE
from stereo_kd_core.registry import default_model
from stereo_kd_ros.payloads import DEPTH_ENCODINGS

SGBM_RANGE_STEP = 16       # OpenCV SGBM's numDisparities is a multiple of 16
SGBM_DEFAULT_RANGE = 192   # max_disparity 0 with model sgbm
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")
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
    ParameterSpec("compile", False, "torch.compile the network (CPU: inductor with freezing; CUDA: CUDA graphs). "
                  "Each input size compiles at its first pair: on a CPU in a background thread (30 s to minutes) "
                  "while the eager network keeps publishing, the compiled graph taking over when ready; on CUDA "
                  "at that pair. Inductor's on-disk cache shortens later starts, and any failure runs "
                  "eagerly with a warning. Measured at 384x640: 2.6x faster on an AMX Xeon, 1.3x on an AVX-512 "
                  "BF16 EPYC (README). Networks only."),
    ParameterSpec("precision", "auto", "Network precision: auto (fp16 on CUDA; on the CPU the shipped model's "
                  "measured default, bf16 where the CPU has AMX/AVX-512 BF16, else fp32), fp32, fp16, bf16 or int8 "
                  "(networks on the CPU: PT2E int8 compiled per input size in the background, eager bf16 "
                  "meanwhile; needs torchao)."),
    ParameterSpec("max_disparity", 0, "Disparity search range in pixels (multiple of 16); 0: the model's own "
                  "(SGBM: 192). A network searches the range it was built for, in the pixels it is given (the "
                  "default model, which shrinks near scenes down to half size: 384): a smaller value "
                  "invalidates larger disparities in every output; a larger one is refused.",
                  value_range=(0, 1024, 16)),
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
    ParameterSpec("align_rows_every", 30,
                  "Measure where the right camera's rows lie against the left's (tracked corners, "
                  "sub-pixel: an offset, and a tilt and stretch across the image) on the first pair and every this "
                  "many pairs after it, and resample the right image by the median of the last five measurements "
                  "(an offset from 0.1 px, a tilt or stretch from 1 px at the edge; a warning from 1 px: "
                  "recalibrate). A 1 px offset costs the default model 0.7 px of EPE on real pairs. Raw input "
                  "(rectify): measured on the rectified views, the right camera's maps moved by it. Swapped views "
                  "are told by the same tracks and warned of. 0: off.",
                  value_range=(0, 100000, 1)),
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


def descriptor(spec: ParameterSpec) -> ParameterDescriptor:
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
    if values["depth_encoding"] not in DEPTH_ENCODINGS:
        raise ParameterError(f"depth_encoding: expected one of {', '.join(DEPTH_ENCODINGS)}, "
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


def declare_parameters(node: Node) -> dict[str, Any]:
    """Declare every parameter of PARAMETERS on `node`; their values (overrides applied)."""
    for spec in PARAMETERS:
        node.declare_parameter(spec.name, spec.default, descriptor(spec))
    return {name: node.get_parameter(name).value for name in PARAMETER_NAMES}


def settings_from(values: dict[str, Any]) -> OutputSettings:
    """The run-time settings among parameter `values`."""
    return OutputSettings(
        confidence_threshold=values["confidence_threshold"], min_depth_m=values["min_depth_m"],
        max_depth_m=values["max_depth_m"], use_color=values["use_color"],
        dense_points=values["dense_points"], input_scale=values["input_scale"],
    )
