"""Fuzzing the node's input path over real DDS: random image layouts, camera_info contents,
frames and stamps. The node never dies, every rejection is counted under the reason an
independent rule predicts, and a valid pair after each case is processed correctly."""

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, StereoHarness, wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from stereo_scene import make_scene

from stereo_kd_ros.conversions import disparity_from_msg, stamp_to_ns
from stereo_kd_ros.pipeline import TIME_RESET_THRESHOLD_S

ROS_DOMAIN_ID = 146 + TEST_DOMAIN_OFFSET
MAX_DISPARITY = 16
BYTES_PER_PIXEL = {"mono8": 1, "8UC1": 1, "mono16": 2, "16UC1": 2, "rgb8": 3, "bgr8": 3, "8UC3": 3,
                   "rgba8": 4, "bgra8": 4}
MAX_DATA_BYTES = 1 << 21  # keeps each case fast

encodings = st.one_of(st.sampled_from(sorted(BYTES_PER_PIXEL) + ["32FC1", "yuv422", "bayer_rggb8", "RGB8", ""]),
                      st.text(max_size=12))


@st.composite
def image_cases(draw):
    """Random image layout for both sides: (fields, expected reason or None for a valid pair)."""
    encoding = draw(encodings)
    width = draw(st.one_of(st.just(0), st.integers(1, 2000)))
    height = draw(st.one_of(st.just(0), st.integers(1, 300)))
    bpp = BYTES_PER_PIXEL.get(encoding, 1)
    step = max(0, width * bpp + draw(st.sampled_from([0, 0, 0, 1, 3, -1, -width * bpp])))
    if step * height > MAX_DATA_BYTES:
        height = MAX_DATA_BYTES // max(step, 1)
    length = max(0, step * height + draw(st.sampled_from([0, 0, 0, -1, 1, -step])))
    fields = dict(encoding=encoding, width=width, height=height, step=step, length=length,
                  is_bigendian=draw(st.sampled_from([0, 1, 255])))
    if encoding not in BYTES_PER_PIXEL:
        return fields, "unsupported_encoding"
    if width == 0 or height == 0:
        return fields, "empty_image"
    if step < width * bpp:
        return fields, "step_too_small"
    if length != step * height:
        return fields, "data_length"
    if width <= MAX_DISPARITY or height < 2:
        return fields, "image_too_small"
    return fields, None


bad_numbers = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0])


@st.composite
def camera_info_cases(draw):
    """(side, matrix, index, value, expected reason or None)."""
    side = draw(st.sampled_from(["left", "right"]))
    matrix = draw(st.sampled_from(["k", "p"]))
    index = draw(st.integers(0, 8 if matrix == "k" else 11))
    value = draw(bad_numbers)
    if matrix == "k":
        return side, matrix, index, value, None  # K is not used by a rectified pipeline
    finite = np.isfinite(value)
    if not finite or (index in (0, 5) and value <= 0):
        return side, matrix, index, value, "bad_camera_info"
    if side == "right" and index == 3 and value >= 0:  # baseline -P[3]/P[0] must be > 0
        return side, matrix, index, value, "bad_camera_info"
    return side, matrix, index, value, None


cases = st.one_of(
    st.tuples(st.just("image"), image_cases()),
    st.tuples(st.just("camera_info"), camera_info_cases()),
    st.tuples(st.just("frame"), st.sampled_from(["left", "right"])),
    st.tuples(st.just("stamp"), st.integers(0, int(3 * TIME_RESET_THRESHOLD_S * 1e9))),  # ns behind the newest
    st.tuples(st.just("size"), st.integers(1, 40)),
)


@pytest.fixture(scope="module")
def fuzz_rig(ros_context):
    harness = StereoHarness(ros_context, model="sgbm", max_disparity=MAX_DISPARITY, diagnostics_period_s=0.2)
    rig = {"harness": harness, "scene": make_scene(width=64, height=48, plane_disparity=4, box_disparity=8,
                                                      max_disparity=MAX_DISPARITY),
           "next_sec": 10, "expected": {}, "processed": 0, "last_accepted_ns": None, "time_resets": 0}
    yield rig
    harness.close()


def image_from(fields: dict, stamp: Time, frame: str, seed: int) -> Image:
    msg = Image(header=Header(stamp=stamp, frame_id=frame), height=fields["height"], width=fields["width"],
                encoding=fields["encoding"], is_bigendian=fields["is_bigendian"], step=fields["step"])
    msg.data = np.random.default_rng(seed).integers(0, 256, fields["length"], dtype=np.uint8).tobytes()
    return msg


def send_case(rig, kind: str, case) -> tuple[str | None, Time]:
    """Publish one fuzzed pair: the reason it must be rejected for (None: it must be processed)
    and its (left image) stamp."""
    harness, scene = rig["harness"], rig["scene"]
    rig["next_sec"] += 1
    stamp = Time(sec=rig["next_sec"])
    left, right = scene.images(stamp)
    left_info, right_info = scene.camera_infos(stamp)
    expected = None
    if kind == "image":
        fields, expected = case
        left = image_from(fields, stamp, "left_optical", 1)
        right = image_from(fields, stamp, "right_optical", 2)
        left_info.width = left_info.height = right_info.width = right_info.height = 0  # size unknown
    elif kind == "camera_info":
        side, matrix, index, value, expected = case
        info = left_info if side == "left" else right_info
        getattr(info, matrix)[index] = value
    elif kind == "frame":
        (left if case == "left" else right).header.frame_id = "elsewhere"
        expected = "frame_mismatch"
    elif kind == "stamp" and rig["last_accepted_ns"] is not None:
        # `case` ns behind the newest accepted pair: a reorder up to the threshold, beyond it a time reset.
        stamp_ns = rig["last_accepted_ns"] - case
        left.header.stamp = right.header.stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
        if case <= TIME_RESET_THRESHOLD_S * 1e9:
            expected = "stamp_out_of_order"
        else:
            rig["time_resets"] += 1
    elif kind == "size":
        right.width -= case
        right.step = right.width
        right.data = bytes(right.step * right.height)
        expected = "size_mismatch"
    harness.send_infos(left_info, right_info)
    harness.send_images(left, right)
    return expected, left.header.stamp


