"""A 20-second soak of the node process under a 30 Hz 640x480 stream (benchmarks/soak.py):
memory stays flat after warm-up, frames keep flowing, and every pair is accounted for."""

import sys

from conftest import REPO_ROOT, TEST_DOMAIN_OFFSET

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from soak import soak  # noqa: E402

ROS_DOMAIN_ID = 148 + TEST_DOMAIN_OFFSET


def test_twenty_second_soak():
    figures = soak(20.0, {"model": "sgbm", "max_disparity": 64, "use_system_default_qos": True},
                   domain_id=ROS_DOMAIN_ID, warmup_s=5.0)
    assert figures["node_exit_code"] == 0, figures["node_output_tail"]
    assert "Traceback" not in figures["node_output_tail"]
    memory = figures["memory"]
    assert memory["growth_after_warmup"] < 0.05, memory
    # Frames keep flowing: outputs in every 5 s window, none of them stalled.
    assert all(window["rate_hz"] >= 1.0 for window in figures["windows"]), figures["windows"]
    frames = figures["frames"]
    assert frames["unaccounted_pairs"] == 0, frames  # pairs = processed + dropped + rejected + discarded
    assert 0 < frames["processed"] <= frames["pairs"] <= frames["published"]
    assert frames["received_left_images"] <= frames["published"] >= frames["received_right_images"]
    assert not figures["backlog_growing"], figures["windows"]
