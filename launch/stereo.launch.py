"""Launch stereo_kd_node (and optionally RViz) on a rectified stereo camera.

    ros2 launch stereo_kd_ros stereo.launch.py left_namespace:=/cam/left right_namespace:=/cam/right

The node reads `params_file`; the arguments that name a node parameter (model, device, ...)
override the file only when given. Everything is checked before anything starts: a missing
params file, a value of the wrong type, or use_rviz:=true without RViz ends the launch with an
error and no process left behind.

The decisions are plain functions (no launch import) so that tests call them where launch is
not installed; launch and launch_ros are imported in the two functions that build actions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PACKAGE = "stereo_kd_ros"
NOT_GIVEN = ""  # default of the node parameter arguments: the params file (or the node) decides

# Launch arguments that set the node parameter of the same name, with that parameter's type.
NODE_PARAMETER_ARGUMENTS: dict[str, tuple[type, str]] = {
    "model": (str, "Estimator: sgbm, a shipped model name, a checkpoint path or an ONNX model (*.onnx)."),
    "device": (str, "Inference device: auto, cpu, cuda or cuda:N."),
    "precision": (str, "Network precision: auto, fp32, fp16 or bf16."),
    "compile": (bool, "torch.compile the network; each input size compiles at its first pair "
                      "(CPU: 30 s+, in the background, eager meanwhile)."),
    "max_disparity": (int, "Disparity search range in pixels (multiple of 16); 0: the model's own."),
    "input_scale": (float, "Resize factor (0.1..1) applied to both images before the estimator."),
    "approximate_sync": (bool, "Pair left/right images by nearest stamps instead of equal stamps."),
    "use_system_default_qos": (bool, "Subscribe reliably instead of with sensor-data QoS (best effort): for large "
                                     "images over a link that loses fragments; needs reliable publishers."),
    "rectify": (bool, "Take the cameras' raw images (image_raw) and rectify them in the node."),
    "rectify_on": (str, "With rectify: auto (the estimator's GPU when on CUDA, else CPU), cpu or estimator."),
    "publish_depth": (bool, "Publish depth/image_rect + depth/camera_info (RGB-D consumers)."),
    "depth_encoding": (str, "Depth image encoding: 32FC1 (metres) or 16UC1 (millimetres)."),
    "publish_rgb": (bool, "Publish rgb/image_rect + rgb/camera_info at the depth image's resolution."),
}
RVIZ_PACKAGE = "rviz2"
RVIZ_MISSING = ("use_rviz:=true but RViz is not installed (no package 'rviz2' with an 'rviz2' executable "
                "on AMENT_PREFIX_PATH): install it (sudo apt install ros-$ROS_DISTRO-rviz2, then source "
                "the ROS setup again) or launch without use_rviz:=true.")


class LaunchArgumentError(ValueError):
    """A launch argument the launch cannot start with; the message says which and why."""


def share_directory() -> Path:
    """Installed share/stereo_kd_ros, or the source tree when run from a checkout."""
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        return Path(get_package_share_directory(PACKAGE))
    except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH (not sourced)
        return Path(__file__).resolve().parents[1]


def typed_value(name: str, text: str, value_type: type) -> Any:
    """A launch argument's text as a value of `value_type` (YAML syntax, as `-p name:=value`):
    '1' is 1.0 for a float, a string stays the text as given; LaunchArgumentError otherwise."""
    if value_type is str:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if value_type is float and isinstance(value, str):  # YAML 1.1 reads '1e-1' as a string
        try:
            value = float(text)
        except ValueError:
            pass
    if value_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value_type is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if value_type is bool and isinstance(value, bool):
        return value
    expected = {float: "a number", int: "an integer", bool: "true or false"}[value_type]
    raise LaunchArgumentError(f"{name}:={text!r} is not valid: expected {expected}")


def node_parameter_overrides(arguments: dict[str, str]) -> dict[str, Any]:
    """Typed node parameters for the node parameter arguments that were given (not empty)."""
    return {name: typed_value(name, arguments[name], value_type)
            for name, (value_type, _) in NODE_PARAMETER_ARGUMENTS.items()
            if arguments.get(name, NOT_GIVEN) != NOT_GIVEN}


def checked_params_file(path_text: str) -> str:
    """The params file as an absolute path; LaunchArgumentError if it is missing, not a file, or
    not a YAML mapping (the node would otherwise run on defaults after a mere warning)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise LaunchArgumentError(f"params_file:={path_text} {problem}: give an existing node parameter "
                                  "YAML (or leave params_file out to use the shipped config/stereo.yaml)")
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise LaunchArgumentError(f"params_file:={path_text} cannot be read as YAML: {error}") from error
    if not isinstance(content, dict):
        raise LaunchArgumentError(f"params_file:={path_text} is not a node parameter YAML "
                                  "(expected '<node name>: {ros__parameters: {...}}')")
    return str(path.resolve())


