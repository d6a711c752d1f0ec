"""Entry points of the console scripts: a stop signal (SIGINT or SIGTERM) at any moment, from the
first instruction of the entry point to the last, ends the process with exit code 0 and no
traceback.

This module imports nothing but the standard library, so the stop handlers are in place before
the imports that take seconds (rclpy, PyTorch). A stop signal then acts by phase:

- starting (imports, rclpy set-up, model load): StopRequested is raised in the main thread and
  caught at the top of the entry point (or by runner.run, which shuts rclpy down first);
- running (spinning): the stop is recorded; runner.run's spin loop sees it and shuts down in order;
- stopping: ignored, so that a second Ctrl-C (or ros2 launch's SIGTERM after SIGINT) cannot break
  the ordered shutdown half way through.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTING, RUNNING, STOPPING = "starting", "running", "stopping"


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived while the process was starting."""


class _StopState:
    phase = STARTING
    stop = threading.Event()  # a stop signal arrived (any phase)
    unraisablehook = sys.__unraisablehook__  # the hook in place before ours: everything else goes there


def _on_stop_signal(signum: int, frame: object) -> None:
    _StopState.stop.set()
    if _StopState.phase == STARTING:
        _StopState.phase = STOPPING  # before raising: a second signal must not raise again
        raise StopRequested(signum)


def _silence_swallowed_stop(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: a StopRequested raised where Python cannot propagate it (a weakref
    callback inside importlib's module locks, a __del__) is dropped quietly instead of printed as
    "Exception ignored ...": the stop flag is already set, and runner.run acts on it once the node
    is up. Everything else goes to the hook that was in place before."""
    if isinstance(unraisable.exc_value, StopRequested):
        return
    _StopState.unraisablehook(unraisable)


def install_stop_handlers() -> None:
    """Route SIGINT and SIGTERM to the phase logic above (main thread only; idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if sys.unraisablehook is not _silence_swallowed_stop:
        _StopState.unraisablehook = sys.unraisablehook
        sys.unraisablehook = _silence_swallowed_stop
    for stop_signal in STOP_SIGNALS:
        if signal.getsignal(stop_signal) is not _on_stop_signal:
            signal.signal(stop_signal, _on_stop_signal)


def enter_phase(phase: str) -> None:
    """runner.run's progress: RUNNING once the node spins, STOPPING once it tears down. A signal
    that arrived while starting but had not been handled yet still counts (stop_requested())."""
    _StopState.phase = phase


def stop_requested() -> bool:
    return _StopState.stop.is_set()


def run_guarded(start: Callable[[], int]) -> int:
    """Install the stop handlers, then call `start` (which does the heavy imports): its exit
    code, or 0 when a stop signal interrupted the start-up."""
    install_stop_handlers()
    try:
        return start()
    except Exception:
        # An import interrupted by StopRequested may surface as another error (rclpy turns it
        # into an ImportError): with a stop requested, that is a stop too.
        if not stop_requested():
            raise
        _exit_now()
    except KeyboardInterrupt:  # stopped while importing or starting: a clean stop
        _exit_now()
    finally:
        _StopState.phase = STOPPING
        # The interpreter's exit resets Python-level handlers to the default action, which would
        # let a late signal kill the process (exit -2 or -15): ignore the stop signals instead.
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
    return 0


def _exit_now() -> None:
    """Exit 0 at once: a native library interrupted half way through its import is not finalized."""
    _StopState.phase = STOPPING
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def node_main() -> int:
    """Console script `stereo_kd_node` (ROS arguments after --ros-args as usual)."""
    return run_guarded(lambda: importlib.import_module("stereo_kd_ros.node").main())


def player_main() -> int:
    """Console script `stereo_kd_player`."""
    return run_guarded(lambda: importlib.import_module("stereo_kd_ros.player").main())


if __name__ == "__main__":
    sys.exit(node_main())
