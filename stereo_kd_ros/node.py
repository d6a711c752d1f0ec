"""stereo_kd_node: rectified stereo pair in, DisparityImage / PointCloud2 (and optional depth,
confidence, colour cameras) out, with the estimator from stereo_kd_core running on a worker thread.

Subscribed: left/image_rect, right/image_rect, left/camera_info, right/camera_info; with `rectify`,
left/image_raw and right/image_raw instead of the image_rect topics (rectified in the node, and the
rectified left image published on left/image_rect_color).
Published: disparity, points2, /diagnostics, and as cameras (image + camera_info of the published
resolution, one header): [depth/image_rect, depth/camera_info], [confidence/image_rect,
confidence/camera_info], [rgb/image_rect, rgb/camera_info]; deprecated: [depth], [confidence].

The node is glue: parameters.py declares and checks its parameters, pipeline.py takes the input
pairs and runs the inference worker, outputs.py publishes, diagnostics.py reports.
"""

from __future__ import annotations

import sys
from typing import Any

from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions

from stereo_kd_core import StereoEstimator
from stereo_kd_ros.diagnostics import StereoDiagnostics
from stereo_kd_ros.outputs import StereoOutputs
from stereo_kd_ros.parameters import (  # noqa: F401 - PARAMETERS & co. re-exported: the node's public names
    PARAMETER_NAMES,
    PARAMETERS,
    SGBM_DEFAULT_RANGE,
    OutputSettings,
    ParameterError,
    declare_parameters,
    scaled_search_range,
    settings_from,
    validate_parameters,
)
from stereo_kd_ros.pipeline import PairPipeline, PipelineStats

NODE_NAME = "stereo_kd_node"

COMPILED_NOTE = (", compiled for each input size from its first camera_info or pair (CPU: in the background, "
                 "eager meanwhile)")


def scale_note(estimator) -> str:
    """', pairs enlarged by 1.25 (near scenes down to 0.5, small pairs up to 2), ' for a model that
    runs at a scale of its own (the default), '' otherwise: the start-up line says how its pixels
    relate to the camera's."""
    scale = getattr(estimator, "scale", 1.0)
    if scale == 1.0:
        return ""
    notes = [f"near scenes down to {estimator.smallest_scale:g}"] if getattr(estimator, "fit_range", False) else []
    small_pairs = getattr(estimator, "small_pairs", None)
    if small_pairs is not None:
        notes.append(f"small pairs up to {small_pairs.max_scale:g}")
    detail = f" ({', '.join(notes)})" if notes else ""
    return f"pairs {'enlarged' if scale > 1 else 'shrunk'} by {scale:g}{detail}, "


def for_input_scale(estimator: StereoEstimator, input_scale: float) -> StereoEstimator:
    """The estimator as the node runs it on pairs it shrank by input_scale: a model that enlarges
    small pairs (the default) sizes that allowance by the camera's pair, not by the shrunk one, or
    input_scale would buy no time (`ScaledEstimator.for_pairs_shrunk_by`)."""
    shrunk = getattr(estimator, "for_pairs_shrunk_by", None)
    return estimator if shrunk is None else shrunk(input_scale)


