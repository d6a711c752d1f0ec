"""PyTorch networks of the core model zoo behind the StereoEstimator seam."""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

import stereo_kd_core.int8_cpu as int8_cpu
from stereo_kd_core.estimator_base import (
    PRECISIONS,
    RawPrediction,
    StereoEstimator,
    StereoPrediction,
    check_pair,
    cpu_has_native_bf16,
    pair_peak,
)
from stereo_kd_core.geometry import points_from_disparity_torch
from stereo_kd_core.models.blocks import (
    fold_batch_norm,
    onednn_3d_convolutions,
    onednn_convolution_available,
    pointwise_as_matmul,
)
from stereo_kd_core.registry import default_cache_dir

log = logging.getLogger(__name__)


# Background builds (compile, int8) run one at a time in the process: torch.export and dynamo keep
# process-wide state, and two sizes built at once (a scaled model's enlarged pair and its probe) failed
# with "Trying to pop empty mode stack" and "_EXPORT_MODULE_HIERARCHY must not be None".
_BUILD_LOCK = threading.Lock()


def int8_unavailable(network: torch.nn.Module, cuda: bool) -> str | None:
    """None where `network` can run in int8 here, else why not."""
    if cuda:
        return "int8 runs on the CPU (PT2E + inductor); on CUDA use fp16"
    if not (hasattr(network, "infer_core") and hasattr(network, "confidence_head")):
        return f"int8 needs a network with infer_core and confidence_head, not {type(network).__name__}"
    return int8_cpu.unavailable()


def compile_cache_dir() -> Path:
    """Where torch.compile's on-disk caches go: the stereo-kd cache dir's inductor/."""
    return default_cache_dir() / "inductor"


