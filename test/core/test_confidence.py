"""The confidence: its calibration table, that it travels with checkpoints and ONNX exports, that
the shipped one is calibrated on generated pairs it was not fitted on, and that regions made wrong
on purpose get low confidence; the minimum-confidence helpers and CLI options."""

import json

import numpy as np
import pytest
import torch

from stereo_kd_core import StereoEstimator
from stereo_kd_core.checkpoint import load_model, save_checkpoint
from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE, density_percent, drop_low_confidence, low_confidence
from stereo_kd_core.data.photo_stereo import PhotoStereoGenerator
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.models.confidence import CUE_NAMES, ConfidenceCalibration, calibration_path, piecewise_linear
from stereo_kd_core.registry import resolve_shipped

# A table as benchmarks/confidence_study.py writes them (numbers of no meaning).
TABLE = {"cues": list(CUE_NAMES), "weights": [1.5, -0.4, -0.5, -0.8, 0.1, -0.3, -0.6, 0.2, -2.0], "bias": 0.7,
         "isotonic": {"x": [0.0, 0.3, 0.6, 0.9, 1.0], "y": [0.05, 0.2, 0.55, 0.9, 0.97]}}
# Held-out generated pairs: not the calibration's (seed 9026) nor the test split's (2026).
HELD_OUT_SEED = 31
CALIBRATION_ERROR_BOUND = 0.06  # the study measures ~0.02 on held-out generated pairs (README)


def test_piecewise_linear_is_numpy_interp():
    x = torch.linspace(-0.5, 1.5, 101)
    got = piecewise_linear(x, TABLE["isotonic"]["x"], TABLE["isotonic"]["y"])
    np.testing.assert_allclose(got.numpy(), np.interp(x.numpy(), TABLE["isotonic"]["x"], TABLE["isotonic"]["y"]),
                               atol=1e-6)


@pytest.mark.parametrize("broken", [{"cues": ["peak", "colour"], "weights": [1.0, 1.0]},
                                    {"weights": [1.0]},
                                    {"isotonic": {"x": [0.0, 0.5, 0.4], "y": [0.1, 0.2, 0.3]}},
                                    {"bias": float("nan")}])
def test_malformed_tables_are_refused(broken):
    with pytest.raises(ValueError, match="confidence calibration"):
        ConfidenceCalibration(TABLE | broken)


