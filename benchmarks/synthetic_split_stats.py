"""Statistics of the synthetic test split (seed 2026, 256x512, max disparity 128): what it covers.

Reported beside the teacher gauge (psmnet's EPE on the split) so that a generator change that
only makes scenes easier shows: disparity range, occlusion, thin structures, textureless regions.
Writes benchmarks/results/synthetic_split_stats.json.

    python benchmarks/synthetic_split_stats.py --n 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from stereo_kd_core.data.photo_stereo import PhotoStereoGenerator

RESULTS = Path(__file__).resolve().parent / "results"
THIN_PX = 5  # a foreground region this narrow (after an opening by a 5x5 square) counts as thin
TEXTURELESS_GRADIENT = 2.0  # mean |grey gradient| below this in a 9x9 window: no texture to match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="pairs of the split (the gauge uses 20)")
    args = parser.parse_args()
    generator = PhotoStereoGenerator(256, 512, 128, seed=2026)
    rows = []
    for index in range(args.n):
        sample = generator.sample(index)
        disparity, nocc = sample["disparity"], sample["nocc"]
        edges = np.abs(np.diff(disparity, axis=1)) > 1.0
        # thin: pixels of a depth layer that an opening by a 5x5 square removes (structures < 5 px)
        levels = np.round(disparity / 2.0).astype(np.int32)
        thin = np.zeros_like(nocc)
        for level in np.unique(levels):
            region = (levels == level).astype(np.uint8)
            thin |= (region & ~cv2.morphologyEx(region, cv2.MORPH_OPEN, np.ones((THIN_PX, THIN_PX), np.uint8))
                     ).astype(bool)
        grey = cv2.cvtColor(sample["left"], cv2.COLOR_RGB2GRAY).astype(np.float32)
        gradient = np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1))
        textureless = cv2.blur(gradient / 8.0, (9, 9)) < TEXTURELESS_GRADIENT
        rows.append({
            "name": sample["name"],
            "disparity_min": float(disparity.min()), "disparity_max": float(disparity.max()),
            "disparity_p50": float(np.median(disparity)),
            "occluded_percent": float(100 * (1 - nocc.mean())),
            "depth_edge_percent": float(100 * edges.mean()),
            "thin_percent": float(100 * thin.mean()),
            "textureless_percent": float(100 * textureless.mean()),
            "layers": len(generator.layers(index)) - 1,
        })
    summary = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key != "name"}
    all_disparity_max = max(r["disparity_max"] for r in rows)
    result = {"n": args.n, "mean": summary, "max_disparity_reached": all_disparity_max, "cases": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "synthetic_split_stats.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"mean": summary, "max_disparity_reached": all_disparity_max}, indent=1))


if __name__ == "__main__":
    main()
