"""StereoEstimator seam: the sgbm backend on a scene with known disparity, and input checks."""

import numpy as np
import pytest

from stereo_kd_core import StereoEstimator


def textured_pair(height=96, width=160, shift=12, seed=0):
    """Right image = left shifted by `shift` px: true disparity is `shift` everywhere it is visible."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height, width + shift), dtype=np.uint8)
    left = base[:, 0:width]                # left(x) = base(x)
    right = base[:, shift:shift + width]   # right(x - shift) = base(x) = left(x)
    return np.repeat(left[..., None], 3, 2), np.repeat(right[..., None], 3, 2)


def test_sgbm_recovers_a_constant_shift():
    left, right = textured_pair()
    est = StereoEstimator.load("sgbm", max_disparity=32)
    out = est.predict(left, right)
    assert out.disparity.dtype == np.float32 and out.disparity.shape == left.shape[:2]
    valid = np.isfinite(out.disparity)
    assert valid.mean() > 0.7  # all but SGBM's left band of max_disparity columns
    assert np.median(np.abs(out.disparity[valid] - 12.0)) < 0.25
    assert set(np.unique(out.confidence)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out.confidence > 0, valid)


def test_sgbm_accepts_mono_and_uint16():
    left, right = textured_pair()
    est = StereoEstimator.load("sgbm", max_disparity=32)
    mono = est.predict(left[..., 0], right[..., 0]).disparity
    deep = est.predict(left.astype(np.uint16) * 257, right.astype(np.uint16) * 257).disparity
    np.testing.assert_allclose(np.nan_to_num(mono, nan=-1), np.nan_to_num(deep, nan=-1))


@pytest.mark.parametrize("left_shape, right_shape, dtype, message", [
    ((32, 48, 3), (32, 40, 3), np.uint8, "differ"),
    ((32, 48, 4), (32, 48, 4), np.uint8, "HxW or HxWx3"),
    ((32, 48, 3), (32, 48, 3), np.float32, "uint8 or uint16"),
])
def test_bad_inputs_get_specific_errors(left_shape, right_shape, dtype, message):
    est = StereoEstimator.load("sgbm", max_disparity=32)
    with pytest.raises(ValueError, match=message):
        est.predict(np.zeros(left_shape, dtype), np.zeros(right_shape, dtype))


def test_unknown_model_lists_known_names_and_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="Known models: .*sgbm"):
        StereoEstimator.load("no-such-model")
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        StereoEstimator.load(str(missing))
    with pytest.raises(ValueError, match="precision"):
        StereoEstimator.load("sgbm", precision="int3")


def test_sgbm_refuses_images_narrower_than_its_search_range():
    est = StereoEstimator.load("sgbm", max_disparity=16)
    assert est.min_input_width == 17
    narrow = np.zeros((20, 15, 3), np.uint8)  # OpenCV itself would crash on this
    with pytest.raises(ValueError, match="needs at least 17 columns"):
        est.predict(narrow, narrow)
    ok = np.random.default_rng(0).integers(0, 256, (20, 17, 3), dtype=np.uint8)
    assert est.predict(ok, ok).disparity.shape == (20, 17)


def test_network_estimator_points_uint16_and_compile_fallback(tmp_path, monkeypatch):
    import torch

    from stereo_kd_core.checkpoint import save_checkpoint
    from stereo_kd_core.geometry import StereoGeometry
    from stereo_kd_core.models import build_model, default_config

    config = default_config("dsnet-fast", max_disparity=64)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "fast.pt", build_model(config), config)
    left, right = textured_pair(height=40, width=72, shift=6)
    geometry = StereoGeometry.from_intrinsics(80.0, 36.0, 20.0, 0.1, cx_right=38.0)

    eager = StereoEstimator.load(str(path), device="cpu", max_disparity=64)
    out = eager.predict(left, right, geometry=geometry)
    assert out.disparity.shape == out.confidence.shape == (40, 72)
    assert np.all((out.confidence >= 0) & (out.confidence <= 1))
    # points come back with the prediction, equal to core's NumPy geometry on the same disparity
    np.testing.assert_allclose(out.points, geometry.points_from_disparity(out.disparity), rtol=1e-5, atol=1e-6)
    deep = eager.predict(left.astype(np.uint16) * 257, right.astype(np.uint16) * 257)
    np.testing.assert_allclose(deep.disparity, out.disparity, atol=0.05)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = StereoEstimator.load(str(path), device="cpu", max_disparity=64, compile=True)
    assert fallback.compiled is False
    np.testing.assert_array_equal(fallback.predict(left, right).disparity, out.disparity)


def test_channels_last_on_the_cpu_changes_the_layout_not_the_result():
    """The shipped model's measured CPU default may be channels_last weights: the same numbers."""
    import torch

    left, right = textured_pair(height=64, width=96, shift=5, seed=3)
    plain = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32", channels_last=False)
    nhwc = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32", channels_last=True)
    assert not plain.channels_last and nhwc.channels_last
    convolutions = [m for m in nhwc.inference_network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    expected, got = plain.predict(left, right), nhwc.predict(left, right)
    np.testing.assert_allclose(got.disparity, expected.disparity, atol=1e-3)
    np.testing.assert_allclose(got.confidence, expected.confidence, atol=1e-4)
    assert np.median(np.abs(expected.disparity[:, 20:] - 5)) < 0.5  # and the shipped network finds the shift


def test_the_cpu_inference_copy_runs_pointwise_3d_convolutions_as_matrix_products():
    """The estimator's CPU copy swaps its 1x1x1 Conv3d for PointwiseConv3d and its other 3D
    convolutions for OneDnnConv3d (with their ReLU): the network's own eval
    output all the same (fp32), and the network it was given keeps its convolutions."""
    import torch

    from stereo_kd_core.models.blocks import OneDnnConv3d, PointwiseConv3d, onednn_convolution_available

    left, right = textured_pair(height=64, width=96, shift=5, seed=4)
    estimator = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32")
    assert any(isinstance(m, PointwiseConv3d) for m in estimator.inference_network.modules())
    if onednn_convolution_available():  # and the others run by oneDNN directly
        assert any(isinstance(m, OneDnnConv3d) and m.relu for m in estimator.inference_network.modules())
    assert not any(isinstance(m, PointwiseConv3d) for m in estimator.network.modules())
    got = estimator.predict(left, right)
    with torch.inference_mode():
        images = [torch.from_numpy(v).permute(2, 0, 1)[None].float() / 255 for v in (left, right)]
        disparity, confidence = estimator.network(*images)
    np.testing.assert_allclose(got.disparity, disparity[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(got.confidence, confidence[0].numpy(), atol=1e-3)


def test_twelve_bit_mono16_matches_eight_bit():
    left, right = textured_pair()
    est = StereoEstimator.load("sgbm", max_disparity=32)
    eight = est.predict(left[..., 0], right[..., 0]).disparity
    twelve = est.predict(left[..., 0].astype(np.uint16) * 16, right[..., 0].astype(np.uint16) * 16).disparity
    np.testing.assert_allclose(np.nan_to_num(twelve, nan=-1), np.nan_to_num(eight, nan=-1))
