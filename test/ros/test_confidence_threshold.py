"""The node's confidence_threshold over real DDS: its default is core's DEFAULT_MIN_CONFIDENCE, and
it removes exactly the pixels below it (and keeps those at or above it) in every output:
disparity, points2 and depth; the confidence image itself is published unchanged, at full size."""

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, wait_until
from rclpy.parameter import Parameter
from stereo_scene import make_scene

from stereo_kd_core import StereoEstimator, StereoPrediction
from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE
from stereo_kd_core.data.bag import image_to_numpy
from stereo_kd_ros.conversions import disparity_from_msg, point_cloud_to_numpy

ROS_DOMAIN_ID = 158 + TEST_DOMAIN_OFFSET
DISPARITY_PX = 8.0
OUTPUTS = ("disparity", "points2", "depth/image_rect", "confidence/image_rect", "/diagnostics")


def confidence_pattern(height: int, width: int) -> np.ndarray:
    """Confidence values on both sides of every threshold tried, and exactly at them, per column:
    a float32 ramp from 0 to 1 plus the exact values 0.5, the default and float32's neighbours."""
    confidence = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    exact = np.array([0.5, DEFAULT_MIN_CONFIDENCE, np.nextafter(np.float32(DEFAULT_MIN_CONFIDENCE), np.float32(0)),
                      np.nextafter(np.float32(DEFAULT_MIN_CONFIDENCE), np.float32(1)), 0.8], dtype=np.float32)
    confidence[::3, : exact.size] = exact
    return confidence


class PatternEstimator(StereoEstimator):
    """A constant disparity (valid everywhere) with `confidence_pattern`; points as a network's
    estimator computes them (from the geometry it is handed)."""

    name, backend, device, precision, max_disparity = "pattern", "python", "cpu", "fp32", 32

    def predict(self, left, right, geometry=None):
        height, width = left.shape[:2]
        disparity = np.full((height, width), DISPARITY_PX, dtype=np.float32)
        return StereoPrediction(disparity=disparity, confidence=confidence_pattern(height, width),
                                points=None if geometry is None else geometry.points_from_disparity(disparity))


@pytest.fixture(scope="module")
def scene():
    return make_scene()


def outputs_of_one_pair(harness, scene, stamp_sec: int) -> dict[str, np.ndarray]:
    stamp = Time(sec=stamp_sec)
    harness.send_infos(*scene.camera_infos(stamp))
    harness.send_images(*scene.images(stamp))
    topics = ("disparity", "points2", "depth/image_rect", "confidence/image_rect")

    def arrived() -> bool:
        with harness._lock:
            return all(any(m.header.stamp.sec == stamp_sec for m in harness.received[t]) for t in topics)

    assert wait_until(arrived), "not every output arrived"
    with harness._lock:
        msgs = {t: next(m for m in harness.received[t] if m.header.stamp.sec == stamp_sec) for t in topics}
    return {"disparity": disparity_from_msg(msgs["disparity"]),
            "points2": point_cloud_to_numpy(msgs["points2"])[..., :3],
            "depth": image_to_numpy(msgs["depth/image_rect"], ("32FC1",)),
            "confidence": image_to_numpy(msgs["confidence/image_rect"], ("32FC1",))}


def assert_removed_exactly_below(outputs: dict[str, np.ndarray], threshold: float) -> None:
    height, width = outputs["disparity"].shape
    confidence = confidence_pattern(height, width)
    np.testing.assert_array_equal(outputs["confidence"], confidence)  # full size, unchanged
    removed = confidence < np.float32(threshold)
    assert removed.any() or threshold == 0.0
    assert (~removed).any()
    np.testing.assert_array_equal(np.isnan(outputs["disparity"]), removed)
    np.testing.assert_allclose(outputs["disparity"][~removed], DISPARITY_PX)
    for axis in range(3):
        np.testing.assert_array_equal(np.isnan(outputs["points2"][..., axis]), removed)
    np.testing.assert_array_equal(np.isnan(outputs["depth"]), removed)
    assert np.all(outputs["depth"][~removed] > 0)


def test_default_threshold_removes_exactly_the_pixels_below_it(make_harness, scene):
    harness = make_harness(record=OUTPUTS, estimator=PatternEstimator(),
                           publish_depth=True, publish_confidence=True, use_color=False)
    assert harness.node.settings.confidence_threshold == DEFAULT_MIN_CONFIDENCE
    assert_removed_exactly_below(outputs_of_one_pair(harness, scene, 1), DEFAULT_MIN_CONFIDENCE)


@pytest.mark.parametrize("threshold", [0.0, 0.8])
def test_threshold_set_at_run_time_applies_to_every_output(make_harness, scene, threshold):
    harness = make_harness(record=OUTPUTS, estimator=PatternEstimator(),
                           publish_depth=True, publish_confidence=True, use_color=False)
    assert all(r.successful for r in harness.node.set_parameters([Parameter("confidence_threshold",
                                                                            value=threshold)]))
    assert_removed_exactly_below(outputs_of_one_pair(harness, scene, 2), threshold)