def random_network(refine: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = default_config("dsnet-fast", max_disparity=64) | ({"refine_channels": 8} if refine else {})
    network = build_model(config).eval()
    for module in network.modules():  # non-trivial statistics: outputs that vary over the image
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    if refine:
        torch.nn.init.normal_(network.refinement.residual.weight, std=0.05)
    return network


def test_checkpoint_loads_its_table_and_the_forward_applies_it(tmp_path):
    network = random_network()
    path = tmp_path / "student.pt"
    save_checkpoint(path, network, network.config)
    left, right = torch.rand(1, 3, 40, 72), torch.rand(1, 3, 40, 72)
    with torch.no_grad():
        _, uncalibrated = load_model(path)(left, right)
        calibration_path(path).write_text(json.dumps(TABLE))
        loaded = load_model(path)
        disparity, confidence = loaded(left, right)
        _, cues = loaded.infer_with_cues(left, right)
    assert loaded.confidence_calibration is not None
    assert set(cues) == set(CUE_NAMES) and all(c.shape == (1, 40, 72) for c in cues.values())
    torch.testing.assert_close(uncalibrated, cues["peak"])  # without a table: the full-resolution peak
    torch.testing.assert_close(confidence, ConfidenceCalibration(TABLE)(cues))
    assert confidence.shape == disparity.shape == (1, 40, 72)
    assert float(confidence.min()) >= 0.05 - 1e-6 and float(confidence.max()) <= 0.97 + 1e-6


def test_onnx_export_carries_the_calibrated_confidence(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_export import run_exported

    network = random_network()
    network.confidence_calibration = ConfidenceCalibration(TABLE)
    (_, expected), (_, got) = run_exported(network, tmp_path / "calibrated.onnx", 96, 160, shift_px=6)
    assert float(expected.std()) > 0.01  # a confidence that varies, not a constant
    assert np.max(np.abs(got - expected)) < 1e-4


@pytest.fixture(scope="module")
def shipped():
    if not calibration_path(resolve_shipped("dsnet-fast")[0]).is_file():
        pytest.fail("the shipped dsnet-fast has no confidence calibration table")
    return StereoEstimator.load("dsnet-fast", device="cpu", precision="auto")


@pytest.fixture(scope="module")
def held_out_pairs():
    generator = PhotoStereoGenerator(256, 384, 128, seed=HELD_OUT_SEED, builtin_photos=True)
    return [generator.sample(i) for i in range(4)]


def test_shipped_confidence_is_calibrated_on_held_out_generated_pairs(shipped, held_out_pairs):
    confidences, correct = [], []
    for sample in held_out_pairs:
        prediction = shipped.predict(sample["left"], sample["right"])
        confidences.append(prediction.confidence.ravel())
        correct.append((np.abs(prediction.disparity - sample["disparity"]) <= 2.0).ravel())
    confidence, correct = np.concatenate(confidences), np.concatenate(correct)
    bins = np.clip((confidence * 10).astype(int), 0, 9)
    error = sum(abs(confidence[bins == b].mean() - correct[bins == b].mean()) * np.mean(bins == b)
                for b in range(10) if np.any(bins == b))
    assert error < CALIBRATION_ERROR_BOUND
    assert 0.8 < correct.mean() < 1.0 and confidence.std() > 0.05  # the pairs are hard enough to mean something


def test_regions_made_wrong_on_purpose_get_low_confidence(shipped, held_out_pairs):
    """A strip of the right view replaced by noise (the left pixels that see it have no match) and a
    textureless patch pasted into the left view only: the disparity there is mostly wrong, and the
    confidence says so (measured with stage 1j: 63 % and 71 % of the pixels wrong, confidence 0.60
    and 0.48 mean, 80 % and 99 % below the default threshold; the rest of the pair 0.81, 36 %)."""
    sample = held_out_pairs[0]
    left, right = sample["left"].copy(), sample["right"].copy()
    height, width = left.shape[:2]
    right[40:height - 40, 150:190] = np.random.default_rng(0).integers(0, 256, (height - 80, 40, 3), dtype=np.uint8)
    left[50:130, 240:360] = 128
    prediction = shipped.predict(left, right)
    matched_column = np.arange(width)[None, :] - sample["disparity"]
    rows = np.arange(height)[:, None]
    strip = (matched_column >= 150) & (matched_column < 190) & (rows >= 40) & (rows < height - 40)
    patch = np.zeros((height, width), bool)
    patch[50:130, 240:360] = True
    untouched = ~(strip | patch)
    wrong = np.abs(prediction.disparity - sample["disparity"]) > 2.0
    confidence = prediction.confidence
    for region in (strip, patch):
        assert wrong[region].mean() > 0.5  # the regions are wrong indeed
        assert confidence[region].mean() < confidence[untouched].mean() - 0.15
        assert (confidence[region] < DEFAULT_MIN_CONFIDENCE).mean() > 0.75
    assert (confidence[untouched] < DEFAULT_MIN_CONFIDENCE).mean() < 0.5


def test_threshold_helpers_keep_exactly_the_pixels_at_or_above():
    confidence = np.array([[0.0, 0.49, 0.5, 0.51, np.nan, 1.0]], dtype=np.float32)
    disparity = np.arange(6, dtype=np.float32)[None]
    np.testing.assert_array_equal(low_confidence(confidence, 0.5), [[True, True, False, False, True, False]])
    assert low_confidence(confidence, 0.0) is None
    kept = drop_low_confidence(disparity, confidence, 0.5)
    np.testing.assert_array_equal(np.isnan(kept), [[True, True, False, False, True, False]])
    assert density_percent(kept) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="min_confidence"):
        low_confidence(confidence, 1.5)
    assert 0.0 < DEFAULT_MIN_CONFIDENCE < 1.0


def test_cli_min_confidence_removes_the_pixels_below_it_and_reports_the_density(held_out_pairs, tmp_path):
    from stereo_kd_core.cli import main
    from stereo_kd_core.data.io import read_pfm, write_image_rgb

    sample = held_out_pairs[1]
    write_image_rgb(tmp_path / "left.png", sample["left"])
    write_image_rgb(tmp_path / "right.png", sample["right"])
    runs = {}
    for threshold in ("0", "0.8"):
        out = tmp_path / threshold
        assert main(["predict", "--model", "dsnet-fast", "--precision", "auto", "--device", "cpu",
                     str(tmp_path / "left.png"), str(tmp_path / "right.png"), "--out", str(out),
                     "--min-confidence", threshold, "--json", str(out / "summary.json")]) == 0
        runs[threshold] = (read_pfm(out / "disparity.pfm"), json.loads((out / "summary.json").read_text()))
    everything, summary_all = runs["0"]
    kept, summary = runs["0.8"]
    assert summary_all["density"] == 100.0 and summary["min_confidence"] == 0.8
    assert 50.0 < summary["density"] < 100.0
    assert summary["density"] == pytest.approx(100.0 * np.isfinite(kept).mean())
    np.testing.assert_array_equal(kept[np.isfinite(kept)], everything[np.isfinite(kept)])  # the rest unchanged
