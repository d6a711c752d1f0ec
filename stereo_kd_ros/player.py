"""stereo_kd_player: publish rectified stereo (image_rect + camera_info, both sides) from recorded data.

Sources (`--source`):
  motorcycle      the bundled Middlebury 2014 Motorcycle pair (scikit-image) with its real
                  calibration, repeated with fresh stamps until --frames (the default).
  FOLDER          pairs in Middlebury layout (CASE/im0.png, CASE/im1.png, CASE/calib.txt) or KITTI
                  layout (image_2/ + image_3/ or colored_0/ + colored_1/, NNNNNN_10.png, with
                  KITTI 2015 calib_cam_to_cam/NNNNNN.txt (P_rect_02, P_rect_03) or KITTI 2012
                  calib/NNNNNN.txt (P2, P3)), in name order, freshly stamped.
  BAG             a rosbag2 folder (sqlite3 or MCAP) or a .db3/.mcap file: the pairs of its stereo
                  topics (equal image stamps), each with the latest camera_info of its side, as
                  recorded (byte for byte, recorded stamps unless --restamp or --loop).

`--calibration FILE.yaml` gives the geometry of a folder without calibration files (and
overrides them). Its keys are those of StereoGeometry: fx, cy, cx_left, baseline_m (metres),
optional fy (default fx) and cx_right (default cx_left).

`--raw-calibration FILE.yaml` publishes raw images instead (on left/image_raw, right/image_raw by
default, for stereo_kd_node with rectify: true): each rectified frame is re-distorted as the
raw cameras of the file would see it, and the camera_infos carry their K, D, R (P stays the
source's rectified projection). The file has a `left:` and a `right:` section, each with
distortion_model (plumb_bob, rational_polynomial or equidistant), k (9 values, row-major),
d, and r (9 values: the rotation from the raw camera to the rectified one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import rclpy
import yaml
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from stereo_kd_core.allocator import keep_freed_memory
from stereo_kd_core.data.io import read_image_rgb, read_middlebury_calib
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.rectification import CalibrationError, CameraCalibration, distort
from stereo_kd_ros.conversions import image_to_numpy, numpy_to_image, stamp_to_ns
from stereo_kd_ros.runner import run

LEFT_FRAME = "left_optical"
RIGHT_FRAME = "right_optical"
TOPIC_KEYS = ("left_info", "left_image", "right_info", "right_image")  # publishing order of a frame
RECORDED_TIMING_POLL_S = 0.005
KITTI_IMAGE_DIRS = (("image_2", "image_3"), ("colored_0", "colored_1"))
KITTI_CALIBS = (("calib_cam_to_cam", "P_rect_02", "P_rect_03"), ("calib", "P2", "P3"))  # 2015, 2012
BAG_SUFFIXES = (".db3", ".mcap")
LARGE_IMAGES_PROFILE = "fastdds_large_images.xml"
BAG_PAIRING_QUEUE = 64  # unmatched images kept per side while pairing a bag; the oldest is evicted


@dataclass
class StereoFrames:
    """A rectified pair and its geometry."""

    left: np.ndarray   # (H, W, 3) uint8 RGB, or (H, W) mono8 / mono16
    right: np.ndarray  # same shape and type as left
    geometry: StereoGeometry
    name: str


@dataclass
class PlayerFrame:
    """The four messages of one stereo frame, keyed by TOPIC_KEYS."""

    messages: dict[str, object]
    recorded_ns: int | None = None  # receive time in the bag (recorded timing), None for folders


def motorcycle_pair() -> StereoFrames:
    """Middlebury 2014 Motorcycle, quarter resolution (741x500), as in skimage.data."""
    from stereo_kd_core.data.motorcycle import motorcycle_geometry, motorcycle_sample

    sample = motorcycle_sample()
    return StereoFrames(left=sample["left"], right=sample["right"], geometry=motorcycle_geometry(),
                        name="middlebury-motorcycle")


def camera_info(projection: np.ndarray, width: int, height: int, header: Header) -> CameraInfo:
    info = CameraInfo(header=header, width=width, height=height, distortion_model="plumb_bob")
    info.k = [float(v) for v in projection[:, :3].ravel()]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.d = [0.0] * 5
    info.p = [float(v) for v in projection.ravel()]
    return info


def frame_messages(stereo: StereoFrames) -> PlayerFrame:
    """Camera infos and images of a pair (stamps left at zero: the player sets them)."""
    encoding = {(3, np.uint8): "rgb8", (2, np.uint8): "mono8", (2, np.uint16): "mono16"}.get(
        (stereo.left.ndim, stereo.left.dtype.type))
    if encoding is None or stereo.left.shape != stereo.right.shape or stereo.left.dtype != stereo.right.dtype:
        raise ValueError(f"{stereo.name}: left {stereo.left.shape} {stereo.left.dtype} and right "
                         f"{stereo.right.shape} {stereo.right.dtype} are not a playable pair")
    height, width = stereo.left.shape[:2]
    p_left, p_right = stereo.geometry.projection_matrices()
    messages = {}
    for side, frame_id, pixels, projection in (("left", LEFT_FRAME, stereo.left, p_left),
                                               ("right", RIGHT_FRAME, stereo.right, p_right)):
        messages[f"{side}_info"] = camera_info(projection, width, height, Header(frame_id=frame_id))
        messages[f"{side}_image"] = numpy_to_image(pixels, encoding, Header(frame_id=frame_id))
    return PlayerFrame(messages)


# -- calibration files -------------------------------------------------------------------------

def geometry_from_yaml(path: str | Path) -> StereoGeometry:
    """Geometry from a YAML file with keys fx, cy, cx_left, baseline_m [, fy, cx_right]."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    required, optional = ("fx", "cy", "cx_left", "baseline_m"), ("fy", "cx_right")
    missing = [key for key in required if key not in values]
    unknown = sorted(set(values) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"{path}: calibration keys are {', '.join(required)} and optionally "
                         f"{', '.join(optional)}; missing {missing}, unknown {unknown}")
    return StereoGeometry.from_intrinsics(float(values["fx"]), float(values["cx_left"]), float(values["cy"]),
                                          float(values["baseline_m"]), cx_right=values.get("cx_right"),
                                          fy=values.get("fy"))


