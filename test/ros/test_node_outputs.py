"""The node over real DDS on the analytic plane + box scene: DisparityImage fields, disparity
against truth, point cloud against the pinhole model, optional depth/confidence outputs."""

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, StereoHarness, wait_until
from rclpy.parameter import Parameter
from stereo_scene import make_scene

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE
from stereo_kd_core.estimator import SGBMEstimator
from stereo_kd_ros.conversions import disparity_from_msg, point_cloud_to_numpy, unpack_rgb
from stereo_kd_ros.parameters import scaled_search_range

ROS_DOMAIN_ID = 141 + TEST_DOMAIN_OFFSET
CX_OFFSET = 2.0  # cx_left - cx_right: exercises the Q term stereo_image_proc also applies


@pytest.fixture(scope="module")
def scene():
    return make_scene(cx_offset=CX_OFFSET)


def run_one_pair(harness, scene, encoding="mono8", stamp_sec=1):
    stamp = Time(sec=stamp_sec, nanosec=500)
    harness.send_infos(*scene.camera_infos(stamp))
    before = harness.count("points2")
    harness.send_images(*scene.images(stamp, encoding=encoding))
    assert wait_until(lambda: harness.count("points2") > before and harness.count("disparity") > before)
    return harness.last("disparity"), harness.last("points2")


