"""keep_freed_memory: a process that serialises a 640x480 coloured point cloud every frame (as
publishing does) gets its buffers' pages back from the heap instead of faulting them in from the
kernel each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMES = 20
CLOUD_BYTES = 480 * 640 * 16  # x y z rgb float32
PROGRAM = f"""
CLOUD_BYTES = {CLOUD_BYTES}
import array, resource, sys
from rclpy.serialization import serialize_message
from sensor_msgs.msg import PointCloud2
from stereo_kd_core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
cloud = PointCloud2(height=480, width=640, point_step=16, row_step=640 * 16)
cloud.data = array.array("B", bytes(CLOUD_BYTES))
serialize_message(cloud)  # one frame before counting
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({FRAMES}):
    serialize_message(cloud)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _minor_faults(mode: str, **env: str) -> int:
    import os

    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    pytest.importorskip("rclpy")
    pages = CLOUD_BYTES // 4096
    plain, kept = _minor_faults("plain"), _minor_faults("keep")
    assert plain >= FRAMES * pages  # glibc returns the buffers to the kernel: each frame faults them in
    assert kept <= pages  # the heap keeps them: at most one buffer's pages over all the frames
    # the switch turns it off
    with pytest.raises(subprocess.CalledProcessError):
        _minor_faults("keep", STEREO_KD_KEEP_FREED_MEMORY="0")