def rviz_is_installed() -> bool:
    """Whether the rviz2 package and its executable are on AMENT_PREFIX_PATH (where launch_ros looks)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    try:
        prefix = Path(get_package_prefix(RVIZ_PACKAGE))
    except (PackageNotFoundError, ValueError, OSError):
        return False
    executable = prefix / "lib" / RVIZ_PACKAGE / "rviz2"
    return executable.is_file() and os.access(executable, os.X_OK)


def input_remappings(left_namespace: str, right_namespace: str) -> list[tuple[str, str]]:
    """The node's relative inputs moved into the cameras' namespaces."""
    return [(f"{side}/{topic}", os.path.join(namespace, topic))
            for side, namespace in (("left", left_namespace), ("right", right_namespace))
            for topic in ("image_rect", "image_raw", "camera_info")]


def launch_plan(arguments: dict[str, str]) -> dict[str, Any]:
    """Everything the launch starts, decided from the launch arguments (all of them as text),
    or LaunchArgumentError before anything starts."""
    overrides = node_parameter_overrides(arguments)
    use_rviz = typed_value("use_rviz", arguments["use_rviz"], bool)
    if use_rviz and not rviz_is_installed():
        raise LaunchArgumentError(RVIZ_MISSING)
    return {
        # Later entries win: the given arguments override the file.
        "parameters": [checked_params_file(arguments["params_file"])] + ([overrides] if overrides else []),
        "remappings": input_remappings(arguments["left_namespace"], arguments["right_namespace"]),
        "namespace": arguments["namespace"],
        "use_rviz": use_rviz,
        "fixed_frame": arguments["fixed_frame"],
    }


def _actions(context) -> list:
    """OpaqueFunction body: the processes to start, all decided before any of them is."""
    from launch_ros.actions import Node

    plan = launch_plan(dict(context.launch_configurations))
    actions = [Node(package=PACKAGE, executable="stereo_kd_node", name="stereo_kd_node",
                    namespace=plan["namespace"], output="screen", parameters=plan["parameters"],
                    remappings=plan["remappings"])]
    if plan["use_rviz"]:
        # In the node's namespace, so that the relative topics of the RViz config resolve to its outputs.
        actions.append(Node(package=RVIZ_PACKAGE, executable="rviz2", name="rviz2", output="screen",
                            namespace=plan["namespace"],
                            arguments=["-d", str(share_directory() / "config" / "stereo_kd.rviz"),
                                       "-f", plan["fixed_frame"]]))
    return actions


def launch_arguments() -> list[tuple[str, str, str]]:
    """(name, default, description) of every launch argument."""
    return [
        ("namespace", "", "Namespace of the node and its outputs."),
        ("left_namespace", "left", "Namespace holding the left image_rect and camera_info."),
        ("right_namespace", "right", "Namespace holding the right image_rect and camera_info."),
        ("params_file", str(share_directory() / "config" / "stereo.yaml"), "Node parameter YAML (must exist)."),
        *((name, NOT_GIVEN, f"{description} Overrides params_file when given.")
          for name, (_, description) in NODE_PARAMETER_ARGUMENTS.items()),
        ("use_rviz", "false", "Start RViz with the point cloud and disparity displays."),
        ("fixed_frame", "left_optical", "RViz fixed frame (the left camera's optical frame)."),
    ]


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=default, description=description)
          for name, default, description in launch_arguments()),
        OpaqueFunction(function=_actions),
    ])
