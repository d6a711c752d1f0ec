"""Launch stereo_kd_node (and optionally RViz) on a rectified stereo camera.

    ros2 launch stereo_kd_ros stereo.launch.py left_namespace:=/cam/left right_namespace:=/cam/right
"""

from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node


def _share_directory() -> Path:
    """Installed share/stereo_kd_ros, or the source tree when run from a checkout."""
    try:
        return Path(get_package_share_directory("stereo_kd_ros"))
    except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH (not sourced)
        return Path(__file__).resolve().parents[1]


def generate_launch_description() -> LaunchDescription:
    share = _share_directory()
    left = LaunchConfiguration("left_namespace")
    right = LaunchConfiguration("right_namespace")
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its outputs."),
        DeclareLaunchArgument("left_namespace", default_value="left",
                              description="Namespace holding the left image_rect and camera_info."),
        DeclareLaunchArgument("right_namespace", default_value="right",
                              description="Namespace holding the right image_rect and camera_info."),
        DeclareLaunchArgument("params_file", default_value=str(share / "config" / "stereo.yaml"),
                              description="Node parameter YAML."),
        DeclareLaunchArgument("model", default_value="sgbm",
                              description="Estimator: sgbm, a shipped model name, a checkpoint path or an ONNX model."),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N."),
        DeclareLaunchArgument("input_scale", default_value="1.0",
                              description="Resize factor (0.1..1) applied to both images before the estimator."),
        DeclareLaunchArgument("use_rviz", default_value="false",
                              description="Start RViz with the point cloud and disparity displays."),
        DeclareLaunchArgument("fixed_frame", default_value="left_optical",
                              description="RViz fixed frame (the left camera's optical frame)."),
        Node(
            package="stereo_kd_ros", executable="stereo_kd_node", name="stereo_kd_node",
            namespace=LaunchConfiguration("namespace"), output="screen",
            parameters=[LaunchConfiguration("params_file"),
                        {"model": LaunchConfiguration("model"), "device": LaunchConfiguration("device"),
                         "input_scale": LaunchConfiguration("input_scale")}],
            remappings=[
                ("left/image_rect", PathJoinSubstitution([left, "image_rect"])),
                ("left/camera_info", PathJoinSubstitution([left, "camera_info"])),
                ("right/image_rect", PathJoinSubstitution([right, "image_rect"])),
                ("right/camera_info", PathJoinSubstitution([right, "camera_info"])),
            ],
        ),
        # In the node's namespace, so that the relative topics of the RViz config resolve to its outputs.
        Node(
            package="rviz2", executable="rviz2", name="rviz2", output="screen",
            namespace=LaunchConfiguration("namespace"),
            arguments=["-d", str(share / "config" / "stereo_kd.rviz"), "-f", LaunchConfiguration("fixed_frame")],
            condition=IfCondition(LaunchConfiguration("use_rviz")),
        ),
    ])
