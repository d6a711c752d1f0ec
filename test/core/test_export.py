"""ONNX export matches PyTorch on real-size inputs (onnxruntime, CPU); TorchScript too."""

import copy

import numpy as np
import pytest
import torch

from stereo_kd_core.export import export_model
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.models.photometric import set_photometric

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


def seeded_pair(height: int, width: int, shift_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded pair (1, 3, H, W): right = left shifted by shift_px, dimmed, plus noise."""
    generator = torch.Generator().manual_seed(1)
    left = torch.rand(1, 3, height, width, generator=generator)
    right = torch.roll(left, shifts=-shift_px, dims=3) * 0.9 + 0.05 * torch.rand(1, 3, height, width,
                                                                                   generator=generator)
    return left, right


def run_in_pytorch(network, left: torch.Tensor, right: torch.Tensor) -> list:
    """`network`'s outputs on the pair, numpy arrays each."""
    with torch.no_grad():
        return [output.numpy() for output in network(left, right)]


def run_exported(network, path, height: int, width: int, shift_px: int) -> tuple[list, list]:
    """Export `network` to ONNX at height x width, then run it and the graph (onnxruntime, CPU)
    on `seeded_pair`: (PyTorch outputs, ONNX outputs), numpy arrays each."""
    path = export_model(network, path, "onnx", height, width)
    left, right = seeded_pair(height, width, shift_px)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return run_in_pytorch(network, left, right), session.run(None, {"left": left.numpy(), "right": right.numpy()})


def test_onnx_matches_pytorch_at_real_size(fast_model, tmp_path):
    height, width = 384, 640
    (disparity, confidence), (onnx_disparity, onnx_confidence) = run_exported(
        fast_model, tmp_path / "fast.onnx", height, width, shift_px=12)
    assert onnx_disparity.shape == (1, height, width)
    assert relative_error(onnx_disparity, disparity) < 1e-3
    assert np.max(np.abs(onnx_confidence - confidence)) < 1e-3


def test_the_onnx_graph_sees_colour_and_exposure_as_the_network_does(fast_model, tmp_path):
    """A network that sees a quarter of the colour and matches exposure (a shipped entry's settings)
    exports with that in the graph: an ONNX runtime fed RGB answers as PyTorch does, not as the
    network seeing the pair as captured."""
    network = set_photometric(copy.deepcopy(fast_model), {"saturation": 0.25, "match_exposure": True}, "test")
    (disparity, _), (onnx_disparity, _) = run_exported(network, tmp_path / "quarter.onnx", 128, 192, shift_px=6)
    assert relative_error(onnx_disparity, disparity) < 1e-3
    colour, _ = run_in_pytorch(fast_model, *seeded_pair(128, 192, shift_px=6))  # seeing the pair as captured
    assert relative_error(colour, disparity) > 1e-2


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


def test_a_model_that_runs_enlarged_exports_its_scale_and_runs_the_same_from_onnx(tmp_path, capsys):
    """`stereo-kd export` of a model with a working scale (the shipped default's 1.25; here a
    checkpoint carrying 1.5) builds the graph at the enlarged size and says so in its metadata,
    so StereoEstimator.load of the file resizes each pair as the PyTorch model does."""
    from stereo_kd_core import StereoEstimator
    from stereo_kd_core.checkpoint import save_checkpoint
    from stereo_kd_core.cli import main

    torch.manual_seed(0)
    config = default_config("dsnet-fast", max_disparity=64)
    checkpoint = save_checkpoint(tmp_path / "enlarged.pt", build_model(config), config, extra={"input_scale": 1.5})
    out = tmp_path / "enlarged.onnx"
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--height", "64", "--width", "96",
                 "--out", str(out), "--device", "cpu", "--precision", "fp32"]) == 0
    assert "graph 144x96: pairs are resized by 1.5 first" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [list(i.shape) for i in session.get_inputs()] == [[1, 3, 96, 144]] * 2
    from_onnx = StereoEstimator.load(str(out), device="cpu")
    from_torch = StereoEstimator.load(str(checkpoint), device="cpu", precision="fp32")
    assert from_onnx.scale == from_torch.scale == 1.5
    rng = np.random.default_rng(2)
    left = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    right = np.roll(left, -4, axis=1)
    got, expected = from_onnx.predict(left, right).disparity, from_torch.predict(left, right).disparity
    assert got.shape == (64, 96)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--height", "64", "--width", "96",
                 "--out", str(tmp_path / "x.pt"), "--device", "cpu"]) == 2
    assert "a TorchScript file cannot say" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