class StereoNode(Node):
    """The ROS glue around StereoEstimator; see the module docstring for topics.

    estimator: a ready estimator to run instead of loading the `model` parameter's (embedding
    the node in a larger program, benchmarks); `model`, `device`, `precision` and
    `max_disparity` are then not used.

    With `model` 'sgbm' the matcher searches max_disparity full-size pixels: at input_scale s it
    is built with scaled_search_range(max_disparity, s) and rebuilt when input_scale changes.
    """

    def __init__(self, estimator: StereoEstimator | None = None, **node_options: Any):
        super().__init__(NODE_NAME, **node_options)
        values = declare_parameters(self)
        validate_parameters(values)
        self.settings: OutputSettings = settings_from(values)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        # SGBM is rebuilt for each input_scale (cheap); networks keep the range they were built for.
        requested_range = values["max_disparity"]  # 0: the model's own
        self._sgbm_max_disparity = ((requested_range or SGBM_DEFAULT_RANGE)
                                    if estimator is None and values["model"] == "sgbm" else None)
        if estimator is not None:
            self._loaded = estimator
        elif self._sgbm_max_disparity is not None:
            self._loaded = self._sgbm_for(values["input_scale"])
        else:
            self._loaded = StereoEstimator.load(values["model"], device=values["device"],
                                                precision=values["precision"],
                                                max_disparity=requested_range or SGBM_DEFAULT_RANGE,
                                                compile=values["compile"], align_rows=False)  # the pipeline aligns
        self.estimator = for_input_scale(self._loaded, values["input_scale"])
        self._rectification_device = (self._choose_rectification_device(values["rectify_on"])
                                      if values["rectify"] else None)
        range_limit_px = self._network_range_limit(requested_range) if estimator is None else None

        overrides = QoSOverridingOptions.with_default_policies()
        self.outputs = StereoOutputs(self, overrides, values["depth_encoding"], values["publish_depth"],
                                     values["publish_confidence"], values["publish_rgb"], values["rectify"],
                                     range_limit_px)
        tolerance = values["approximate_sync_tolerance_seconds"] if values["approximate_sync"] else None
        self.pipeline = PairPipeline(
            self, self.outputs, lambda: (self.estimator, self.settings), input_qos(values), overrides,
            values["queue_size"], tolerance, values["rectify"],
            # Reprojection runs where the estimator runs when that is a GPU (one copy back for all).
            points_on_estimator=self.estimator.device.startswith("cuda"), align_rows_every=values["align_rows_every"])
        self.diagnostics = StereoDiagnostics(self, self.pipeline, self._described, values["diagnostics_period_s"],
                                             values["status_log_period_s"])
        self.get_logger().info(
            f"model '{self.estimator.name}' ({self.estimator.backend}) on {self.estimator.device} "
            f"({self.estimator.precision}{COMPILED_NOTE if getattr(self.estimator, 'compiled', False) else ''}), "
            f"max_disparity {self.outputs.search_range_px(self.estimator)}"
            f"{f' (of the {self.estimator.max_disparity} it was built for)' if range_limit_px else ''}, "
            f"{scale_note(self.estimator)}{'approximate' if tolerance else 'exact'} sync"
            f"{' via message_filters' if self.pipeline.image_sync.uses_message_filters else ''}"
        )

    @property
    def stats(self) -> PipelineStats:
        return self.pipeline.stats

    @property
    def camera_infos(self) -> dict:
        """The latest camera_info per side ('left', 'right')."""
        return self.pipeline.camera_infos

    # -- parameters -------------------------------------------------------------------------

    def _merged_values(self, changes: list[Parameter]) -> dict[str, Any]:
        values = {name: self.get_parameter(name).value for name in PARAMETER_NAMES}
        values.update({p.name: p.value for p in changes if p.name in values})
        return values

    def _on_set_parameters(self, changes: list[Parameter]) -> SetParametersResult:
        try:
            validate_parameters(self._merged_values(changes))
        except ParameterError as error:
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, changes: list[Parameter]) -> None:
        settings = settings_from(self._merged_values(changes))
        if settings.input_scale != self.settings.input_scale:  # the worker reads it once per frame
            if self._sgbm_max_disparity is not None:
                self._loaded = self._sgbm_for(settings.input_scale)
            self.estimator = for_input_scale(self._loaded, settings.input_scale)
        self.settings = settings

    def _choose_rectification_device(self, rectify_on: str) -> str:
        """Raw input is rectified on the estimator's device (`predict_raw`) where that is asked
        for, or by auto where the estimator is a network on CUDA (also one run at a scale of its
        own, as the default); otherwise with OpenCV. Returns the device that rectifies."""
        able = self.estimator.can_rectify_on_device
        on_device = able and (rectify_on == "estimator"
                              or (rectify_on == "auto" and self.estimator.device.startswith("cuda")))
        if rectify_on == "estimator" and not on_device:
            self.get_logger().warning(f"rectify_on 'estimator': '{self.estimator.name}' is not a PyTorch network "
                                      "(SGBM, ONNX); rectifying on the CPU (OpenCV)")
        if able:
            self.estimator.rectifies_on_device = on_device
        return self.estimator.device if on_device else "cpu"

    def _network_range_limit(self, max_disparity: int) -> int | None:
        """A network searches the range it was built for: max_disparity below it is honoured by
        invalidating larger disparities (returned as the limit); above it, it cannot be, and the
        node refuses to start (ParameterError, also logged to /rosout)."""
        built = self.estimator.max_disparity
        if self._sgbm_max_disparity is not None or max_disparity in (0, built):
            return None
        if max_disparity > built:
            message = (f"max_disparity: {max_disparity} exceeds the {built} px that model '{self.estimator.name}' "
                       f"was built for; give at most {built} (or a model built for more)")
            self.get_logger().error(message)
            raise ParameterError(message)
        return max_disparity

    def _sgbm_for(self, input_scale: float) -> StereoEstimator:
        return StereoEstimator.load("sgbm", max_disparity=scaled_search_range(self._sgbm_max_disparity, input_scale),
                                    align_rows=False)  # the pipeline aligns

    # -- diagnostics and shutdown ------------------------------------------------------------

    def _described(self) -> dict[str, str]:
        values = {}
        if self.pipeline.rectifier is not None:
            values["rectification_map_builds"] = str(self.pipeline.rectifier.builds)
            values["rectification_device"] = self._rectification_device
        values.update(model=self.estimator.name, device=self.estimator.device,
                      input_scale=f"{self.settings.input_scale:g}",
                      max_disparity=str(self.outputs.search_range_px(self.estimator)))
        return values

    def diagnostic_values(self) -> dict[str, str]:
        """Current figures, as published on /diagnostics."""
        return self.diagnostics.values()

    def shutdown_wait_s(self) -> float:
        """How long close() waits for the inference worker: covers the slowest inference seen so far."""
        return self.pipeline.shutdown_wait_s()

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop taking pairs and stop the inference worker: a frame in flight is not published.
        Waits up to `timeout_s` (default shutdown_wait_s()) for it; a result arriving later is
        dropped without touching the node. Returns whether the worker has ended."""
        return self.pipeline.close(timeout_s)


def input_qos(values: dict[str, Any]) -> QoSProfile:
    """The subscriptions' QoS: sensor-data (best effort), or reliable with use_system_default_qos."""
    if values["use_system_default_qos"]:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=values["queue_size"],
                          reliability=ReliabilityPolicy.RELIABLE)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=values["queue_size"],
                      reliability=qos_profile_sensor_data.reliability,
                      durability=qos_profile_sensor_data.durability)


def main(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM (the console script `stereo_kd_node` calls this through
    entry.node_main, which handles a stop signal during the imports too)."""
    from stereo_kd_core.allocator import keep_freed_memory
    from stereo_kd_ros.runner import run

    keep_freed_memory()  # megabyte-sized outputs every frame: reuse their pages (stereo_kd_core.allocator)
    return run(StereoNode, argv)


if __name__ == "__main__":
    sys.exit(main())
