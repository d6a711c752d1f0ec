"""ONNX Runtime backend of StereoEstimator: our exported networks and third-party stereo models.

What a model expects (its *input convention*) comes from the ONNX file's metadata, which
`stereo-kd export` writes (keys `stereo_kd.*`), or, for a third-party model, from a small YAML
file beside it with the same stem (`hitnet.onnx` + `hitnet.yaml`); the YAML wins where both
exist. Example for a RAFT-Stereo-style export (0-255 input, negative x-flow output):

    colour_order: RGB          # RGB | BGR | GRAY (one channel per view)
    value_range: 255.0         # pixel values fed in [0, value_range] before mean/std
    mean: [0.0, 0.0, 0.0]      # subtracted after scaling (per channel, in the colour order above)
    std: [1.0, 1.0, 1.0]
    inputs: [left, right]      # two inputs, or one name: both views stacked on the channel axis
    padding_multiple: 32       # dynamic-size models: pad H and W up to a multiple (bottom/right)
    max_disparity: 192
    disparity_output: disparity
    disparity_scale: -1.0      # multiplies the output into disparity in pixels (flow models: -1)
    confidence_output: null    # name of a [0, 1] confidence output, if the model has one
    model_name: raft-stereo
    input_scale: 1.0           # resize each pair by this before the model (exports of a model that runs enlarged)

Fixed-size models (integer H and W in the graph) are fed pairs resized to that size unless the
pair fits inside it, in which case it is padded (replicating the last row/column) and the
output cropped; resized disparity is mapped back to the input size and multiplied by the width
ratio. Models without a confidence output get confidence 1 where the disparity is valid, 0
elsewhere (as SGBM).

Providers follow `device`: "auto" takes TensorRT, then CUDA, then CPU among those the installed
onnxruntime offers; "cuda[:N]" asks for TensorRT and CUDA; "cpu" forces the CPU provider. A
requested provider that is missing (or that onnxruntime drops while creating the session) is
named in a warning and the next one is used.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

from stereo_kd_core.estimator_base import StereoEstimator, StereoPrediction, check_pair, pair_peak
from stereo_kd_core.registry import default_cache_dir

log = logging.getLogger(__name__)

METADATA_PREFIX = "stereo_kd."
TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
COLOUR_ORDERS = ("RGB", "BGR", "GRAY")
# ITU-R BT.601 luma, for models that take one grey channel per view
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class OnnxModelError(RuntimeError):
    """An ONNX model that cannot be read, or whose inputs/outputs do not fit its convention."""


@dataclass
class InputConvention:
    """How to feed a stereo ONNX model and read its outputs (see the module docstring)."""

    colour_order: str = "RGB"
    value_range: float = 1.0
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    inputs: list[str] = field(default_factory=lambda: ["left", "right"])
    padding_multiple: int = 1
    max_disparity: int = 192
    disparity_output: str = "disparity"
    disparity_scale: float = 1.0
    confidence_output: str | None = None
    model_name: str = ""
    # informative: {output name: meaning}, model architecture, SHA-256 of the source checkpoint,
    # and "int8-static" for quantised graphs
    outputs: dict[str, str] = field(default_factory=dict)
    arch: str = ""
    source_sha256: str = ""
    quantization: str = ""
    # the pair is resized by this before the graph (a model exported from one with a working scale:
    # StereoEstimator.load applies it, as it does for the shipped model; the graph's size is the enlarged one)
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        self.colour_order = str(self.colour_order).upper()
        if self.colour_order not in COLOUR_ORDERS:
            raise ValueError(f"colour_order must be one of {', '.join(COLOUR_ORDERS)}, got '{self.colour_order}'")
        channels = self.channels
        self.mean = [float(v) for v in np.broadcast_to(np.asarray(self.mean, dtype=np.float64).ravel(), (channels,))]
        self.std = [float(v) for v in np.broadcast_to(np.asarray(self.std, dtype=np.float64).ravel(), (channels,))]
        if any(v == 0 for v in self.std):
            raise ValueError("std must not contain 0")
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.inputs = [str(name) for name in self.inputs]
        if len(self.inputs) not in (1, 2):
            raise ValueError(f"inputs must name one (stacked) or two (left, right) inputs, got {self.inputs}")
        self.value_range = float(self.value_range)
        self.padding_multiple = int(self.padding_multiple)
        self.max_disparity = int(self.max_disparity)
        self.disparity_scale = float(self.disparity_scale)
        self.input_scale = float(self.input_scale)
        if not 0.1 <= self.input_scale <= 4.0:
            raise ValueError(f"input_scale must be between 0.1 and 4, got {self.input_scale}")
        if self.padding_multiple < 1:
            raise ValueError(f"padding_multiple must be >= 1, got {self.padding_multiple}")

    @property
    def channels(self) -> int:
        """Channels per view."""
        return 1 if self.colour_order == "GRAY" else 3

    @classmethod
    def from_mapping(cls, values: dict, source: str) -> InputConvention:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OnnxModelError(f"{source}: unknown input-convention keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise OnnxModelError(f"{source}: bad input convention: {exc}") from None

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props entries (string values; lists and dicts as JSON)."""
        return {METADATA_PREFIX + key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> InputConvention | None:
        ours = {key[len(METADATA_PREFIX):]: value for key, value in metadata.items() if key.startswith(METADATA_PREFIX)}
        if not ours:
            return None
        try:
            values = {key: json.loads(value) for key, value in ours.items()}
        except json.JSONDecodeError as exc:
            raise OnnxModelError(f"{source}: unreadable stereo-kd metadata ({exc})") from None
        return cls.from_mapping(values, source)


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The YAML beside a model that states its input convention: model.onnx -> model.yaml."""
    return Path(model_path).with_suffix(".yaml")


def read_convention(model_path: str | os.PathLike, metadata: dict[str, str]) -> InputConvention:
    """The model's input convention: the YAML beside it where there is one, else its metadata."""
    sidecar = sidecar_path(model_path)
    if sidecar.is_file():
        import yaml

        try:
            values = yaml.safe_load(sidecar.read_text())
        except yaml.YAMLError as exc:
            raise OnnxModelError(f"cannot read {sidecar}: {exc}") from None
        if not isinstance(values, dict):
            raise OnnxModelError(f"{sidecar} must hold a mapping of input-convention keys")
        return InputConvention.from_mapping(values, str(sidecar))
    convention = InputConvention.from_metadata(metadata, str(model_path))
    if convention is None:
        raise OnnxModelError(
            f"{model_path} has no stereo-kd metadata and no {sidecar.name} beside it: for a third-party model, "
            f"write {sidecar} stating its input convention (colour_order, value_range, mean, std, inputs, "
            "padding_multiple, max_disparity, disparity_output, disparity_scale; see stereo_kd_core/onnx_runtime.py)")
    return convention


def choose_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for `device`, in preference order, among `available`; a warning names
    every requested provider that this onnxruntime lacks."""
    if device == "cpu":
        requested = [CPU]
    elif device == "auto":
        requested = [p for p in (TENSORRT, CUDA) if p in available] + [CPU]
    elif device == "cuda" or device.startswith("cuda:"):
        requested = [TENSORRT, CUDA, CPU] if TENSORRT in available else [CUDA, CPU]
    else:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'")
    missing = [p for p in requested if p not in available]
    if missing:
        log.warning("onnxruntime has no %s (available: %s); falling back to %s", ", ".join(missing),
                    ", ".join(available), next(p for p in requested if p in available))
    return [p for p in requested if p in available]


def default_engine_cache_dir() -> Path:
    return default_cache_dir() / "tensorrt"


class OnnxEstimator(StereoEstimator):
    """A stereo ONNX model run in ONNX Runtime (see the module docstring for conventions)."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", precision: str = "fp32",
                 max_disparity: int | None = None, threads: int | None = None,
                 engine_cache_dir: str | os.PathLike | None = None):
        import onnxruntime as ort

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model does not exist: {path}")
        providers = choose_providers(device, ort.get_available_providers())
        device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        if precision == "fp16" and TENSORRT not in providers:
            log.warning("fp16 in onnxruntime needs the TensorRT provider; running '%s' as exported", path.name)
            precision = "fp32"
        elif precision == "bf16":
            log.warning("bf16 is not an onnxruntime option; running '%s' as exported", path.name)
            precision = "fp32"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or 0)  # 0 = onnxruntime's default (physical cores)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: provider fallbacks are reported by us
        cache_dir = Path(engine_cache_dir) if engine_cache_dir else default_engine_cache_dir()
        provider_options = {
            TENSORRT: {"device_id": device_id, "trt_fp16_enable": precision == "fp16",
                       "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)},
            CUDA: {"device_id": device_id},
            CPU: {},
        }
        if TENSORRT in providers:
            cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                                provider_options=[provider_options.get(p, {}) for p in providers])
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own untyped Fail/InvalidProtobuf)
            raise OnnxModelError(f"cannot load ONNX model {path}: the file is truncated, corrupt or not an ONNX "
                                 f"model ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        active = self.session.get_providers()
        dropped = [p for p in providers if p not in active]
        if dropped:
            log.warning("onnxruntime could not start %s for %s (missing libraries or GPU?); running on %s",
                        ", ".join(dropped), path.name, ", ".join(active))
        self.providers = active
        self.path = path
        self.convention = read_convention(path, self.session.get_modelmeta().custom_metadata_map)
        self.name = self.convention.model_name or path.stem
        self.backend = f"onnxruntime ({active[0]})"
        self.device = f"cuda:{device_id}" if active[0] in (TENSORRT, CUDA) else "cpu"
        self.precision = "int8" if self.convention.quantization else precision
        self.max_disparity = self.convention.max_disparity
        if max_disparity is not None and max_disparity != self.max_disparity:
            log.warning("max_disparity %d requested but model '%s' was built for %d; using %d",
                        max_disparity, self.name, self.max_disparity, self.max_disparity)
        self.min_disparity = 0.0
        self.fixed_size = self._check_signature()
        self._io_binding = self.device.startswith("cuda")

    def _check_signature(self) -> tuple[int, int] | None:
        """Validate inputs/outputs against the convention; the model's fixed (H, W), or None when dynamic."""
        conv = self.convention
        found = {i.name: i.shape for i in self.session.get_inputs()}
        stacked = len(conv.inputs) == 1
        channels = conv.channels * (2 if stacked else 1)
        expected = f"(1, {channels}, H, W)"
        if sorted(found) != sorted(conv.inputs):
            raise OnnxModelError(f"{self.path}: the model's inputs are {found}; its convention expects inputs "
                                 f"{conv.inputs}, each {expected}")
        sizes = set()
        for name in conv.inputs:
            shape = found[name]
            fixed_channels = shape[1] if len(shape) == 4 else None
            if len(shape) != 4 or (isinstance(fixed_channels, int) and fixed_channels != channels) or \
                    (isinstance(shape[0], int) and shape[0] != 1):
                raise OnnxModelError(f"{self.path}: input '{name}' has shape {shape}; expected {expected} "
                                     f"({conv.colour_order}, {'both views stacked' if stacked else 'one view'})")
            sizes.add(tuple(shape[2:]))
        if len(sizes) != 1:
            raise OnnxModelError(f"{self.path}: inputs {conv.inputs} differ in size: {sorted(map(str, sizes))}")
        height, width = sizes.pop()
        # float16 graphs (third-party exports) take float16 inputs; everything else float32
        self._input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        for role, name in (("disparity_output", conv.disparity_output), ("confidence_output", conv.confidence_output)):
            if name is not None and name not in outputs:
                raise OnnxModelError(f"{self.path}: {role} '{name}' is not an output of the model "
                                     f"(outputs: {outputs})")
        self._output_names = [conv.disparity_output] + ([conv.confidence_output] if conv.confidence_output else [])
        if isinstance(height, int) and isinstance(width, int):
            return height, width
        return None

    # -- pre- and post-processing -----------------------------------------------------------

    def _normalise(self, image: np.ndarray, peak: float) -> np.ndarray:
        """HxWx3 uint8/uint16 RGB -> (C, H, W) float32 in the model's convention."""
        conv = self.convention
        x = image.astype(np.float32) * np.float32(conv.value_range / peak)
        if conv.colour_order == "BGR":
            x = x[..., ::-1]
        elif conv.colour_order == "GRAY":
            x = (x @ LUMA_WEIGHTS)[..., None]
        x = (x - np.asarray(conv.mean, np.float32)) / np.asarray(conv.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 image -> the size the graph is run at (padded, or resized for fixed-size models)."""
        height, width = image.shape[:2]
        if self.fixed_size is None:
            multiple = self.convention.padding_multiple
            pad_h, pad_w = -height % multiple, -width % multiple
        else:
            fixed_h, fixed_w = self.fixed_size
            if height > fixed_h or width > fixed_w:
                return cv2.resize(image, (fixed_w, fixed_h), interpolation=cv2.INTER_AREA)
            pad_h, pad_w = fixed_h - height, fixed_w - width
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
        return image

    def _feeds(self, left: np.ndarray, right: np.ndarray) -> dict[str, np.ndarray]:
        peak = pair_peak(left, right)
        views = [self._normalise(self._fit(image), peak)[None].astype(self._input_dtype, copy=False)
                 for image in (left, right)]  # (1, C, h, w)
        if len(self.convention.inputs) == 1:
            return {self.convention.inputs[0]: np.concatenate(views, axis=1)}
        return dict(zip(self.convention.inputs, views, strict=True))

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self._io_binding:
            return self.session.run(self._output_names, feeds)
        return self._run_with_io_binding(feeds)

    def _run_with_io_binding(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """CUDA/TensorRT: inputs copied to the device once, outputs left on the device until the run
        ends, then copied back together (no per-node host round trips). NOT yet run on a GPU."""
        import onnxruntime as ort

        device_id = int(self.device.split(":")[1])
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id))
        for name in self._output_names:
            binding.bind_output(name, "cuda", device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _to_input_size(self, plane: np.ndarray, height: int, width: int, what: str) -> tuple[np.ndarray, float]:
        """A model output at run size -> (H, W) at input size, and the factor disparities scale by."""
        run_h, run_w = self._run_size(height, width)
        squeezed = plane.reshape(plane.shape[-2:]) if plane.size == run_h * run_w else None
        if squeezed is None or squeezed.shape != (run_h, run_w):
            raise OnnxModelError(f"{self.path}: output {what} has shape {plane.shape}; expected (1, {run_h}, {run_w}) "
                                 f"or (1, 1, {run_h}, {run_w}) for inputs of {run_h}x{run_w}")
        if not self._resized(height, width):
            return np.ascontiguousarray(squeezed[:height, :width], dtype=np.float32), 1.0
        resized = cv2.resize(squeezed.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return resized, width / run_w

    def _resized(self, height: int, width: int) -> bool:
        return self.fixed_size is not None and (height > self.fixed_size[0] or width > self.fixed_size[1])

    def _run_size(self, height: int, width: int) -> tuple[int, int]:
        if self.fixed_size is not None:
            return self.fixed_size
        multiple = self.convention.padding_multiple
        return -(-height // multiple) * multiple, -(-width // multiple) * multiple

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = check_pair(left, right)
        height, width = left.shape[:2]
        outputs = self._run(self._feeds(left, right))
        disparity, scale = self._to_input_size(outputs[0], height, width, f"'{self.convention.disparity_output}'")
        disparity *= np.float32(scale * self.convention.disparity_scale)
        disparity[~np.isfinite(disparity)] = np.nan
        if len(outputs) > 1:
            confidence, _ = self._to_input_size(outputs[1], height, width, f"'{self.convention.confidence_output}'")
            confidence = np.clip(np.nan_to_num(confidence, nan=0.0), 0.0, 1.0)
        else:
            confidence = np.isfinite(disparity).astype(np.float32)
        return StereoPrediction(disparity=disparity, confidence=confidence, points=self._points(disparity, geometry))