def geometry_from_middlebury_calib(path: Path) -> StereoGeometry:
    """Middlebury calib.txt: cam0/cam1 intrinsics, baseline in millimetres."""
    calib = read_middlebury_calib(path)
    if not {"cam0", "cam1", "baseline"} <= set(calib):
        raise ValueError(f"{path}: needs cam0, cam1 and baseline")
    cam0, cam1 = calib["cam0"], calib["cam1"]
    return StereoGeometry(fx=float(cam0[0, 0]), fy=float(cam0[1, 1]), cx_left=float(cam0[0, 2]),
                          cx_right=float(cam1[0, 2]), cy=float(cam0[1, 2]), baseline_m=float(calib["baseline"]) / 1000)


def read_kitti_projections(path: Path, left_key: str, right_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The two 3x4 rectified projections named `left_key`, `right_key` in a KITTI calib file."""
    rows = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            rows[key.strip()] = value
    try:
        return tuple(np.array(rows[key].split(), dtype=np.float64).reshape(3, 4) for key in (left_key, right_key))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: needs 12 values for each of {left_key} and {right_key}") from error


def geometry_from_kitti_projections(p_left: np.ndarray, p_right: np.ndarray) -> StereoGeometry:
    """KITTI's P_rect_0i are relative to camera 0; the pair's baseline is their x offset difference."""
    fx = p_left[0, 0]
    return StereoGeometry(fx=float(fx), fy=float(p_left[1, 1]), cx_left=float(p_left[0, 2]),
                          cx_right=float(p_right[0, 2]), cy=float(p_left[1, 2]),
                          baseline_m=float((p_left[0, 3] - p_right[0, 3]) / fx))


RAW_CALIBRATION_KEYS = ("distortion_model", "k", "d", "r")


def raw_calibration_from_yaml(path: str | Path) -> dict[str, dict]:
    """--raw-calibration: {side: {distortion_model, k, d, r}} for 'left' and 'right'."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if set(values) != {"left", "right"}:
        raise ValueError(f"{path}: needs exactly a 'left' and a 'right' section, got {sorted(values)}")
    for side, camera in values.items():
        if not isinstance(camera, dict) or set(camera) != set(RAW_CALIBRATION_KEYS):
            found = sorted(camera) if isinstance(camera, dict) else camera
            raise ValueError(f"{path}: '{side}' needs the keys {', '.join(RAW_CALIBRATION_KEYS)}, got {found}")
        try:  # checked now with a stand-in P (the frames bring theirs), not at the first frame
            k = tuple(float(v) for v in camera["k"])
            CameraCalibration(1, 1, str(camera["distortion_model"]), tuple(float(v) for v in camera["d"]), k,
                              tuple(float(v) for v in camera["r"]), (*k[:3], 0.0, *k[3:6], 0.0, *k[6:], 0.0))
        except (CalibrationError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: '{side}': {error}") from error
    return values


def distorted_frame(frame: PlayerFrame, raw_calibration: dict[str, dict]) -> PlayerFrame:
    """The frame as raw cameras with `raw_calibration` see it: images re-distorted (see
    rectification.distort), camera_infos with the raw K, D, R and the frame's P."""
    messages = dict(frame.messages)
    for side in ("left", "right"):
        info, image, camera = frame.messages[f"{side}_info"], frame.messages[f"{side}_image"], raw_calibration[side]
        raw_info = CameraInfo(header=info.header, width=image.width, height=image.height,
                              distortion_model=camera["distortion_model"])
        raw_info.k = [float(v) for v in camera["k"]]
        raw_info.d = [float(v) for v in camera["d"]]
        raw_info.r = [float(v) for v in camera["r"]]
        raw_info.p = list(info.p)
        try:
            calibration = CameraCalibration.from_camera_info(raw_info)
        except CalibrationError as error:
            raise ValueError(f"--raw-calibration, {side}: {error}") from error
        pixels = image_to_numpy(image)
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))  # native order for OpenCV
        messages[f"{side}_info"] = raw_info
        messages[f"{side}_image"] = numpy_to_image(distort(pixels, calibration), image.encoding, image.header)
    return PlayerFrame(messages, frame.recorded_ns)


