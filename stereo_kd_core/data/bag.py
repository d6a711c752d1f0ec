"""Stereo frames from recorded ROS 2 bags (sqlite3 or MCAP), read with the `rosbags` library.

No ROS install and no rclpy: the image decoders here serve offline bag processing
(`stereo-kd bag`, `stereo-kd adapt`) and the node alike (stereo_kd_ros.payloads re-exports
them). Decoders take any object with the Image message's field names (`encoding`, `height`,
`width`, `step`, `is_bigendian`, `data`), as rclpy and rosbags messages both have.

Pairing follows the node's exact sync: a left and a right image with equal header stamps make
a pair, checked against the latest camera_info of each side. A pair that cannot be used is
counted under the node's reason names: `missing_camera_info`, `bad_camera_info`,
`frame_mismatch`, `size_mismatch`, `stamp_out_of_order`, image decoding reasons
(`unsupported_encoding`, ...), `unmatched_image`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stereo_kd_core.geometry import StereoGeometry

PENDING_IMAGES_PER_SIDE = 64  # unmatched images kept waiting for their partner
IMAGE_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
DEFAULT_TOPICS = {"left_image": "/left/image_rect", "right_image": "/right/image_rect",
                  "left_info": "/left/camera_info", "right_info": "/right/camera_info"}


@dataclass(frozen=True)
class PixelFormat:
    dtype: np.dtype        # one channel, little-endian
    channels: int
    rgb_channels: slice | None  # channel slice giving R, G, B (a view); None for one channel


PIXEL_FORMATS: dict[str, PixelFormat] = {
    "mono8": PixelFormat(np.dtype(np.uint8), 1, None),
    "8UC1": PixelFormat(np.dtype(np.uint8), 1, None),
    "mono16": PixelFormat(np.dtype("<u2"), 1, None),
    "16UC1": PixelFormat(np.dtype("<u2"), 1, None),
    "rgb8": PixelFormat(np.dtype(np.uint8), 3, slice(None)),
    "bgr8": PixelFormat(np.dtype(np.uint8), 3, slice(None, None, -1)),
    "8UC3": PixelFormat(np.dtype(np.uint8), 3, slice(None, None, -1)),  # OpenCV's default channel order
    "rgba8": PixelFormat(np.dtype(np.uint8), 4, slice(0, 3)),
    "bgra8": PixelFormat(np.dtype(np.uint8), 4, slice(2, None, -1)),
    "32FC1": PixelFormat(np.dtype("<f4"), 1, None),
}
INPUT_ENCODINGS = ("mono8", "8UC1", "mono16", "16UC1", "rgb8", "bgr8", "8UC3", "rgba8", "bgra8")


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class ImageFormatError(ValueError):
    """An Image message whose layout cannot be decoded; `reason` is a short counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_to_numpy(msg: Any, encodings: tuple[str, ...] = tuple(PIXEL_FORMATS)) -> np.ndarray:
    """View of an Image as HxW or HxWxC in its own channel order (read-only, no copy).

    Padded rows become a strided view; big-endian data becomes a byte-swapped dtype view.
    Raises ImageFormatError for an unsupported encoding or inconsistent step/data length.
    """
    fmt = PIXEL_FORMATS.get(msg.encoding)
    if fmt is None or msg.encoding not in encodings:
        raise ImageFormatError(
            "unsupported_encoding",
            f"unsupported encoding '{msg.encoding}' (supported: {', '.join(encodings)})",
        )
    height, width, step = msg.height, msg.width, msg.step
    pixel_bytes = fmt.dtype.itemsize * fmt.channels
    if height == 0 or width == 0:
        raise ImageFormatError("empty_image", f"empty image ({width}x{height})")
    if step < width * pixel_bytes:
        raise ImageFormatError(
            "step_too_small",
            f"step {step} is smaller than width * bytes_per_pixel = {width} * {pixel_bytes}",
        )
    if len(msg.data) != step * height:
        raise ImageFormatError(
            "data_length",
            f"data length {len(msg.data)} != step * height = {step} * {height} = {step * height}",
        )
    dtype = fmt.dtype.newbyteorder(">") if msg.is_bigendian else fmt.dtype
    if step % fmt.dtype.itemsize:
        # Rows that start off the element alignment cannot be strided views; copy them out.
        raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)[:, : width * pixel_bytes]
        flat = np.ascontiguousarray(raw).view(dtype)
    else:
        flat = np.frombuffer(msg.data, dtype=dtype)
        flat = np.lib.stride_tricks.as_strided(
            flat, shape=(height, width * fmt.channels), strides=(step, fmt.dtype.itemsize),
            writeable=False,
        )
    shape = (height, width) if fmt.channels == 1 else (height, width, fmt.channels)
    return flat.reshape(shape)


# Colour encodings that need their channels reordered (or alpha dropped) to become RGB.
_TO_RGB = {"bgr8": cv2.COLOR_BGR2RGB, "8UC3": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB,
           "bgra8": cv2.COLOR_BGRA2RGB}


