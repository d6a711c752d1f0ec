"""Side by side in one process: a plain fp32 eager forward of a reference network against models
loaded as the node loads them (`StereoEstimator.load(model)`, precision auto unless given), at
one size and thread count. Rounds go over every variant in turn, so load on a shared machine hits
them alike; each round's figure is the median of `runs` calls, the table the median over rounds.

    python benchmarks/speed_side_by_side.py --reference dsnet-fast dsnet-fast runs/x/final.pt:bf16 \
        dsnet-faster+compile --json benchmarks/results/speed_side_by_side.json

The reference is timed as `network(left, right)` in fp32 under inference mode on contiguous
(B, 3, H, W) tensors: the network alone, no staging or host copies. The models are timed as
`predict()` on uint8 images: everything the node's inference step does. The process keeps freed
memory for reuse, as the node's console script does (stereo_kd_core.allocator).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stereo_kd_core import StereoEstimator  # noqa: E402
from stereo_kd_core.allocator import keep_freed_memory  # noqa: E402
from stereo_kd_core.checkpoint import load_model  # noqa: E402
from stereo_kd_core.data.motorcycle import motorcycle_sample  # noqa: E402
from stereo_kd_core.registry import describe_estimator, resolve_shipped  # noqa: E402


def _timed(call, runs: int) -> float:
    """Median ms of `runs` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+",
                        help="registry names or checkpoint paths, each optionally :precision, and +compile for "
                             "the node's compile:=true (compiled before timing)")
    parser.add_argument("--reference", default="dsnet-fast", help="network timed as a plain fp32 eager forward")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    kept = keep_freed_memory()
    torch.set_num_threads(args.threads)

    sample = motorcycle_sample()
    left, right = (cv2.resize(sample[side], (args.width, args.height), interpolation=cv2.INTER_AREA)
                   for side in ("left", "right"))
    path = Path(args.reference) if Path(args.reference).is_file() else resolve_shipped(args.reference)[0]
    reference = load_model(path).eval()
    tensors = [torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).contiguous() for image in (left, right)]
    variants = {f"{args.reference}: plain fp32 eager forward": lambda: reference(*tensors)}
    described = {}
    for spec in args.models:
        compiled = spec.endswith("+compile")
        model, _, precision = spec.removesuffix("+compile").partition(":")
        estimator = StereoEstimator.load(model, device="cpu", precision=precision or "auto", compile=compiled,
                                         align_rows=False)  # the node aligns rows itself, every 30 pairs
        if hasattr(estimator, "warm_up"):
            estimator.warm_up(args.height, args.width)
        label = (f"{model} ({estimator.precision}{', compiled' if compiled else ''}"
                 f"{', as the node loads it' if not precision else ''})")
        variants[label] = lambda estimator=estimator: estimator.predict(left, right)
        described[label] = describe_estimator(estimator, model)

    rounds: dict[str, list[float]] = {label: [] for label in variants}
    with torch.inference_mode():
        for call in variants.values():  # warm-up
            call()
        for _ in range(args.rounds):
            for label, call in variants.items():
                rounds[label].append(_timed(call, args.runs))
    base = statistics.median(next(iter(rounds.values())))
    print(f"| variant, {args.height}x{args.width}, {args.threads} threads | ms, median of {args.rounds} rounds "
          f"(rounds) | vs the reference |\n|---|---|---|")
    for label, figures in rounds.items():
        median = statistics.median(figures)
        print(f"| {label} | {median:.1f} ({', '.join(f'{f:.0f}' for f in figures)}) | {median / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({
            "size": [args.height, args.width], "threads": args.threads, "runs": args.runs,
            "rounds_ms": rounds, "median_ms": {k: statistics.median(v) for k, v in rounds.items()},
            "ratio_to_reference": {k: statistics.median(v) / base for k, v in rounds.items()},
            "models": described, "kept_freed_memory": kept,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg(), "torch": torch.__version__}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