def raw_source(source: Callable[[], Iterator[PlayerFrame]],
               raw_calibration: dict[str, dict]) -> Callable[[], Iterator[PlayerFrame]]:
    """A frame pass factory yielding `source`'s frames as raw images (distorted_frame)."""
    return lambda: (distorted_frame(frame, raw_calibration) for frame in source())


# -- sources ----------------------------------------------------------------------------------

def read_stereo_image(path: Path) -> np.ndarray:
    """An image file as published: 8-bit grey stays mono8, 16-bit grey mono16, anything else RGB8."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is not None and raw.ndim == 2 and raw.dtype in (np.uint8, np.uint16):
        return raw
    return read_image_rgb(path)


def folder_pairs(root: Path, calibration: StereoGeometry | None = None) -> list[tuple[str, Path, Path, Callable]]:
    """(name, left, right, geometry loader) of every pair of a Middlebury or KITTI layout folder."""
    pairs = []
    for left_dir, right_dir in KITTI_IMAGE_DIRS:
        for left in sorted((root / left_dir).glob("*.png")):
            right = root / right_dir / left.name
            if not right.is_file():
                continue
            calib_files = [(root / folder / f"{left.stem.split('_')[0]}.txt", keys)
                           for folder, *keys in KITTI_CALIBS]
            found = next(((path, keys) for path, keys in calib_files if path.is_file()), None)
            if calibration is None and found is None:
                raise ValueError(f"{left}: no KITTI calibration ({' or '.join(str(p) for p, _ in calib_files)}); "
                                 "give --calibration")
            loader = ((lambda geometry=calibration: geometry) if calibration is not None else
                      (lambda path=found[0], keys=found[1]: geometry_from_kitti_projections(
                          *read_kitti_projections(path, *keys))))
            pairs.append((f"{left_dir}/{left.stem}", left, right, loader))
    if pairs:
        return pairs
    for left in sorted(root.rglob("im0.png")):
        right, calib = left.parent / "im1.png", left.parent / "calib.txt"
        if not right.is_file():
            continue
        if calibration is None and not calib.is_file():
            raise ValueError(f"{left.parent}: no calib.txt; give --calibration")
        loader = ((lambda geometry=calibration: geometry) if calibration is not None else
                  (lambda path=calib: geometry_from_middlebury_calib(path)))
        pairs.append((left.parent.relative_to(root).as_posix(), left, right, loader))
    if not pairs:
        raise ValueError(f"{root}: no stereo pairs in Middlebury (CASE/im0.png, im1.png) or KITTI "
                         "(image_2/, image_3/) layout")
    return pairs


def folder_frames(root: Path, calibration: StereoGeometry | None = None) -> Callable[[], Iterator[PlayerFrame]]:
    """A pass over the folder's pairs; images are read when their frame is due."""
    pairs = folder_pairs(root, calibration)

    def frames() -> Iterator[PlayerFrame]:
        for name, left, right, geometry in pairs:
            yield frame_messages(StereoFrames(read_stereo_image(left), read_stereo_image(right), geometry(), name))

    return frames


