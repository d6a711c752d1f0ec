"""Large images at the launch defaults (issue 25, D3): the project's player publishing the
Motorcycle pair (741x500 rgb8, about 1.1 MB an image) at 5 Hz reaches the node, subscribed with
its default sensor-data (best effort) QoS, with at least 95 % of the pairs. Counted by the node
(/diagnostics pairs), not timed. Before the shared memory transport in config/fastdds_localhost.xml
4 of 40 pairs arrived."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, TEST_DOMAIN_OFFSET

ROS_DOMAIN_ID = 156 + TEST_DOMAIN_OFFSET
FRAMES = 40


def test_the_player_reaches_the_node_with_95_percent_of_pairs_at_the_defaults():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "node_qos.py"), "--frames", str(FRAMES), "--rate", "5",
         "--domain", str(ROS_DOMAIN_ID), "--variants", "defaults"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["player_rc"] == 0
    assert measured["pairs"] >= 0.95 * FRAMES, measured
