"""Raw cameras in (`rectify: true`), over real DDS: the analytic scene seen through known
distortion (plumb_bob) and rectification (non-identity R on both cameras) gives the disparity and
points of the rectified-input run; maps are cached per calibration; uncalibrated camera_infos
are rejected with their reason."""

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, RosoutRecorder, wait_until
from sensor_msgs.msg import CameraInfo
from stereo_scene import make_scene

from stereo_kd_core.rectification import CameraCalibration, RectificationMaps, distort
from stereo_kd_ros.conversions import disparity_from_msg, image_to_numpy, point_cloud_to_numpy
from stereo_kd_ros.parameters import PARAMETERS, ParameterError, validate_parameters

ROS_DOMAIN_ID = 150 + TEST_DOMAIN_OFFSET
WIDTH, HEIGHT = 192, 128
MARGIN = 16  # rectified pixels near the border see outside the raw image
RAW_CAMERAS = {  # side: (K fx, fy, cx shift, cy shift, D (plumb_bob), R as degrees about x, y, z)
    "left": (104.0, 103.0, 1.5, -1.0, (-0.10, 0.02, 0.001, -0.001, 0.0), (0.6, -1.0, 0.2)),
    "right": (102.0, 102.5, -1.0, 0.5, (-0.08, 0.015, -0.0005, 0.001, 0.0), (-0.4, 0.8, -0.3)),
}


@pytest.fixture(scope="module")
def scene():
    return make_scene(width=WIDTH, height=HEIGHT, plane_disparity=12, box_disparity=24, max_disparity=48,
                      cx_offset=2.0)


def raw_infos(scene, stamp: Time, rotate_left_deg: float = 0.0) -> tuple[CameraInfo, CameraInfo]:
    """The camera_infos of the raw cameras whose rectified views are the scene's images."""
    rectified = scene.camera_infos(stamp)
    for info, side in zip(rectified, ("left", "right"), strict=True):
        fx, fy, dx, dy, d, angles = RAW_CAMERAS[side]
        if side == "left":
            angles = (angles[0], angles[1] + rotate_left_deg, angles[2])
        info.k = [fx, 0.0, (WIDTH - 1) / 2 + dx, 0.0, fy, (HEIGHT - 1) / 2 + dy, 0.0, 0.0, 1.0]
        info.d = list(d)
        info.distortion_model = "plumb_bob"
        info.r = list(cv2.Rodrigues(np.radians(angles))[0].ravel())
    return rectified


def raw_images(scene, stamp: Time, infos):
    """The scene's rectified images as the raw cameras see them."""
    left, right = scene.images(stamp)
    for msg, info in ((left, infos[0]), (right, infos[1])):
        raw = distort(image_to_numpy(msg), CameraCalibration.from_camera_info(info))
        msg.data = raw.tobytes()
    return left, right


def run_pair(harness, infos, images):
    before = harness.count("points2")
    harness.send_infos(*infos)
    harness.send_images(*images)
    assert wait_until(lambda: harness.count("points2") > before and harness.count("disparity") > before)
    return harness.last("disparity"), harness.last("points2")


def interior(scale: float) -> np.ndarray:
    height, width = round(HEIGHT * scale), round(WIDTH * scale)
    mask = np.zeros((height, width), dtype=bool)
    margin = round(MARGIN * scale)
    mask[margin:-margin, margin:-margin] = True
    return mask


# OpenCV on the CPU (SGBM), and the torch path a network on CUDA takes (forced with
# rectify_on 'estimator' for the shipped network on the CPU: on a GPU only the device differs).
# Tolerances (median, p95 of |raw - rectified-input| px; median relative depth difference, which
# is the disparity difference over the 6-24 px disparities): SGBM's integer-step matching barely
# moves under resampling; the network moves ~0.17 px median on the 96x64 half-scale input with
# either path (OpenCV's measured 0.16, torch's 0.18; the paths themselves agree to < 0.05 px,
# test/core/test_rectification.py).
# The default (a network run at a scale of its own) rectifies on its device too, straight to the sizes
# it runs at.
PATHS = [("sgbm", "auto", "cpu", (0.1, 0.5, 0.01)), ("dsnet-fast", "estimator", "cpu", (0.3, 1.5, 0.05)),
         ("dsnet-faster-x1.25", "estimator", "cpu", (0.3, 1.5, 0.05))]


@pytest.mark.parametrize("model, rectify_on, device, tolerance", PATHS)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_raw_input_gives_the_rectified_input_results(make_harness, scene, scale, model, rectify_on, device,
                                                      tolerance):
    stamp = Time(sec=1)
    rectified = make_harness(model=model, input_scale=scale, max_disparity=48)
    reference_disparity, reference_cloud = run_pair(rectified, scene.camera_infos(stamp), scene.images(stamp))
    rectified.close()
    raw = make_harness(model=model, rectify=True, rectify_on=rectify_on, input_scale=scale, max_disparity=48,
                       publish_depth=True)
    infos = raw_infos(scene, stamp)
    disparity_msg, cloud_msg = run_pair(raw, infos, raw_images(scene, stamp, infos))
    assert raw.diagnostics()["rectification_device"] == device
    assert raw.node.estimator.rectifies_on_device == (rectify_on == "estimator")

    # The published geometry is the rectified cameras' (P), scaled as with rectified input.
    assert (disparity_msg.f, disparity_msg.t) == pytest.approx((reference_disparity.f, reference_disparity.t))
    assert (disparity_msg.image.width, disparity_msg.image.height) == (round(WIDTH * scale), round(HEIGHT * scale))
    assert wait_until(lambda: raw.count("depth/camera_info"))
    assert list(raw.last("depth/camera_info").p) == pytest.approx(list(
        np.array([[100 * scale, 0, (95.5 + 0.5) * scale - 0.5, 0], [0, 100 * scale, (63.5 + 0.5) * scale - 0.5, 0],
                  [0, 0, 1, 0]]).ravel()))

    reference, result = disparity_from_msg(reference_disparity), disparity_from_msg(disparity_msg)
    both = np.isfinite(reference) & np.isfinite(result) & interior(scale)
    reference_valid = np.isfinite(reference) & interior(scale)
    assert both.sum() >= 0.9 * reference_valid.sum()
    error = np.abs(result - reference)[both]
    # Rectification resamples the raw images once more (bilinear): sub-pixel differences only.
    assert np.median(error) < tolerance[0] and np.percentile(error, 95) < tolerance[1], (
        np.median(error), np.percentile(error, 95))
    z, z_reference = point_cloud_to_numpy(cloud_msg)[..., 2], point_cloud_to_numpy(reference_cloud)[..., 2]
    relative = np.abs(z - z_reference)[both] / z_reference[both]
    assert np.median(relative) < tolerance[2]


