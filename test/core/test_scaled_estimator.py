"""`input_scale`: an estimator run on the pair resized by a factor, its disparity brought back to
the pair's size and pixels (stereo_kd_core.scaled_estimator)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stereo_kd_core import StereoEstimator
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.scaled_estimator import ScaledEstimator, SmallPairs, disparity_to_size

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
    estimator = StereoEstimator.load("sgbm", max_disparity=64, input_scale=scale, align_rows=False)
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



REFERENCE = SmallPairs(384 * 640, 2.0)  # the shipped default's small_pairs: like 384x640, at most x2


def _small_pairs_estimator(inner: StereoEstimator, scale: float = 1.25, caller: float = 1.0) -> ScaledEstimator:
    return ScaledEstimator(inner, scale * caller, fit_range=True,
                           small_pairs=REFERENCE.composed(scale * caller, caller))


@pytest.mark.parametrize(("height", "width", "expected"), [
    (384, 640, 1.25), (480, 640, 1.25), (375, 1242, 1.25),  # the reference and larger: the model's own scale
    (381, 432, 1.375),   # a Middlebury 2001 pair: (384000 - 216 x 190) / 164592 = 2.08 -> 1.44 -> 1.375
    (300, 400, 1.625),   # (384000 - 200 x 150) / 120000 = 2.95 -> 1.72 -> 1.625
    (240, 320, 2.0),     # (384000 - 160 x 120) / 76800 = 4.75 -> 2.18: at most 2
])
def test_a_small_pair_may_run_enlarged_to_the_pixels_and_time_of_the_reference_size(height, width, expected):
    """small_pairs: a pair with fewer pixels than 384x640 may be enlarged beyond 1.25 until it and its
    probe (at 1/2 for such a pair) have about the pixels of a 384x640 pair enlarged by 1.25; the
    scales are grid scales (rounded down), at most max_scale."""
    scaled = _small_pairs_estimator(StereoEstimator.load("sgbm", max_disparity=64))
    assert scaled.pair_scale(height, width) == expected
    network, probe = scaled.run_sizes(height, width)
    assert network == (round(width * expected), round(height * expected))
    small = expected > 1.25
    assert probe == ((max(128, round(width / 2)), round(height * max(128, round(width / 2)) / width)) if small
                     else (max(128, round(width / 4)), round(height * max(128, round(width / 4)) / width)))
    if small:  # the time of the reference size: the enlarged pair and its probe have no more pixels
        assert network[0] * network[1] + probe[0] * probe[1] <= 1.01 * 480 * 800


def test_sizes_around_the_reference_never_run_more_pixels_than_it():
    """Over sizes from tiny to twice the reference: a small pair and its probe never run more pixels
    than a 384x640 pair at 1.25 (1 % for rounding), and none runs below the model's own scale."""
    scaled = _small_pairs_estimator(StereoEstimator.load("sgbm", max_disparity=64))
    for height in range(64, 769, 37):
        for width in range(96, 1281, 53):
            scale = scaled.pair_scale(height, width)
            assert 1.25 <= scale <= 2.0
            if scale > 1.25:
                (w, h), (pw, ph) = scaled.run_sizes(height, width)
                assert w * h + pw * ph <= 1.01 * 480 * 800, (height, width, scale)


def test_a_small_pair_is_enlarged_only_as_far_as_its_nearest_point_fits():
    """The probe's 98th percentile keeps the usual scene inside the trained range; a small pair's
    further enlargement also needs its largest disparity inside it (at 1/4 the probe missed thin
    near objects, which then fell out of range: the generated split lost 1.345 -> 1.411 px)."""
    scaled = _small_pairs_estimator(StereoEstimator.load("sgbm", max_disparity=64))  # trained range 51.2 px
    far = np.full((60, 80), 10.0, np.float32)
    assert scaled._fitted_scale(far, 240, 320) == 2.0  # 51.2 / 10 fits 2
    near_strip = far.copy()
    near_strip[:, :1] = 34.0  # 1.25 % of the pixels: beyond the 98th percentile
    assert scaled._fitted_scale(near_strip, 240, 320) == 1.5  # 51.2 / 34 = 1.506
    nearer = far.copy()
    nearer[:, :1] = 60.0
    assert scaled._fitted_scale(nearer, 240, 320) == 1.25  # not below the model's own scale for it
    assert scaled._fitted_scale(nearer, 384, 640) == 1.25 and scaled._fitted_scale(far, 384, 640) == 1.25
    near = np.full((60, 80), 45.0, np.float32)
    assert scaled._fitted_scale(near, 240, 320) == 1.125  # the usual fit: 51.2 / 45 -> 1.125


