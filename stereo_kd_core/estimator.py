"""StereoEstimator: the one seam between the library and the ROS node (see DESIGN.md)."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from stereo_kd_core import registry
from stereo_kd_core.rectification import resize_pair

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class StereoPrediction:
    disparity: np.ndarray   # float32 HxW, pixels, NaN where invalid
    confidence: np.ndarray  # float32 HxW in [0, 1]
    points: np.ndarray | None = None  # float32 HxWx3 metres (left optical frame) when geometry was given


@dataclass
class RawPrediction:
    """What `StereoEstimator.predict_raw` gives for a raw (unrectified) pair."""

    prediction: StereoPrediction
    left: np.ndarray                          # the left image the estimator saw: rectified, at its input size
    rectified_left: np.ndarray | None = None  # the rectified left image at full size, when asked for


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX-512 BF16): elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str, model: str) -> str:
    """"auto" -> a concrete precision: fp16 on CUDA; on the CPU the shipped model's measured CPU
    default (its manifest's cpu_default, chosen by stereo_kd_core.backend_choice's rule from
    benchmarks/cpu_backends.py) where the CPU has native bf16, else fp32. Others pass through."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    chosen = _measured_cpu_default(model)
    if chosen.get("backend") in PYTORCH_CPU_BACKENDS and chosen.get("precision") == "bf16" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


# The PyTorch variants benchmarks/cpu_backends.py measures on the CPU: plain, and 2D convolution
# weights in channels_last (oneDNN then keeps 2D activations in NHWC; same results).
PYTORCH_CPU_BACKENDS = ("pytorch", "pytorch-channels-last")


def _measured_cpu_default(model: str) -> dict:
    """The shipped model's manifest `cpu_default` ({} for checkpoint paths and unmeasured models)."""
    return registry.shipped_models().get(model, {}).get("cpu_default", {})


def resolve_channels_last(channels_last: bool | None, model: str) -> bool:
    """None -> the shipped model's measured CPU default layout (channels_last when its manifest's
    cpu_default backend is pytorch-channels-last; False for checkpoint paths)."""
    if channels_last is not None:
        return bool(channels_last)
    return _measured_cpu_default(model).get("backend") == "pytorch-channels-last"


def compile_cache_dir() -> Path:
    """Where torch.compile's on-disk caches go: $STEREO_KD_CACHE (else ~/.cache/stereo-kd)/inductor."""
    return Path(os.environ.get("STEREO_KD_CACHE") or Path.home() / ".cache" / "stereo-kd") / "inductor"


def resolve_device(device: str) -> str:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got '{device}'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but torch sees no CUDA GPU; use device 'auto' or 'cpu'")
    return device


