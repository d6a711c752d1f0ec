"""stereo_kd_player: publish a rectified stereo pair (image_rect + camera_info, both sides).

The bundled default input is the Middlebury 2014 Motorcycle pair shipped with scikit-image,
with its real calibration. Other sources (folders, bags) are functions returning
`StereoFrames`, registered in SOURCES.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_ros.conversions import numpy_to_image
from stereo_kd_ros.node import run

LEFT_FRAME = "left_optical"
RIGHT_FRAME = "right_optical"


@dataclass
class StereoFrames:
    """A rectified pair and its geometry."""

    left: np.ndarray   # (H, W, 3) uint8 RGB
    right: np.ndarray  # (H, W, 3) uint8 RGB
    geometry: StereoGeometry
    name: str


def motorcycle_pair() -> StereoFrames:
    """Middlebury 2014 Motorcycle, quarter resolution (741x500), as in skimage.data."""
    from skimage.data import stereo_motorcycle

    left, right, _ = stereo_motorcycle()
    # Calibration of the down-sampled pair, from skimage.data.stereo_motorcycle's docstring.
    focal_px, cx, cy, doffs_px, baseline_m = 994.978, 311.193, 254.877, 31.086, 0.193001
    geometry = StereoGeometry.from_intrinsics(focal_px, cx, cy, baseline_m, cx_right=cx + doffs_px)
    return StereoFrames(left=left, right=right, geometry=geometry, name="middlebury-motorcycle")


SOURCES: dict[str, Callable[[], StereoFrames]] = {"motorcycle": motorcycle_pair}


def camera_info(projection: np.ndarray, width: int, height: int, header: Header) -> CameraInfo:
    info = CameraInfo(header=header, width=width, height=height, distortion_model="plumb_bob")
    info.k = [float(v) for v in projection[:, :3].ravel()]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.d = [0.0] * 5
    info.p = [float(v) for v in projection.ravel()]
    return info


class StereoPlayer(Node):
    """Publishes one pair repeatedly with fresh stamps at `rate_hz`; `frames` = 0 repeats forever."""

    def __init__(self, stereo: StereoFrames, rate_hz: float = 10.0, frames: int = 0, **node_options):
        super().__init__("stereo_kd_player", **node_options)
        height, width = stereo.left.shape[:2]
        p_left, p_right = stereo.geometry.projection_matrices()
        self.messages = []
        for side, frame, pixels, projection in (("left", LEFT_FRAME, stereo.left, p_left),
                                                ("right", RIGHT_FRAME, stereo.right, p_right)):
            header = Header(frame_id=frame)
            qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
            self.messages.append((self.create_publisher(CameraInfo, f"{side}/camera_info", qos),
                                  camera_info(projection, width, height, header)))
            self.messages.append((self.create_publisher(Image, f"{side}/image_rect", qos),
                                  numpy_to_image(pixels, "rgb8", header)))
        self.frames = frames
        self.published = 0
        self.create_timer(1.0 / rate_hz, self._publish)
        self.get_logger().info(f"publishing '{stereo.name}' {width}x{height} at {rate_hz} Hz, "
                               f"{frames or 'unlimited'} frames")

    def _publish(self) -> None:
        if self.frames and self.published >= self.frames:
            return
        if self.frames and not all(pub.get_subscription_count() for pub, _ in self.messages):
            return  # a fixed number of frames counts from when every topic has a subscriber
        stamp = self.get_clock().now().to_msg()
        for publisher, msg in self.messages:  # camera_info first, then the image, per side
            msg.header.stamp = stamp
            publisher.publish(msg)
        self.published += 1
        if self.frames and self.published >= self.frames:
            self.get_logger().info(f"published {self.published} frames")
            time.sleep(0.5)  # let reliable writers deliver the last frame before exiting
            rclpy.try_shutdown(context=self.context)


def main(argv: list[str] | None = None) -> int:
    """Console script `stereo_kd_player`."""
    args_in = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(prog="stereo_kd_player", description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=sorted(SOURCES), default="motorcycle", help="Stereo input to play.")
    parser.add_argument("--rate", type=float, default=10.0, help="Frames per second.")
    parser.add_argument("--frames", type=int, default=0, help="Frames to publish, then exit (0 = forever).")
    args = parser.parse_args(remove_ros_args(args_in)[1:])
    if args.rate <= 0 or args.frames < 0:
        parser.error("--rate must be > 0 and --frames >= 0")
    stereo = SOURCES[args.source]()
    return run(lambda: StereoPlayer(stereo, rate_hz=args.rate, frames=args.frames), args_in)


if __name__ == "__main__":
    sys.exit(main())