def is_bag(path: Path) -> bool:
    return (path / "metadata.yaml").is_file() or (path.is_file() and path.suffix in BAG_SUFFIXES)


class BagFrames:
    """Passes over a bag's stereo pairs (exact stamp match), each with its sides' latest camera_info.

    topics: TOPIC_KEYS -> topic name in the bag. Images waiting for their partner are bounded by
    BAG_PAIRING_QUEUE per side (the oldest evicted, counted in `evicted`, warned about once).
    """

    def __init__(self, path: Path, topics: dict[str, str]):
        from rosbags.rosbag2 import Reader

        with Reader(path) as reader:
            missing = [name for name in topics.values() if name not in reader.topics]
        if missing:
            raise ValueError(f"{path}: no topic {', '.join(missing)}")
        self.path = path
        self.key_of = {name: key for key, name in topics.items()}
        self.evicted = 0

    def _wait(self, queue: dict[int, Image], stamp: int, msg: Image) -> None:
        queue[stamp] = msg
        if len(queue) > BAG_PAIRING_QUEUE:
            del queue[next(iter(queue))]  # insertion order: the oldest unmatched image
            if not self.evicted:
                get_logger("stereo_kd_player").warning(
                    f"{self.path}: images without a partner of equal stamp: keeping the newest "
                    f"{BAG_PAIRING_QUEUE} per side")
            self.evicted += 1

    def __call__(self) -> Iterator[PlayerFrame]:
        from rosbags.rosbag2 import Reader

        latest: dict[str, object] = {}
        waiting: dict[str, dict[int, Image]] = {"left": {}, "right": {}}
        with Reader(self.path) as reader:
            connections = [c for c in reader.connections if c.topic in self.key_of]
            for conn, log_ns, raw in reader.messages(connections):
                key = self.key_of[conn.topic]
                side, kind = key.split("_")
                msg = deserialize_message(bytes(raw), CameraInfo if kind == "info" else Image)
                if kind == "info":
                    latest[key] = msg
                    continue
                stamp = stamp_to_ns(msg.header.stamp)
                partner = waiting["right" if side == "left" else "left"].pop(stamp, None)
                if partner is None:
                    self._wait(waiting[side], stamp, msg)
                    continue
                if "left_info" not in latest or "right_info" not in latest:
                    continue  # as the node would: no geometry yet
                waiting["left"] = {s: m for s, m in waiting["left"].items() if s > stamp}
                waiting["right"] = {s: m for s, m in waiting["right"].items() if s > stamp}
                other_side = "right" if side == "left" else "left"
                yield PlayerFrame({"left_info": latest["left_info"], "right_info": latest["right_info"],
                                   f"{side}_image": msg, f"{other_side}_image": partner}, recorded_ns=log_ns)


def bag_frames(path: Path, topics: dict[str, str]) -> BagFrames:
    """A pass factory over a bag's stereo pairs; see BagFrames."""
    return BagFrames(path, topics)


def open_source(source: str, calibration: str | None, bag_topics: dict[str, str]) -> tuple[str, Callable, bool]:
    """(description, frame pass factory, repeats) of a --source value."""
    if source == "motorcycle":
        stereo = motorcycle_pair()
        return f"'{stereo.name}'", lambda: iter([frame_messages(stereo)]), True
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--source: '{source}' is neither 'motorcycle' nor an existing folder or bag")
    if is_bag(path):
        return f"bag {path}", bag_frames(path, bag_topics), False
    geometry = geometry_from_yaml(calibration) if calibration else None
    return f"folder {path}", folder_frames(path, geometry), False


