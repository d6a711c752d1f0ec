"""The C allocator of a process that handles megabyte-sized buffers every frame.

glibc serves allocations above its mmap threshold (128 KiB, raised up to 32 MiB as large blocks
are freed) with fresh pages from the kernel and hands them back on free, and trims the top of the
heap when more than twice that is free. A 640x480 coloured point cloud is 4.9 MB; its message is
copied and serialised into new buffers at every publish, and each new buffer costs a page fault per
4 KiB: serialising one took 7.9 ms here, 0.5 ms once freed memory is kept for reuse
(benchmarks/node_overhead.py). `keep_freed_memory` makes the process keep it: blocks up to
`mmap_threshold_mb` come from the heap, and up to `trim_threshold_mb` of free heap is kept rather
than returned to the kernel. The executables call it (the node, the player, the CLI); a library
user decides for their own process. `STEREO_KD_KEEP_FREED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

DEFAULT_MMAP_THRESHOLD_MB = 32  # the largest glibc accepts on every 64-bit version
DEFAULT_TRIM_THRESHOLD_MB = 256


def keep_freed_memory(mmap_threshold_mb: int = DEFAULT_MMAP_THRESHOLD_MB,
                      trim_threshold_mb: int = DEFAULT_TRIM_THRESHOLD_MB) -> bool:
    """Tune glibc's malloc to reuse freed large blocks; True when applied. False (and nothing
    changed) on other C libraries or platforms, or with STEREO_KD_KEEP_FREED_MEMORY=0."""
    if os.environ.get("STEREO_KD_KEEP_FREED_MEMORY", "1").strip() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = [mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb << 20),
               mallopt(M_TRIM_THRESHOLD, trim_threshold_mb << 20),
               mallopt(M_TOP_PAD, min(mmap_threshold_mb, trim_threshold_mb) << 20)]
    return all(result == 1 for result in applied)
