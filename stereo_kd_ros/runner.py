"""Running a node process: rclpy set up, spin until a stop signal, then an ordered shutdown.

The order matters: the node stops taking pairs and its inference worker is joined (bounded)
while the rclpy context is still valid, then the node (publishers, subscriptions) is destroyed,
and only then the context is shut down. rclpy's own signal handlers are not installed: they shut
the context down from a signal thread at once, under a worker that may be publishing, and leave
the node's last words (to /rosout) with nowhere to go.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import rclpy
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from stereo_kd_core.checkpoint import CheckpointError
from stereo_kd_ros import entry
from stereo_kd_ros.parameters import ParameterError

CONFIGURATION_ERRORS = (ParameterError, InvalidParameterValueException, InvalidParameterTypeException,
                        FileNotFoundError, CheckpointError, ValueError)
# The spin wakes at least this often to see a stop signal (the signal handler runs in the main
# thread, which waits inside rcl without running Python code until the wait set returns).
STOP_POLL_S = 0.1


def run(node_factory: Callable[[], Node], argv: list[str] | None = None, program: str = "stereo_kd_node") -> int:
    """Spin one node until SIGINT/SIGTERM (or until the node shuts the context down); 0 on a
    clean stop, 2 on a configuration error (printed after `program`'s name).

    A node with a `close()` (StereoNode: stop taking pairs, join the worker, bounded) is closed
    first. If its worker is still busy after that (an inference longer than the wait), the
    process ends at once (os._exit) after the shutdown: finalizing the interpreter under a
    thread inside PyTorch aborts or crashes it.
    """
    entry.install_stop_handlers()  # already in place when started by an entry point
    node = executor = None
    code = 0
    try:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
        # A stop signal while starting raises StopRequested; the flag also covers one whose
        # exception a library swallowed on the way (a bare except in an import, say).
        if not entry.stop_requested():
            node = node_factory()
        executor = SingleThreadedExecutor()
        if node is not None:
            executor.add_node(node)
        entry.enter_phase(entry.RUNNING)
        while not entry.stop_requested() and executor.context.ok():
            executor.spin_once(timeout_sec=STOP_POLL_S)
    except KeyboardInterrupt:  # stopped while starting (importing, loading a model): clean
        pass
    except ExternalShutdownException:
        pass
    except CONFIGURATION_ERRORS as error:
        if not entry.stop_requested():
            print(f"{program}: configuration error: {error}", file=sys.stderr)
            code = 2
    except Exception:
        # A node that shuts the context down itself (the player at its last frame) can make the
        # executor's next wait fail with "the given context is not valid": that is a stop. So is
        # any failure of a start-up that a stop signal interrupted.
        if rclpy.ok() and not entry.stop_requested():
            raise
    finally:
        entry.enter_phase(entry.STOPPING)
        busy = shut_down(node, executor)
    if busy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def shut_down(node: Node | None, executor: SingleThreadedExecutor | None) -> bool:
    """Close the node (worker joined, bounded), destroy it, then shut rclpy down; returns whether
    a worker thread is still running."""
    busy = False
    if node is not None and hasattr(node, "close"):
        busy = node.close() is False
    if executor is not None:
        executor.shutdown()
    if node is not None:
        node.destroy_node()
    rclpy.try_shutdown()
    return busy