def image_to_rgb(msg: Any) -> np.ndarray:
    """An input image as the estimator takes it: HxW (mono) or HxWx3 RGB, uint8/uint16, native byte order.

    mono and rgb8 data are a view of the message (no copy). Other colour encodings are
    converted by one OpenCV pass into a contiguous RGB array: a reordered NumPy view would be
    free here but every consumer (estimator staging, resizing, colour packing) then copies it
    through a 3-long inner loop, about 30x slower (1.6 ms vs 0.05 ms at 640x480). Big-endian
    16-bit data is byte-swapped into a copy.
    """
    pixels = image_to_numpy(msg, INPUT_ENCODINGS)
    if pixels.dtype.byteorder == ">":
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    conversion = _TO_RGB.get(msg.encoding)
    return pixels if conversion is None else cv2.cvtColor(pixels, conversion)


class SkippedPairError(Exception):
    """A pair that cannot be used; `reason` is the node's counter key, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass
class StereoPair:
    """A checked pair: decoded images (HxW or HxWx3 RGB, uint8/uint16), geometry, messages."""

    left: Any              # the left Image message
    right: Any
    left_rgb: np.ndarray
    right_rgb: np.ndarray
    geometry: StereoGeometry
    stamp_ns: int


class StereoPairing:
    """Pairs left and right Image messages by equal header stamps and checks each pair
    against the latest camera_info of both sides, as the node does.

    Feed messages in log order: `add_info(side, msg)`; `add_image(side, msg)` returns the
    (left, right) messages when `msg` completes a pair; `check(left, right)` decodes and
    checks a pair (SkippedPairError otherwise). `skipped` counts unmatched images; call
    `finish()` after the last message to count the ones still waiting.
    """

    def __init__(self, topics: dict[str, str] | None = None) -> None:
        self.topics = dict(topics or DEFAULT_TOPICS)
        self.infos: dict[str, Any] = {}
        self.pending: dict[str, OrderedDict] = {"left": OrderedDict(), "right": OrderedDict()}
        self.last_stamp_ns: int | None = None
        self.skipped: Counter = Counter()
        self._geometry: tuple[tuple, StereoGeometry] | None = None

    def add_info(self, side: str, msg: Any) -> None:
        self.infos[side] = msg

    def add_image(self, side: str, msg: Any) -> tuple[Any, Any] | None:
        stamp = stamp_to_ns(msg.header.stamp)
        partner = self.pending["right" if side == "left" else "left"].pop(stamp, None)
        if partner is None:
            waiting = self.pending[side]
            waiting[stamp] = msg
            if len(waiting) > PENDING_IMAGES_PER_SIDE:
                waiting.popitem(last=False)
                self.skipped["unmatched_image"] += 1
            return None
        return (msg, partner) if side == "left" else (partner, msg)

    def finish(self) -> None:
        self.skipped["unmatched_image"] += len(self.pending["left"]) + len(self.pending["right"])
        self.pending = {"left": OrderedDict(), "right": OrderedDict()}

    def check(self, left: Any, right: Any) -> StereoPair:
        """Decode and check a pair; advances the stamp order only for pairs that pass."""
        missing = [side for side in ("left", "right") if side not in self.infos]
        if missing:
            raise SkippedPairError("missing_camera_info", "no camera_info yet on "
                                   + ", ".join(self.topics[f"{side}_info"] for side in missing))
        stamp = stamp_to_ns(left.header.stamp)
        if self.last_stamp_ns is not None and stamp <= self.last_stamp_ns:
            raise SkippedPairError("stamp_out_of_order", f"stamp {stamp} ns is not after {self.last_stamp_ns} ns")
        for side, image in (("left", left), ("right", right)):
            info = self.infos[side]
            if image.header.frame_id != info.header.frame_id:
                raise SkippedPairError("frame_mismatch", f"{self.topics[side + '_image']} frame "
                                       f"'{image.header.frame_id}' vs {self.topics[side + '_info']} "
                                       f"'{info.header.frame_id}'")
            if info.width and info.height and (info.width, info.height) != (image.width, image.height):
                raise SkippedPairError("size_mismatch", f"{self.topics[side + '_image']} is "
                                       f"{image.width}x{image.height} but {self.topics[side + '_info']} "
                                       f"says {info.width}x{info.height}")
        try:
            left_rgb, right_rgb = image_to_rgb(left), image_to_rgb(right)
        except ImageFormatError as error:
            raise SkippedPairError(error.reason, str(error)) from error
        if left_rgb.shape != right_rgb.shape or left_rgb.dtype != right_rgb.dtype:
            raise SkippedPairError("size_mismatch", f"{self.topics['left_image']} {left_rgb.shape} "
                                   f"{left_rgb.dtype} vs {self.topics['right_image']} {right_rgb.shape} "
                                   f"{right_rgb.dtype}")
        key = (tuple(self.infos["left"].p), tuple(self.infos["right"].p))
        if self._geometry is None or self._geometry[0] != key:
            try:
                self._geometry = (key, StereoGeometry.from_projections(*key))
            except ValueError as error:
                raise SkippedPairError("bad_camera_info", str(error)) from error
        self.last_stamp_ns = stamp
        return StereoPair(left, right, left_rgb, right_rgb, self._geometry[1], stamp)


def find_stereo_topics(topics: dict[str, str], given: dict[str, str | None] | None = None,
                       source: str = "bag") -> dict[str, str]:
    """The four stereo topics of a bag: those `given` (None = find); an image topic is the
    default (/left/image_rect, /right/image_rect) when the bag has it, else the one Image topic
    whose name holds "left" / "right" (preferring "rect"); a camera_info topic is the
    `camera_info` next to its image topic, else the default (/left/camera_info, ...).

    topics: {topic: message type}. ValueError naming the topics when no stereo pair is found.
    """
    given = {key: value for key, value in (given or {}).items() if value}
    images = sorted(t for t, kind in topics.items() if kind == IMAGE_TYPE)
    chosen = dict(given)
    for side in ("left", "right"):
        image_key, info_key = f"{side}_image", f"{side}_info"
        if image_key not in chosen:
            if DEFAULT_TOPICS[image_key] in topics:
                chosen[image_key] = DEFAULT_TOPICS[image_key]
            else:
                candidates = [t for t in images if side in t.lower()]
                candidates = [t for t in candidates if "rect" in t.lower()] or candidates
                if len(candidates) != 1:
                    found = ", ".join(candidates or images) or "no Image topics at all"
                    raise ValueError(f"{source}: cannot tell the {side} image topic: "
                                     f"{'several' if candidates else 'no'} Image topics with '{side}' in the "
                                     f"name ({found}); give it with --{side}-image-topic")
                chosen[image_key] = candidates[0]
        if info_key not in chosen:
            sibling = chosen[image_key].rsplit("/", 1)[0] + "/camera_info"
            default = DEFAULT_TOPICS[info_key]
            chosen[info_key] = default if default in topics and sibling not in topics else sibling
    for key in DEFAULT_TOPICS:
        topic, flag = chosen[key], "--" + key.replace("_", "-") + "-topic"
        if topic not in topics:
            raise ValueError(f"{source}: no topic '{topic}' for the {key.replace('_', ' ')} (give it with {flag}); "
                             f"topics: {', '.join(sorted(topics)) or 'none'}")
        expected = IMAGE_TYPE if key.endswith("image") else INFO_TYPE
        if topics[topic] != expected:
            raise ValueError(f"{source}: topic '{topic}' is {topics[topic]}, expected {expected}")
    return {key: chosen[key] for key in DEFAULT_TOPICS}


@dataclass
class BagFrame:
    """One usable stereo pair of a bag: its index among the bag's usable pairs (time order)."""

    index: int
    stamp_ns: int
    left: np.ndarray   # HxWx3 RGB (or HxW mono), uint8/uint16
    right: np.ndarray
    geometry: StereoGeometry


