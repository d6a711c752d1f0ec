"""ONNX export matches PyTorch on real-size inputs (onnxruntime, CPU); TorchScript too."""

import numpy as np
import pytest
import torch

from stereo_kd_core.export import export_model
from stereo_kd_core.models import build_model, default_config

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def fast_model():
    torch.manual_seed(0)
    # with the refinement (its grid_sample and pixel shuffle), acting: a superset of the plain network's ops
    model = build_model(default_config("dsnet-fast", max_disparity=192) | {"refine_channels": 8}).eval()
    # non-trivial BN statistics, so the comparison is not between two near-constant maps
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(model.refinement.residual.weight, std=0.05)
    return model


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def run_exported(network, path, height: int, width: int, shift_px: int) -> tuple[list, list]:
    """Export `network` to ONNX at height x width, then run it and the graph (onnxruntime, CPU)
    on one seeded pair (right = left shifted by shift_px, dimmed, plus noise): (PyTorch
    outputs, ONNX outputs), numpy arrays each."""
    path = export_model(network, path, "onnx", height, width)
    generator = torch.Generator().manual_seed(1)
    left = torch.rand(1, 3, height, width, generator=generator)
    right = torch.roll(left, shifts=-shift_px, dims=3) * 0.9 + 0.05 * torch.rand(1, 3, height, width,
                                                                                   generator=generator)
    with torch.no_grad():
        expected = [output.numpy() for output in network(left, right)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return expected, session.run(None, {"left": left.numpy(), "right": right.numpy()})


def test_onnx_matches_pytorch_at_real_size(fast_model, tmp_path):
    height, width = 384, 640
    (disparity, confidence), (onnx_disparity, onnx_confidence) = run_exported(
        fast_model, tmp_path / "fast.onnx", height, width, shift_px=12)
    assert onnx_disparity.shape == (1, height, width)
    assert relative_error(onnx_disparity, disparity) < 1e-3
    assert np.max(np.abs(onnx_confidence - confidence)) < 1e-3


def test_torchscript_matches_pytorch(fast_model, tmp_path):
    path = export_model(fast_model, tmp_path / "fast.ts", "torchscript", 64, 96)
    scripted = torch.jit.load(str(path))
    left, right = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = fast_model(left, right)[0]
        got = scripted(left, right)[0]
    assert relative_error(got.numpy(), expected.numpy()) < 1e-5


def test_unknown_format_is_refused(fast_model, tmp_path):
    with pytest.raises(ValueError, match="onnx"):
        export_model(fast_model, tmp_path / "x.bin", "tflite", 64, 96)