class StereoPlayer(Node):
    """Publishes stereo frames at `rate_hz` or at their recorded timing.

    `frames` > 0: stop after that many frames, counted from when every topic has a subscriber.
    `loop`: start the source again at its end (a one-pair source always repeats); recorded frames
    are then restamped, since their stamps would jump back at each new pass.
    `restamp`: give recorded frames fresh stamps (frames from files always get fresh ones).
    """

    def __init__(self, source: Callable[[], Iterator[PlayerFrame]], description: str = "stereo",
                 rate_hz: float = 10.0, frames: int = 0, loop: bool = False, recorded_timing: bool = False,
                 restamp: bool = False, topics: dict[str, str] | None = None, **node_options):
        super().__init__("stereo_kd_player", **node_options)
        topics = topics or {"left_info": "left/camera_info", "left_image": "left/image_rect",
                            "right_info": "right/camera_info", "right_image": "right/image_rect"}
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.publishers_by_key = {key: self.create_publisher(CameraInfo if key.endswith("info") else Image,
                                                             topics[key], qos) for key in TOPIC_KEYS}
        self.source, self.loop, self.frames, self.restamp = source, loop, frames, restamp or loop
        self.recorded_timing = recorded_timing
        self.published = 0
        self._pass: Iterator[PlayerFrame] | None = None
        self._next: PlayerFrame | None = None
        self._pass_start: tuple[float, int] | None = None  # (monotonic s, recorded ns) at a pass's first frame
        self._done = False
        period = RECORDED_TIMING_POLL_S if recorded_timing else 1.0 / rate_hz
        self.create_timer(period, self._tick)
        self.get_logger().info(f"publishing {description} "
                               f"{'at the recorded timing' if recorded_timing else f'at {rate_hz} Hz'}, "
                               f"{frames or 'unlimited'} frames{', looping' if loop else ''}")

    def _peek(self) -> PlayerFrame | None:
        """The next frame, starting a new pass at the end of one when looping."""
        if self._next is None and not self._done:
            for attempt in range(2):
                if self._pass is None:
                    self._pass, self._pass_start = self.source(), None
                self._next = next(self._pass, None)
                if self._next is not None or not self.loop or attempt:
                    break
                self._pass = None
            self._done = self._next is None
        return self._next

    def _tick(self) -> None:
        if self.frames and not all(pub.get_subscription_count() for pub in self.publishers_by_key.values()):
            return  # a fixed number of frames counts from when every topic has a subscriber
        try:
            frame = self._peek()
        except (ValueError, OSError) as error:
            self.get_logger().error(f"cannot read the next frame: {error}")
            self._pass, self._next = None, None
            self._done = not self.loop
            frame = None
        if frame is None:
            if self._done:
                self._finish()
            return
        if self.recorded_timing and frame.recorded_ns is not None:
            now = time.monotonic()
            if self._pass_start is None:
                self._pass_start = (now, frame.recorded_ns)
            if now - self._pass_start[0] < (frame.recorded_ns - self._pass_start[1]) * 1e-9:
                return  # not due yet
        self._next = None
        if frame.recorded_ns is None or self.restamp:
            stamp = self.get_clock().now().to_msg()
            for msg in frame.messages.values():
                msg.header.stamp = stamp
        try:
            for key in TOPIC_KEYS:  # camera_info first, then the image, per side
                self.publishers_by_key[key].publish(frame.messages[key])
        except Exception:
            if self.context.ok():
                raise
            return  # SIGINT/SIGTERM shut the context down mid-frame: the rest of the frame is dropped
        self.published += 1
        if self.frames and self.published >= self.frames:
            self._finish()

    def _finish(self) -> None:
        self.get_logger().info(f"published {self.published} frames")
        time.sleep(0.5)  # let reliable writers deliver the last frame before exiting
        rclpy.try_shutdown(context=self.context)

    def close(self) -> None:
        """Release the source (an open bag); a frame not yet published is dropped."""
        if self._pass is not None and hasattr(self._pass, "close"):
            self._pass.close()
        self._pass = self._next = None


