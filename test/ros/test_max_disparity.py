"""max_disparity with a network (issue 25, D4): a network searches the range it was built for, so a
smaller max_disparity is honoured by invalidating larger disparities in every output, with the
DisparityImage and /diagnostics reporting the range that ran; a larger one is refused with an
error logged through the node's logger (console and /rosout) and exit code 2."""

import subprocess

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, wait_until
from stereo_scene import make_scene
from test_stop_signals import NODE, env

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


def test_a_larger_max_disparity_than_the_network_was_built_for_is_refused():
    result = subprocess.run([*NODE, "-p", "max_disparity:=256"], env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    logged = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]") and "stereo_kd_node" in line]
    assert logged and "max_disparity: 256 exceeds the 192 px that model 'dsnet-fast' was built for" in logged[0]
