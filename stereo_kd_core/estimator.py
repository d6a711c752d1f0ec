"""StereoEstimator: the one seam between the library and the ROS node (see DESIGN.md).

This module is the loader: `StereoEstimator.load` resolves "auto" precision and device and
picks the backend a model needs. The interface lives in `estimator_base`; the backends side by
side under it: `sgbm_estimator` (OpenCV), `network_estimator` (PyTorch), `onnx_runtime`.
"""

from __future__ import annotations

import os
from pathlib import Path

from stereo_kd_core.aligned_estimator import RowAlignedEstimator
from stereo_kd_core.checkpoint import load_model
from stereo_kd_core.estimator_base import (  # noqa: F401 (re-exported: the seam's names in one place)
    PRECISIONS,
    RawPrediction,
    StereoEstimator,
    StereoPrediction,
    cpu_has_native_bf16,
    pair_peak,
    resolve_device,
)
from stereo_kd_core.network_estimator import NetworkEstimator, compile_cache_dir
from stereo_kd_core.onnx_runtime import OnnxEstimator
from stereo_kd_core.registry import default_model, load_shipped, shipped_models
from stereo_kd_core.scaled_estimator import ScaledEstimator, SmallPairs, check_scale
from stereo_kd_core.sgbm_estimator import SGBMEstimator

# The PyTorch variants benchmarks/cpu_backends.py measures on the CPU: plain, and 2D convolution
# weights in channels_last (oneDNN then keeps 2D activations in NHWC; same results).
PYTORCH_CPU_BACKENDS = ("pytorch", "pytorch-channels-last")


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


def _measured_cpu_default(model: str) -> dict:
    """The shipped model's manifest `cpu_default` ({} for checkpoint paths and unmeasured models)."""
    return shipped_models().get(model, {}).get("cpu_default", {})


def measured_as(network) -> str | None:
    """The shipped model whose measured CPU default a checkpoint of `network`'s architecture
    takes (same arch and config family, e.g. an `adapt`ed dsnet-fast), or None. bf16 and
    channels_last were measured per architecture (the same weights within 0.003 px of fp32), so
    a fine-tuned copy runs as fast as the shipped one instead of in plain fp32."""
    arch = getattr(network, "config", {}).get("arch")
    for name, entry in shipped_models().items():
        if arch is not None and entry.get("arch") == arch and entry.get("cpu_default"):
            return name
    return None


def resolve_channels_last(channels_last: bool | None, model: str) -> bool:
    """None -> the shipped model's measured CPU default layout (channels_last when its manifest's
    cpu_default backend is pytorch-channels-last; False for checkpoint paths)."""
    if channels_last is not None:
        return bool(channels_last)
    return _measured_cpu_default(model).get("backend") == "pytorch-channels-last"


def load(model: str | None = None, device: str = "auto", precision: str = "auto",
         max_disparity: int = 192, compile: bool = False, threads: int | None = None,
         engine_cache_dir: str | None = None, channels_last: bool | None = None,
         input_scale: float = 1.0, align_rows: bool = True) -> StereoEstimator:
    """A registry name ("dsnet", ...), a checkpoint path, an ONNX model path (*.onnx), or "sgbm";
    None = the registry's default student (`registry.default_model()`).

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

    input_scale: run on each pair resized by this factor, the disparity brought back to the
    pair's size and pixels (`stereo_kd_core.scaled_estimator`: above 1, more exact and slower).
    A model with a working scale of its own (a shipped model's manifest `input_scale`, an adapted
    checkpoint's) runs at that scale times this one; its name then says only the caller's factor.
    One that fits near scenes into its range (manifest or checkpoint `fit_range`) probes each pair
    first and runs nearer scenes at a smaller scale (`ScaledEstimator`). One that enlarges small
    pairs (manifest or checkpoint `small_pairs`, `SmallPairs`) runs a pair with fewer pixels than
    the size it was measured at enlarged further, for about that size's time.

    align_rows: measure where each pair's right rows lie against the left's (an offset; a tilt or
    stretch across the image) and take it out first (`stereo_kd_core.aligned_estimator`; a pair whose
    rows line up runs as given): a 1 px offset
    costs the default 0.7 px of realval EPE, 2 px make it useless. False: pairs as given (what a
    caller that aligns rows itself, as the node does over a stream, asks for).
    """
    estimator = _load(model, device, precision, max_disparity, compile, threads, engine_cache_dir, channels_last,
                      input_scale)
    return RowAlignedEstimator(estimator) if align_rows else estimator