def image_fields(encoding="mono8", width=64, height=48, step=64, length=64 * 48, is_bigendian=0) -> dict:
    return dict(encoding=encoding, width=width, height=height, step=step, length=length, is_bigendian=is_bigendian)


NAN = float("nan")


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases)
# Every class at least once, whatever the random draw covers.
@example(case=("image", (image_fields(length=64 * 48 - 1), "data_length")))
@example(case=("image", (image_fields(length=0), "data_length")))
@example(case=("image", (image_fields(encoding="bgra8", width=16, step=64, length=64 * 48), "image_too_small")))
@example(case=("image", (image_fields(height=1, length=64), "image_too_small")))
@example(case=("image", (image_fields(encoding="mono16", step=131, length=131 * 48, is_bigendian=1), None)))
@example(case=("image", (image_fields(encoding="rgb8", width=1500, height=400, step=4500, length=4500 * 400),
                         None)))
@example(case=("camera_info", ("left", "k", 0, NAN, None)))
@example(case=("camera_info", ("right", "p", 3, 0.0, "bad_camera_info")))  # zero baseline
@example(case=("camera_info", ("left", "p", 2, float("inf"), "bad_camera_info")))
@example(case=("camera_info", ("right", "p", 5, 0.0, "bad_camera_info")))
@example(case=("stamp", 0))  # the same stamp again
@example(case=("stamp", int(TIME_RESET_THRESHOLD_S * 1e9)))  # the largest reorder
@example(case=("stamp", int(TIME_RESET_THRESHOLD_S * 1e9) + 1))  # the smallest time reset
def test_fuzzed_inputs_are_rejected_for_the_predicted_reason_and_the_node_keeps_working(fuzz_rig, case):
    harness, scene = fuzz_rig["harness"], fuzz_rig["scene"]
    stats = harness.node.stats
    # The node is idle here: the previous example waited until its last pair was counted.
    processed = fuzz_rig["processed"]
    with stats.lock:
        pairs, rejected = stats.pairs, dict(stats.rejected)
        assert stats.processed == processed, "counts are off since an earlier failing example"
    expected, stamp = send_case(fuzz_rig, *case)
    assert wait_until(lambda: stats.pairs == pairs + 1, timeout_s=10), f"pair never synchronized: {case}"
    if expected is None:
        assert wait_until(lambda: harness.count("disparity") and harness.last("disparity").header.stamp == stamp,
                          timeout_s=10), f"no output for {case}"
        assert wait_until(lambda: stats.processed == processed + 1, timeout_s=10), (case, stats.processed)
        processed += 1
    else:
        assert wait_until(lambda: stats.rejected[expected] == rejected.get(expected, 0) + 1, timeout_s=10), \
            (case, dict(stats.rejected))
        fuzz_rig["expected"][expected] = fuzz_rig["expected"].get(expected, 0) + 1
    assert sum(stats.rejected.values()) == sum(rejected.values()) + (expected is not None)

    # A valid pair right after is processed, and correctly.
    fuzz_rig["next_sec"] += 1
    stamp = Time(sec=fuzz_rig["next_sec"])
    harness.send_infos(*scene.camera_infos(stamp))
    harness.send_images(*scene.images(stamp))
    assert wait_until(lambda: harness.count("disparity") and harness.last("disparity").header.stamp == stamp,
                      timeout_s=10), f"no output after {case}"
    fuzz_rig["last_accepted_ns"] = stamp_to_ns(stamp)
    # The node counts a pair after publishing its outputs: wait for the count, so that the next
    # example starts from an idle node and exact totals (no pair lost, none counted twice).
    fuzz_rig["processed"] = processed + 1
    assert wait_until(lambda: stats.processed == processed + 1, timeout_s=10), (case, stats.processed)
    assert stats.dropped == 0, case
    disparity = disparity_from_msg(harness.last("disparity"))
    comparable = scene.comparable & np.isfinite(disparity)
    assert comparable.sum() > 0.5 * scene.comparable.sum()
    assert np.median(np.abs(disparity - scene.disparity)[comparable]) <= 0.25


def test_diagnostics_count_every_fuzzed_rejection_by_reason(fuzz_rig):
    """Runs after the fuzz test in this module: /diagnostics agrees with the predicted tally."""
    expected = fuzz_rig["expected"]
    if not expected:
        pytest.skip("the fuzz test did not run")
    values = fuzz_rig["harness"].diagnostics()
    for reason, count in expected.items():
        assert values[f"rejected_{reason}"] == str(count), reason
    assert values["rejected"] == str(sum(expected.values()))
    assert values["time_resets"] == str(fuzz_rig["time_resets"])
    assert fuzz_rig["harness"].node.stats.rejected.get("estimator_error", 0) == 0
