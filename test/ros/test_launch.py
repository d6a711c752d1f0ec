"""launch/stereo.launch.py: argument typing, params file precedence, the params file and RViz
checks (plain functions, no launch needed), the parameters they produce on a real node, the
description evaluated by launch where launch_ros exists, and a wheel install that ament finds."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, TEST_DOMAIN_OFFSET
from rclpy.exceptions import InvalidParameterTypeException

from stereo_kd_ros.node import PARAMETER_NAMES, PARAMETERS, StereoNode

ROS_DOMAIN_ID = 149 + TEST_DOMAIN_OFFSET
LAUNCH_FILE = REPO_ROOT / "launch" / "stereo.launch.py"


def load_launch_module(path: Path = LAUNCH_FILE):
    spec = importlib.util.spec_from_file_location("stereo_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = load_launch_module()


def arguments(**given: str) -> dict[str, str]:
    """Launch configurations as `ros2 launch` leaves them: every declared default, then `given`."""
    return {**{name: default for name, default, _ in launch.launch_arguments()}, **given}


@pytest.fixture
def params_file(tmp_path):
    """A user params file that sets model, input_scale, max_disparity and approximate_sync."""
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump({"/**/stereo_kd_node": {"ros__parameters": {
        "model": "sgbm", "input_scale": 0.5, "max_disparity": 48, "approximate_sync": True}}}))
    return path


def test_every_node_parameter_argument_has_the_node_parameters_type():
    specs = {spec.name: spec for spec in PARAMETERS}
    declared = {name for name, _, _ in launch.launch_arguments()}
    assert declared & set(PARAMETER_NAMES) == set(launch.NODE_PARAMETER_ARGUMENTS)
    for name, (value_type, _) in launch.NODE_PARAMETER_ARGUMENTS.items():
        assert type(specs[name].default) is value_type, name


@pytest.mark.parametrize(("name", "text", "value"), [
    ("input_scale", "1", 1.0), ("input_scale", "0.5", 0.5), ("input_scale", "1e-1", 0.1),
    ("max_disparity", "64", 64), ("approximate_sync", "true", True), ("approximate_sync", "False", False),
    ("model", "123", "123"), ("model", "true", "true"), ("device", "cuda:0", "cuda:0"),
    ("use_system_default_qos", "true", True),
])
def test_arguments_become_values_of_the_node_parameters_type(name, text, value):
    typed = launch.node_parameter_overrides(arguments(**{name: text}))
    assert typed == {name: value}
    assert type(typed[name]) is type(value)


@pytest.mark.parametrize(("name", "text"), [
    ("input_scale", "abc"), ("input_scale", "true"), ("max_disparity", "64.5"), ("approximate_sync", "2"),
])
def test_an_argument_of_the_wrong_type_is_refused_naming_it(name, text):
    with pytest.raises(launch.LaunchArgumentError, match=name):
        launch.launch_plan(arguments(**{name: text}))


def test_arguments_override_the_params_file_only_when_given(params_file):
    plan = launch.launch_plan(arguments(params_file=str(params_file)))
    assert plan["parameters"] == [str(params_file.resolve())]  # the file decides model, input_scale, ...
    plan = launch.launch_plan(arguments(params_file=str(params_file), model="sgbm", input_scale="1"))
    assert plan["parameters"] == [str(params_file.resolve()), {"model": "sgbm", "input_scale": 1.0}]


def node_from_parameters(context, parameters: list, tmp_path: Path) -> StereoNode:
    """The node started with `parameters` as launch_ros passes them: files in order, a dict
    written to a temporary file under the '/**' key."""
    cli_args = ["--ros-args"]
    for index, entry in enumerate(parameters):
        if isinstance(entry, dict):
            path = tmp_path / f"launch_params_{index}.yaml"
            path.write_text(yaml.dump({"/**": {"ros__parameters": entry}}, default_flow_style=False))
            entry = path
        cli_args += ["--params-file", str(entry)]
    return StereoNode(context=context, cli_args=cli_args)


@pytest.mark.parametrize(("given", "expected"), [
    ({}, {"input_scale": 0.5, "max_disparity": 48, "approximate_sync": True}),
    ({"input_scale": "1", "max_disparity": "64", "approximate_sync": "false"},
     {"input_scale": 1.0, "max_disparity": 64, "approximate_sync": False}),
])
def test_the_node_gets_the_file_values_unless_an_argument_overrides_them(ros_context, params_file, tmp_path,
                                                                          given, expected):
    plan = launch.launch_plan(arguments(params_file=str(params_file), **given))
    node = node_from_parameters(ros_context, plan["parameters"], tmp_path)
    try:
        values = {name: node.get_parameter(name).value for name in expected}
        assert values == expected
        assert all(type(values[name]) is type(value) for name, value in expected.items())
    finally:
        node.close()
        node.destroy_node()


def test_an_untyped_launch_value_is_what_the_node_refuses(ros_context, tmp_path):
    """Why the arguments are typed: input_scale:=1 passed through as YAML is the integer 1."""
    with pytest.raises(InvalidParameterTypeException, match="input_scale"):
        node_from_parameters(ros_context, [{"input_scale": 1}], tmp_path)


@pytest.mark.parametrize("problem", ["missing", "directory", "not_a_mapping"])
def test_an_unusable_params_file_is_refused(tmp_path, problem):
    path = {"missing": tmp_path / "nonexistent.yaml", "directory": tmp_path,
            "not_a_mapping": tmp_path / "list.yaml"}[problem]
    if problem == "not_a_mapping":
        path.write_text("- model: sgbm\n")
    with pytest.raises(launch.LaunchArgumentError, match="params_file"):
        launch.launch_plan(arguments(params_file=str(path)))


def fake_prefix(root: Path, package: str, executable: str | None) -> Path:
    """An install prefix holding `package` in the ament index (and lib/<package>/<executable>)."""
    marker = root / "share" / "ament_index" / "resource_index" / "packages" / package
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    if executable is not None:
        path = root / "lib" / package / executable
        path.parent.mkdir(parents=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root


def test_use_rviz_without_rviz_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(fake_prefix(tmp_path / "ros", "rclpy", None)))
    assert launch.launch_plan(arguments())["use_rviz"] is False  # not asked for: not needed
    with pytest.raises(launch.LaunchArgumentError) as refused:
        launch.launch_plan(arguments(use_rviz="true"))
    message = str(refused.value)
    assert "rviz2" in message and "apt install" in message and "use_rviz" in message
    # Registered but without its executable is just as unusable.
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(fake_prefix(tmp_path / "broken", "rviz2", None)))
    with pytest.raises(launch.LaunchArgumentError):
        launch.launch_plan(arguments(use_rviz="true"))
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(fake_prefix(tmp_path / "rviz", "rviz2", "rviz2")))
    assert launch.launch_plan(arguments(use_rviz="true"))["use_rviz"] is True


def test_inputs_are_remapped_into_the_camera_namespaces():
    assert launch.input_remappings("/cam/left", "right") == [
        ("left/image_rect", "/cam/left/image_rect"), ("left/image_raw", "/cam/left/image_raw"),
        ("left/camera_info", "/cam/left/camera_info"),
        ("right/image_rect", "right/image_rect"), ("right/image_raw", "right/image_raw"),
        ("right/camera_info", "right/camera_info")]


def evaluate_description(**given: str) -> list:
    """The actions the launch description would start, evaluated by launch without starting them."""
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    context = LaunchContext()
    context.launch_configurations.update(given)
    actions = []
    for entity in launch.generate_launch_description().entities:
        if isinstance(entity, DeclareLaunchArgument):
            entity.visit(context)  # sets the default of an argument not given
        elif isinstance(entity, OpaqueFunction):
            actions += entity.visit(context) or []
    return actions


def test_launch_description_evaluates_to_the_node_or_refuses_before_any_action(params_file, tmp_path,
                                                                                  monkeypatch):
    pytest.importorskip("launch_ros")
    from launch_ros.actions import Node

    actions = evaluate_description(params_file=str(params_file), input_scale="1")
    assert [(a.node_package, a.node_executable) for a in actions if isinstance(a, Node)] == [
        ("stereo_kd_ros", "stereo_kd_node")]
    with pytest.raises(launch.LaunchArgumentError, match="params_file"):
        evaluate_description(params_file=str(tmp_path / "nonexistent.yaml"))
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(fake_prefix(tmp_path / "ros", "rclpy", None)))
    with pytest.raises(launch.LaunchArgumentError, match="rviz2"):
        evaluate_description(params_file=str(params_file), use_rviz="true")


def test_a_wheel_install_is_found_by_ament_and_runs_where_ros2_run_looks(tmp_path):
    """`pip install .` (not editable): ament index marker, package.xml, launch and config under
    <prefix>/share, executables in <prefix>/lib/stereo_kd_ros that start the installed node."""
    pytest.importorskip("setuptools.command.bdist_wheel")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "package.xml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("resource", "launch", "config", "stereo_kd_core", "stereo_kd_ros"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    prefix = tmp_path / "prefix"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(prefix),
                    *map(str, (tmp_path / "dist").glob("*.whl"))], check=True, capture_output=True, timeout=300)
    site_packages = sysconfig.get_path("purelib", vars={"base": str(prefix)})
    env = {**os.environ, "AMENT_PREFIX_PATH": str(prefix), "PYTHONPATH": site_packages,
           "ROS_DOMAIN_ID": str(ROS_DOMAIN_ID)}

    from ament_index_python.packages import get_package_share_directory, get_resource
    os.environ["AMENT_PREFIX_PATH"], saved = str(prefix), os.environ.get("AMENT_PREFIX_PATH")
    try:
        share = Path(get_package_share_directory("stereo_kd_ros"))
        assert get_resource("packages", "stereo_kd_ros")[1] == str(prefix)
    finally:
        if saved is None:
            del os.environ["AMENT_PREFIX_PATH"]
        else:
            os.environ["AMENT_PREFIX_PATH"] = saved
    assert share == prefix / "share" / "stereo_kd_ros"
    for name in ("package.xml", "launch/stereo.launch.py", "config/stereo.yaml", "config/stereo_kd.rviz"):
        assert (share / name).is_file(), name
    # The installed launch file finds its own share directory.
    script = ("import runpy; defaults = {name: default for name, default, _ in "
              f"runpy.run_path({str(share / 'launch' / 'stereo.launch.py')!r})['launch_arguments']()}}; "
              "print(defaults['params_file'])")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == str(share / "config" / "stereo.yaml"), result.stderr
    # ros2 run / launch_ros start <prefix>/lib/stereo_kd_ros/<executable>.
    executables = prefix / "lib" / "stereo_kd_ros"
    for name in ("stereo_kd_node", "stereo_kd_player", "stereo_kd_demo", "stereo-kd"):
        assert os.access(executables / name, os.X_OK), name
    result = subprocess.run([str(executables / "stereo_kd_node"), "--ros-args", "-p", "precision:=fp64"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "precision" in result.stderr, result.stderr
    imported = subprocess.run([sys.executable, "-c", "import stereo_kd_ros; print(stereo_kd_ros.__file__)"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip().startswith(str(prefix)), imported
