"""StereoEstimator on ONNX Runtime: parity with PyTorch at an odd size, export metadata round
trip, third-party models with a YAML convention (hand-built graphs), fixed-size resize/pad,
provider fallback, int8 quantisation, the CPU-default rule, and clear errors."""

import json
import logging

import numpy as np
import pytest
import torch

from stereo_kd_core import StereoEstimator
from stereo_kd_core.backend_choice import BackendCandidate, choose_cpu_default
from stereo_kd_core.checkpoint import save_checkpoint, sha256_of_file
from stereo_kd_core.export import export_model, network_convention, read_onnx_metadata
from stereo_kd_core.models import build_model, default_config

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper  # noqa: E402

from stereo_kd_core.onnx_runtime import (  # noqa: E402
    CPU,
    CUDA,
    TENSORRT,
    InputConvention,
    OnnxModelError,
    choose_providers,
)

ODD_HEIGHT, ODD_WIDTH = 75, 133  # neither a multiple of the network's stride (32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random dsnet-fast (64 px search, non-trivial BN statistics), its checkpoint, and its ONNX
    export at an odd fixed size."""
    folder = tmp_path_factory.mktemp("onnx")
    config = default_config("dsnet-fast", max_disparity=64)
    torch.manual_seed(0)
    model = build_model(config).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    checkpoint = save_checkpoint(folder / "fast.pt", model, config)
    onnx_path = export_model(model, folder / "fast.onnx", "onnx", ODD_HEIGHT, ODD_WIDTH, model_name="fast",
                             source_sha256=sha256_of_file(checkpoint))
    return {"model": model, "checkpoint": checkpoint, "onnx": onnx_path}


def shifted_pair(height, width, shift=6, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height, width + shift, 3), dtype=np.uint8)
    return np.ascontiguousarray(base[:, :width]), np.ascontiguousarray(base[:, shift:])


def test_onnx_runtime_matches_pytorch_at_an_odd_size(exported):
    left, right = shifted_pair(ODD_HEIGHT, ODD_WIDTH)
    torch_est = StereoEstimator.load(str(exported["checkpoint"]), device="cpu", max_disparity=64,
                                     precision="fp32")  # the graph runs fp32
    onnx_est = StereoEstimator.load(str(exported["onnx"]), device="cpu", max_disparity=64, threads=1)
    assert onnx_est.backend == f"onnxruntime ({CPU})" and torch_est.backend == "pytorch"
    assert onnx_est.fixed_size == (ODD_HEIGHT, ODD_WIDTH) and onnx_est.max_disparity == 64
    expected, got = torch_est.predict(left, right), onnx_est.predict(left, right)
    assert got.disparity.shape == got.confidence.shape == (ODD_HEIGHT, ODD_WIDTH)
    assert got.disparity.dtype == np.float32
    np.testing.assert_allclose(got.disparity, expected.disparity, atol=0.01)
    np.testing.assert_allclose(got.confidence, expected.confidence, atol=1e-3)


def test_export_metadata_round_trip(exported):
    metadata = read_onnx_metadata(exported["onnx"])
    convention = InputConvention.from_metadata(metadata, "test")
    assert convention == network_convention(exported["model"], "fast", sha256_of_file(exported["checkpoint"]))
    assert convention.colour_order == "RGB" and convention.value_range == 1.0
    assert convention.padding_multiple == 32 and convention.max_disparity == 64
    assert set(convention.outputs) == {"disparity", "confidence"} and "pixels" in convention.outputs["disparity"]
    assert convention.arch == "dsnet-fast" and convention.model_name == "fast"
    assert json.loads(metadata["stereo_kd.source_sha256"]) == sha256_of_file(exported["checkpoint"])
    assert list(exported["onnx"].parent.glob("*.data")) == []  # one self-contained file, weights inside
    estimator = StereoEstimator.load(str(exported["onnx"]), device="cpu", max_disparity=64)
    assert estimator.name == "fast" and estimator.convention == convention
    # a non-default convention survives to_metadata -> from_metadata unchanged
    odd = InputConvention(colour_order="bgr", value_range=255, mean=[1, 2, 3], std=2, inputs="pair",
                          padding_multiple=8, disparity_scale=-1, confidence_output="conf", quantization="int8-static")
    assert InputConvention.from_metadata(odd.to_metadata(), "test") == odd


def tiny_model(path, inputs, outputs, nodes, initializers=()):
    """Write a hand-built ONNX graph (opset 17) to `path`."""
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def constant(name, values):
    return helper.make_tensor(name, TensorProto.FLOAT, [len(values)], values)


@pytest.fixture()
def fixed_bgr_model(tmp_path):
    """Third-party style: fixed 1x3x8x12 inputs `img_l`/`img_r` in BGR 0-255, one output `flow`
    (1, 1, 8, 12) = -(first channel of img_l), i.e. minus the blue value; no confidence."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 8, 12]) for name in ("img_l", "img_r")]
    outputs = [helper.make_tensor_value_info("flow", TensorProto.FLOAT, [1, 1, 8, 12])]
    nodes = [helper.make_node("Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [0])),
             helper.make_node("Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [1])),
             helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
             helper.make_node("Slice", ["img_l", "starts", "ends", "axes"], ["first"]),
             helper.make_node("ReduceMin", ["img_r"], ["img_r_min"], keepdims=1),  # img_r must be used
             helper.make_node("Mul", ["img_r_min", "zero"], ["img_r_zero"]),
             helper.make_node("Add", ["first", "img_r_zero"], ["first_plus"]),
             helper.make_node("Neg", ["first_plus"], ["flow"])]
    path = tiny_model(tmp_path / "hitnet_like.onnx", inputs, outputs, nodes, [constant("zero", [0.0])])
    (tmp_path / "hitnet_like.yaml").write_text(
        "colour_order: BGR\nvalue_range: 255\ninputs: [img_l, img_r]\nmax_disparity: 128\n"
        "disparity_output: flow\ndisparity_scale: -1.0\nmodel_name: hitnet-like\n")
    return path


def uniform_pair(height, width, rgb=(10, 20, 30)):
    image = np.empty((height, width, 3), np.uint8)
    image[:] = rgb
    return image, image.copy()


def test_third_party_fixed_size_model_with_yaml_pads_or_resizes(fixed_bgr_model):
    estimator = StereoEstimator.load(str(fixed_bgr_model), device="cpu")
    assert estimator.name == "hitnet-like" and estimator.max_disparity == 128 and estimator.fixed_size == (8, 12)
    # fits: padded to 8x12, output cropped; BGR -> blue first, -flow -> +disparity, no rescaling
    small = estimator.predict(*uniform_pair(6, 10))
    assert small.disparity.shape == (6, 10)
    np.testing.assert_allclose(small.disparity, 30.0)
    np.testing.assert_array_equal(small.confidence, 1.0)  # no confidence output: 1 where valid
    # too big: resized to 8x12 and back; disparity values scale with the width ratio (24 / 12)
    large = estimator.predict(*uniform_pair(16, 24))
    assert large.disparity.shape == (16, 24)
    np.testing.assert_allclose(large.disparity, 60.0, rtol=1e-5)


def test_third_party_dynamic_stacked_model_is_padded_to_its_multiple(tmp_path):
    """One input (1, 6, H, W) = left and right stacked, dynamic size, padding multiple 4, mean/std;
    outputs the mean of the right view's channels (1, H, W) and a confidence (1, 1, H, W)."""
    inputs = [helper.make_tensor_value_info("pair", TensorProto.FLOAT, [1, 6, "h", "w"])]
    outputs = [helper.make_tensor_value_info("disp", TensorProto.FLOAT, [1, "h", "w"]),
               helper.make_tensor_value_info("conf", TensorProto.FLOAT, [1, 1, "h", "w"])]
    nodes = [helper.make_node("Split", ["pair", "halves"], ["left", "right"], axis=1),
             helper.make_node("ReduceMean", ["right"], ["disp"], axes=[1], keepdims=0),
             helper.make_node("Mul", ["disp", "half"], ["half_disp"]),
             helper.make_node("Unsqueeze", ["half_disp", "axes"], ["conf"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    halves = helper.make_tensor("halves", TensorProto.INT64, [2], [3, 3])
    path = tiny_model(tmp_path / "stacked.onnx", inputs, outputs, nodes, [axes, halves, constant("half", [0.5])])
    (tmp_path / "stacked.yaml").write_text(
        "colour_order: RGB\nvalue_range: 255\nmean: 2.0\nstd: [4.0, 4.0, 4.0]\ninputs: [pair]\n"
        "padding_multiple: 4\ndisparity_output: disp\nconfidence_output: conf\n")
    estimator = StereoEstimator.load(str(path), device="cpu")
    assert estimator.fixed_size is None and estimator.name == "stacked"
    out = estimator.predict(*uniform_pair(10, 13, rgb=(6, 6, 6)))
    assert out.disparity.shape == out.confidence.shape == (10, 13)
    np.testing.assert_allclose(out.disparity, 1.0)    # (6 - 2) / 4
    np.testing.assert_allclose(out.confidence, 0.5)


def test_float16_model_gets_float16_inputs(tmp_path):
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT16, [1, 3, "h", "w"]) for name in ("l", "r")]
    outputs = [helper.make_tensor_value_info("d", TensorProto.FLOAT16, [1, "h", "w"])]
    nodes = [helper.make_node("Sub", ["l", "r"], ["diff"]),
             helper.make_node("ReduceMean", ["diff"], ["d"], axes=[1], keepdims=0)]
    path = tiny_model(tmp_path / "half.onnx", inputs, outputs, nodes)
    (tmp_path / "half.yaml").write_text("value_range: 255\ninputs: [l, r]\ndisparity_output: d\n")
    left, right = uniform_pair(9, 11, rgb=(30, 30, 30))
    out = StereoEstimator.load(str(path), device="cpu").predict(left, right - 6)
    assert out.disparity.dtype == np.float32
    np.testing.assert_allclose(out.disparity, 6.0)


def test_third_party_model_without_yaml_or_metadata_names_the_yaml(fixed_bgr_model):
    fixed_bgr_model.with_suffix(".yaml").unlink()
    with pytest.raises(OnnxModelError, match="no stereo-kd metadata and no hitnet_like.yaml"):
        StereoEstimator.load(str(fixed_bgr_model), device="cpu")


def difference_model(path, input_shape, output_shape):
    """left - right as the output `disparity`: any input shape, declared output shape."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, input_shape) for name in ("left", "right")]
    outputs = [helper.make_tensor_value_info("disparity", TensorProto.FLOAT, output_shape)]
    tiny_model(path, inputs, outputs, [helper.make_node("Sub", ["left", "right"], ["disparity"])])
    path.with_suffix(".yaml").write_text("colour_order: RGB\n")
    return path


def test_wrong_shaped_model_names_expected_and_found_shapes(tmp_path):
    path = difference_model(tmp_path / "rgba.onnx", [1, 4, 8, 12], [1, 4, 8, 12])
    with pytest.raises(OnnxModelError, match=r"input 'left' has shape \[1, 4, 8, 12\]; expected \(1, 3, H, W\)"):
        StereoEstimator.load(str(path), device="cpu")
    # inputs fit, but the output is not one disparity map of the input size
    path = difference_model(tmp_path / "rgb.onnx", [1, 3, 8, 12], [1, 3, 8, 12])
    estimator = StereoEstimator.load(str(path), device="cpu")
    with pytest.raises(OnnxModelError, match=r"has shape \(1, 3, 8, 12\); expected \(1, 8, 12\)"):
        estimator.predict(*uniform_pair(8, 12))
    # a convention that names inputs the model does not have
    (tmp_path / "rgb.yaml").write_text("inputs: [im0, im1]\n")
    with pytest.raises(OnnxModelError, match="expects inputs"):
        StereoEstimator.load(str(path), device="cpu")


def test_missing_provider_falls_back_with_a_warning_naming_it(exported, monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with caplog.at_level(logging.WARNING, logger="stereo_kd_core.onnx_runtime"):
        estimator = StereoEstimator.load(str(exported["onnx"]), device="cuda", max_disparity=64)
    assert CUDA in caplog.text and "falling back to CPUExecutionProvider" in caplog.text
    assert estimator.providers == [CPU] and estimator.device == "cpu"
    assert estimator.predict(*shifted_pair(ODD_HEIGHT, ODD_WIDTH)).disparity.shape == (ODD_HEIGHT, ODD_WIDTH)


def test_provider_preference_follows_device():
    everything = [TENSORRT, CUDA, CPU]
    assert choose_providers("auto", everything) == everything
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cpu", everything) == [CPU]
    assert choose_providers("cuda:1", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ValueError, match="device"):
        choose_providers("tpu", everything)


def test_corrupted_or_truncated_file_gets_a_clear_error(exported, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported["onnx"].read_bytes()[:5000])
    with pytest.raises(OnnxModelError, match="truncated, corrupt or not an ONNX model"):
        StereoEstimator.load(str(truncated), device="cpu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 100)
    with pytest.raises(OnnxModelError, match=str(garbage)):
        StereoEstimator.load(str(garbage), device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        StereoEstimator.load(str(tmp_path / "missing.onnx"))


def test_cli_bench_reports_the_backend_and_eval_takes_onnx(exported, tmp_path):
    from stereo_kd_core.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", str(exported["onnx"]), "--device", "cpu", "--height", "40", "--width", "64",
                 "--runs", "2", "--warmup", "1", "--threads", "1", "--max-disparity", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == f"onnxruntime ({CPU})" and "1 onnxruntime threads" in result["machine"]
    assert main(["predict", "--model", str(tmp_path / "missing.onnx"), "a.png", "b.png"]) == 2
    scores = tmp_path / "eval.json"
    assert main(["eval", "--model", str(exported["onnx"]), "--device", "cpu", "--dataset", "synthetic", "--n", "1",
                 "--height", str(ODD_HEIGHT), "--width", str(ODD_WIDTH), "--max-disparity", "64",
                 "--json", str(scores)]) == 0
    assert json.loads(scores.read_text())["model"] == "fast"


def test_int8_quantisation_keeps_metadata_and_runs(exported, tmp_path):
    from stereo_kd_core.quantize import quantize_int8_static, synthetic_calibration_pairs

    pairs = synthetic_calibration_pairs(2, ODD_HEIGHT, ODD_WIDTH, max_disparity=64)
    path = quantize_int8_static(exported["onnx"], tmp_path / "fast_int8.onnx", pairs)
    estimator = StereoEstimator.load(str(path), device="cpu", max_disparity=64)
    assert estimator.precision == "int8" and estimator.name == "fast"
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)
    out = estimator.predict(*pairs[0])
    assert out.disparity.shape == (ODD_HEIGHT, ODD_WIDTH) and np.isfinite(out.disparity).all()


def test_cli_export_records_the_checkpoint_hash_and_writes_int8(exported, tmp_path):
    from stereo_kd_core.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(exported["checkpoint"]), "--out", str(out), "--height", "40",
                 "--width", "64", "--max-disparity", "64", "--device", "cpu", "--int8-calibration-pairs", "1"]) == 0
    convention = InputConvention.from_metadata(read_onnx_metadata(out), "cli")
    assert convention.source_sha256 == sha256_of_file(exported["checkpoint"]) and convention.model_name == "fast"
    int8 = InputConvention.from_metadata(read_onnx_metadata(tmp_path / "cli_int8.onnx"), "cli")
    assert int8.quantization == "int8-static" and int8.source_sha256 == convention.source_sha256


def test_cpu_default_rule_takes_the_fastest_within_the_accuracy_bound():
    reference = BackendCandidate("pytorch", "fp32", 230.0, {"motorcycle": 2.00, "synthetic": 3.00})
    bf16 = BackendCandidate("pytorch", "bf16", 110.0, {"motorcycle": 2.03, "synthetic": 3.00})    # +0.03: out
    ort_fp32 = BackendCandidate("onnxruntime", "fp32", 150.0, {"motorcycle": 2.01, "synthetic": 2.99})
    int8 = BackendCandidate("onnxruntime", "int8", 90.0, {"motorcycle": 2.09, "synthetic": 3.05})  # +0.09: in
    chosen, verdicts = choose_cpu_default([reference, bf16, ort_fp32, int8])
    assert chosen is int8
    assert verdicts["pytorch/bf16"].startswith("rejected") and verdicts["onnxruntime/fp32"].startswith("admissible")
    int8.epe["motorcycle"] = 2.10  # an int8 loss of 0.1 px is not "under 0.1"
    assert choose_cpu_default([reference, bf16, ort_fp32, int8])[0] is ort_fp32
    unscored = BackendCandidate("onnxruntime", "fp32", 10.0, {})
    chosen, verdicts = choose_cpu_default([reference, unscored])
    assert chosen is reference and "not measured" in verdicts["onnxruntime/fp32"]
    with pytest.raises(ValueError, match="reference"):
        choose_cpu_default([bf16])