def test_the_shipped_default_runs_a_small_pair_at_twice_its_size_and_answers_in_its_pixels():
    """The registry default enlarges a 96x256 pair by 2 (its probe at 1/2, 128 px wide), and the shift
    comes back in the pair's pixels; a caller's input_scale multiplies both bounds."""
    left, right = shifted_pair()
    default = StereoEstimator.load("dsnet-faster-x1.25", device="cpu", precision="fp32")
    assert default.small_pairs is not None and default.scale_for(left, right) == 2.0
    disparity = default.predict(left, right).disparity
    assert disparity.shape == (HEIGHT, WIDTH)
    assert np.median(disparity[:, 32:]) == pytest.approx(SHIFT_PX, abs=0.5)
    halved = StereoEstimator.load("dsnet-faster-x1.25", device="cpu", precision="fp32", input_scale=0.5)
    assert halved.pair_scale(HEIGHT, WIDTH) == 1.0 and halved.pair_scale(384, 640) == 0.625
    # (96000 - 160 x 96) / 61440 = 1.31 -> 1.125, at most 0.5 x 2
    assert halved.pair_scale(192, 320) == 1.0 and halved.pair_scale(240, 320) == 1.0


def test_small_pairs_needs_a_probe_and_a_well_formed_entry():
    sgbm = StereoEstimator.load("sgbm", max_disparity=64)
    with pytest.raises(ValueError, match="small_pairs needs fit_range"):
        ScaledEstimator(sgbm, 1.25, small_pairs=REFERENCE)
    assert SmallPairs.from_entry(None) is None
    assert SmallPairs.from_entry({"like": [384, 640], "max_scale": 2}) == REFERENCE
    for bad in ({"like": [384], "max_scale": 2}, {"like": [384, 640]}, {"like": [0, 640], "max_scale": 2},
                {"like": [384, 640], "max_scale": 9}):
        with pytest.raises(ValueError, match="small_pairs"):
            SmallPairs.from_entry(bad)


def test_pairs_shrunk_by_the_caller_are_not_enlarged_back():
    """The node shrinks a 640x480 camera's pair to 320x240 at input_scale 0.5 for speed: sized by the
    shrunk pair alone, small_pairs would enlarge it back by 2; the view for pairs shrunk by 0.5 has a
    quarter of the allowance (as load(input_scale=0.5) composes it) and runs it at 1.25, while a
    320x240 camera's own pair still runs at 2. The view shares the inner estimator."""
    scaled = _small_pairs_estimator(StereoEstimator.load("sgbm", max_disparity=64))
    assert scaled.pair_scale(240, 320) == 2.0
    shrunk = scaled.for_pairs_shrunk_by(0.5)
    assert shrunk.pair_scale(240, 320) == 1.25 and shrunk.inner is scaled.inner
    assert shrunk.small_pairs == SmallPairs(round(REFERENCE.composed(1.25, 1.0).pixels / 4), 2.0)
    assert shrunk.pair_scale(120, 160) == 2.0  # a 320x240 camera shrunk by 0.5: the quarter allowance
    assert scaled.pair_scale(240, 320) == 2.0  # the original is unchanged
    assert scaled.for_pairs_shrunk_by(1.0) is scaled
    plain = ScaledEstimator(StereoEstimator.load("sgbm", max_disparity=64), 1.25)
    assert plain.for_pairs_shrunk_by(0.5) is plain
