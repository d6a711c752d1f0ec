"""Offline stereo over a recorded ROS 2 bag, without a ROS install (rosbags + stereo_kd_core).

Reads the rectified stereo topics of a rosbag2 bag (sqlite3 or MCAP), pairs left and right
images by equal header stamps (as the node's exact sync does), runs StereoEstimator on every
pair and writes a new bag holding every input message unchanged plus `disparity`
(stereo_msgs/msg/DisparityImage) and `points2` (sensor_msgs/msg/PointCloud2), built with the
same payload code and defaults as the node (organized cloud, rgb when use_color, the node's
default minimum confidence, no depth limits). Each output is logged at the receive time of the image
that completed its pair and stamped with the left image's header.

Skipped pairs are counted by reason in the summary, with the node's reason names:
`missing_camera_info` (no camera_info on a side yet), `bad_camera_info`, `frame_mismatch`,
`size_mismatch`, `stamp_out_of_order`, image decoding reasons (`unsupported_encoding`, ...),
`unmatched_image` (an image whose partner with the same stamp never came), `max_pairs`
(pairs past the `max_pairs` limit), `estimator_error`.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import McapReader
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.confidence import DEFAULT_MIN_CONFIDENCE, density_percent, drop_low_confidence, low_confidence
from stereo_kd_core.data.bag import SkippedPairError, StereoPairing
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.viz import stereo_panel, write_animation
from stereo_kd_ros import payloads

STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
DISPARITY_TYPE = "stereo_msgs/msg/DisparityImage"
POINTS_TYPE = "sensor_msgs/msg/PointCloud2"


def input_storage(reader: Reader) -> str:
    """'mcap' or 'sqlite3': the storage format of an open bag."""
    storages = getattr(reader.storage, "storages", [reader.storage])  # a bag folder or a single file
    return "mcap" if isinstance(storages[0], McapReader) else "sqlite3"


class _OutputBuilder:
    """Builds the node's output messages as rosbags messages and serializes them."""

    def __init__(self, typestore: Any, estimator: StereoEstimator, use_color: bool):
        self.typestore = typestore
        self.estimator = estimator
        self.use_color = use_color
        types = typestore.types
        self.image_type, self.disparity_type = types["sensor_msgs/msg/Image"], types[DISPARITY_TYPE]
        self.cloud_type, self.field_type = types[POINTS_TYPE], types["sensor_msgs/msg/PointField"]
        self.roi_type = types["sensor_msgs/msg/RegionOfInterest"]

    def disparity(self, disparity: np.ndarray, header: Any, geometry: StereoGeometry) -> bytes:
        estimator = self.estimator
        payload = payloads.disparity_payload(
            disparity, geometry, min_disparity=estimator.min_disparity,
            max_disparity=estimator.min_disparity + estimator.max_disparity - 1)
        height, width = payload.values.shape
        image = self.image_type(header=header, height=height, width=width, encoding="32FC1", is_bigendian=0,
                                step=width * 4, data=payload.values.reshape(-1).view(np.uint8))
        window = payload.valid_window
        roi = self.roi_type(x_offset=window.x_offset, y_offset=window.y_offset, height=window.height,
                            width=window.width, do_rectify=False)
        msg = self.disparity_type(header=header, image=image, f=payload.f, t=payload.t, valid_window=roi,
                                  min_disparity=payload.min_disparity, max_disparity=payload.max_disparity,
                                  delta_d=payload.delta_d)
        return bytes(self.typestore.serialize_cdr(msg, DISPARITY_TYPE))

    def points(self, disparity: np.ndarray, left_rgb: np.ndarray, header: Any, geometry: StereoGeometry) -> bytes:
        points = geometry.points_from_disparity(disparity)  # (H, W, 3) metres
        color = left_rgb if self.use_color else None
        payload = payloads.point_cloud_payload(points, color)
        fields = [self.field_type(name=name, offset=4 * i, datatype=payloads.FLOAT32, count=1)
                  for i, name in enumerate(payload.field_names)]
        height, width = payload.values.shape[:2]
        msg = self.cloud_type(header=header, height=height, width=width, fields=fields, is_bigendian=False,
                              point_step=payload.point_step, row_step=payload.row_step,
                              data=payload.values.reshape(-1).view(np.uint8), is_dense=payload.is_dense)
        return bytes(self.typestore.serialize_cdr(msg, POINTS_TYPE))


