"""ament_python packaging for stereo_kd_ros (+ the stereo_kd_core library it ships with).

Two ways in:
  * colcon in a ROS 2 workspace: ROS dependencies come from package.xml / rosdep; the
    Python-only ones (torch) from pip, see README.
  * pip / venv with no ROS install: `pip install torch==2.13.0` then `pip install -e ".[ros]"`;
    the [ros] extra pulls the ROS 2 Kilted wheels (rclpy over Fast DDS and the messages).
"""

import os
from glob import glob

from setuptools import find_packages, setup

package_name = "stereo_kd_ros"

# Under colcon the dependencies are system (apt/rosdep) packages that pip metadata cannot
# see (python3-opencv has no "opencv-python" dist-info), so do not declare them there.
pip_requires = [
    "numpy>=1.24",
    "opencv-python-headless>=4.8",
    "pyyaml>=6",
    "scikit-image>=0.22",
    "torch>=2.1",
    "tqdm>=4.60",
]
install_requires = ["setuptools"] if os.environ.get("COLCON") else pip_requires

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=["stereo_kd_core", "stereo_kd_core.*", "stereo_kd_ros", "stereo_kd_ros.*"]),
    package_data={"stereo_kd_core": ["weights/*", "recipes/*.yaml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.xml")),
    ],
    install_requires=install_requires,
    extras_require={
        "ros": [
            "ros-rclpy[fastrtps]",
            "ros-sensor-msgs",
            "ros-stereo-msgs",
            "ros-std-msgs",
            "ros-diagnostic-msgs",
        ],
        "export": ["onnx>=1.15", "onnxscript>=0.1", "onnxruntime>=1.17"],
        "bag": ["rosbags>=0.10"],
        "test": ["pytest>=7", "hypothesis>=6", "onnx>=1.15", "onnxscript>=0.1", "onnxruntime>=1.17",
                 "rosbags>=0.10", "ruff"],
    },
    zip_safe=False,
    maintainer="stereo-kd developers",
    maintainer_email="stereo-kd@example.org",
    description="Distilled deep stereo on the GPU for ROS 2: disparity and point clouds, plus the "
                "library and CLI that train the network by knowledge distillation.",
    license="Apache-2.0",
    python_requires=">=3.10",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "stereo_kd_node = stereo_kd_ros.node:main",
            "stereo_kd_player = stereo_kd_ros.player:main",
            "stereo_kd_demo = stereo_kd_ros.demo:main",
            "stereo-kd = stereo_kd_core.cli:main",
        ],
    },
)
