"""Time synchronization of several topics, with message_filters' semantics.

`subscribe_synchronized` uses message_filters when it is importable and the synchronizers
below otherwise. Both keep, per input, at most `queue_size` messages keyed by header stamp
(the oldest stamp is evicted first) and emit each matched set once, removing it.

- Exact: a set is emitted when every input holds a message with the same stamp.
- Approximate: on each arrival, the other inputs' messages within `tolerance` of the new
  stamp are tried nearest first; the first combination whose stamps all lie within
  `tolerance` of each other is emitted.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rclpy.node import Node
from rclpy.qos import QoSProfile
from rclpy.qos_overriding_options import QoSOverridingOptions

from stereo_kd_ros.conversions import stamp_to_ns

try:
    import message_filters
except ImportError:  # pip installs without ROS: the project's own synchronizer is used
    message_filters = None


def stamp_ns(msg: Any) -> int:
    return stamp_to_ns(msg.header.stamp)


class ExactTimeSynchronizer:
    """Emits `callback(*msgs)` when all inputs hold a message with the same stamp."""

    def __init__(self, input_count: int, queue_size: int, callback: Callable[..., None]):
        if input_count < 2 or queue_size < 1:
            raise ValueError("need at least 2 inputs and a queue_size of at least 1")
        self.queue_size = queue_size
        self.callback = callback
        self.queues: list[dict[int, Any]] = [{} for _ in range(input_count)]
        self.evicted = 0  # messages pushed out of a full queue without a match
        self._lock = threading.Lock()

    def add(self, index: int, msg: Any) -> None:
        with self._lock:
            self._insert(index, msg)
            matched = self._match(index, stamp_ns(msg))
        for msgs in matched:
            self.callback(*msgs)

    def _insert(self, index: int, msg: Any) -> None:
        queue = self.queues[index]
        queue[stamp_ns(msg)] = msg
        while len(queue) > self.queue_size:
            del queue[min(queue)]
            self.evicted += 1

    def _match(self, index: int, stamp: int) -> list[tuple[Any, ...]]:
        if not all(stamp in queue for queue in self.queues):
            return []
        return [tuple(queue.pop(stamp) for queue in self.queues)]


class ApproximateTimeSynchronizer(ExactTimeSynchronizer):
    """Emits the nearest set of messages whose stamps lie within `tolerance_s` of each other."""

    def __init__(self, input_count: int, queue_size: int, tolerance_s: float,
                 callback: Callable[..., None]):
        super().__init__(input_count, queue_size, callback)
        if tolerance_s <= 0:
            raise ValueError(f"tolerance must be positive, got {tolerance_s}")
        self.tolerance_ns = round(tolerance_s * 1e9)

    def _match(self, index: int, stamp: int) -> list[tuple[Any, ...]]:
        if stamp not in self.queues[index]:
            return []  # evicted at once: older than everything in a full queue
        candidates = []  # per other input: its stamps near `stamp`, nearest first
        for other, queue in enumerate(self.queues):
            if other == index:
                continue
            near = sorted((s for s in queue if abs(s - stamp) <= self.tolerance_ns),
                          key=lambda s: abs(s - stamp))
            if not near:
                return []
            candidates.append(near)
        for combination in itertools.product(*candidates):
            stamps = list(combination)
            stamps.insert(index, stamp)
            if max(stamps) - min(stamps) <= self.tolerance_ns:
                return [tuple(queue.pop(s) for queue, s in zip(self.queues, stamps, strict=True))]
        return []


class SynchronizedSubscription:
    """Subscriptions to `topics` feeding one synchronizer (keeps both alive)."""

    def __init__(self, subscriptions: list[Any], synchronizer: Any, uses_message_filters: bool,
                 received: list[int]):
        self.subscriptions = subscriptions
        self.synchronizer = synchronizer
        self.uses_message_filters = uses_message_filters
        self.received = received  # messages taken per topic, matched or not

    @property
    def evicted(self) -> int | None:
        """Unmatched messages dropped from full queues (None under message_filters)."""
        return None if self.uses_message_filters else self.synchronizer.evicted


def subscribe_synchronized(node: Node, msg_type: type, topics: Sequence[str], qos: QoSProfile,
                           queue_size: int, approximate_tolerance_s: float | None,
                           callback: Callable[..., None], prefer_message_filters: bool = True,
                           qos_overriding_options: QoSOverridingOptions | None = None,
                           ) -> SynchronizedSubscription:
    """Subscribe to `topics` and call `callback(*msgs)` per synchronized set.

    Exact stamps when `approximate_tolerance_s` is None, approximate otherwise.
    """
    received = [0] * len(topics)

    def count(index: int) -> None:
        received[index] += 1  # one writer per topic: the executor thread

    if message_filters is not None and prefer_message_filters:
        subscribers = [
            message_filters.Subscriber(node, msg_type, topic, qos_profile=qos,
                                       qos_overriding_options=qos_overriding_options)
            for topic in topics
        ]
        for index, subscriber in enumerate(subscribers):
            subscriber.registerCallback(lambda msg, index=index: count(index))
        if approximate_tolerance_s is None:
            synchronizer = message_filters.TimeSynchronizer(subscribers, queue_size)
        else:
            synchronizer = message_filters.ApproximateTimeSynchronizer(
                subscribers, queue_size, approximate_tolerance_s)
        synchronizer.registerCallback(callback)
        return SynchronizedSubscription(subscribers, synchronizer, uses_message_filters=True, received=received)

    if approximate_tolerance_s is None:
        synchronizer = ExactTimeSynchronizer(len(topics), queue_size, callback)
    else:
        synchronizer = ApproximateTimeSynchronizer(len(topics), queue_size,
                                                   approximate_tolerance_s, callback)
    def take(index: int, msg: Any) -> None:
        count(index)
        synchronizer.add(index, msg)

    subscriptions = [
        node.create_subscription(msg_type, topic, lambda msg, index=index: take(index, msg), qos,
                                 qos_overriding_options=qos_overriding_options)
        for index, topic in enumerate(topics)
    ]
    return SynchronizedSubscription(subscriptions, synchronizer, uses_message_filters=False, received=received)