def run_bag(
    input_path: str | Path,
    output_path: str | Path,
    model: str | None = None,
    device: str = "auto",
    left_image_topic: str = "/left/image_rect",
    right_image_topic: str = "/right/image_rect",
    left_info_topic: str = "/left/camera_info",
    right_info_topic: str = "/right/camera_info",
    disparity_topic: str = "/disparity",
    points_topic: str = "/points2",
    use_color: bool = True,
    max_pairs: int | None = None,
    storage: str | None = None,
    precision: str = "auto",
    max_disparity: int = 192,
    animation: str | Path | None = None,
    animation_fps: float = 5.0,
    animation_frames: int = 60,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> dict:
    """Run the estimator over a bag's stereo pairs; write `output_path` (a new bag) and return a summary
    (with what ran: registry.describe_estimator). model: as StereoEstimator.load (None: the default).

    storage: 'sqlite3' or 'mcap' for the output; None = the input's format.
    max_pairs: estimate at most this many pairs (every input message is still copied).
    animation: also write the first `animation_frames` result panels (left, disparity, confidence,
    point cloud) as an animated GIF (or MP4 where Pillow is missing) at this path.
    min_confidence: pixels below this confidence are invalid in disparity and points2; the summary's
    `density` is the mean percentage of pixels left.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if storage is not None and storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got '{storage}'")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
    if output_path.exists():
        raise ValueError(f"output bag {output_path} exists already; give a new path")
    image_topics = {left_image_topic: "left", right_image_topic: "right"}
    info_topics = {left_info_topic: "left", right_info_topic: "right"}
    typestore = get_typestore(Stores.ROS2_KILTED)
    model = registry.default_model() if model is None else model
    estimator = StereoEstimator.load(model, device=device, precision=precision, max_disparity=max_disparity)
    builder = _OutputBuilder(typestore, estimator, use_color)
    skipped: Counter = Counter()
    processed, copied, inference_s = 0, 0, 0.0
    panels: list[np.ndarray] = []
    densities: list[float] = []
    low_confidence(np.zeros(1), min_confidence)  # a bad threshold fails before any work
    start = time.perf_counter()

    with Reader(input_path) as reader:
        topics = reader.topics
        for topic in (*image_topics, *info_topics):
            if topic not in topics:
                raise ValueError(f"{input_path}: no topic '{topic}' (topics: {', '.join(sorted(topics))})")
        for topic in (disparity_topic, points_topic):
            if topic in topics:
                raise ValueError(f"{input_path} already has a topic '{topic}'; choose other output topics")
        out_storage = storage or input_storage(reader)
        pair_total = min(topics[left_image_topic].msgcount, topics[right_image_topic].msgcount)
        if max_pairs is not None:
            pair_total = min(pair_total, max_pairs)

        pairing = StereoPairing({"left_image": left_image_topic, "right_image": right_image_topic,
                                 "left_info": left_info_topic, "right_info": right_info_topic})

        def process(left: Any, right: Any) -> tuple[bytes, bytes]:
            pair = pairing.check(left, right)
            left_rgb, geometry = pair.left_rgb, pair.geometry
            header = typestore.types["std_msgs/msg/Header"](stamp=left.header.stamp, frame_id=left.header.frame_id)
            try:
                prediction = estimator.predict(left_rgb, pair.right_rgb)
            except (ValueError, RuntimeError) as error:
                raise SkippedPairError("estimator_error") from error
            disparity = drop_low_confidence(prediction.disparity, prediction.confidence, min_confidence)
            densities.append(density_percent(disparity))  # (H, W) float32 above, NaN invalid
            if animation is not None and len(panels) < animation_frames:
                panels.append(stereo_panel(left_rgb, disparity, prediction.confidence,
                                           geometry.points_from_disparity(disparity), estimator.max_disparity))
            return (builder.disparity(disparity, header, geometry),
                    builder.points(disparity, left_rgb, header, geometry))

        output_path.parent.mkdir(parents=True, exist_ok=True)
        with Writer(output_path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[out_storage]) as writer:
            connections = {}
            for conn in reader.connections:
                known = conn.msgdef.data and conn.digest
                connections[conn.id] = writer.add_connection(
                    conn.topic, conn.msgtype, typestore=None if known else typestore,
                    msgdef=conn.msgdef.data if known else None, rihs01=conn.digest if known else None,
                    offered_qos_profiles=conn.ext.offered_qos_profiles)
            disparity_out = writer.add_connection(disparity_topic, DISPARITY_TYPE, typestore=typestore)
            points_out = writer.add_connection(points_topic, POINTS_TYPE, typestore=typestore)

            with tqdm(total=pair_total, unit="pair", desc="stereo-kd bag", disable=None) as progress:
                for conn, log_time, raw in reader.messages():
                    writer.write(connections[conn.id], log_time, raw)
                    copied += 1
                    if conn.topic in info_topics:
                        pairing.add_info(info_topics[conn.topic], typestore.deserialize_cdr(raw, conn.msgtype))
                        continue
                    side = image_topics.get(conn.topic)
                    if side is None:
                        continue
                    pair = pairing.add_image(side, typestore.deserialize_cdr(raw, conn.msgtype))
                    if pair is None:
                        continue
                    left, right = pair
                    if max_pairs is not None and processed >= max_pairs:
                        skipped["max_pairs"] += 1
                        continue
                    tick = time.perf_counter()
                    try:
                        disparity_cdr, points_cdr = process(left, right)
                    except SkippedPairError as skip:
                        skipped[skip.reason] += 1
                        continue
                    inference_s += time.perf_counter() - tick
                    writer.write(disparity_out, log_time, disparity_cdr)
                    writer.write(points_out, log_time, points_cdr)
                    processed += 1
                    progress.update(1)
    pairing.finish()
    skipped.update(pairing.skipped)
    animation_path = write_animation(animation, panels, animation_fps) if animation is not None and panels else None
    return {
        "animation": None if animation_path is None else str(animation_path),
        "input": str(input_path),
        "output": str(output_path),
        "storage": out_storage,
        **registry.describe_estimator(estimator, model),
        "pairs_processed": processed,
        "skipped": {reason: count for reason, count in sorted(skipped.items()) if count},
        "messages_copied": copied,
        "messages_added": 2 * processed,
        "topics_added": {disparity_topic: DISPARITY_TYPE, points_topic: POINTS_TYPE},
        "per_pair_ms": 1e3 * inference_s / processed if processed else None,
        "min_confidence": min_confidence,
        "density": float(np.mean(densities)) if densities else None,
        "seconds": time.perf_counter() - start,
    }
