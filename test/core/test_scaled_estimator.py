"""`input_scale`: an estimator run on the pair resized by a factor, its disparity brought back to
the pair's size and pixels (stereo_kd_core.scaled_estimator)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stereo_kd_core import StereoEstimator
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.scaled_estimator import ScaledEstimator, disparity_to_size

HEIGHT, WIDTH, SHIFT_PX = 96, 256, 8


def shifted_pair(shift: int = SHIFT_PX, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random texture (blobs a few pixels wide, so it survives resizing); right(x - shift) = left(x)."""
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, size=(HEIGHT // 4, (width + shift) // 4 + 1)).astype(np.float32)
    import cv2

    base = cv2.resize(coarse, (coarse.shape[1] * 4, HEIGHT), interpolation=cv2.INTER_CUBIC)
    base = np.clip(base, 0, 255).astype(np.uint8)
    left, right = base[:, :width], base[:, shift:shift + width]
    return np.repeat(left[..., None], 3, 2), np.repeat(right[..., None], 3, 2)


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.0])
def test_the_disparity_comes_back_in_the_pairs_pixels(scale):
    """SGBM sees the shift times the scale; the caller gets the shift, at the pair's size."""
    left, right = shifted_pair()
    estimator = StereoEstimator.load("sgbm", max_disparity=64, input_scale=scale)
    assert isinstance(estimator, ScaledEstimator) and estimator.name == f"sgbm@x{scale:g}"
    assert estimator.max_disparity == int(64 / scale)  # its range in the pair's pixels
    prediction = estimator.predict(left, right)
    assert prediction.disparity.shape == prediction.confidence.shape == (HEIGHT, WIDTH)
    valid = prediction.disparity[:, 80:][np.isfinite(prediction.disparity[:, 80:])]
    assert valid.size > 0.5 * HEIGHT * (WIDTH - 80)
    assert np.median(valid) == pytest.approx(SHIFT_PX, abs=0.25)
    sgbm_width = StereoEstimator.load("sgbm", max_disparity=64).min_input_width
    assert estimator.min_input_width == math.ceil(sgbm_width / scale)  # what the resized pair needs
    native = StereoEstimator.load("sgbm", max_disparity=64).predict(left, right).disparity
    assert np.median(native[:, 80:][np.isfinite(native[:, 80:])]) == pytest.approx(SHIFT_PX, abs=0.25)


def test_points_follow_the_returned_disparity():
    left, right = shifted_pair()
    geometry = StereoGeometry(fx=200.0, fy=200.0, cx_left=128.0, cx_right=128.0, cy=48.0, baseline_m=0.1)
    prediction = StereoEstimator.load("sgbm", max_disparity=64, input_scale=1.5).predict(left, right, geometry)
    expected = geometry.points_from_disparity(prediction.disparity)
    np.testing.assert_array_equal(prediction.points, expected)


def test_disparity_to_size_rescales_values_and_keeps_invalid_pixels_local():
    disparity = np.full((10, 20), 4.0, np.float32)
    disparity[4:6, 8:10] = np.nan
    enlarged = disparity_to_size(disparity, (30, 15))
    assert enlarged.shape == (15, 30)
    finite = np.isfinite(enlarged)
    np.testing.assert_allclose(enlarged[finite], 6.0, rtol=1e-6)  # 4 px at 20 wide = 6 px at 30 wide
    assert 0 < (~finite).sum() <= 3 * 3 * 2 and not finite[7, 13]  # the hole, and no more than its size
    assert disparity_to_size(disparity, (20, 10)) is disparity


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), 10.0])
def test_a_bad_scale_is_refused_before_anything_loads(scale):
    with pytest.raises(ValueError, match="input scale must be between 0.1 and 4"):
        StereoEstimator.load("path/that/does/not/exist.pt", input_scale=scale)


def test_the_cli_takes_input_scale_where_pairs_are_estimated(tmp_path, capsys):
    from stereo_kd_core.cli import main

    assert main(["eval", "--model", "sgbm", "--dataset", "motorcycle", "--input-scale", "0.5"]) == 0
    assert "sgbm@x0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", "--model", "dsnet-fast", "--out", str(tmp_path / "x.onnx"), "--input-scale", "2"])


def test_fit_range_runs_a_near_scene_at_a_scale_that_keeps_it_inside_the_range():
    """A 40 px shift enlarged by 2 is 80 px, beyond SGBM's 64: plainly scaled it fails; with fit_range
    the probe measures 40 px, and the pair runs at the largest grid scale that keeps it within
    0.8 of the range (51.2 / 40 = 1.28 -> 1.25), where the answer is right. A far scene keeps 2."""
    shift, width = 40, 384
    left, right = shifted_pair(shift, width)
    sgbm = StereoEstimator.load("sgbm", max_disparity=64)
    fitted, plain = ScaledEstimator(sgbm, 2.0, fit_range=True), ScaledEstimator(sgbm, 2.0)
    assert fitted.max_disparity == 128 and plain.max_disparity == 32  # the range reachable by shrinking to 0.5
    assert fitted.scale_for(left, right) == 1.25
    region = np.s_[:, 160:]
    good = fitted.predict(left, right).disparity[region]
    assert np.isfinite(good).mean() > 0.5 and np.median(good[np.isfinite(good)]) == pytest.approx(shift, abs=0.5)
    bad = plain.predict(left, right).disparity[region]
    assert np.isfinite(bad).mean() < 0.5 or abs(np.median(bad[np.isfinite(bad)]) - shift) > 2
    far_left, far_right = shifted_pair(8, width)
    assert fitted.scale_for(far_left, far_right) == 2.0