def _load(model: str | None, device: str, precision: str, max_disparity: int, compile: bool, threads: int | None,
          engine_cache_dir: str | None, channels_last: bool | None, input_scale: float) -> StereoEstimator:
    """`load` without row alignment."""
    scale = check_scale(input_scale)
    model = default_model() if model is None else model
    estimator, own_scale, fit_range, small_pairs = _load_at_own_scale(model, device, precision, max_disparity,
                                                                      compile, threads, engine_cache_dir, channels_last)
    name = estimator.name if scale == 1.0 else f"{estimator.name}@x{scale:g}"
    if scale * own_scale == 1.0 and not fit_range and small_pairs is None:
        estimator.name = name
        return estimator
    total = check_scale(scale * own_scale)
    return ScaledEstimator(estimator, total, name=name, fit_range=fit_range,
                           small_pairs=None if small_pairs is None else small_pairs.composed(total, scale))


def _load_at_own_scale(model: str, device: str, precision: str, max_disparity: int, compile: bool,
                       threads: int | None, engine_cache_dir: str | None, channels_last: bool | None
                       ) -> tuple[StereoEstimator, float, bool, SmallPairs | None]:
    """(the estimator `model` names, run on pairs as given; the scale it is meant to run at;
    whether it fits near scenes into its range; how it enlarges small pairs)."""
    if precision not in PRECISIONS and precision not in ("auto", "int8"):
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, int8, got '{precision}'")
    if not isinstance(max_disparity, int) or max_disparity < 16:
        raise ValueError(f"max_disparity must be an integer >= 16, got {max_disparity!r}")
    if model == "sgbm":
        return SGBMEstimator(max_disparity=max_disparity), 1.0, False, None
    if model.endswith(".onnx"):
        if precision == "int8":
            raise ValueError("precision int8 is for networks; an int8 ONNX model is its own file "
                             "(stereo_kd_core.quantize.quantize_int8_static): load that file")
        if precision == "auto":
            precision = resolve_precision(precision, "cpu", model)
        onnx = OnnxEstimator(model, device=device, precision=precision, max_disparity=max_disparity,
                             threads=threads, engine_cache_dir=engine_cache_dir)
        return onnx, onnx.convention.input_scale, False, None  # a graph's size is fixed at export: no probe
    shipped = not (os.sep in model or model.endswith((".pt", ".pth", ".ckpt")) or Path(model).is_file())
    if shipped:
        network, name = load_shipped(model), model
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint path does not exist: {path}")
        network, name = load_model(path), path.stem
    measured = model if shipped else (measured_as(network) or model)
    device = resolve_device(device)
    estimator = NetworkEstimator(network, name=name, device=device,
                                 precision=resolve_precision(precision, device, measured), max_disparity=max_disparity,
                                 compile=compile, channels_last=resolve_channels_last(channels_last, measured))
    return estimator, network.working_scale, network.fit_range, SmallPairs.from_entry(network.small_pairs)


StereoEstimator.load = staticmethod(load)  # the seam's entry point (see estimator_base.StereoEstimator)

__all__ = ["NetworkEstimator", "OnnxEstimator", "RawPrediction", "RowAlignedEstimator", "SGBMEstimator",
           "ScaledEstimator", "StereoEstimator",
           "StereoPrediction", "compile_cache_dir", "load", "pair_peak", "resolve_device", "resolve_precision"]
