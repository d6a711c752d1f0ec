"""The node's `compile` parameter reaches the estimator: the network is compiled (here torch.compile
is replaced by one that records its calls and returns the function, so no minutes-long inductor
run), the pair is processed through the compiled path and published over DDS, with the same
disparity as the estimator's eager output. The real compile is tested in test/core/test_compile.py."""

import threading

import numpy as np
import torch
from builtin_interfaces.msg import Time
from conftest import TEST_DOMAIN_OFFSET, wait_until
from stereo_scene import make_scene

from stereo_kd_ros.conversions import disparity_from_msg

ROS_DOMAIN_ID = 151 + TEST_DOMAIN_OFFSET


def test_compile_parameter_compiles_the_network_and_the_node_publishes_through_it(make_harness, monkeypatch):
    calls = []

    def recording_compile(function, **options):
        calls.append((getattr(function, "__name__", type(function).__name__), options))
        return function

    monkeypatch.setattr(torch, "compile", recording_compile)
    scene = make_scene(plane_disparity=8, box_disparity=16)
    harness = make_harness(model="dsnet-fast", compile=True, confidence_threshold=0.0)
    assert harness.node.estimator.compiled
    names = [name for name, _ in calls]
    assert names == ["infer_core", "confidence_head"]  # the weights frozen, the confidence head apart
    assert calls[0][1]["options"] == {"freezing": True} and calls[0][1]["dynamic"] is False
    stamp = Time(sec=1)
    harness.send_infos(*scene.camera_infos(stamp))
    harness.send_images(*scene.images(stamp))
    assert wait_until(lambda: harness.count("disparity"), timeout_s=120)
    published = disparity_from_msg(harness.last("disparity"))
    reference = harness.node.estimator.predict(scene.left, scene.right).disparity
    finite = np.isfinite(reference)
    assert finite.mean() > 0.5 and np.array_equal(np.isfinite(published), finite)
    assert np.allclose(published[finite], reference[finite], atol=1e-3)


def test_compile_is_off_by_default(make_harness, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("compiled")))
    harness = make_harness(model="sgbm")
    assert harness.node.get_parameter("compile").value is False


def test_precision_int8_quantises_in_the_background_and_the_node_publishes_through_it(make_harness, monkeypatch):
    """precision:=int8 (stereo_kd_core.int8_cpu; inductor replaced by the identity, so the
    quantised graph runs as reference ops): pairs are published while the int8 graph is built,
    and through it afterwards, close to the fp32 network's disparity."""
    from stereo_kd_core import StereoEstimator, int8_cpu

    if int8_cpu.unavailable():
        import pytest

        pytest.skip(int8_cpu.unavailable())
    monkeypatch.setattr(torch, "compile", lambda graph, **kwargs: graph)
    scene = make_scene(plane_disparity=8, box_disparity=16)
    harness = make_harness(model="dsnet-fast", precision="int8", confidence_threshold=0.0)
    estimator = harness.node.estimator
    assert estimator.precision == "int8" and estimator.compiled
    fp32 = StereoEstimator.load("dsnet-fast", device="cpu", precision="fp32").predict(scene.left, scene.right)
    for second in range(2):  # the first pair starts the build (eager answer), the second runs int8
        stamp = Time(sec=1 + second)
        harness.send_infos(*scene.camera_infos(stamp))
        harness.send_images(*scene.images(stamp))
        assert wait_until(lambda n=second + 1: harness.count("disparity") >= n, timeout_s=120)
        if second == 0:
            assert estimator.wait_for_compile(timeout_s=300) and estimator.compiled
        published = disparity_from_msg(harness.last("disparity"))
        finite = np.isfinite(published) & np.isfinite(fp32.disparity)
        assert finite.mean() > 0.5
        assert np.median(np.abs(published[finite] - fp32.disparity[finite])) < 0.25


def test_a_compiled_node_builds_its_graph_when_camera_info_gives_the_size(make_harness, monkeypatch):
    """compile:=true: the camera_info alone starts the build for the input size it implies
    (input_scale applied), in the background, before any image; the pair that follows runs through
    that graph. A camera_info of an absurd size starts nothing and the node keeps going."""
    builds = []  # (thread name, function) of each compiled graph call

    def recording_compile(function, **options):
        def compiled(*args):
            builds.append((threading.current_thread().name, function.__name__))
            return function(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    scene = make_scene(width=128, height=96, plane_disparity=8, box_disparity=16)
    harness = make_harness(model="dsnet-fast", compile=True, confidence_threshold=0.0, input_scale=0.5)
    estimator = harness.node.estimator
    huge_left, huge_right = scene.camera_infos(Time(sec=1))
    huge_left.width = huge_right.width = 100_000
    harness.send_infos(huge_left, huge_right)
    assert not estimator._compiling  # nothing built for a size no pair can have
    harness.send_infos(*scene.camera_infos(Time(sec=2)))
    assert wait_until(lambda: (48, 64) in estimator._compiling, timeout_s=30), estimator._compiling
    assert estimator.wait_for_compile(timeout_s=120) and estimator.compiled
    assert builds == [("compile-dsnet-fast-48x64", "infer_core"), ("compile-dsnet-fast-48x64", "confidence_head")]
    harness.send_infos(*scene.camera_infos(Time(sec=3)))  # the same size again: no second build
    assert len(estimator._compiling) == 1
    harness.send_images(*scene.images(Time(sec=3)))
    assert wait_until(lambda: harness.count("disparity"), timeout_s=120)
    assert [name for _, name in builds[2:]] == ["infer_core", "confidence_head"]  # the pair ran the graph
    assert all(thread != "compile-dsnet-fast-48x64" for thread, _ in builds[2:])
    assert list(estimator._compiling) == [(48, 64)]  # and started no build of its own
