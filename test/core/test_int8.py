"""precision int8 on the CPU (stereo_kd_core.int8_cpu): the PT2E-quantised graph of the shipped
network gives its fp32 disparity within tolerance, NetworkEstimator builds it per input size in
the background while the eager network answers, and where int8 cannot run it says why and runs
in floating point. Here torch.compile is replaced by the identity (the quantise/dequantise graph
runs as reference ops; no minutes-long inductor build); the compiled graph's accuracy on real
pairs is in the README (and the slow test below)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from test_compile import HEIGHT, SHIFT_PX, WIDTH, shifted_pair

from stereo_kd_core import StereoEstimator, int8_cpu

pytestmark = pytest.mark.skipif(int8_cpu.unavailable() is not None, reason=str(int8_cpu.unavailable()))


def tensors(left: np.ndarray, right: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(v.transpose(2, 0, 1).copy())[None].float() / 255 for v in (left, right))


@pytest.fixture
def no_inductor(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda graph, **kwargs: graph)


def test_the_quantised_graph_gives_the_fp32_disparity(no_inductor):
    network = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32").network
    left, right = tensors(*shifted_pair())
    with torch.no_grad():
        expected = network(left, right)[0]
    calibration = [(left, right), *int8_cpu.calibration_tensors(HEIGHT, WIDTH, 32, n=2)]
    core = int8_cpu.quantize_core(network, HEIGHT, WIDTH, bf16=False, calibration=calibration)
    with torch.no_grad():
        got = network.confidence_head(core(left, right), HEIGHT, WIDTH)[0]
    difference = (got - expected)[0, :, 24:].abs()
    assert float(difference.median()) < 0.1 and float(difference.mean()) < 0.3
    assert float((got[0, :, 24:] - SHIFT_PX).abs().median()) < 0.5
    targets = [str(node.target) for node in core.converted.graph.nodes]
    assert sum("quantize_per_channel" in t for t in targets) >= 20  # int8 weights for the convolutions
    assert sum("quantize_per_tensor" in t for t in targets) >= 20   # uint8 activations into them


def test_int8_builds_in_the_background_and_takes_over(no_inductor, caplog):
    left, right = shifted_pair()
    estimator = StereoEstimator.load("dsnet-fast", device="cpu", precision="int8")
    assert estimator.precision == "int8" and estimator.compiled
    fp32 = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32").predict(left, right).disparity
    first = estimator.predict(left, right).disparity  # eager (bf16 or fp32) while int8 is built
    with caplog.at_level(logging.INFO, logger="stereo_kd_core.network_estimator"):
        assert estimator.wait_for_compile(timeout_s=600)
    assert f"quantised to int8 and compiled 'dsnet-fast' for {HEIGHT}x{WIDTH} int8" in caplog.text
    assert estimator.compiled, caplog.text  # no fallback
    second = estimator.predict(left, right).disparity
    for got in (first, second):
        assert np.median(np.abs(got[:, 24:] - fp32[:, 24:])) < 0.1
    assert not np.array_equal(first, second)  # the second came through the int8 graph


def test_where_int8_cannot_run_it_says_why_and_runs_in_floating_point(monkeypatch, caplog):
    monkeypatch.setattr(int8_cpu, "unavailable", lambda: "int8 on the CPU needs torchao (test)")
    with caplog.at_level(logging.WARNING, logger="stereo_kd_core.network_estimator"):
        estimator = StereoEstimator.load("dsnet-fast", device="cpu", precision="int8")
    assert estimator.precision in ("bf16", "fp32") and not estimator.compiled
    assert "needs torchao (test)" in caplog.text
    with pytest.raises(ValueError, match="int8 ONNX model is its own file"):
        StereoEstimator.load("model.onnx", device="cpu", precision="int8")


@pytest.mark.skipif(not os.environ.get("STEREO_KD_SLOW_TESTS"),
                    reason="quantises and compiles with inductor (a minute or more); set STEREO_KD_SLOW_TESTS=1")
def test_the_compiled_int8_graph_matches_fp32():
    left, right = shifted_pair()
    estimator = StereoEstimator.load("dsnet-fast", device="cpu", precision="int8")
    estimator.warm_up(HEIGHT, WIDTH)
    assert estimator.compiled
    fp32 = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32").predict(left, right).disparity
    got = estimator.predict(left, right).disparity
    assert np.median(np.abs(got[:, 24:] - fp32[:, 24:])) < 0.1
