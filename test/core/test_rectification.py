"""Rectification maps against the pinhole + distortion model by hand, round trips through
`distort`, the torch twin, calibration validation and map caching."""

import cv2
import numpy as np
import pytest
import torch

from stereo_kd_core.rectification import (
    CalibrationError,
    CameraCalibration,
    RectificationMaps,
    StereoRectifier,
    distort,
    raw_coordinates,
    rectified_coordinates,
)

WIDTH, HEIGHT = 160, 120
DISTORTIONS = {
    "plumb_bob": (-0.12, 0.03, 0.001, -0.0015, 0.0),
    "rational_polynomial": (-0.1, 0.02, 0.001, -0.001, 0.0, 0.05, 0.0, 0.0),
    "equidistant": (0.05, -0.01, 0.002, 0.0),
}


def rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    return cv2.Rodrigues(np.radians([rx_deg, ry_deg, rz_deg]))[0]


def make_calibration(model: str = "plumb_bob", r=None, **changes) -> CameraCalibration:
    k = np.array([[110.0, 0, 81.0], [0, 108.0, 58.5], [0, 0, 1]])
    p = np.array([[100.0, 0, 79.5, 0], [0, 100.0, 59.5, 0], [0, 0, 1, 0]])
    r = rotation(0.8, -1.5, 0.3) if r is None else r
    values = dict(width=WIDTH, height=HEIGHT, distortion_model=model, d=DISTORTIONS[model],
                  k=tuple(k.ravel()), r=tuple(np.ravel(r)), p=tuple(p.ravel()))
    values.update(changes)
    return CameraCalibration(**values)


def texture(seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, (HEIGHT, WIDTH)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)  # smooth: bilinear resampling is nearly exact


@pytest.mark.parametrize("model", list(DISTORTIONS))
def test_maps_follow_the_camera_model(model):
    calibration = make_calibration(model)
    raw_x, raw_y = raw_coordinates(calibration)
    assert raw_x.shape == raw_y.shape == (HEIGHT, WIDTH) and raw_x.dtype == np.float32
    k, d, r, p = calibration.K, calibration.D, calibration.R, calibration.P
    for v, u in ((10, 20), (60, 80), (100, 150)):
        # The rectified pixel's ray, rotated back into the raw camera (R maps raw -> rectified).
        ray = r.T @ np.array([(u - p[0, 2]) / p[0, 0], (v - p[1, 2]) / p[1, 1], 1.0])
        x, y = ray[0] / ray[2], ray[1] / ray[2]
        if model == "equidistant":
            radius = np.hypot(x, y)
            theta = np.arctan(radius)
            theta_d = theta * (1 + d[0] * theta**2 + d[1] * theta**4 + d[2] * theta**6 + d[3] * theta**8)
            xd, yd = x * theta_d / radius, y * theta_d / radius
        else:
            k1, k2, p1, p2, k3 = d[:5]
            k4, k5, k6 = d[5:] if len(d) == 8 else (0.0, 0.0, 0.0)
            r2 = x * x + y * y
            radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
            xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
            yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        expected = (k[0, 0] * xd + k[0, 2], k[1, 1] * yd + k[1, 2])
        np.testing.assert_allclose((raw_x[v, u], raw_y[v, u]), expected, atol=1e-3)