def read_stereo_frames(path: str | Path, topics: dict[str, str | None] | None = None,
                       skipped: Counter | None = None) -> Iterator[BagFrame]:
    """The usable stereo pairs of a rosbag2 bag (folder, .db3 or .mcap), in log order.

    topics: left_image, right_image, left_info, right_info (None or absent = found, see
    `find_stereo_topics`). Unusable pairs are counted in `skipped` by reason; ValueError
    when the bag has no usable pair at all (naming the topics and the first reason).
    """
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    typestore = get_typestore(Stores.ROS2_KILTED)
    skipped = Counter() if skipped is None else skipped
    first_problem: str | None = None
    count = 0
    with Reader(path) as reader:
        chosen = find_stereo_topics({t: info.msgtype for t, info in reader.topics.items()}, topics, str(path))
        pairing = StereoPairing(chosen)
        roles = {chosen["left_image"]: ("image", "left"), chosen["right_image"]: ("image", "right"),
                 chosen["left_info"]: ("info", "left"), chosen["right_info"]: ("info", "right")}
        wanted = [c for c in reader.connections if c.topic in roles]
        for conn, _, raw in reader.messages(connections=wanted):
            kind, side = roles[conn.topic]
            msg = typestore.deserialize_cdr(raw, conn.msgtype)
            if kind == "info":
                pairing.add_info(side, msg)
                continue
            pair = pairing.add_image(side, msg)
            if pair is None:
                continue
            try:
                checked = pairing.check(*pair)
            except SkippedPairError as skip:
                skipped[skip.reason] += 1
                first_problem = first_problem or skip.detail
                continue
            yield BagFrame(count, checked.stamp_ns, np.array(checked.left_rgb), np.array(checked.right_rgb),
                           checked.geometry)
            count += 1
    pairing.finish()
    skipped.update(pairing.skipped)
    if count == 0:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()) if n) or "no images"
        raise ValueError(f"{path}: no usable stereo pair on {chosen['left_image']} + {chosen['right_image']} "
                         f"({reasons}){': ' + first_problem if first_problem else ''}")