def test_a_network_probe_looks_at_cost_resolution_and_decides_as_the_whole_forward():
    """A network's probe is its cost-resolution disparity (predict_coarse: no upsampling, refinement
    or confidence; half the time): it finds the shift in the pair's pixels, and fit_range keeps the
    scene inside the trained range as with the whole forward (a grid step apart at most); a compiled
    estimator (whose graph of the whole forward is the faster look) and SGBM have no such probe."""
    shift = 48  # enlarged by 4: 192 px, beyond 0.8 x 192; 153.6 / 48 = 3.2 fits
    left, right = shifted_pair(shift, WIDTH)
    network = StereoEstimator.load("dsnet-faster", device="cpu", precision="fp32")
    coarse = network.predict_coarse(left, right)
    assert coarse.shape == (HEIGHT // 8, WIDTH // 8)
    assert np.median(coarse[:, 8:]) == pytest.approx(shift, abs=1.0)
    fitted = ScaledEstimator(network, 4.0, fit_range=True)
    by_coarse = fitted.scale_for(left, right)
    network.predict_coarse = lambda *pair: None  # the whole forward instead
    by_forward = fitted.scale_for(left, right)
    for scale in (by_coarse, by_forward):
        assert 2.75 <= scale <= 3.125 and shift * scale <= 0.8 * 192
    assert abs(by_coarse - by_forward) <= 0.125
    assert StereoEstimator.load("dsnet-faster", device="cpu", compile=True).predict_coarse(left, right) is None
    assert not hasattr(StereoEstimator.load("sgbm", max_disparity=64), "predict_coarse")


def test_a_dense_disparity_resizes_as_the_masked_path_does_away_from_invalid_pixels():
    """The dense fast path (a network's answer) and the masked path agree wherever no invalid pixel
    is near: one NaN in a corner changes nothing far from it."""
    disparity = np.random.default_rng(3).uniform(0, 60, (96, 160)).astype(np.float32)
    holed = disparity.copy()
    holed[0, 0] = np.nan
    dense, masked = disparity_to_size(disparity, (200, 120)), disparity_to_size(holed, (200, 120))
    assert np.isfinite(dense).all() and np.isnan(masked[0, 0])
    np.testing.assert_allclose(dense[10:, 10:], masked[10:, 10:], rtol=1e-6)
    assert dense.max() > 60 * 200 / 160 * 0.9  # values rescaled by the width ratio


class _Recording(StereoEstimator):
    """An inner estimator that records the sizes it is asked to prepare (a compiled network's hook)."""

    name, backend, device, precision, max_disparity = "recording", "python", "cpu", "fp32", 64

    def __init__(self):
        self.prepared, self.warmed = [], []

    def warm_up(self, height: int, width: int) -> float:
        self.warmed.append((width, height))
        return 0.0

    def predict(self, left, right, geometry=None):
        raise AssertionError("a warm-up runs the inner estimator at its sizes, not a blank pair through the probe")

    def prepare_size(self, height: int, width: int) -> bool:
        self.prepared.append((width, height))
        return True


def test_prepare_size_builds_the_sizes_the_pair_runs_at_not_the_pairs():
    """The node asks a compiled estimator to build for the camera's size before frames arrive: a
    scaled one must build the enlarged size (and the probe's), or its first frames run eagerly."""
    inner = _Recording()
    assert ScaledEstimator(inner, 1.25).prepare_size(480, 640) and inner.prepared == [(800, 600)]
    inner.prepared.clear()
    assert ScaledEstimator(inner, 1.25, fit_range=True).prepare_size(480, 640)
    assert inner.prepared == [(800, 600), (160, 120)]
    assert not ScaledEstimator(StereoEstimator.load("sgbm", max_disparity=64), 1.5).prepare_size(96, 256)


def test_warm_up_builds_the_sizes_the_pair_runs_at_one_after_another():
    """A blank pair through predict would let the probe pick a scale for a scene that is not there
    (and a compiled network build that size, not the enlarged one): the inner estimator is warmed
    at the enlarged size and the probe's, in turn."""
    inner = _Recording()
    ScaledEstimator(inner, 1.25, fit_range=True).warm_up(480, 640)
    assert inner.warmed == [(800, 600), (160, 120)]

