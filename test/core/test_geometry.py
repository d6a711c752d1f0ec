"""Camera geometry against hand-computed values and image_geometry's Q convention."""

import numpy as np
import pytest

from stereo_kd_core.geometry import PinholeCamera, StereoGeometry, nan_where_invalid

FX, FY, CX_L, CX_R, CY, BASELINE = 500.0, 480.0, 320.5, 330.5, 240.25, 0.12


def make_geometry() -> StereoGeometry:
    p_left = np.array([[FX, 0, CX_L, 0], [0, FY, CY, 0], [0, 0, 1, 0]])
    p_right = np.array([[FX, 0, CX_R, -FX * BASELINE], [0, FY, CY, 0], [0, 0, 1, 0]])
    return StereoGeometry.from_projections(p_left.ravel(), p_right.ravel())


def test_from_projections_reads_baseline_and_centres():
    g = make_geometry()
    assert (g.fx, g.fy, g.cx_left, g.cx_right, g.cy) == (FX, FY, CX_L, CX_R, CY)
    assert g.baseline_m == pytest.approx(BASELINE)
    assert g.disparity_offset == pytest.approx(CX_L - CX_R)


def test_q_matrix_reprojects_like_the_closed_form():
    g = make_geometry()
    u, v, d = 100.0, 50.0, 30.0
    x, y, z, w = g.Q @ np.array([u, v, d, 1.0])
    z_expected = FX * BASELINE / (d - (CX_L - CX_R))   # 500 * 0.12 / 40 = 1.5 m
    assert z / w == pytest.approx(z_expected)
    assert x / w == pytest.approx((u - CX_L) * z_expected / FX)
    assert y / w == pytest.approx((v - CY) * z_expected / FY)


def test_points_and_depth_match_q_and_mark_invalid():
    g = make_geometry()
    disparity = np.full((4, 6), 30.0, dtype=np.float32)
    disparity[0, 0] = np.nan
    disparity[1, 1] = -10.0          # shifted disparity 0: point at infinity -> invalid
    disparity[2, 2] = -20.0          # negative shifted disparity -> invalid
    points = g.points_from_disparity(disparity)
    depth = g.depth_from_disparity(disparity)
    assert points.dtype == np.float32 and points.shape == (4, 6, 3)
    for r, c in [(0, 0), (1, 1), (2, 2)]:
        assert np.isnan(depth[r, c]) and np.all(np.isnan(points[r, c]))
    for r, c in [(3, 5), (0, 4)]:
        homogeneous = g.Q @ np.array([c, r, disparity[r, c], 1.0])
        np.testing.assert_allclose(points[r, c], homogeneous[:3] / homogeneous[3], rtol=1e-5)
        assert depth[r, c] == pytest.approx(1.5, rel=1e-6)
    np.testing.assert_allclose(g.depth_to_disparity(depth)[3, 5], 30.0, rtol=1e-6)
    # written into the x y z fields of an x y z rgb cloud (a strided view): the same values,
    # and the rgb field untouched
    cloud = np.full((4, 6, 4), 7.0, dtype=np.float32)
    g.points_from_disparity(disparity, out=cloud[..., :3])
    np.testing.assert_array_equal(cloud[..., :3], points)
    assert np.all(cloud[..., 3] == 7.0)


def test_nan_where_invalid_keeps_valid_values_bit_for_bit():
    values = np.array([[1e-30, -2.5, np.inf], [3.0, np.nan, 1e30]], dtype=np.float32)
    valid = np.array([[True, False, True], [True, True, False]])
    masked = values * nan_where_invalid(valid)
    assert masked.dtype == np.float32
    np.testing.assert_array_equal(masked[valid], values[valid])  # inf and NaN stay what they were
    assert np.isnan(masked[~valid]).all()


@pytest.mark.parametrize("field, value, message", [
    ("p_left_fx", 0.0, "focal"),
    ("p_right_tx", 0.0, "zero baseline"),
    ("p_right_tx", +60.0, "negative baseline"),
    ("p_left_cx", float("nan"), "NaN or inf"),
])
def test_bad_projections_are_refused_with_a_specific_message(field, value, message):
    p_left = np.array([[FX, 0, CX_L, 0], [0, FY, CY, 0], [0, 0, 1, 0]])
    p_right = np.array([[FX, 0, CX_R, -FX * BASELINE], [0, FY, CY, 0], [0, 0, 1, 0]])
    if field == "p_left_fx":
        p_left[0, 0] = value
    elif field == "p_right_tx":
        p_right[0, 3] = value
    else:
        p_left[0, 2] = value
    with pytest.raises(ValueError, match=message):
        StereoGeometry.from_projections(p_left, p_right)


def test_scaled_geometry_keeps_depth_of_a_point():
    g = make_geometry()
    half = g.scaled(0.5)
    # a point at depth 1.5 m has disparity 30 px at full size (offset -10) ...
    z = g.depth_from_disparity(np.array([[30.0]], np.float32))[0, 0]
    # ... and half the shifted disparity at half size
    d_half = (30.0 - g.disparity_offset) * 0.5 + half.disparity_offset
    assert half.depth_from_disparity(np.array([[d_half]], np.float32))[0, 0] == pytest.approx(z, rel=1e-5)
    assert half.fx == FX / 2 and half.cx_left == pytest.approx((CX_L + 0.5) / 2 - 0.5)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_left_camera_back_projects_depth_to_the_points(scale):
    g = make_geometry().scaled(scale)
    height, width = round(480 * scale), round(640 * scale)
    camera = g.left_camera(width, height)
    assert isinstance(camera, PinholeCamera) and (camera.width, camera.height) == (width, height)
    np.testing.assert_array_equal(camera.K, [[g.fx, 0, g.cx_left], [0, g.fy, g.cy], [0, 0, 1]])
    np.testing.assert_array_equal(camera.P, np.hstack([camera.K, np.zeros((3, 1))]))  # Tx = Ty = 0
    rng = np.random.default_rng(0)
    disparity = rng.uniform(-5.0, 60.0, size=(height, width)).astype(np.float32)  # some invalid
    points = g.points_from_disparity(disparity)
    z = points[..., 2]
    # depth_image_proc's model, from K alone: X = (u - cx) Z / fx, Y = (v - cy) Z / fy.
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    (fx, _, cx), (_, fy, cy) = camera.K[0], camera.K[1]
    np.testing.assert_allclose(points[..., 0], (u - cx) * z / fx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(points[..., 1], (v - cy) * z / fy, rtol=1e-5, atol=1e-6)
    # and projecting a point with P lands on its own pixel
    r, c = np.argwhere(np.isfinite(z))[0]
    projected = camera.P @ np.append(points[r, c], 1.0)
    np.testing.assert_allclose(projected[:2] / projected[2], [c, r], atol=1e-3)
