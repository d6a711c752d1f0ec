"""stereo_kd_node's outputs: the publishers (disparity, points2 and the image cameras), the
messages they rewrite in place frame after frame, and building each output from a prediction,
only for the outputs somebody subscribes to."""

from __future__ import annotations

from typing import Any

import numpy as np
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from stereo_msgs.msg import DisparityImage

from stereo_kd_core import StereoEstimator, StereoPrediction
from stereo_kd_core.geometry import StereoGeometry, nan_where_invalid
from stereo_kd_ros import conversions
from stereo_kd_ros.parameters import OutputSettings
from stereo_kd_ros.payloads import DISPARITY_STEP

OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)


def subscribed(publisher: Any) -> bool:
    """An enabled output somebody listens to (the outputs are built only then)."""
    return publisher is not None and publisher.get_subscription_count() > 0


class StereoOutputs:
    """The node's publishers and the messages they reuse (worker thread only, after creation).

    enabled: the optional outputs switched on (publish_depth, publish_confidence, publish_rgb;
    rectify adds left/image_rect_color).
    range_limit_px: a search range narrower than the estimator's (a network built for more than
    max_disparity asks for): larger disparities are invalid in every output.
    """

    def __init__(self, node: Node, overrides: QoSOverridingOptions, depth_encoding: str, publish_depth: bool,
                 publish_confidence: bool, publish_rgb: bool, rectify: bool, range_limit_px: int | None = None):
        self.node = node
        self.depth_encoding = depth_encoding
        self.range_limit_px = range_limit_px

        def publisher(msg_type: type, topic: str, enabled: bool = True) -> Any:
            return (node.create_publisher(msg_type, topic, OUTPUT_QOS, qos_overriding_options=overrides)
                    if enabled else None)

        self.disparity_pub = publisher(DisparityImage, "disparity")
        self.points_pub = publisher(PointCloud2, "points2")
        # Image outputs are cameras, as RGB-D drivers publish them (<name>/image_rect and
        # <name>/camera_info with one header): what nvblox, RTAB-Map and depth_image_proc consume.
        self.depth_pub = publisher(Image, "depth/image_rect", publish_depth)
        self.depth_info_pub = publisher(CameraInfo, "depth/camera_info", publish_depth)
        self.confidence_pub = publisher(Image, "confidence/image_rect", publish_confidence)
        self.confidence_info_pub = publisher(CameraInfo, "confidence/camera_info", publish_confidence)
        self.rgb_pub = publisher(Image, "rgb/image_rect", publish_rgb)
        self.rgb_info_pub = publisher(CameraInfo, "rgb/camera_info", publish_rgb)
        # The names before the camera layout (32FC1, no camera_info): kept, with a warning, until removed.
        self.depth_alias_pub = publisher(Image, "depth", publish_depth)
        self.confidence_alias_pub = publisher(Image, "confidence", publish_confidence)
        self.rect_color_pub = publisher(Image, "left/image_rect_color", rectify)

        # Output messages rewritten in place frame after frame (worker thread only).
        self.disparity_msg = DisparityImage()
        self.cloud_msg = PointCloud2()
        self.depth_msg = Image()
        self.depth_alias_msg = Image()  # 32FC1 for the deprecated 'depth' while depth/image_rect is 16UC1
        self.confidence_msg = Image()
        self.rgb_msg = Image()
        self.camera_info_msg = CameraInfo()  # of the published resolution: depth, confidence and rgb share it
        self.rect_color_msg = Image()
        self._deprecation_warned: set[str] = set()

    def search_range_px(self, estimator: StereoEstimator) -> int:
        """The disparity range the outputs hold: the estimator's, or the narrower limit."""
        if self.range_limit_px is None:
            return estimator.max_disparity
        return min(self.range_limit_px, estimator.max_disparity)

    def wants_points(self) -> bool:
        """Whether a subscribed output needs the points (points2 or depth)."""
        return (self.points_pub.get_subscription_count() > 0
                or subscribed(self.depth_pub) or subscribed(self.depth_alias_pub))

    def wants_rectified_left(self) -> bool:
        return subscribed(self.rect_color_pub)

    def publish_rectified_left(self, image: np.ndarray, header: Header) -> None:
        """left/image_rect_color: the rectified left image of raw input, at full size."""
        if subscribed(self.rect_color_pub):
            self.rect_color_pub.publish(conversions.numpy_to_image(
                image, conversions.estimator_image_encoding(image), header, msg=self.rect_color_msg))

    def publish(self, header: Header, left: np.ndarray, geometry: StereoGeometry, prediction: StereoPrediction,
                settings: OutputSettings, estimator: StereoEstimator) -> None:
        """Build and publish every output somebody subscribes to, from `estimator`'s prediction
        for the (possibly resized) pair whose left image is `left` and geometry `geometry`."""
        disparity = prediction.disparity  # (H, W) float32, NaN invalid
        search_range_px = self.search_range_px(estimator)
        largest_px = estimator.min_disparity + search_range_px - 1
        invalid = None  # (H, W) bool: below the confidence threshold or beyond the search range
        if settings.confidence_threshold > 0:
            invalid = ~(prediction.confidence >= settings.confidence_threshold)
        if search_range_px < estimator.max_disparity:
            with np.errstate(invalid="ignore"):
                beyond = disparity > largest_px
            invalid = beyond if invalid is None else invalid | beyond
        if invalid is not None:
            disparity = disparity * nan_where_invalid(~invalid)
        if self.disparity_pub.get_subscription_count():
            self.disparity_pub.publish(conversions.disparity_image(
                disparity, header, geometry, min_disparity=estimator.min_disparity,
                max_disparity=largest_px, delta_d=DISPARITY_STEP, msg=self.disparity_msg))

        wants_cloud = self.points_pub.get_subscription_count() > 0
        wants_depth = subscribed(self.depth_pub)
        wants_depth_alias = subscribed(self.depth_alias_pub)
        if wants_cloud or wants_depth or wants_depth_alias:
            # x, y, z as (H, W) planes: masked in one pass each, then interleaved into the cloud in one pass
            if prediction.points is not None:  # reprojected where the estimator runs (a GPU)
                planes = tuple(prediction.points[..., axis] for axis in range(3))
                dropped = invalid  # the disparity's invalid pixels are not yet NaN in these points
            else:
                planes = geometry.point_planes(disparity)  # NaN wherever the disparity is
                dropped = None
            if settings.min_depth_m > 0 or settings.max_depth_m > 0:
                with np.errstate(invalid="ignore"):
                    out_of_range = planes[2] < settings.min_depth_m
                    if settings.max_depth_m > 0:
                        out_of_range |= planes[2] > settings.max_depth_m
                dropped = out_of_range if dropped is None else dropped | out_of_range
            if dropped is not None:
                keep = nan_where_invalid(~dropped)
                planes = tuple(plane * keep for plane in planes)
            depth = planes[2]  # (H, W) metres
            if wants_cloud:
                height, width = disparity.shape
                with_color = settings.use_color
                cloud = conversions.organized_cloud(self.cloud_msg, header, height, width, with_color)
                conversions.write_cloud(cloud, planes, left if with_color else None)
                self.points_pub.publish(conversions.dense_cloud(cloud, header) if settings.dense_points
                                        else self.cloud_msg)
            if wants_depth:
                self.depth_pub.publish(conversions.depth_image(depth, header, self.depth_encoding,
                                                               msg=self.depth_msg))
            if wants_depth_alias:
                self._warn_deprecated("depth", "depth/image_rect")
                self.depth_alias_pub.publish(
                    self.depth_msg if wants_depth and self.depth_encoding == "32FC1"
                    else conversions.float_image(depth, header, msg=self.depth_alias_msg))
        wants_confidence = subscribed(self.confidence_pub)
        wants_confidence_alias = subscribed(self.confidence_alias_pub)
        if wants_confidence or wants_confidence_alias:
            confidence_msg = conversions.float_image(prediction.confidence, header, msg=self.confidence_msg)
            if wants_confidence:
                self.confidence_pub.publish(confidence_msg)
            if wants_confidence_alias:
                self._warn_deprecated("confidence", "confidence/image_rect")
                self.confidence_alias_pub.publish(confidence_msg)
        if subscribed(self.rgb_pub):
            self.rgb_pub.publish(conversions.numpy_to_image(
                left, conversions.estimator_image_encoding(left), header, msg=self.rgb_msg))
        info_pubs = [pub for pub in (self.depth_info_pub, self.confidence_info_pub, self.rgb_info_pub)
                     if subscribed(pub)]
        if info_pubs:
            height, width = disparity.shape
            info = conversions.camera_info(geometry.left_camera(width, height), header,
                                           msg=self.camera_info_msg)
            for pub in info_pubs:
                pub.publish(info)

    def _warn_deprecated(self, topic: str, replacement: str) -> None:
        if topic not in self._deprecation_warned:
            self._deprecation_warned.add(topic)
            self.node.get_logger().warning(
                f"topic '{topic}' is deprecated and will be removed: subscribe to '{replacement}' and its "
                f"camera_info instead")