@pytest.mark.parametrize("model, rectify_on", [("sgbm", "cpu"), ("dsnet-fast", "estimator")])
def test_rectified_left_image_is_published_for_overlays(make_harness, scene, model, rectify_on):
    stamp = Time(sec=1)
    harness = make_harness(model=model, rectify=True, rectify_on=rectify_on, max_disparity=48)
    infos = raw_infos(scene, stamp)
    images = raw_images(scene, stamp, infos)
    run_pair(harness, infos, images)
    assert wait_until(lambda: harness.count("left/image_rect_color"))
    rect = harness.last("left/image_rect_color")
    assert rect.header == images[0].header and rect.encoding == "mono8" and (rect.width, rect.height) == (WIDTH, HEIGHT)
    expected = RectificationMaps.build(CameraCalibration.from_camera_info(infos[0])).remap(image_to_numpy(images[0]))
    if rectify_on == "cpu":
        np.testing.assert_array_equal(image_to_numpy(rect), expected)
    else:  # float maps in torch against OpenCV's 1/32 px fixed-point maps
        difference = np.abs(image_to_numpy(rect).astype(float) - expected)
        assert difference.max() <= 3 and difference.mean() < 0.3


def test_maps_are_built_once_per_calibration(make_harness, scene):
    harness = make_harness(rectify=True, max_disparity=48)
    for second in (1, 2, 3):  # fresh camera_info messages, same calibration
        stamp = Time(sec=second)
        infos = raw_infos(scene, stamp)
        run_pair(harness, infos, raw_images(scene, stamp, infos))
    assert harness.diagnostics()["rectification_map_builds"] == "2"  # one per camera
    stamp = Time(sec=4)
    infos = raw_infos(scene, stamp, rotate_left_deg=0.5)  # the left camera re-calibrated
    run_pair(harness, infos, raw_images(scene, stamp, infos))
    assert harness.diagnostics()["rectification_map_builds"] == "3"


def uncalibrated(kind: str, infos) -> str:
    left = infos[0]
    if kind == "zero_k":
        left.k = [0.0] * 9
    elif kind == "zero_p":
        left.p = [0.0] * 12
    elif kind == "short_d":
        left.d = [0.0] * 4
    elif kind == "not_a_rotation":
        left.r = list((1.1 * np.eye(3)).ravel())
    return {"zero_k": "K is all zero", "zero_p": "P is all zero", "short_d": "needs 5 distortion coefficients",
            "not_a_rotation": "R is not a rotation"}[kind]


@pytest.mark.parametrize("kind, reason", [("zero_k", "uncalibrated"), ("zero_p", "uncalibrated"),
                                          ("short_d", "bad_distortion"), ("not_a_rotation", "bad_rotation")])
def test_uncalibrated_camera_infos_are_rejected_with_their_reason(make_harness, scene, kind, reason):
    harness = make_harness(rectify=True, max_disparity=48)
    log = RosoutRecorder(harness)
    log.wait_connected()
    good = raw_infos(scene, Time(sec=1))
    images = raw_images(scene, Time(sec=1), good)
    bad = raw_infos(scene, Time(sec=1))
    message = uncalibrated(kind, bad)
    harness.send_infos(*bad)
    harness.send_images(*images)
    assert wait_until(lambda: harness.node.stats.rejected[reason] == 1)
    assert wait_until(lambda: log.matching(f"[{reason}]: left/camera_info cannot rectify"))
    assert message in log.matching(f"[{reason}]")[0]
    assert harness.diagnostics()[f"rejected_{reason}"] == "1"
    # The next calibrated pair is processed.
    stamp = Time(sec=2)
    infos = raw_infos(scene, stamp)
    run_pair(harness, infos, raw_images(scene, stamp, infos))


def test_rectify_on_is_validated_and_falls_back_to_the_cpu_for_opencv_estimators(make_harness, scene):
    defaults = {spec.name: spec.default for spec in PARAMETERS}
    with pytest.raises(ParameterError, match="rectify_on: expected one of auto, cpu, estimator, got 'gpu'"):
        validate_parameters({**defaults, "rectify_on": "gpu"})
    harness = make_harness(rectify=True, rectify_on="estimator", max_disparity=48)  # SGBM: OpenCV only
    stamp = Time(sec=1)
    infos = raw_infos(scene, stamp)
    run_pair(harness, infos, raw_images(scene, stamp, infos))
    assert harness.diagnostics()["rectification_device"] == "cpu"
