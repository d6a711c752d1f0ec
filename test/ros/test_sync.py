"""The project's synchronizers against message_filters' semantics, and message_filters itself
over DDS when it is importable."""

import os

import pytest
from builtin_interfaces.msg import Time
from std_msgs.msg import Header

from stereo_kd_ros.sync import ApproximateTimeSynchronizer, ExactTimeSynchronizer


class Stamped:
    def __init__(self, nanoseconds: int, label: str = ""):
        self.header = Header(stamp=Time(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000))
        self.label = label


MS = 1_000_000


def test_exact_matches_equal_stamps_only_and_bounds_queues():
    out = []
    sync = ExactTimeSynchronizer(2, queue_size=3, callback=lambda a, b: out.append((a.label, b.label)))
    sync.add(0, Stamped(10 * MS, "L10"))
    sync.add(1, Stamped(11 * MS, "R11"))
    assert out == []
    sync.add(1, Stamped(10 * MS, "R10"))
    assert out == [("L10", "R10")]
    for t in range(20, 26):  # six unmatched left messages into a queue of three
        sync.add(0, Stamped(t * MS))
    assert len(sync.queues[0]) == 3 and sync.evicted == 3
    assert min(sync.queues[0]) == 23 * MS  # the oldest went first


def test_approximate_pairs_nearest_within_tolerance():
    out = []
    sync = ApproximateTimeSynchronizer(2, queue_size=5, tolerance_s=0.005,
                                       callback=lambda a, b: out.append((a.label, b.label)))
    sync.add(1, Stamped(100 * MS, "R100"))
    sync.add(1, Stamped(103 * MS, "R103"))
    sync.add(0, Stamped(102 * MS, "L102"))  # both within 5 ms: the nearest (R103) wins
    assert out == [("L102", "R103")]
    sync.add(0, Stamped(120 * MS, "L120"))  # 20 ms from R100: no pair
    assert out == [("L102", "R103")]
    sync.add(0, Stamped(96 * MS, "L96"))    # 4 ms from R100
    assert out[-1] == ("L96", "R100")
    assert all(not q or list(q) == [120 * MS] for q in sync.queues)


def test_approximate_three_inputs_need_a_common_window():
    out = []
    sync = ApproximateTimeSynchronizer(3, queue_size=5, tolerance_s=0.005, callback=lambda *m: out.append(m))
    sync.add(0, Stamped(100 * MS))
    sync.add(1, Stamped(104 * MS))
    sync.add(2, Stamped(96 * MS))  # within 5 ms of the new stamp each, but 8 ms across
    assert out == []
    sync.add(2, Stamped(101 * MS))
    assert len(out) == 1


def test_invalid_configuration():
    with pytest.raises(ValueError):
        ExactTimeSynchronizer(1, 5, print)
    with pytest.raises(ValueError):
        ApproximateTimeSynchronizer(2, 5, 0.0, print)


ROS_DOMAIN_ID = 143 + int(os.environ.get("STEREO_KD_TEST_DOMAIN_OFFSET", "0"))  # as conftest's


@pytest.mark.parametrize("approximate", [False, True])
def test_message_filters_path_over_dds(ros_context, approximate):
    pytest.importorskip("message_filters")
    import threading

    from conftest import RELIABLE, wait_until
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from stereo_kd_ros.sync import subscribe_synchronized

    node = Node("sync_test", context=ros_context)
    pairs = []
    handle = subscribe_synchronized(node, Image, ["a", "b"], RELIABLE, 5, 0.005 if approximate else None,
                                    lambda a, b: pairs.append((a, b)))
    assert handle.uses_message_filters
    pubs = [node.create_publisher(Image, topic, RELIABLE) for topic in ("a", "b")]
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    assert wait_until(lambda: all(p.get_subscription_count() for p in pubs))
    pubs[0].publish(Image(header=Header(stamp=Time(sec=1))))
    pubs[1].publish(Image(header=Header(stamp=Time(sec=1, nanosec=2 * MS if approximate else 0))))
    assert wait_until(lambda: len(pairs) == 1)
    executor.shutdown()
    node.destroy_node()
