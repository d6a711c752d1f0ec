"""max_disparity with a network (issue 25, D4): a network searches the range it was built for, so a
smaller max_disparity is honoured by invalidating larger disparities in every output, with the
DisparityImage and /diagnostics reporting the range that ran; a larger one is refused with an
error logged through the node's logger (console and /rosout) and exit code 2."""

import subprocess

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, wait_until
from rclpy.parameter import Parameter
from stereo_scene import make_scene
from test_stop_signals import NODE, env

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.scaled_estimator import SMALLEST_FIT
from stereo_kd_ros.conversions import disparity_from_msg, point_cloud_to_numpy

ROS_DOMAIN_ID = 155 + TEST_DOMAIN_OFFSET
LIMIT_PX = 16


def test_a_network_honours_a_smaller_max_disparity(make_harness):
    scene = make_scene(plane_disparity=8, box_disparity=24)  # the box lies beyond the limit
    # threshold 0: this test is about the disparity limit alone (the confidence threshold has its own)
    harness = make_harness(model="dsnet-fast", max_disparity=LIMIT_PX, confidence_threshold=0.0)
    assert harness.node.estimator.max_disparity == 192  # the network as built
    stamp = Time(sec=1)
    harness.send_infos(*scene.camera_infos(stamp))
    harness.send_images(*scene.images(stamp))
    assert wait_until(lambda: harness.count("disparity") and harness.count("points2"), timeout_s=120)
    msg, cloud = harness.last("disparity"), harness.last("points2")

    assert msg.min_disparity == pytest.approx(0.0)
    assert msg.max_disparity == pytest.approx(LIMIT_PX - 1)  # what ran, not the network's 191
    # The same network's own output for the pair: the published disparity is it, limited.
    reference = harness.node.estimator.predict(scene.left, scene.right).disparity
    published = disparity_from_msg(msg)
    clear = np.abs(reference - (LIMIT_PX - 1)) > 0.05  # away from the limit (bf16 rounding)
    kept = np.isfinite(reference) & (reference <= LIMIT_PX - 1)
    assert np.array_equal(np.isfinite(published)[clear], kept[clear])
    assert np.allclose(published[kept & clear], reference[kept & clear], atol=0.05)
    assert (np.isfinite(reference) & ~kept & clear).sum() > 200  # the limit took pixels (on the box) away
    assert np.isfinite(published[scene.comparable & (scene.disparity == 8)]).mean() > 0.9  # the plane stays
    points = point_cloud_to_numpy(cloud)
    assert np.array_equal(np.isnan(points[..., 2]), np.isnan(published))  # the cloud too
    assert harness.diagnostics(until=lambda v: v["processed"] == "1")["max_disparity"] == str(LIMIT_PX)


def test_the_default_max_disparity_is_the_default_models_own_range(make_harness):
    """max_disparity 0 (the parameter's default): the range of the model that runs. The shipped
    default runs on pairs enlarged by 1.25 and shrinks near scenes down to 0.5 to keep them in the
    range it learned (fit_range), so in the node's pixels it reaches 192 / 0.5 = 384."""
    scene = make_scene(plane_disparity=8, box_disparity=24)
    harness = make_harness(model=registry.default_model(), max_disparity=0, confidence_threshold=0.0)
    searched = harness.node.estimator.max_disparity
    assert registry.fits_range(registry.default_model()) and searched == int(192 / SMALLEST_FIT)
    stamp = Time(sec=1)
    harness.send_infos(*scene.camera_infos(stamp))
    harness.send_images(*scene.images(stamp))
    assert wait_until(lambda: harness.count("disparity"), timeout_s=120)
    assert harness.last("disparity").max_disparity == pytest.approx(searched - 1)
    assert harness.diagnostics(until=lambda v: v["processed"] == "1")["max_disparity"] == str(searched)


def test_a_larger_max_disparity_than_the_network_was_built_for_is_refused():
    default = StereoEstimator.load()  # what the node runs without a model parameter
    asked = (default.max_disparity // 16 + 1) * 16  # the next multiple of 16 above its range
    result = subprocess.run([*NODE, "-p", f"max_disparity:={asked}"], env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    logged = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]") and "stereo_kd_node" in line]
    assert logged and (f"max_disparity: {asked} exceeds the {default.max_disparity} px that model "
                       f"'{default.name}' was built for") in logged[0]


def test_the_start_up_line_says_how_a_scaled_model_sees_the_camera():
    from stereo_kd_ros.node import scale_note

    default = registry.default_model()
    scale = registry.working_scale(default)
    assert scale_note(StereoEstimator.load(default)) == (f"pairs enlarged by {scale:g} (near scenes down to 0.5, "
                                                         "small pairs up to 2), ")
    assert scale_note(StereoEstimator.load("sgbm", input_scale=0.5)) == "pairs shrunk by 0.5, "
    assert scale_note(StereoEstimator.load("sgbm")) == ""


def test_the_node_sizes_the_defaults_small_pair_allowance_by_the_camera_not_by_input_scale(make_harness):
    """The default enlarges pairs smaller than 384x640 further (small_pairs); the node's input_scale
    shrinks the camera's pair first, for speed, and must not be undone: at 0.5 a 640x480 camera's
    320x240 pairs run at 1.25 (at input_scale 1 a 320x240 camera's would run at 2), also after a
    change at run time."""
    harness = make_harness(model=registry.default_model(), max_disparity=0, input_scale=0.5)
    assert harness.node.estimator.pair_scale(240, 320) == 1.25
    assert harness.node.set_parameters([Parameter("input_scale", value=1.0)])[0].successful
    assert harness.node.estimator.pair_scale(240, 320) == 2.0
    assert harness.node.set_parameters([Parameter("input_scale", value=0.5)])[0].successful
    assert harness.node.estimator.pair_scale(240, 320) == 1.25
