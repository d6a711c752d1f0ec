"""Running a node process: rclpy set up, spin until SIGINT/SIGTERM, shut down."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import rclpy
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

from stereo_kd_core.checkpoint import CheckpointError
from stereo_kd_ros.parameters import ParameterError

CONFIGURATION_ERRORS = (ParameterError, InvalidParameterValueException, InvalidParameterTypeException,
                        FileNotFoundError, CheckpointError, ValueError)


def run(node_factory: Callable[[], Node], argv: list[str] | None = None, program: str = "stereo_kd_node") -> int:
    """Spin one node until SIGINT/SIGTERM; 0 on a clean stop, 2 on a configuration error (printed
    after `program`'s name).

    rclpy's signal handlers shut the context down, which ends the spin; a frame in flight is
    dropped. Further signals are ignored while the node is torn down (bounded by close()'s
    wait) so that a second Ctrl-C cannot leave a traceback half way through.
    """
    rclpy.init(args=argv)
    try:
        node = node_factory()
    except CONFIGURATION_ERRORS as error:
        print(f"{program}: configuration error: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    except KeyboardInterrupt:  # stopped while starting (e.g. loading a model)
        rclpy.try_shutdown()
        return 0
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # A signal that shuts the context down between the spin's check of it and its next wait
        # set makes rclpy raise "the given context is not valid": that is a stop, not a failure.
        if rclpy.ok():
            raise
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, signal.SIG_IGN)
        if hasattr(node, "close"):
            node.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
