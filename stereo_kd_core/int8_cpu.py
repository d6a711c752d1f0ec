"""int8 on the CPU: PT2E static quantisation of a network's weighted part, compiled by inductor.

A network with `infer_core` (the weights: features, volume, aggregation, upsampling, refinement)
and `confidence_head` (cues and calibration, no weights) is run as:

1. `torch.export` of `infer_core` at one input size;
2. torchao's PT2E flow with its `X86InductorQuantizer` (int8 weights per output channel, uint8
   activations per tensor, static ranges): observers inserted, calibrated on CALIBRATION_PAIRS
   procedural pairs at that size (`calibration_tensors`: 1/f colour noise, shifted; never an
   evaluation set, and no data module below the seam), converted to quantise/dequantise pairs;
3. `torch.compile` (inductor, freezing), which fuses those pairs into oneDNN int8 convolutions
   (VNNI / AMX-INT8), under bf16 autocast for everything left in floating point on CPUs with
   native bf16 (fp32 elsewhere); the confidence head (no weights) runs after it, compiled
   without int8 by `NetworkEstimator`.

Measured on the shipped dsnet-fast (README, "CPU speed"): realval and Motorcycle EPE within
0.03 px of eager fp32 on every pair. Each input size is exported, calibrated and compiled once
(15 s to over a minute on 2 cores); `NetworkEstimator` does it, on a copy of the network, in a
background thread while the eager network answers. torchao is optional: `unavailable()` says why int8 cannot run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch

CALIBRATION_PAIRS = 8
CALIBRATION_SEED = 7


def unavailable() -> str | None:
    """None when int8 can run here, else the reason (a message for the user)."""
    try:
        _quantization_api()
    except ImportError as error:
        return f"int8 on the CPU needs torchao (pip install torchao): {error}"
    return None


def _quantization_api():
    # only the Python PT2E flow is used: torchao's C++/CUDA kernels are not loaded (nor warned about)
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    finally:
        torchao_log.setLevel(level)
    return x86, prepare_pt2e, convert_pt2e


class _Core(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, left: torch.Tensor, right: torch.Tensor):
        return self.network.infer_core(left, right)


def calibration_tensors(height: int, width: int, max_disparity: int, n: int = CALIBRATION_PAIRS,
                        seed: int = CALIBRATION_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` procedural stereo pairs at height x width as (1, 3, H, W) tensors in [0, 1]: colour 1/f
    noise (the power spectrum of natural images) at random contrast and brightness, the right
    view the left shifted by a disparity drawn up to `max_disparity` (two depth layers)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        disparity = rng.uniform(2, max_disparity, size=2)
        canvas = _pink_noise(rng, height, width + int(disparity.max()) + 2)
        canvas = np.clip(rng.uniform(0.2, 0.8) + rng.uniform(0.3, 1.0) * canvas, 0, 1)
        left = canvas[:, -width:]
        right = np.empty_like(left)
        split = int(rng.integers(height // 4, 3 * height // 4))  # near layer below, far above
        for rows, shift in ((slice(0, split), int(disparity.min())), (slice(split, height), int(disparity.max()))):
            right[rows] = canvas[rows, canvas.shape[1] - width - shift:canvas.shape[1] - shift]
        pairs.append(tuple(torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1)))[None].float()
                           for view in (left, right)))
    return pairs


def _pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 noise with amplitude ~ 1/frequency, about unit spread, channels correlated."""
    import cv2

    total = np.zeros((height, width, 3), np.float32)
    scale = 1.0
    cells = 4
    while cells < max(height, width):
        grid = rng.standard_normal((cells, cells, 3)).astype(np.float32)
        grid = 0.6 * grid.mean(axis=2, keepdims=True) + 0.4 * grid  # mostly grey, some colour
        total += scale * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        cells *= 2
        scale *= 0.7
    return total / (3 * total.std() + 1e-6)


def quantize_core(network: torch.nn.Module, height: int, width: int, bf16: bool,
                  calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  compile: bool = True) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """`network.infer_core` at height x width as an int8 graph: a function (left, right) ->
    infer_core's outputs. `calibration`: (left, right) pairs at that size (default:
    `calibration_tensors`); `compile` False keeps the converted graph uncompiled (quantise/dequantise run as
    reference ops: for tests)."""
    import torch._inductor.config  # noqa: F401 (the freezing switch below)

    x86, prepare_pt2e, convert_pt2e = _quantization_api()
    if calibration is None:
        calibration = calibration_tensors(height, width, max(4, min(width // 2, int(network.max_disparity) * 2 // 3)))
    # export and calibrate in plain fp32 whatever the caller's thread has on (an estimator's build
    # thread runs under inference mode and bf16 autocast): the observers must see fp32 ranges
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
        exported = torch.export.export(_Core(network).eval(), calibration[0]).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for left, right in calibration:
            prepared(left, right)
        converted = convert_pt2e(prepared)
    # export pins every intermediate dtype to fp32; under bf16 autocast those checks would fail
    for node in list(converted.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            converted.graph.erase_node(node)
    converted.recompile()
    graph = torch.compile(converted, dynamic=False) if compile else converted

    def run(left: torch.Tensor, right: torch.Tensor) -> tuple:
        # freezing through the global config: with torch.compile(options={"freezing": True}) inductor
        # does not fuse the quantise/dequantise pairs (onednn.qconv_prepack fails under fake tensors)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False), \
                torch._inductor.config.patch(freezing=True):
            return graph(left, right)

    run.converted = converted  # the quantised graph, before inductor
    return run
