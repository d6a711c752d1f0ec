"""Rows that do not line up: a model on ../shared/realval and Motorcycle with the right view moved
down by a few offsets (bilinear), run as given and with its rows aligned
(`StereoEstimator.load(..., align_rows=True)`, stereo_kd_core.row_alignment); also how well each
pair's offset is measured and how long that takes. Validation pairs only.

    python benchmarks/row_offsets.py --json benchmarks/results/row_offsets.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from realval import REALVAL, score, table

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.evaluate import open_eval_dataset
from stereo_kd_core.row_alignment import estimate_row_offset


def moved(offset_px: float):
    """A sample transform: the right view's content moved down by offset_px."""
    def move(sample: dict) -> dict:
        right = sample["right"]
        height, width = right.shape[:2]
        matrix = np.float32([[1, 0, 0], [0, 1, offset_px]])
        return {**sample, "right": cv2.warpAffine(right, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_REPLICATE)}
    return move


def measurement(offsets: list[float], realval: Path) -> dict:
    """Per offset: the measured offset's error over every pair (median, max) and the time taken."""
    samples = [*open_eval_dataset("middlebury", str(realval)), *open_eval_dataset("motorcycle")]
    result = {}
    for offset in offsets:
        errors, times, missing = [], [], 0
        for sample in map(moved(offset), samples):
            start = time.perf_counter()
            found = estimate_row_offset(sample["left"], sample["right"])
            times.append((time.perf_counter() - start) * 1e3)
            if found is None:
                missing += 1
            else:
                errors.append(abs(found.offset_px - offset))
        result[f"{offset:g}"] = {"median_error_px": float(np.median(errors)), "max_error_px": float(np.max(errors)),
                                 "no_estimate": missing, "median_ms": float(np.median(times)),
                                 "max_ms": float(np.max(times))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the registry's default")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.5, 1.0, -1.5, 2.5])
    parser.add_argument("--realval", default=str(REALVAL))
    parser.add_argument("--json")
    args = parser.parse_args()
    model = args.model or registry.default_model()
    rows = []
    for align_rows in (False, True):
        estimator = StereoEstimator.load(model, device="cpu", precision=args.precision, align_rows=align_rows)
        for offset in args.offsets:
            row = score(model, Path(args.realval), args.precision, estimator=estimator, pairs=moved(offset))
            row.update(label=f"right view {offset:+g} px, {'aligned' if align_rows else 'as given'}",
                       offset_px=offset, align_rows=align_rows)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    measured = measurement(args.offsets, Path(args.realval))
    for offset, figures in measured.items():
        print(f"offset {offset} px: measured within {figures['median_error_px']:.3f} px (median), "
              f"{figures['max_error_px']:.3f} (worst), {figures['no_estimate']} without an estimate, "
              f"{figures['median_ms']:.1f} ms median ({figures['max_ms']:.1f} worst)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "rows": rows, "measurement": measured},
                                              indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