def use_compile_cache_dir() -> None:
    """Point inductor's caches (FX graphs, C++ kernels) at `compile_cache_dir()` unless the user
    chose TORCHINDUCTOR_CACHE_DIR (inductor writes its own default into the environment once
    used; that one is replaced)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(inductor_default())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())

# Padded input sizes on CUDA are rounded up to a multiple of this, so that a compiled graph (and
# cudnn's autotuning) sees a handful of shapes instead of one per camera resolution.
SHAPE_BUCKET = 64


class NetworkEstimator(StereoEstimator):
    """A stereo network from the core model zoo, run under torch.inference_mode().

    On CUDA: cudnn autotuning, channels_last, pinned host staging buffers with non-blocking
    copies, shape buckets, optional torch.compile, and one device-to-host copy per frame for
    disparity, confidence and (optionally) points together.
    """

    can_rectify_on_device = True

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
        if precision == "int8":
            why = int8_unavailable(network, self._cuda)
            if why is not None:
                fallback = "fp16" if self._cuda else "bf16" if cpu_has_native_bf16() else "fp32"
                log.warning("%s; running '%s' in %s", why, name, fallback)
                self.precision = fallback
        # what runs in floating point: int8's eager stand-in and the layers int8 leaves in float
        self._float_dtype = PRECISIONS.get(self.precision) or (
            torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
        self.network = network.to(device).eval()
        # what runs (eagerly, and what compile and int8 build from): a copy with BatchNorm folded
        # into the convolutions; self.network stays as given (a caller may go on training it)
        self._eager = fold_batch_norm(self.network)
        self._host_buffer: torch.Tensor | None = None
        self.channels_last = self._cuda or channels_last
        if self._cuda:
            torch.backends.cudnn.benchmark = True
            self._eager = self._eager.to(memory_format=torch.channels_last)
        else:
            pointwise_as_matmul(self._eager)  # oneDNN's 1x1x1 3D convolutions are slow on the CPU
            if channels_last:  # the convolutions' weights: oneDNN follows them with NHWC activations
                for module in self._eager.modules():
                    if isinstance(module, torch.nn.Conv2d):
                        module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
                    elif isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                        # NDHWC volumes: dsnet-faster 67 -> 63 ms at 384x640 in bf16
                        module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
            if onednn_convolution_available():  # float32 3D convolutions of small volumes: oneDNN, not slow_conv3d
                onednn_3d_convolutions(self._eager)
        self._forward = self._eager
        self.compiled = False
        self._compiling: dict[tuple[int, ...], threading.Thread] = {}  # input size -> background compile
        self._start_build = None  # _per_size's: start the background build of a size
        if self.precision == "int8":  # a compiled path of its own, per input size
            use_compile_cache_dir()
            self._forward = self._per_size(self._int8_graph, "quantised to int8 and compiled")
        elif compile:
            self._forward = self._try_compile()

    @property
    def inference_network(self) -> torch.nn.Module:
        """The module the eager path runs (and a hook sees) and the compiled and int8 graphs are
        built from: `network` with its BatchNorms folded into the convolutions, a copy made at
        construction."""
        return self._eager

    def _try_compile(self):
        """torch.compile the network; the eager network (with a warning) where that is refused.
        CUDA: CUDA graphs. CPU: inductor with freezing (weights folded as constants, so oneDNN
        convolutions run on prepacked weights with their BatchNorm and ReLU fused), its caches
        (FX graphs, C++ kernels) under the stereo-kd cache dir unless TORCHINDUCTOR_CACHE_DIR is
        set by the user, so a second start reuses the first one's work. Compilation runs at the
        first call per input size (`warm_up` does it at start-up); its time is logged. On the CPU
        it runs in a background thread while the eager network answers (the first frames come at
        eager speed instead of after 30 s or more without output); the compiled graph takes over
        for that size once it is ready (`wait_for_compile` waits for it)."""
        try:
            if self._cuda:  # reduce-overhead = CUDA graphs
                compiled = torch.compile(self._eager, mode="reduce-overhead", dynamic=False)
            else:
                use_compile_cache_dir()
                # static sizes: torch 2.13's inductor fails on this network's symbolic sizes
                # (TensorReferenceAnalysis.python_mod), so each input size compiles once
                compiled = self._compile_cpu()
        except Exception as exc:  # noqa: BLE001 (any failure means: run eager)
            log.warning("torch.compile unavailable (%s); running '%s' eagerly", exc, self.name)
            return self._eager
        return self._per_size(lambda left, right: compiled, "compiled")

    def _int8_graph(self, left: torch.Tensor, right: torch.Tensor):
        """int8_cpu's graph of infer_core at this pair's size, with the confidence head after it."""
        # a copy: torch.export patches the modules it traces while the eager network keeps answering
        with torch.inference_mode(False):  # the build thread runs in inference mode: a copy of normal tensors
            network = copy.deepcopy(self._eager)
        core = int8_cpu.quantize_core(network, left.shape[-2], left.shape[-1],
                                      bf16=self._float_dtype == torch.bfloat16)
        head = torch.compile(network.confidence_head, dynamic=False)  # no weights: no freezing, no int8

        def forward(left: torch.Tensor, right: torch.Tensor):
            return head(core(left, right), left.shape[-2], left.shape[-1])

        return forward

    def _per_size(self, build, what: str):
        """A forward that runs `build(left, right)`'s graph for each input size once it is ready:
        the first pair of a size builds it (and runs it once: inductor compiles at that call), on
        the CPU in a background thread while the eager network answers, on CUDA (CUDA graphs
        capture on the calling thread's stream) at that pair. A failed build runs eager from then
        on, with a warning."""
        self.compiled = True
        ready: dict[tuple[int, ...], object] = {}
        lock = threading.Lock()

        def prepare(left: torch.Tensor, right: torch.Tensor, size: tuple[int, ...]):
            started = time.perf_counter()
            graph = build(left, right)
            outputs = graph(left, right)
            with lock:
                ready[size] = graph
            log.info("%s '%s' for %dx%d %s in %.1f s%s (cache: %s)", what, self.name, size[0], size[1],
                     self.precision, time.perf_counter() - started, "" if self._cuda else " in the background",
                     os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            return outputs

        def prepare_in_background(left: torch.Tensor, right: torch.Tensor, size: tuple[int, ...]):
            try:  # autocast and inference mode are per thread: as _run_network sets them
                lowered = self._float_dtype != torch.float32
                with _BUILD_LOCK, torch.inference_mode(), torch.autocast(
                        "cpu", dtype=self._float_dtype, cache_enabled=False, enabled=lowered):
                    prepare(left, right, size)
            except Exception as exc:  # noqa: BLE001 (any failure means: run eager from now on)
                log.warning("compiling '%s' for %dx%d failed (%s); running it eagerly", self.name, size[0],
                            size[1], exc)
                self._forward, self.compiled = self._eager, False

        def start_in_background(left: torch.Tensor, right: torch.Tensor) -> bool:
            """Start building the graph of this size in a thread unless built or building; True
            when this call started it."""
            size = tuple(left.shape[-2:])
            with lock:
                if size in self._compiling or size in ready:
                    return False
                self._compiling[size] = threading.Thread(
                    # not a daemon: a process that exits mid-compile waits for it (killed inside
                    # inductor's C++ at interpreter exit, it aborts the process instead)
                    target=prepare_in_background, args=(left.clone(), right.clone(), size), daemon=False,
                    name=f"compile-{self.name}-{size[0]}x{size[1]}")
                self._compiling[size].start()
            return True

        def forward(left: torch.Tensor, right: torch.Tensor):
            size = tuple(left.shape[-2:])
            graph = ready.get(size)
            if graph is not None:
                return graph(left, right)
            if self._cuda:
                return prepare(left, right, size)
            start_in_background(left, right)
            return self._eager(left, right)  # eager until the graph is ready

        self._start_build = start_in_background
        return forward

    @torch.inference_mode()  # as predict: the graph is built for what predict passes it
    def prepare_size(self, height: int, width: int) -> bool:
        """Start compiling (or quantising) for height x width input pairs now, in the background
        (CPU), before any pair of that size arrives: the node calls it when a camera_info tells it
        the size. True when this call started a build; False when there is nothing to build
        (not compiled, CUDA, which builds at the first pair on its inference stream, or a size
        built or building already)."""
        if not self.compiled or self._cuda or self._start_build is None:
            return False
        blank = np.zeros((height, width, 3), np.uint8)
        images = self._images(blank, blank)  # the strides a real pair has: the graph's guards hold
        return self._start_build(images[0:1], images[1:2])

    def wait_for_compile(self, timeout_s: float | None = None) -> bool:
        """Wait for the background compilations started so far; True when none is still running."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in list(self._compiling.values()):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._compiling.values())

    def _compile_cpu(self):
        """Inductor with freezing on the weighted part of the network; the confidence head (cues
        and calibration, no weights) as a second graph without freezing: torch 2.13's inductor
        fails on the two in one frozen graph ("vr must not be None for symbol q0"). A copy of the
        network: it is traced in a background thread while the eager one answers."""
        network = copy.deepcopy(self._eager)
        if not (hasattr(network, "infer_core") and hasattr(network, "confidence_head")):
            return torch.compile(network, dynamic=False, options={"freezing": True})
        core = torch.compile(network.infer_core, dynamic=False, options={"freezing": True})
        head = torch.compile(network.confidence_head, dynamic=False)

        def forward(left: torch.Tensor, right: torch.Tensor):
            return head(core(left, right), left.shape[-2], left.shape[-1])

        return forward

    def warm_up(self, height: int, width: int) -> float:
        """One prediction on a blank height x width pair, so that a compiled network compiles (or
        loads from its cache) now instead of at the first frame, and waits for it; returns its
        seconds."""
        started = time.perf_counter()
        blank = np.zeros((height, width, 3), np.uint8)
        self.predict(blank, blank)
        self.wait_for_compile()
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

    @torch.inference_mode()
    def predict_with_costs(self, left: np.ndarray, right: np.ndarray) -> tuple[StereoPrediction, torch.Tensor]:
        """predict's output and, from the same forward, the network's last cost logits (D, h, w)
        float32, their grid from the pair's top-left corner (`infer_with_costs`): a teacher's label
        and cost distribution in one pass. Eager (a compiled graph has no cost output)."""
        if not hasattr(self.network, "infer_with_costs"):
            raise ValueError(f"'{self.name}' has no cost volume to return")
        left, right = check_pair(left, right)
        costs = []

        def forward(left_t: torch.Tensor, right_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            disparity, confidence, cost = self._eager.infer_with_costs(left_t, right_t)
            costs.append(cost)
            return disparity, confidence

        prediction, _ = self._predict_images(self._images(left, right), None, forward=forward)
        return prediction, costs[0][0].float()

    def _run_network(self, left_t: torch.Tensor, right_t: torch.Tensor,
                     forward=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's (disparity, confidence) under the estimator's precision: through `forward`
        where given, else the estimator's own forward (compiled or eager)."""
        dtype = self._float_dtype
        # No autocast weight-cast cache: its mutex is process-wide, and with a background compile
        # (or int8 build) running autocast in a second thread, one thread held it waiting for the
        # GIL (a tensor decref) while the other held the GIL waiting for it: the node hung for good
        # (seen with gdb, compile:=true, December 2026). Uncached, each use casts its weights again
        # (no cost measurable at 384x640).
        with torch.autocast(device_type=torch.device(self.device).type, dtype=dtype, cache_enabled=False,
                            enabled=dtype != torch.float32):
            if forward is not None:
                return forward(left_t, right_t)
            try:
                return self._forward(left_t, right_t)
            except Exception as exc:  # compiled graph failed at first use: fall back to eager once
                if not self.compiled:
                    raise
                log.warning("compiled '%s' failed (%s); falling back to eager", self.name, exc)
                self._forward, self.compiled = self._eager, False
                return self._forward(left_t, right_t)

    @torch.inference_mode()
    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        left, right = check_pair(left, right)
        prediction, _ = self._predict_images(self._images(left, right), geometry)
        return prediction

    @torch.inference_mode()
    def predict_coarse(self, left: np.ndarray, right: np.ndarray) -> np.ndarray | None:
        """The network's expected disparity at its cost resolution (`coarse_disparity`: no upsampling,
        refinement or confidence), (ceil(H / stride), ceil(W / stride)) float32 in the pair's pixels,
        eager in the estimator's precision: a cheap look at how near the scene is (a scaled model's
        probe). None for a network without it or a compiled estimator (its graph of the whole forward
        at the probe's size is the faster look there)."""
        network = self._eager
        if self.compiled or not hasattr(network, "coarse_disparity"):
            return None
        left, right = check_pair(left, right)
        images = self._images(left, right)
        coarse = self._run_network(images[0:1], images[1:2], forward=network.coarse_disparity)[0]
        stride = network.cost_stride
        rows, columns = -(-left.shape[0] // stride), -(-left.shape[1] // stride)
        return coarse[:rows, :columns].float().cpu().numpy()

    def _images(self, left: np.ndarray, right: np.ndarray) -> torch.Tensor:
        """A checked host pair -> (2, 3, H, W) float in [0, 1] on the device."""
        scale = 1.0 / pair_peak(left, right)
        return self._stage(left, right).permute(0, 3, 1, 2).float().mul_(scale)

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
        left, right = check_pair(left, right)
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

    def _predict_images(self, images: torch.Tensor, geometry, extra: torch.Tensor | None = None,
                        forward=None) -> tuple[StereoPrediction, np.ndarray | None]:
        """The network (or `forward`) on a (2, 3, H, W) pair in [0, 1] on the device; `extra`
        (C, H, W) comes back to the host in the same copy as the outputs (as H x W x C)."""
        height, width = images.shape[-2:]
        if self._cuda:
            padded_h = -(-height // SHAPE_BUCKET) * SHAPE_BUCKET
            padded_w = -(-width // SHAPE_BUCKET) * SHAPE_BUCKET
            images = torch.nn.functional.pad(images, (0, padded_w - width, 0, padded_h - height), mode="replicate")
            images = images.contiguous(memory_format=torch.channels_last)
        disparity, confidence = self._run_network(images[0:1], images[1:2], forward)  # (1, Hp, Wp) each
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