def use_large_images_profile() -> None:
    """Unless the environment names a Fast DDS profile (or another RMW), the player's participant
    uses config/fastdds_large_images.xml: Fast DDS's own transports with a shared memory segment
    that holds its images. With the built-in 0.5 MB segment a 1.1 MB image goes over UDP in 64 kB
    fragments and, to a sensor-data (best effort) subscriber, most images lose one (README "QoS
    and large images")."""
    if os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE") or os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") \
            != "rmw_fastrtps_cpp":
        return
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    candidates = [Path(__file__).resolve().parents[1]]  # a source checkout
    try:
        candidates.insert(0, Path(get_package_share_directory("stereo_kd_ros")))
    except (PackageNotFoundError, OSError):
        pass
    profile = next((path / "config" / LARGE_IMAGES_PROFILE for path in candidates
                    if (path / "config" / LARGE_IMAGES_PROFILE).is_file()), None)
    if profile is not None:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)


def main(argv: list[str] | None = None) -> int:
    """Console script `stereo_kd_player`."""
    args_in = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(prog="stereo_kd_player", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--source", default="motorcycle",
                        help="'motorcycle' (built in), a folder of pairs, or a ROS 2 bag (folder, .db3 or .mcap).")
    parser.add_argument("--calibration", default=None, help="YAML geometry for a folder (keys below).")
    parser.add_argument("--raw-calibration", default=None,
                        help="YAML raw camera calibration (below): publish re-distorted raw images.")
    parser.add_argument("--rate", type=float, default=10.0, help="Frames per second.")
    parser.add_argument("--recorded-timing", action="store_true", help="Bag: publish at the recorded times.")
    parser.add_argument("--loop", action="store_true",
                        help="Start the folder or bag again at its end. Implies --restamp for a bag (recorded "
                             "stamps would jump back at every pass).")
    parser.add_argument("--restamp", action="store_true", help="Bag: fresh stamps instead of the recorded ones.")
    parser.add_argument("--frames", type=int, default=0, help="Frames to publish, then exit (0 = all / forever).")
    topic_flags = {"left_image": "left/image_rect", "right_image": "right/image_rect",
                   "left_info": "left/camera_info", "right_info": "right/camera_info"}
    for key, default in topic_flags.items():
        flag = key.replace("_", "-")
        what = key.replace("_", " ")
        published_help = f"Published {what} topic" + (" (image_raw with --raw-calibration)." if "image" in key else ".")
        parser.add_argument(f"--{flag}-topic", default=None, help=published_help)
        parser.add_argument(f"--bag-{flag}-topic", default=f"/{default}", help=f"Bag: recorded {what} topic.")
    args = parser.parse_args(remove_ros_args(args_in)[1:])
    keep_freed_memory()  # two images a frame: reuse their pages (stereo_kd_core.allocator)
    if args.rate <= 0 or args.frames < 0:
        parser.error("--rate must be > 0 and --frames >= 0")
    if args.raw_calibration:
        topic_flags.update(left_image="left/image_raw", right_image="right/image_raw")
    topics = {key: getattr(args, f"{key}_topic") or topic_flags[key] for key in TOPIC_KEYS}
    bag_topics = {key: getattr(args, f"bag_{key}_topic") for key in TOPIC_KEYS}
    try:
        description, source, repeats = open_source(args.source, args.calibration, bag_topics)
        if args.raw_calibration:
            source = raw_source(source, raw_calibration_from_yaml(args.raw_calibration))
            description += f" as raw images ({args.raw_calibration})"
    except (ValueError, FileNotFoundError) as error:
        print(f"stereo_kd_player: {error}", file=sys.stderr)
        return 2
    if args.recorded_timing and not is_bag(Path(args.source)):
        parser.error("--recorded-timing needs a bag source")
    use_large_images_profile()  # before rclpy creates the participant
    return run(lambda: StereoPlayer(source, description, rate_hz=args.rate, frames=args.frames,
                                    loop=args.loop or repeats, recorded_timing=args.recorded_timing,
                                    restamp=args.restamp, topics=topics), args_in,
               program="stereo_kd_player")


if __name__ == "__main__":
    sys.exit(main())
