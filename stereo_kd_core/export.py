"""Export a network to ONNX or TorchScript for deployment runtimes (onnxruntime, TensorRT).

ONNX files carry their input convention in the model metadata (stereo_kd_core.onnx_runtime's
`stereo_kd.*` keys), so `StereoEstimator.load("model.onnx")` needs no side file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stereo_kd_core.rectification import input_size

ONNX_OPSET = 18  # "17 or newer"; 18 is what the dynamo exporter emits natively

OUTPUT_MEANINGS = {
    "disparity": "float32 (B, H, W): left-view disparity in pixels at input resolution",
    "confidence": "float32 (B, H, W) in [0, 1]: P(|error| <= 2 px) with the network's confidence calibration "
                  "(in the graph), else the peak probability of the disparity distribution",
}


class InferenceWrapper(nn.Module):
    """(left, right) float RGB in [0, 1], (B, 3, H, W) -> (disparity, confidence), (B, H, W) each."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval()

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        disparity, confidence = self.network(left, right)
        return disparity, confidence


def network_convention(network: nn.Module, model_name: str = "", source_sha256: str = "", input_scale: float = 1.0):
    """The InputConvention of an InferenceWrapper export of `network`: RGB in [0, 1] (the network
    normalises inside), padded to its stride, its max disparity, disparity + confidence outputs,
    fed pairs resized by `input_scale` (the working scale of the model it was exported from)."""
    from stereo_kd_core.onnx_runtime import InputConvention

    return InputConvention(
        colour_order="RGB", value_range=1.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], inputs=["left", "right"],
        padding_multiple=int(getattr(network, "stride", 1)), max_disparity=int(network.max_disparity),
        disparity_output="disparity", disparity_scale=1.0, confidence_output="confidence",
        model_name=model_name or getattr(network, "arch", ""), outputs=dict(OUTPUT_MEANINGS),
        arch=getattr(network, "arch", ""), source_sha256=source_sha256, input_scale=float(input_scale))


def write_onnx_metadata(path: str | Path, entries: dict[str, str]) -> None:
    """Set (replace) metadata_props entries of an ONNX file in place."""
    import onnx

    model = onnx.load(str(path))
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


def export_model(network: nn.Module, out_path: str | Path, fmt: str, height: int, width: int,
                 dynamic: bool = False, model_name: str = "", source_sha256: str = "", input_scale: float = 1.0
                 ) -> Path:
    """Write `network` as ONNX (opset 18, with its input convention as metadata) or TorchScript
    (traced) for pairs of the given size. `source_sha256`: of the checkpoint the network came from.
    `input_scale`: the model runs on pairs resized by it (a shipped working scale): the graph is
    built at the resized size and the ONNX metadata says so, so StereoEstimator.load resizes."""
    out_path = Path(out_path)
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"export format must be 'onnx' or 'torchscript', got '{fmt}'")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if input_scale != 1.0:
        if fmt == "torchscript":
            raise ValueError(f"this model runs on pairs resized by {input_scale:g}, which a TorchScript file "
                             "cannot say: export ONNX (its metadata carries the scale)")
        width, height = input_size(width, height, input_scale)
    wrapper = InferenceWrapper(network).cpu().eval()
    example = (torch.rand(1, 3, height, width), torch.rand(1, 3, height, width))
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(out_path))
            return out_path
        dynamic_axes = None
        if dynamic:
            axes = {0: "batch", 2: "height", 3: "width"}
            dynamic_axes = {"left": axes, "right": axes, "disparity": {0: "batch", 1: "height", 2: "width"},
                            "confidence": {0: "batch", 1: "height", 2: "width"}}
        torch.onnx.export(wrapper, example, str(out_path), input_names=["left", "right"],
                          output_names=["disparity", "confidence"], opset_version=ONNX_OPSET,
                          dynamic_axes=dynamic_axes, dynamo=True, external_data=False)  # one self-contained file
    write_onnx_metadata(out_path, network_convention(network, model_name, source_sha256, input_scale).to_metadata())
    if dynamic:
        _check_dynamic_export(out_path, wrapper, height, width)
    return out_path


def _check_dynamic_export(path: Path, wrapper: nn.Module, height: int, width: int) -> None:
    """Compare a dynamic-size export with PyTorch at a second size: torch 2.13's dynamo exporter
    specialises some width expressions of our cost volumes to the example size, and such a graph
    (wrong or failing at every other size) must not ship."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    other = (height + 19, width + 37)  # a size that is not the example's, nor its multiple of the stride
    left, right = torch.rand(1, 3, *other), torch.rand(1, 3, *other)
    with torch.no_grad():
        expected = wrapper(left, right)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        got = session.run(["disparity"], {"left": left.numpy(), "right": right.numpy()})[0]
        problem = None if got.shape == expected.shape and float(abs(got - expected).max()) < 1e-2 else \
            f"its disparity differs from PyTorch's at {other[0]}x{other[1]}"
    except Exception as exc:  # noqa: BLE001 (onnxruntime's untyped Fail)
        problem = f"it fails at {other[0]}x{other[1]}: {str(exc).splitlines()[0][:200]}"
    if problem:
        path.unlink()
        raise RuntimeError(f"the dynamic-size ONNX export is wrong ({problem}); export at a fixed size "
                           "instead (without --dynamic): StereoEstimator pads or resizes pairs to it")
