"""Models against psmnet's confident labels on the real-pair corpus (other cameras than realval:
EuRoC, Bumblebee2, Argoverse; README "Real-pair corpus"). Not ground truth: the labels are the
teacher's, kept where the confidence rule trusts them, so this says whether a model moved away
from the teacher on cameras realval does not have, not which one is right.

    python benchmarks/corpus_agreement.py dsnet-fast dsnet-faster-x1.25 --labels runs/real_labels \
        --json benchmarks/results/corpus_agreement.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from stereo_kd_core import StereoEstimator
from stereo_kd_core.data.io import read_image_rgb


def agreement(model: str, labels: Path, precision: str) -> dict[str, dict]:
    """{camera source: {"epe", "bad2", "pairs"}}: means over its pairs, on the labelled pixels."""
    estimator = StereoEstimator.load(model, device="cpu", precision=precision)
    per_source: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for label_file in sorted((labels / "labels").glob("*.npy")):
        pair = labels / "pairs" / label_file.stem
        label = np.load(label_file)
        disparity = estimator.predict(read_image_rgb(pair / "im0.png"), read_image_rgb(pair / "im1.png")).disparity
        labelled = np.isfinite(label) & (label > 0)
        error = np.abs(np.where(np.isfinite(disparity), disparity, 0.0) - label)[labelled]
        per_source[label_file.stem.split("-")[0]].append((float(error.mean()), float((error > 2).mean() * 100)))
    return {source: {"epe": float(np.mean([e for e, _ in v])), "bad2": float(np.mean([b for _, b in v])),
                     "pairs": len(v)} for source, v in sorted(per_source.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--labels", type=Path, default=Path("runs/real_labels"),
                        help="corpus_labels output: labels/<pair>.npy and pairs/<pair>/im0.png, im1.png")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = {model: agreement(model, args.labels, args.precision) for model in args.models}
    for model, sources in rows.items():
        print(f"| {model} | " + " | ".join(f"{s}: {v['epe']:.2f} / {v['bad2']:.1f} % ({v['pairs']})"
                                            for s, v in sources.items()) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