def test_disparity_image_matches_scene(make_harness, scene):
    harness = make_harness(publish_depth=True, publish_confidence=True)
    disparity_msg, _ = run_one_pair(harness, scene)

    assert disparity_msg.header.frame_id == "left_optical"
    assert (disparity_msg.header.stamp.sec, disparity_msg.header.stamp.nanosec) == (1, 500)
    assert disparity_msg.image.encoding == "32FC1"
    assert disparity_msg.f == pytest.approx(scene.focal_px)
    assert disparity_msg.t == pytest.approx(scene.baseline_m)
    # Values are shifted by cx_left - cx_right (Z = f T / d); SGBM searches raw [0, 31].
    assert disparity_msg.min_disparity == pytest.approx(0 - CX_OFFSET)
    assert disparity_msg.max_disparity == pytest.approx(31 - CX_OFFSET)
    assert disparity_msg.delta_d == pytest.approx(1 / 16)

    raw = np.frombuffer(disparity_msg.image.data, dtype=np.float32).reshape(scene.left.shape)
    published = disparity_from_msg(disparity_msg)
    valid = np.isfinite(published)
    assert np.all(raw[~valid] < disparity_msg.min_disparity)  # invalid: below the valid range
    # SGBM on exact integer shifts of a random texture is exact up to its 1/16 px step; allow
    # half a pixel for sub-pixel interpolation and require nearly every comparable pixel valid.
    truth = scene.disparity - CX_OFFSET
    comparable = scene.comparable
    assert valid[comparable].mean() > 0.98
    error = np.abs(published - truth)[comparable & valid]
    assert np.all(error <= 0.5)
    # SGBM leaves its leftmost max_disparity columns empty: the valid window starts after them.
    window = disparity_msg.valid_window
    rows, cols = np.nonzero(valid)
    assert (window.x_offset, window.y_offset) == (cols.min(), rows.min())
    assert (window.width, window.height) == (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
    assert window.x_offset >= 31

    assert wait_until(lambda: harness.count("depth/image_rect") and harness.count("confidence/image_rect"))
    depth = np.frombuffer(harness.last("depth/image_rect").data, dtype=np.float32).reshape(scene.left.shape)
    expected_depth = disparity_msg.f * disparity_msg.t / published
    np.testing.assert_allclose(depth[valid], expected_depth[valid], rtol=1e-5)
    assert np.all(np.isnan(depth[~valid]))
    confidence = np.frombuffer(harness.last("confidence/image_rect").data, dtype=np.float32).reshape(scene.left.shape)
    assert set(np.unique(confidence)) <= {0.0, 1.0}  # SGBM: valid or not
    np.testing.assert_array_equal(confidence == 1.0, valid)


def test_default_model_is_the_shipped_student(ros_context, scene):
    """No model parameter: the node runs the registry's default student (weights verified by
    SHA-256 at load), dense, with a graded confidence, and close to the truth on the analytic scene."""
    harness = StereoHarness(ros_context, diagnostics_period_s=0.2)
    try:
        assert harness.node.estimator.name == registry.default_model() and harness.node.estimator.backend == "pytorch"
        disparity_msg, _ = run_one_pair(harness, scene)
        published = disparity_from_msg(disparity_msg)
        confidence = harness.node.estimator.predict(scene.left, scene.right).confidence
        assert 0 <= confidence.min() and confidence.max() <= 1 and len(np.unique(confidence)) > 2
        # a network answers everywhere; the default threshold leaves out exactly the less confident pixels
        np.testing.assert_array_equal(np.isfinite(published), confidence >= DEFAULT_MIN_CONFIDENCE)
        assert np.isfinite(published[scene.comparable]).mean() > 0.5
        truth = scene.disparity - CX_OFFSET
        # measured 0.11 px median on this scene (dsnet-fast: 0.14); an untrained network is off by tens of pixels
        kept = scene.comparable & np.isfinite(published)
        assert np.median(np.abs(published - truth)[kept]) < 1.0
    finally:
        harness.close()


def test_point_cloud_follows_pinhole_model(make_harness, scene):
    harness = make_harness()
    disparity_msg, cloud_msg = run_one_pair(harness, scene, encoding="rgb8")
    height, width = scene.left.shape
    assert (cloud_msg.height, cloud_msg.width, cloud_msg.is_dense) == (height, width, False)
    assert [f.name for f in cloud_msg.fields] == ["x", "y", "z", "rgb"]
    assert [f.offset for f in cloud_msg.fields] == [0, 4, 8, 12]
    assert cloud_msg.point_step == 16 and cloud_msg.row_step == 16 * width

    cloud = point_cloud_to_numpy(cloud_msg)
    disparity = disparity_from_msg(disparity_msg)
    valid = np.isfinite(disparity)
    z = scene.focal_px * scene.baseline_m / disparity
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    np.testing.assert_allclose(cloud[..., 2][valid], z[valid], rtol=1e-5)
    np.testing.assert_allclose(cloud[..., 0][valid], ((u - scene.cx_left) * z / scene.focal_px)[valid],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cloud[..., 1][valid], ((v - scene.cy) * z / scene.focal_px)[valid],
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.isnan(cloud[..., :3][~valid]))
    # Against the analytic scene: plane at f B / (8 - 2) = 1.667 m, box at f B / (16 - 2) = 0.714 m.
    plane = scene.comparable & (scene.disparity == 8)
    box = scene.comparable & (scene.disparity == 16)
    assert np.nanmedian(cloud[..., 2][plane]) == pytest.approx(10.0 / 6, rel=0.01)
    assert np.nanmedian(cloud[..., 2][box]) == pytest.approx(10.0 / 14, rel=0.01)
    grey = np.repeat(scene.left[..., None], 3, axis=2)
    np.testing.assert_array_equal(unpack_rgb(cloud[..., 3]), grey)


def test_runtime_thresholds_and_dense_mode(make_harness, scene):
    harness = make_harness()
    # The plane is at 1.667 m and the box at 0.714 m: a 1 m limit keeps only the box.
    results = harness.node.set_parameters([Parameter("max_depth_m", value=1.0),
                                           Parameter("dense_points", value=True),
                                           Parameter("use_color", value=False)])
    assert all(r.successful for r in results)
    _, cloud_msg = run_one_pair(harness, scene)
    assert cloud_msg.height == 1 and cloud_msg.is_dense
    assert [f.name for f in cloud_msg.fields] == ["x", "y", "z"] and cloud_msg.point_step == 12
    cloud = point_cloud_to_numpy(cloud_msg)[0]
    assert np.all(np.isfinite(cloud)) and np.all(cloud[:, 2] <= 1.0)
    box_pixels = int((scene.comparable & (scene.disparity == 16)).sum())
    assert cloud.shape[0] >= box_pixels

    rejected = harness.node.set_parameters([Parameter("min_depth_m", value=2.0)])  # above max_depth_m
    assert not rejected[0].successful and "max_depth_m" in rejected[0].reason
    out_of_range = harness.node.set_parameters([Parameter("confidence_threshold", value=1.5)])
    assert not out_of_range[0].successful
    read_only = harness.node.set_parameters([Parameter("model", value="dsnet")])
    assert not read_only[0].successful
    assert harness.node.settings.min_depth_m == 0.0
    assert harness.node.settings.confidence_threshold == DEFAULT_MIN_CONFIDENCE


def test_input_scale_halves_outputs_and_keeps_metric_geometry(make_harness):
    # Plane at f B / 12 = 0.833 m and box at f B / 24 = 0.417 m at full size.
    scene = make_scene(width=192, height=128, plane_disparity=12, box_disparity=24, max_disparity=48)
    medians = {}
    for scale in (1.0, 0.5):
        harness = make_harness(input_scale=scale, max_disparity=48)
        disparity_msg, cloud_msg = run_one_pair(harness, scene)
        height, width = round(128 * scale), round(192 * scale)
        assert (disparity_msg.image.height, disparity_msg.image.width) == (height, width)
        assert (cloud_msg.height, cloud_msg.width) == (height, width)
        # Focal length scales with the image, the baseline does not: Z = f T / d stays metric.
        assert disparity_msg.f == pytest.approx(scene.focal_px * scale)
        assert disparity_msg.t == pytest.approx(scene.baseline_m)
        cloud = point_cloud_to_numpy(cloud_msg)
        disparity = disparity_from_msg(disparity_msg)
        valid = disparity > 0  # 0 = a point at infinity: NaN in the cloud
        np.testing.assert_allclose(cloud[..., 2][valid], disparity_msg.f * disparity_msg.t / disparity[valid],
                                   rtol=1e-5)
        # The truth mask at the published resolution (nearest pixel of the full-size scene).
        rows = np.minimum((np.arange(height) + 0.5) / scale, 127).astype(int)
        cols = np.minimum((np.arange(width) + 0.5) / scale, 191).astype(int)
        truth = scene.disparity[np.ix_(rows, cols)]
        comparable = scene.comparable[np.ix_(rows, cols)]
        medians[scale] = {surface: float(np.nanmedian(cloud[..., 2][comparable & (truth == d)]))
                          for surface, d in (("plane", 12), ("box", 24))}
        # x follows the pinhole model of the scaled camera: u' = (u + 0.5) s - 0.5.
        cx = (scene.cx_left + 0.5) * scale - 0.5
        u = np.arange(width)[None, :].repeat(height, axis=0)
        np.testing.assert_allclose(cloud[..., 0][valid], ((u - cx) * cloud[..., 2] / disparity_msg.f)[valid],
                                   rtol=1e-4, atol=1e-6)
        harness.close()
    for surface, depth_m in (("plane", 10.0 / 12), ("box", 10.0 / 24)):
        assert medians[1.0][surface] == pytest.approx(depth_m, rel=0.01)
        assert medians[0.5][surface] == pytest.approx(depth_m, rel=0.03), surface


def test_input_scale_is_validated_and_changeable_at_run_time(make_harness, scene):
    harness = make_harness()
    refused = harness.node.set_parameters([Parameter("input_scale", value=1.5)])
    assert not refused[0].successful and "Min: 0.1" in refused[0].reason and "Max: 1.0" in refused[0].reason
    assert harness.node.set_parameters([Parameter("input_scale", value=0.5)])[0].successful
    disparity_msg, _ = run_one_pair(harness, scene)
    assert (disparity_msg.image.height, disparity_msg.image.width) == (48, 64)
    assert harness.diagnostics()["input_scale"] == "0.5"


def test_sgbm_search_range_follows_input_scale(make_harness, ros_context):
    assert [scaled_search_range(192, s) for s in (1.0, 0.5, 0.3, 0.1)] == [192, 96, 64, 32]
    assert scaled_search_range(32, 0.1) == 16  # never below one SGBM step
    scene = make_scene(width=192, height=128, plane_disparity=12, box_disparity=24, max_disparity=64)
    # Half size: 96x64 pixels, surfaces at 6 and 12 px; the full 64 px range becomes 32 resized pixels.
    harness = make_harness(max_disparity=64, input_scale=0.5)
    assert harness.node.estimator.max_disparity == 32
    scaled_msg, _ = run_one_pair(harness, scene)
    assert (scaled_msg.min_disparity, scaled_msg.max_disparity) == (0.0, 31.0)  # cx offset 0: no shift
    # The same input with the unscaled 64 px range searched on the half-size image (a ready estimator
    # is used as given).
    unscaled = StereoHarness(ros_context, estimator=SGBMEstimator(max_disparity=64), max_disparity=64,
                             input_scale=0.5, diagnostics_period_s=0.2)
    try:
        unscaled_msg, _ = run_one_pair(unscaled, scene)
    finally:
        unscaled.close()
    assert unscaled_msg.max_disparity == 63.0
    scaled_window, unscaled_window = scaled_msg.valid_window, unscaled_msg.valid_window
    # SGBM leaves the first columns of its search range invalid: a smaller range, a wider valid window.
    assert scaled_window.x_offset <= 32 < 63 <= unscaled_window.x_offset
    assert scaled_window.width > unscaled_window.width
    assert scaled_window.x_offset + scaled_window.width == unscaled_window.x_offset + unscaled_window.width

    # Rebuilt when input_scale changes at run time.
    for scale, expected in ((1.0, 64), (0.25, 16)):
        assert harness.node.set_parameters([Parameter("input_scale", value=scale)])[0].successful
        assert harness.node.estimator.max_disparity == expected
        disparity_msg, _ = run_one_pair(harness, scene, stamp_sec=int(10 / scale))
        assert disparity_msg.max_disparity == expected - 1
        assert disparity_msg.image.width == round(192 * scale)


class DevicePointsEstimator(StereoEstimator):
    """SGBM that, like the CUDA network path, also returns the points when given the geometry
    (here marked: x = 7 m), so that the test sees which points the node publishes."""

    def __init__(self):
        self.sgbm = StereoEstimator.load("sgbm", max_disparity=32)
        self.name, self.device, self.precision = "sgbm-points", "cuda", "fp32"
        self.max_disparity, self.min_disparity = 32, 0.0
        self.geometries = []

    def predict(self, left, right, geometry=None):
        prediction = self.sgbm.predict(left, right)
        self.geometries.append(geometry)
        if geometry is not None:
            prediction.points = geometry.points_from_disparity(prediction.disparity)
            prediction.points[..., 0] = np.where(np.isfinite(prediction.points[..., 2]), 7.0, np.nan)
            prediction.confidence[:, : prediction.confidence.shape[1] // 2] = 0.25  # left half less sure
        return prediction


def test_points_computed_by_the_estimator_are_published_with_thresholds_applied(ros_context, scene):
    estimator = DevicePointsEstimator()
    harness = StereoHarness(ros_context, estimator=estimator, max_disparity=32, diagnostics_period_s=0.2)
    try:
        assert all(r.successful for r in harness.node.set_parameters([
            Parameter("confidence_threshold", value=0.5), Parameter("max_depth_m", value=1.0)]))
        disparity_msg, cloud_msg = run_one_pair(harness, scene)
        assert estimator.geometries[-1].fx == pytest.approx(scene.focal_px)  # the geometry was handed over
        cloud = point_cloud_to_numpy(cloud_msg)
        half = scene.left.shape[1] // 2
        assert np.all(np.isnan(cloud[:, :half, :3]))  # confidence 0.25 < 0.5: invalid everywhere
        assert np.all(np.isnan(disparity_from_msg(disparity_msg)[:, :half]))
        kept = np.isfinite(cloud[..., 2])
        assert kept.any() and np.all(cloud[..., 0][kept] == 7.0)  # the estimator's points, not recomputed
        assert np.all(cloud[..., 2][kept] <= 1.0)  # max_depth_m applied: only the box (0.714 m) is left
        box = scene.comparable & (scene.disparity == 16)
        box[:, :half] = False
        assert kept[box].mean() > 0.9
    finally:
        harness.close()
