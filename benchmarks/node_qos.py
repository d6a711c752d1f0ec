"""How many of the player's pairs reach stereo_kd_node, per subscription QoS and DDS transport set-up.

The player publishes the Motorcycle pair (741x500 rgb8, about 1.1 MB an image) at --rate for
--frames frames; the node (SGBM at input_scale 0.25, so the estimator is not what limits) counts
the images it receives (/diagnostics received_left_images, received_right_images, pairs). Each
variant: node QoS (best effort = sensor-data, the default; reliable = use_system_default_qos) and a
Fast DDS profile (see --variants).

    python benchmarks/node_qos.py --frames 40 --rate 5 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UDP_PROFILE = """<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns="http://www.eprosima.com"><profiles>
  <transport_descriptors>
    <transport_descriptor><transport_id>udp</transport_id><type>UDPv4</type>
      <interfaceWhiteList><address>127.0.0.1</address></interfaceWhiteList>
      <maxMessageSize>65500</maxMessageSize><sendBufferSize>4194304</sendBufferSize>
      <receiveBufferSize>4194304</receiveBufferSize></transport_descriptor>
  </transport_descriptors>
  <participant profile_name="udp_loopback" is_default_profile="true"><rtps>
    <userTransports><transport_id>udp</transport_id></userTransports>
    <useBuiltinTransports>false</useBuiltinTransports></rtps></participant>
</profiles></dds>
"""  # the project's profile before shared memory


def measure(node_reliable: bool, profile: str | None, frames: int, rate_hz: float, domain: int,
            player_profile: str | None = None) -> dict:
    """profile: FASTDDS_DEFAULT_PROFILES_FILE of every process (None: Fast DDS's built-in
    transports); player_profile: the player's own, where it differs."""
    env = {key: value for key, value in os.environ.items() if key != "FASTDDS_DEFAULT_PROFILES_FILE"}
    env.update({"ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if profile:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = profile
    player_env = {**env, "FASTDDS_DEFAULT_PROFILES_FILE": player_profile} if player_profile else env
    python = [sys.executable, "-c"]
    player_main = "import sys; from stereo_kd_ros.entry import player_main; sys.exit(player_main())"
    node = subprocess.Popen([*python, "import sys; from stereo_kd_ros.entry import node_main; sys.exit(node_main())",
                             "--ros-args", "-p", "model:=sgbm", "-p", "input_scale:=0.25",
                             "-p", f"use_system_default_qos:={str(node_reliable).lower()}",
                             "-p", "diagnostics_period_s:=0.5"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watch = ("import rclpy, sys, json\n"
             "from diagnostic_msgs.msg import DiagnosticArray\n"
             "rclpy.init(); n = rclpy.create_node('qos_watch'); last = {}\n"
             "n.create_subscription(DiagnosticArray, '/diagnostics', lambda m: last.update("
             "{kv.key: kv.value for kv in m.status[0].values}), 10)\n"
             "import time; end = time.monotonic() + float(sys.argv[1])\n"
             "while time.monotonic() < end: rclpy.spin_once(n, timeout_sec=0.1)\n"
             "print(json.dumps(last))\n")
    player = subprocess.run([*python, player_main, "--source", "motorcycle", "--rate", str(rate_hz),
                             "--frames", str(frames)],
                            env=player_env, capture_output=True, text=True, timeout=600)
    time.sleep(1.0)
    last = json.loads(subprocess.run([*python, watch, "3"], env=env, capture_output=True, text=True,
                                     timeout=120).stdout or "{}")
    node.send_signal(signal.SIGINT)
    node.communicate(timeout=60)
    return {"node_qos": "reliable" if node_reliable else "best_effort",
            "profile": Path(profile).name if profile else "fastdds built-in",
            "player_profile": Path(player_profile).name if player_profile else "same",
            "frames": frames, "player_rc": player.returncode,
            **{key: int(last[key]) for key in ("received_left_images", "received_right_images", "pairs")
               if key in last}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="Frames the player publishes per variant.")
    parser.add_argument("--rate", type=float, default=5.0, help="Player rate, Hz.")
    parser.add_argument("--domain", type=int, default=90, help="ROS_DOMAIN_ID to use.")
    parser.add_argument("--json", default=None, help="Write the results to this JSON file.")
    parser.add_argument("--variants", default="udp,udp-reliable,project,builtin,builtin-large-player",
                        help="Comma-separated: defaults (this shell's Fast DDS profile), udp (loopback UDP "
                             "only), udp-reliable (node subscribes reliably), project (config/fastdds_localhost.xml), "
                             "builtin (Fast DDS's own transports), builtin-large-player (the player with "
                             "config/fastdds_large_images.xml).")
    args = parser.parse_args()
    udp = Path(tempfile.mkdtemp()) / "fastdds_udp_loopback.xml"
    udp.write_text(UDP_PROFILE)
    project = str(REPO / "config" / "fastdds_localhost.xml")
    large = str(REPO / "config" / "fastdds_large_images.xml")
    defaults = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE") or None  # as this shell's nodes would run
    variants = {"defaults": (False, defaults, None), "udp": (False, str(udp), None),
                "udp-reliable": (True, str(udp), None), "project": (False, project, None),
                "builtin": (False, None, None), "builtin-large-player": (False, None, large)}
    results = []
    for name in args.variants.split(","):
        results.append(measure(*variants[name][:2], args.frames, args.rate, args.domain, variants[name][2]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
