"""ament_python packaging for stereo_kd_ros (+ the stereo_kd_core library it ships with).

Ways in:
  * colcon in a ROS 2 workspace: ROS dependencies come from package.xml / rosdep; the
    Python-only ones (torch) from pip, see README. setup.cfg puts the executables in
    lib/stereo_kd_ros, where `ros2 run` and `ros2 launch` look.
  * a wheel (`pip install .`): the data files (ament index marker, package.xml, launch and
    config) land under the environment's prefix, and launchers in <prefix>/lib/stereo_kd_ros
    start the console scripts pip puts in <prefix>/bin; with that prefix on AMENT_PREFIX_PATH,
    `ros2 run` and `ros2 launch` work.
  * pip / venv with no ROS install: `pip install torch==2.13.0` then `pip install -e ".[ros]"`;
    the [ros] extra pulls the ROS 2 Kilted wheels (rclpy over Fast DDS and the messages).
    An editable install has no data files: no `ros2 launch` (see README).
"""

import os
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel support at all: colcon's `setup.py install` does not need it
        bdist_wheel = None

package_name = "stereo_kd_ros"
console_scripts = {
    "stereo_kd_node": "stereo_kd_ros.entry:node_main",
    "stereo_kd_player": "stereo_kd_ros.entry:player_main",
    "stereo_kd_demo": "stereo_kd_ros.demo:main",
    "stereo-kd": "stereo_kd_core.cli:main",
}
# ros2 run / launch_ros look for executables in <prefix>/lib/<package>; a wheel's console scripts
# go to <prefix>/bin (setup.cfg's install_scripts is not used for wheels).
WHEEL_LAUNCHER = """#!/bin/sh
# {name} of a pip (wheel) install, where ros2 run and ros2 launch look for it.
exec "$(dirname "$0")/../../bin/{name}" "$@"
"""

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


if bdist_wheel is not None:
    class WheelWithRosExecutables(bdist_wheel):
        """A wheel that also installs WHEEL_LAUNCHER into <prefix>/lib/stereo_kd_ros (wheels only:
        under colcon, setup.cfg installs the console scripts themselves there)."""

        def run(self):
            launcher_dir = Path(self.bdist_dir).parent / "ros_launchers"
            launcher_dir.mkdir(parents=True, exist_ok=True)
            launchers = []
            for name in console_scripts:
                launcher = launcher_dir / name
                launcher.write_text(WHEEL_LAUNCHER.format(name=name))
                launcher.chmod(0o755)
                launchers.append(str(launcher))
            # In place: install_data holds this very list.
            self.distribution.data_files.append(("lib/" + package_name, launchers))
            super().run()


setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=["stereo_kd_core", "stereo_kd_core.*", "stereo_kd_ros", "stereo_kd_ros.*"]),
    package_data={"stereo_kd_core": ["weights/*", "recipes/*.yaml", "data/*.json"]},
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
        "int8": ["torchao>=0.18"],  # precision int8 on the CPU (PT2E quantisation)
        "test": ["pytest>=7", "hypothesis>=6", "onnx>=1.15", "onnxscript>=0.1", "onnxruntime>=1.17",
                 "torchao>=0.18", "rosbags>=0.10", "ruff"],
    },
    zip_safe=False,
    maintainer="stereo-kd developers",
    maintainer_email="stereo-kd@example.org",
    description="Distilled deep stereo on the GPU for ROS 2: disparity and point clouds, plus the "
                "library and CLI that train the network by knowledge distillation.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={"console_scripts": [f"{name} = {target}" for name, target in console_scripts.items()]},
    cmdclass={} if bdist_wheel is None else {"bdist_wheel": WheelWithRosExecutables},
)