def smooth_scene(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth analytic image (wavelengths 27-41 px): its value anywhere is exact."""
    return (127 + 60 * np.sin(2 * np.pi * x / 32 + 0.3) * np.cos(2 * np.pi * y / 27)
            + 40 * np.sin(2 * np.pi * (x + y) / 41)).astype(np.float32)


@pytest.mark.parametrize("model", list(DISTORTIONS))
def test_rectifying_a_raw_view_of_an_analytic_scene_gives_the_scene(model):
    calibration = make_calibration(model)
    # The raw image, exactly: each raw pixel shows the scene where it lands after rectification.
    raw = smooth_scene(*rectified_coordinates(calibration))
    rectified = RectificationMaps.build(calibration).remap(raw)
    u, v = np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT))
    inside = np.zeros((HEIGHT, WIDTH), dtype=bool)
    inside[12:-12, 12:-12] = True  # the raw view covers the centre; borders fall outside it
    error = np.abs(rectified - smooth_scene(u, v))[inside]
    # Bilinear sampling of these wavelengths errs by < 1 grey level; a map off by a quarter pixel
    # would err by up to ~6.
    assert np.median(error) < 0.3 and np.percentile(error, 99) < 1.0
    # distort() renders the same raw view by resampling a rectified image (one more interpolation).
    resampled = distort(smooth_scene(u, v), calibration)
    assert np.median(np.abs(resampled - raw)[inside]) < 0.3


def test_identity_calibration_leaves_the_image_unchanged():
    k = (100.0, 0.0, 79.5, 0.0, 100.0, 59.5, 0.0, 0.0, 1.0)
    calibration = CameraCalibration(WIDTH, HEIGHT, "plumb_bob", (0.0,) * 5, k, tuple(np.eye(3).ravel()),
                                    (100.0, 0.0, 79.5, 0.0, 0.0, 100.0, 59.5, 0.0, 0.0, 0.0, 1.0, 0.0))
    image = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    np.testing.assert_array_equal(RectificationMaps.build(calibration).remap(image), image)


def test_grid_sample_twin_matches_opencv_remap():
    maps = RectificationMaps.build(make_calibration())
    raw = np.random.default_rng(2).uniform(0, 1, (HEIGHT, WIDTH, 3)).astype(np.float32)
    expected = cv2.remap(raw, maps.raw_x, maps.raw_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    tensor = torch.from_numpy(raw).permute(2, 0, 1)[None]  # (1, 3, H, W)
    result = maps.grid_sample(tensor)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(result, expected, atol=1e-4)
    fixed_point = maps.remap(raw)  # 1/32 px maps: close to the float maps
    assert np.abs(fixed_point - expected).max() < 0.05


@pytest.mark.parametrize("changes, reason, message", [
    ({"k": (0.0,) * 9}, "uncalibrated", "K is all zero"),
    ({"p": (0.0,) * 12}, "uncalibrated", "P is all zero"),
    ({"width": 0, "height": 0}, "uncalibrated", "0x0"),
    ({"d": (0.1, 0.0, 0.0, 0.0)}, "bad_distortion", "plumb_bob needs 5 distortion coefficients, D has 4"),
    ({"d": ()}, "bad_distortion", "D has 0"),
    ({"distortion_model": "kannala"}, "bad_distortion", "'kannala' is not supported"),
    ({"r": tuple((2 * np.eye(3)).ravel())}, "bad_rotation", "R is not a rotation"),
    ({"r": tuple(np.diag([1.0, 1.0, -1.0]).ravel())}, "bad_rotation", "det R = -1"),  # a reflection
    ({"r": (0.0,) * 9}, "bad_rotation", "R is not a rotation"),
])
def test_uncalibrated_camera_infos_are_refused_with_their_reason(changes, reason, message):
    with pytest.raises(CalibrationError, match=message) as error:
        make_calibration(**changes)
    assert error.value.reason == reason


def test_maps_are_rebuilt_only_when_a_calibration_changes():
    rectifier = StereoRectifier()
    left, right = make_calibration(), make_calibration(r=rotation(-0.5, 1.2, 0.0))
    first = rectifier.maps("left", left), rectifier.maps("right", right)
    assert rectifier.builds == 2
    again = rectifier.maps("left", make_calibration()), rectifier.maps("right", right)  # equal values
    assert rectifier.builds == 2 and again[0] is first[0] and again[1] is first[1]
    moved = make_calibration(r=rotation(0.8, -1.4, 0.3))
    assert rectifier.maps("left", moved) is not first[0] and rectifier.builds == 3


def raw_stereo_pair(dtype=np.uint8, mono=False, shift=8):
    """A fronto-parallel textured plane at `shift` px disparity, as two raw cameras with
    different distortion and rotation see it; returns the raw images and both cameras' maps."""
    full = 255.0 if dtype == np.uint8 else 4095.0  # 12-bit data in mono16
    scene = cv2.resize(texture(3), (WIDTH + shift, HEIGHT)) * (full / 255.0)
    rectified = (scene[:, :-shift], scene[:, shift:])  # right[x - shift] = left[x]
    calibrations = (make_calibration(), make_calibration(r=rotation(-0.6, 1.2, -0.4), k=(112.0, 0, 79.0, 0, 109.0,
                                                                                         60.5, 0, 0, 1)))
    raws = []
    for image, calibration in zip(rectified, calibrations, strict=True):
        raw = np.rint(distort(image.astype(np.float32), calibration)).astype(dtype)
        raws.append(raw if mono else np.repeat(raw[..., None], 3, axis=2))
    return raws, tuple(RectificationMaps.build(c) for c in calibrations)


@pytest.mark.parametrize("model", ["dsnet-fast", "dsnet-faster-x1.25"])
@pytest.mark.parametrize("dtype, mono, size", [(np.uint8, False, None), (np.uint8, False, (80, 60)),
                                               (np.uint16, True, (120, 90))])
def test_rectifying_on_the_estimator_device_matches_opencv(dtype, mono, size, model):
    """The device path (grid_sample + area resize in torch, run here on the CPU: on a GPU only the
    device differs) gives the images and disparity of the OpenCV path; for the default, a network
    run at a scale of its own, the raw pair is rectified and resized straight to the sizes it runs
    at (the probe's and the enlarged pair's)."""
    from stereo_kd_core import StereoEstimator

    (left, right), maps = raw_stereo_pair(dtype, mono)
    estimator = StereoEstimator.load(model, device="cpu", precision="fp32")
    assert estimator.can_rectify_on_device and not estimator.rectifies_on_device
    reference = estimator.predict_raw(left, right, maps, size, rectified_left=True)
    estimator.rectifies_on_device = True
    result = estimator.predict_raw(left, right, maps, size, rectified_left=True)

    expected_shape = (HEIGHT, WIDTH) if size is None else (size[1], size[0])
    for name in ("left", "rectified_left"):
        got, want = getattr(result, name), getattr(reference, name)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert got.ndim == (2 if mono else 3)
    assert result.left.shape[:2] == result.prediction.disparity.shape == expected_shape
    # OpenCV's maps are fixed point (1/32 px) and its area resize differs from torch's at
    # fractional scales by rounding: a few grey levels at most, none on average.
    unit = 1 if dtype == np.uint8 else 4095 / 255
    difference = np.abs(result.rectified_left.astype(float) - reference.rectified_left)
    assert difference.max() <= 3 * unit and difference.mean() < 0.3 * unit
    assert difference.max() > 0  # torch's resampling on the device, not OpenCV's again
    difference = np.abs(result.left.astype(float) - reference.left)
    assert difference.max() <= 3 * unit and difference.mean() < 0.3 * unit
    # Disparity: the same, up to those resampling differences (border pixels see outside the raw image).
    scale = 1.0 if size is None else size[0] / WIDTH
    margin = max(2, round(12 * scale))
    inner = (slice(margin, -margin), slice(margin, -margin))
    error = np.abs(result.prediction.disparity - reference.prediction.disparity)[inner]
    assert np.median(error) < 0.05 and np.percentile(error, 95) < 0.3, (np.median(error), np.percentile(error, 95))
    truth = 8 * scale
    assert abs(np.median(result.prediction.disparity[inner]) - truth) < 0.5


def test_predict_raw_on_the_cpu_is_remap_resize_predict():
    from stereo_kd_core import StereoEstimator

    (left, right), maps = raw_stereo_pair()
    sgbm = StereoEstimator.load("sgbm", max_disparity=32)
    result = sgbm.predict_raw(left, right, maps, (120, 90))
    small = [cv2.resize(m.remap(image), (120, 90), interpolation=cv2.INTER_AREA)
             for m, image in zip(maps, (left, right), strict=True)]
    np.testing.assert_array_equal(result.left, small[0])
    np.testing.assert_array_equal(result.prediction.disparity, sgbm.predict(*small).disparity)
    assert result.rectified_left is None
    with pytest.raises(ValueError, match="calibration is for 160x120"):
        sgbm.predict_raw(left[:-2], right[:-2], maps)


def test_maps_with_rows_moved_rectify_as_the_rows_moved_after_rectifying():
    """A right camera's maps moved by a RowShift give, in one remap, the rectified view brought onto
    the left's rows (row_alignment.onto_left_rows after remap): within a grey level (OpenCV's 1/32 px
    fixed-point maps) for whole pixels, within interpolation for a sub-pixel tilt."""
    from stereo_kd_core.row_alignment import RowShift, onto_left_rows

    (_, right), (_, maps) = raw_stereo_pair()
    assert maps.with_rows_moved(RowShift()) is maps
    inside = (slice(8, -8), slice(8, -8))
    moved = maps.with_rows_moved(RowShift(2.0)).remap(right)
    np.testing.assert_allclose(moved[inside], onto_left_rows(maps.remap(right), RowShift(2.0))[inside], atol=1)
    tilted = maps.with_rows_moved(RowShift(0.3, 1.2, -0.4)).remap(right).astype(np.float32)
    expected = onto_left_rows(maps.remap(right), RowShift(0.3, 1.2, -0.4)).astype(np.float32)
    assert np.abs(tilted - expected)[inside].mean() < 2.0
    assert np.abs(tilted - maps.remap(right))[inside].mean() > 4 * np.abs(tilted - expected)[inside].mean()
