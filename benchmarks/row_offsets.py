"""Rows that do not line up: a model on ../shared/realval and Motorcycle with the right view moved
down by a few offsets and rolled by a few angles about its centre (bilinear), run as given and with
its rows aligned (`StereoEstimator.load(..., align_rows=True)`, stereo_kd_core.row_alignment); also
how well each pair's offset and roll are measured and how long that takes. Validation pairs only.

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
from stereo_kd_core.row_alignment import measure_rows


def moved(offset_px: float):
    """A sample transform: the right view's content moved down by offset_px."""
    def move(sample: dict) -> dict:
        right = sample["right"]
        height, width = right.shape[:2]
        matrix = np.float32([[1, 0, 0], [0, 1, offset_px]])
        return {**sample, "right": cv2.warpAffine(right, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_REPLICATE)}
    return move


def rolled(degrees: float):
    """A sample transform: the right view rotated by `degrees` about its centre (a camera's roll). The
    turn also moves the right view's rows sideways, by sin(degrees) (y - its centre row): the ground
    truth disparity is changed by that much, so that a matcher that finds the turned pair's true matches
    scores as on the pair before (only the vertical part is the rows' business)."""
    def roll(sample: dict) -> dict:
        right = sample["right"]
        height, width = right.shape[:2]
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
        rows = np.arange(height, dtype=np.float32)[:, None] - (height - 1) / 2
        return {**sample, "right": cv2.warpAffine(right, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_REPLICATE),
                "disparity": sample["disparity"] - np.float32(np.sin(np.deg2rad(degrees))) * rows}
    return roll


def validation_pairs(realval: Path) -> list[dict]:
    """Every realval pair and Motorcycle."""
    return [*open_eval_dataset("middlebury", str(realval)), *open_eval_dataset("motorcycle")]


def roll_measurement(rolls: list[float], samples: list[dict]) -> dict:
    """Per roll: the measured tilt's error against the roll's (the tilt measured on the pair as
    given subtracted: the pairs' own tilt), median and worst over every pair."""
    own = [measure_rows(sample["left"], sample["right"]) for sample in samples]
    result = {}
    for degrees in rolls:
        errors = []
        for sample, as_given in zip(samples, own, strict=True):
            turned = rolled(degrees)(sample)
            found = measure_rows(turned["left"], turned["right"])
            if as_given is not None and found is not None:  # a roll of +deg moves the right edge's rows up
                expected = -np.sin(np.deg2rad(degrees)) * (sample["left"].shape[1] - 1) / 2
                errors.append(abs(found.shift.tilt_px - as_given.shift.tilt_px - expected))
        result[f"{degrees:g}"] = {"median_error_px": float(np.median(errors)), "max_error_px": float(np.max(errors)),
                                  "pairs": len(errors)}
    return result


def measurement(offsets: list[float], samples: list[dict]) -> dict:
    """Per offset: the measured offset's error over every pair (median, max) and the time taken."""
    result = {}
    for offset in offsets:
        errors, times, missing = [], [], 0
        for sample in map(moved(offset), samples):
            start = time.perf_counter()
            found = measure_rows(sample["left"], sample["right"])
            times.append((time.perf_counter() - start) * 1e3)
            if found is None:
                missing += 1
            else:
                errors.append(abs(found.shift.offset_px - offset))
        result[f"{offset:g}"] = {"median_error_px": float(np.median(errors)), "max_error_px": float(np.max(errors)),
                                 "no_estimate": missing, "median_ms": float(np.median(times)),
                                 "max_ms": float(np.max(times))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the registry's default")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.5, 1.0, -1.5, 2.5])
    parser.add_argument("--rolls", type=float, nargs="+", default=[0.1, 0.2, -0.3], help="degrees")
    parser.add_argument("--realval", default=str(REALVAL))
    parser.add_argument("--json")
    args = parser.parse_args()
    model = args.model or registry.default_model()
    rows = []
    for align_rows in (False, True):
        estimator = StereoEstimator.load(model, device="cpu", precision=args.precision, align_rows=align_rows)
        changes = [(f"right view {offset:+g} px", {"offset_px": offset}, moved(offset)) for offset in args.offsets]
        changes += [(f"right view rolled {degrees:+g} deg", {"roll_deg": degrees}, rolled(degrees))
                    for degrees in args.rolls]
        for label, change, transform in changes:
            row = score(model, Path(args.realval), args.precision, estimator=estimator, pairs=transform)
            row.update(label=f"{label}, {'aligned' if align_rows else 'as given'}", align_rows=align_rows, **change)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    samples = validation_pairs(Path(args.realval))
    measured = measurement(args.offsets, samples)
    for offset, figures in measured.items():
        print(f"offset {offset} px: measured within {figures['median_error_px']:.3f} px (median), "
              f"{figures['max_error_px']:.3f} (worst), {figures['no_estimate']} without an estimate, "
              f"{figures['median_ms']:.1f} ms median ({figures['max_ms']:.1f} worst)")
    rolls = roll_measurement(args.rolls, samples)
    for degrees, figures in rolls.items():
        print(f"roll {degrees} deg: tilt measured within {figures['median_error_px']:.3f} px at the edge (median), "
              f"{figures['max_error_px']:.3f} (worst), {figures['pairs']} pairs")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "rows": rows, "measurement": measured,
                                               "roll_measurement": rolls},
                                              indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