def _as_rgb(image: np.ndarray, side: str) -> np.ndarray:
    """Validate one input image; returns HxWx3 (uint8 or uint16)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{side} image must be a numpy array, got {type(image).__name__}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{side} image must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{side} image must be HxW or HxWx3, got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{side} image is too small: {image.shape[1]}x{image.shape[0]}")
    return image


def pair_peak(left: np.ndarray, right: np.ndarray) -> float:
    """Full-scale value of a pair: 255 for 8-bit; for 16-bit the pair's largest value, so 10-,
    12- and 16-bit sensors (mono16 from a 12-bit camera peaks at 4095) all use the full range."""
    if left.dtype == np.uint8:
        return 255.0
    return float(max(int(left.max()), int(right.max()), 1))


def _check_pair(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    left, right = _as_rgb(left, "left"), _as_rgb(right, "right")
    if left.shape != right.shape or left.dtype != right.dtype:
        raise ValueError(f"left and right images differ: {left.shape} {left.dtype} vs {right.shape} {right.dtype}")
    return left, right


class StereoEstimator:
    """Disparity (and confidence) for rectified stereo pairs, from a network or OpenCV SGBM."""

    name: str
    backend: str = "python"  # "pytorch", "opencv", "onnxruntime (<execution provider>)"; subclasses say
    device: str
    precision: str
    max_disparity: int
    min_disparity: float = 0.0
    min_input_width: int = 2  # narrower pairs are refused with a ValueError

    @classmethod
    def load(cls, model: str = "sgbm", device: str = "auto", precision: str = "fp32",
             max_disparity: int = 192, compile: bool = False, threads: int | None = None,
             engine_cache_dir: str | None = None, channels_last: bool | None = None) -> StereoEstimator:
        """A registry name ("dsnet", ...), a checkpoint path, an ONNX model path (*.onnx), or "sgbm".

        precision: fp32, fp16, bf16, or auto (`resolve_precision`: fp16 on CUDA, the shipped
        model's measured CPU default on the CPU).

        compile: torch.compile the network (CUDA graphs on CUDA); falls back to eager with a
        warning where compilation is unavailable. channels_last (networks on the CPU; CUDA always
        uses it): None = the shipped model's measured CPU default (`resolve_channels_last`).
        ONNX models run in ONNX Runtime (stereo_kd_core.onnx_runtime): providers follow `device`
        (auto: TensorRT > CUDA > CPU among those installed), `threads` sets the CPU provider's
        intra-op threads (None: onnxruntime's default), `engine_cache_dir` TensorRT's engine
        cache; precision "fp16" builds TensorRT engines in fp16. `max_disparity` is the model's
        own for networks and ONNX models (a different request is logged and ignored).
        """
        if precision not in PRECISIONS and precision != "auto":
            raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got '{precision}'")
        if not isinstance(max_disparity, int) or max_disparity < 16:
            raise ValueError(f"max_disparity must be an integer >= 16, got {max_disparity!r}")
        if model == "sgbm":
            return SGBMEstimator(max_disparity=max_disparity)
        if precision == "auto":
            precision = resolve_precision(precision, "cpu" if model.endswith(".onnx") else resolve_device(device),
                                          model)
        if model.endswith(".onnx"):
            from stereo_kd_core.onnx_runtime import OnnxEstimator

            return OnnxEstimator(model, device=device, precision=precision, max_disparity=max_disparity,
                                 threads=threads, engine_cache_dir=engine_cache_dir)
        if os.sep in model or model.endswith((".pt", ".pth", ".ckpt")) or Path(model).is_file():
            path, sha = Path(model).expanduser(), None
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint path does not exist: {path}")
            name = path.stem
        else:
            path, sha = registry.resolve_shipped(model)
            name = model
        from stereo_kd_core.checkpoint import load_model

        network = load_model(path, expected_sha256=sha)
        return NetworkEstimator(network, name=name, device=resolve_device(device),
                                precision=precision, max_disparity=max_disparity, compile=compile,
                                channels_last=resolve_channels_last(channels_last, model))

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        """Disparity and confidence of a rectified pair; with `geometry` (a StereoGeometry) also
        the organized point cloud, computed on the estimator's device."""
        raise NotImplementedError

    # Where predict_raw rectifies and resizes: False = OpenCV on the CPU; True = on the
    # estimator's own device (networks only: torch grid_sample, no host round trip on a GPU).
    rectifies_on_device: bool = False

    def predict_raw(self, left: np.ndarray, right: np.ndarray, maps, size: tuple[int, int] | None = None,
                    geometry=None, rectified_left: bool = False) -> RawPrediction:
        """Rectify a raw pair with `maps` (left and right RectificationMaps), resize it to `size`
        (W, H; area interpolation; None = full size) and predict, as `predict` would on the
        rectified, resized pair; `geometry` is that of the resized pair (points as in `predict`).
        This implementation rectifies with OpenCV on the CPU."""
        left_maps, right_maps = maps
        full_left, full_right = left_maps.remap(left), right_maps.remap(right)
        if size is None:
            size = (full_left.shape[1], full_left.shape[0])
        small_left, small_right = resize_pair(full_left, full_right, size)
        prediction = self.predict(small_left, small_right, geometry=geometry)
        return RawPrediction(prediction, small_left, full_left if rectified_left else None)

    @staticmethod
    def _points(disparity: np.ndarray, geometry) -> np.ndarray | None:
        return None if geometry is None else geometry.points_from_disparity(disparity)


class SGBMEstimator(StereoEstimator):
    """OpenCV semi-global matching: the classical peer and CPU fallback.

    Confidence is 1 where SGBM returns a disparity that passed its uniqueness, left-right
    and speckle checks, 0 elsewhere (SGBM exposes no distribution over disparities).
    """

    def __init__(self, max_disparity: int = 192, block_size: int = 5):
        self.name = "sgbm"
        self.backend = "opencv"
        self.device = "cpu"
        self.precision = "fp32"
        self.max_disparity = int(max_disparity)
        self.min_disparity = 0.0
        num_disparities = ((self.max_disparity + 15) // 16) * 16
        # OpenCV's SGBM needs columns beyond the search range (narrower images crash or throw).
        self.min_input_width = num_disparities + 1
        channels = 3
        self._matcher = cv2.StereoSGBM_create(
            minDisparity=0, numDisparities=num_disparities, blockSize=block_size,
            P1=8 * channels * block_size**2, P2=32 * channels * block_size**2,
            disp12MaxDiff=1, uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
            mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
        )

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = _check_pair(left, right)
        if left.shape[1] < self.min_input_width:
            raise ValueError(f"image is {left.shape[1]} px wide: sgbm with max_disparity {self.max_disparity} "
                             f"needs at least {self.min_input_width} columns")
        if left.dtype == np.uint16:
            to_8bit = 255.0 / pair_peak(left, right)
            left = cv2.convertScaleAbs(left, alpha=to_8bit)
            right = cv2.convertScaleAbs(right, alpha=to_8bit)
        fixed_point = self._matcher.compute(np.ascontiguousarray(left), np.ascontiguousarray(right))
        disparity = fixed_point.astype(np.float32) * np.float32(1.0 / 16.0)  # StereoSGBM: 4 fractional bits
        invalid = fixed_point < 0
        disparity[invalid] = np.nan
        confidence = (~invalid).astype(np.float32)
        return StereoPrediction(disparity=disparity, confidence=confidence,
                                points=self._points(disparity, geometry))


# Padded input sizes on CUDA are rounded up to a multiple of this, so that a compiled graph (and
# cudnn's autotuning) sees a handful of shapes instead of one per camera resolution.
SHAPE_BUCKET = 64


class NetworkEstimator(StereoEstimator):
    """A stereo network from the core model zoo, run under torch.inference_mode().

    On CUDA: cudnn autotuning, channels_last, pinned host staging buffers with non-blocking
    copies, shape buckets, optional torch.compile, and one device-to-host copy per frame for
    disparity, confidence and (optionally) points together.
    """

    def __init__(self, network: torch.nn.Module, name: str, device: str, precision: str,
                 max_disparity: int, compile: bool = False, channels_last: bool = False):
        self.name = name
        self.backend = "pytorch"
        self.device = device
        self.precision = precision
        model_max = int(getattr(network, "max_disparity", max_disparity))
        if max_disparity != model_max:
            log.warning("max_disparity %d requested but model '%s' was built for %d; using %d",
                        max_disparity, name, model_max, model_max)
        self.max_disparity = model_max
        self.min_disparity = 0.0
        self._cuda = device.startswith("cuda")
        if precision == "fp16" and not self._cuda:
            log.warning("fp16 needs a CUDA device; running '%s' in fp32 on %s", name, device)
            self.precision = "fp32"
        self.network = network.to(device).eval()
        self._host_buffer: torch.Tensor | None = None
        self.channels_last = self._cuda or channels_last
        if self._cuda:
            torch.backends.cudnn.benchmark = True
            self.network = self.network.to(memory_format=torch.channels_last)
        elif channels_last:  # the 2D convolutions' weights: oneDNN follows them with NHWC activations
            for module in self.network.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        self._forward = self.network
        self.compiled = False
        if compile:
            self._forward = self._try_compile()

    def _try_compile(self):
        """torch.compile the network; the eager network (with a warning) where that is refused.
        CUDA: CUDA graphs. CPU: inductor with freezing (weights folded as constants, so oneDNN
        convolutions run on prepacked weights with their BatchNorm and ReLU fused), its caches
        (FX graphs, C++ kernels) under the stereo-kd cache dir unless TORCHINDUCTOR_CACHE_DIR is
        set by the user, so a second start reuses the first one's work. Compilation runs at the first call
        per input size (`warm_up` does it at start-up); its time is logged."""
        try:
            if self._cuda:  # reduce-overhead = CUDA graphs
                compiled = torch.compile(self.network, mode="reduce-overhead", dynamic=False)
            else:
                from torch._inductor.runtime.cache_dir_utils import default_cache_dir

                # inductor writes its default into the environment once used; only a user's choice stays
                if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
                # static sizes: torch 2.13's inductor fails on this network's symbolic sizes
                # (TensorReferenceAnalysis.python_mod), so each input size compiles once
                compiled = torch.compile(self.network, dynamic=False, options={"freezing": True})
        except Exception as exc:  # noqa: BLE001 (any failure means: run eager)
            log.warning("torch.compile unavailable (%s); running '%s' eagerly", exc, self.name)
            return self.network
        self.compiled = True
        seen_sizes: set[tuple[int, ...]] = set()

        def forward(left: torch.Tensor, right: torch.Tensor):
            size = tuple(left.shape[-2:])
            if size in seen_sizes:
                return compiled(left, right)
            started = time.perf_counter()
            outputs = compiled(left, right)
            seen_sizes.add(size)
            log.info("compiled '%s' for %dx%d %s in %.1f s (cache: %s)", self.name, size[0], size[1],
                     self.precision, time.perf_counter() - started, os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            return outputs

        return forward

    def warm_up(self, height: int, width: int) -> float:
        """One prediction on a blank height x width pair, so that a compiled network compiles (or
        loads from its cache) now instead of at the first frame; returns its seconds."""
        started = time.perf_counter()
        blank = np.zeros((height, width, 3), np.uint8)
        self.predict(blank, blank)
        return time.perf_counter() - started

    def _stage(self, left: np.ndarray, right: np.ndarray) -> torch.Tensor:
        """(2, H, W, 3) uint8/uint16 host pair -> device tensor, through a pinned buffer on CUDA."""
        pair = torch.from_numpy(np.stack([left, right]).astype(np.int32 if left.dtype == np.uint16 else np.uint8,
                                                              copy=False))
        if not self._cuda:
            return pair
        if self._host_buffer is None or self._host_buffer.shape != pair.shape or self._host_buffer.dtype != pair.dtype:
            self._host_buffer = torch.empty(pair.shape, dtype=pair.dtype).pin_memory()
        self._host_buffer.copy_(pair)
        return self._host_buffer.to(self.device, non_blocking=True)

    def _run_network(self, left_t: torch.Tensor, right_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = PRECISIONS[self.precision]
        with torch.autocast(device_type=torch.device(self.device).type, dtype=dtype,
                            enabled=dtype != torch.float32):
            try:
                return self._forward(left_t, right_t)
            except Exception as exc:  # compiled graph failed at first use: fall back to eager once
                if not self.compiled:
                    raise
                log.warning("compiled '%s' failed (%s); falling back to eager", self.name, exc)
                self._forward, self.compiled = self.network, False
                return self._forward(left_t, right_t)

    @torch.inference_mode()
    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = _check_pair(left, right)
        scale = 1.0 / pair_peak(left, right)
        images = self._stage(left, right).permute(0, 3, 1, 2).float().mul_(scale)  # (2, 3, H, W) in [0, 1]
        prediction, _ = self._predict_images(images, geometry)
        return prediction

    @torch.inference_mode()
    def predict_raw(self, left: np.ndarray, right: np.ndarray, maps, size: tuple[int, int] | None = None,
                    geometry=None, rectified_left: bool = False) -> RawPrediction:
        """As StereoEstimator.predict_raw; with `rectifies_on_device` the raw pair goes to the
        device as it came and is rectified there (grid_sample, bilinear) and resized there
        (area), and the images the host needs come back in the same copy as the outputs."""
        if not self.rectifies_on_device:
            return super().predict_raw(left, right, maps, size, geometry, rectified_left)
        mono = left.ndim == 2
        dtype = left.dtype
        left, right = _check_pair(left, right)
        height, width = left.shape[:2]
        for side_maps, side in zip(maps, ("left", "right"), strict=True):
            side_maps.check_size(height, width, f"{side} raw image")
        raw = self._stage(left, right).permute(0, 3, 1, 2).float()        # (2, 3, H, W) raw values
        full = torch.cat([maps[0].grid_sample(raw[0:1]), maps[1].grid_sample(raw[1:2])])
        full = full.round_()  # as OpenCV, which rounds to the image's integer type after each resampling
        small = full
        if size is not None and size != (width, height):
            rows = _area_weights(height, size[1], str(full.device))           # (H', H)
            columns = _area_weights(width, size[0], str(full.device))         # (W', W)
            small = (rows @ full @ columns.T).round_()
        peak = 255.0 if dtype == np.uint8 else max(float(small.amax()), 1.0)
        maximum = float(np.iinfo(dtype).max)
        prediction, left_plane = self._predict_images(small / peak, geometry, extra=small[0])
        small_left = _host_image(left_plane, dtype, mono, maximum)
        full_left = None
        if rectified_left:
            full_left = _host_image(full[0].permute(1, 2, 0).cpu().numpy(), dtype, mono, maximum)
        return RawPrediction(prediction, small_left, full_left)

    def _predict_images(self, images: torch.Tensor, geometry,
                        extra: torch.Tensor | None = None) -> tuple[StereoPrediction, np.ndarray | None]:
        """The network on a (2, 3, H, W) pair in [0, 1] on the device; `extra` (C, H, W) comes
        back to the host in the same copy as the outputs (as H x W x C)."""
        from stereo_kd_core.geometry import points_from_disparity_torch

        height, width = images.shape[-2:]
        if self._cuda:
            padded_h = -(-height // SHAPE_BUCKET) * SHAPE_BUCKET
            padded_w = -(-width // SHAPE_BUCKET) * SHAPE_BUCKET
            images = torch.nn.functional.pad(images, (0, padded_w - width, 0, padded_h - height), mode="replicate")
            images = images.contiguous(memory_format=torch.channels_last)
        disparity, confidence = self._run_network(images[0:1], images[1:2])  # (1, Hp, Wp) each
        disparity = disparity[0, :height, :width].float()
        confidence = confidence[0, :height, :width].float().clamp(0, 1)
        disparity = torch.where(torch.isfinite(disparity), disparity, torch.full_like(disparity, float("nan")))
        planes = [disparity[..., None], confidence[..., None]]
        if geometry is not None:
            planes.append(points_from_disparity_torch(geometry, disparity))
        if extra is not None:
            planes.append(extra.permute(1, 2, 0).float())
        packed = torch.cat(planes, dim=-1).cpu().numpy()                   # one device-to-host copy
        prediction = StereoPrediction(
            disparity=np.ascontiguousarray(packed[..., 0]), confidence=np.ascontiguousarray(packed[..., 1]),
            points=np.ascontiguousarray(packed[..., 2:5]) if geometry is not None else None)
        return prediction, (packed[..., -extra.shape[0]:] if extra is not None else None)


@functools.lru_cache(maxsize=8)  # a camera's sizes: built once, not per frame
def _area_weights(size_in: int, size_out: int, device: str) -> torch.Tensor:
    """(size_out, size_in) weights of area interpolation (OpenCV's INTER_AREA when shrinking):
    output pixel j averages input [j, j + 1) * size_in / size_out, partial pixels by overlap."""
    edges = torch.arange(size_out + 1, dtype=torch.float64) * (size_in / size_out)
    pixel = torch.arange(size_in, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], pixel + 1) - torch.maximum(edges[:-1, None], pixel)).clamp_(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).float().to(device)


def _host_image(plane: np.ndarray, dtype, mono: bool, maximum: float) -> np.ndarray:
    """A float H x W x 3 image from the device as the caller's image type (mono: H x W)."""
    image = np.clip(np.rint(plane), 0, maximum).astype(dtype)
    return np.ascontiguousarray(image[..., 0] if mono else image)
