"""Export a network to ONNX or TorchScript for deployment runtimes (onnxruntime, TensorRT)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ONNX_OPSET = 18  # "17 or newer"; 18 is what the dynamo exporter emits natively


class InferenceWrapper(nn.Module):
    """(left, right) float RGB in [0, 1], (B, 3, H, W) -> (disparity, confidence), (B, H, W) each."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval()

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        disparity, confidence = self.network(left, right)
        return disparity, confidence


def export_model(network: nn.Module, out_path: str | Path, fmt: str, height: int, width: int,
                 dynamic: bool = False) -> Path:
    """Write `network` as ONNX (opset 18) or TorchScript (traced) at the given input size."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = InferenceWrapper(network).cpu()
    example = (torch.rand(1, 3, height, width), torch.rand(1, 3, height, width))
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(out_path))
        elif fmt == "onnx":
            dynamic_axes = None
            if dynamic:
                axes = {0: "batch", 2: "height", 3: "width"}
                dynamic_axes = {"left": axes, "right": axes, "disparity": {0: "batch", 1: "height", 2: "width"},
                                "confidence": {0: "batch", 1: "height", 2: "width"}}
            torch.onnx.export(wrapper, example, str(out_path), input_names=["left", "right"],
                              output_names=["disparity", "confidence"], opset_version=ONNX_OPSET,
                              dynamic_axes=dynamic_axes, dynamo=True)
        else:
            raise ValueError(f"export format must be 'onnx' or 'torchscript', got '{fmt}'")
    return out_path
