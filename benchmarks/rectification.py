"""Cost of rectifying a raw 640x480 stereo pair in the node (`rectify: true`), on this CPU.

Both cameras have plumb_bob distortion and a non-identity R (a typical calibrated stereo head);
what is timed is what the node's worker does per pair: `RectificationMaps.remap` of the left and
the right image (OpenCV, fixed-point maps, bilinear). Also reported: building the maps (once per
calibration), and the torch grid_sample twin on the CPU for comparison.

    python benchmarks/rectification.py [--repeats 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stereo_kd_core.rectification import CameraCalibration, RectificationMaps  # noqa: E402

WIDTH, HEIGHT = 640, 480
TARGET_MS = 3.0  # both images of a pair, from the issue


def calibration(side: str) -> CameraCalibration:
    angles = (0.6, -1.0, 0.2) if side == "left" else (-0.4, 0.8, -0.3)
    rotation = cv2.Rodrigues(np.radians(angles))[0]
    tx = 0.0 if side == "left" else -400.0 * 0.12
    return CameraCalibration(
        WIDTH, HEIGHT, "plumb_bob", (-0.28, 0.07, 0.0005, -0.0008, 0.0),
        (430.0, 0.0, 322.0, 0.0, 428.0, 241.0, 0.0, 0.0, 1.0), tuple(rotation.ravel()),
        (400.0, 0.0, 319.5, tx, 0.0, 400.0, 239.5, 0.0, 0.0, 0.0, 1.0, 0.0))


def timed_ms(function, repeats: int) -> dict[str, float]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": float(np.median(times)), "p95": float(np.percentile(times, 95)), "min": float(min(times))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="timed pairs per case")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    build_ms = timed_ms(lambda: RectificationMaps.build(calibration("left")), 20)
    maps = {side: RectificationMaps.build(calibration(side)) for side in ("left", "right")}
    rng = np.random.default_rng(0)
    results = {"image": f"{WIDTH}x{HEIGHT} pair, plumb_bob, non-identity R on both cameras",
               "map_build_ms_per_camera": build_ms, "remap_pair_ms": {}, "grid_sample_cpu_pair_ms": {}}
    for encoding, shape in (("mono8", (HEIGHT, WIDTH)), ("rgb8", (HEIGHT, WIDTH, 3))):
        left, right = (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2))
        results["remap_pair_ms"][encoding] = timed_ms(
            lambda left=left, right=right: (maps["left"].remap(left), maps["right"].remap(right)), args.repeats)
        channels = 1 if len(shape) == 2 else 3
        tensors = [torch.from_numpy(image.reshape(HEIGHT, WIDTH, channels)).permute(2, 0, 1)[None].float()
                   for image in (left, right)]
        with torch.inference_mode():
            results["grid_sample_cpu_pair_ms"][encoding] = timed_ms(
                lambda tensors=tensors: (maps["left"].grid_sample(tensors[0]), maps["right"].grid_sample(tensors[1])),
                max(args.repeats // 10, 10))
    results.update(target_pair_ms=TARGET_MS, opencv_threads=cv2.getNumThreads(),
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
                   load_average=list(os.getloadavg()))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
