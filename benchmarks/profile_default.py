"""Where the time of the shipped CPU default goes: torch.profiler over end-to-end predict() calls of
a registry model loaded as the node loads it (precision auto, the manifest's layout; on this AMX
CPU bf16 with channels_last), broken down by network module and by operator within each module.
Writes benchmarks/results/<model>_profile.json and prints the README's tables.

    python benchmarks/profile_default.py                      # the default at 384x640 and 480x640
    python benchmarks/profile_default.py --model dsnet-fast
    python benchmarks/profile_default.py --sizes 384x640 --compile

Module ranges are torch.profiler.record_function spans opened and closed by forward hooks on the
network's top-level stages (a model run on enlarged pairs, as the default is: its network's
stages, the probe's pass included); "outside the network" is predict()'s own work (and a scaled
model's resizing) (staging, casts, NaN
masking, the host copy) plus the frame's normalisation, padding, soft argmin and confidence. Each
operator's self CPU time is charged to the innermost stage range around it. Profiled times carry
the profiler's overhead; the unprofiled median beside them is the latency to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from stereo_kd_core import StereoEstimator
from stereo_kd_core.registry import default_model

RESULTS = Path(__file__).resolve().parent / "results"
# network submodule -> stage; the convex mask is predicted by upsampler.mask outside upsampler.forward
STAGES = {"features": "features", "volume": "volume", "aggregation": "aggregation",
          "upsampler.mask": "upsampler", "upsampler": "upsampler", "refinement": "refinement"}
OUTSIDE = "outside the network"
TOP_OPERATORS = 8  # per stage in the JSON and tables


def instrument(network: torch.nn.Module) -> None:
    """Open a record_function range named after each top-level stage around its forward."""
    for path, name in STAGES.items():
        try:
            module = network.get_submodule(path)
        except AttributeError:
            continue
        if module is None:
            continue
        ranges: list = []

        def enter(_module, _args, name=name, ranges=ranges):
            ranges.append(record_function(f"stage::{name}"))
            ranges[-1].__enter__()

        def leave(_module, _args, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def stage_of(event) -> str:
    while event is not None:
        if event.name.startswith("stage::"):
            return event.name.removeprefix("stage::")
        event = event.cpu_parent
    return OUTSIDE


def profile_size(estimator: StereoEstimator, height: int, width: int, runs: int) -> dict:
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    right = np.roll(left, -8, axis=1)
    for _ in range(2):
        estimator.predict(left, right)
    wall_ms = []
    for _ in range(runs):
        start = time.perf_counter()
        estimator.predict(left, right)
        wall_ms.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            with record_function("predict"):
                estimator.predict(left, right)
    events = prof.events()
    predict_us = sum(e.cpu_time_total for e in events if e.name == "predict") / runs
    stage_us: dict[str, float] = defaultdict(float)
    operators: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event.name.startswith("stage::"):
            if stage_of(event.cpu_parent) == OUTSIDE:  # outermost stage range only
                stage_us[event.name.removeprefix("stage::")] += event.cpu_time_total / runs
            continue
        if event.name == "predict" or event.name.startswith("stage::"):
            continue
        operators[stage_of(event)][event.name] += event.self_cpu_time_total / runs
    stage_us[OUTSIDE] = predict_us - sum(stage_us.values())
    total_ms = predict_us / 1e3
    stages = {}
    for name in [*dict.fromkeys(STAGES.values()), OUTSIDE]:
        if name not in stage_us:
            continue
        ops = sorted(operators[name].items(), key=lambda item: -item[1])[:TOP_OPERATORS]
        stages[name] = {"ms": stage_us[name] / 1e3, "share": stage_us[name] / predict_us,
                        "top_operators_self_ms": {op: us / 1e3 for op, us in ops}}
    overall: dict[str, float] = defaultdict(float)
    for per_stage in operators.values():
        for op, us in per_stage.items():
            overall[op] += us / 1e3
    return {"size": [height, width], "runs": runs, "unprofiled_median_ms": statistics.median(wall_ms),
            "unprofiled_runs_ms": wall_ms, "profiled_ms_per_predict": total_ms, "stages": stages,
            "top_operators_self_ms": dict(sorted(overall.items(), key=lambda item: -item[1])[:15])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="registry name (default: the node's default)")
    parser.add_argument("--sizes", default="384x640,480x640", help="comma-separated HxW")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="predict() calls profiled (and timed) per size")
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile path instead")
    parser.add_argument("--json", default=None, help="output (default benchmarks/results/<model>_profile.json)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    estimator = StereoEstimator.load(args.model, device="cpu", precision="auto", compile=args.compile,
                                     align_rows=False)  # as the node loads it
    if not args.compile:  # hooks would split the compiled graph
        instrument(getattr(estimator, "inner", estimator).inference_network)  # a scaled model's network
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    load_before = os.getloadavg()[0]
    results = [profile_size(estimator, height, width, args.runs) for height, width in sizes]
    result = {"model": args.model, "precision": estimator.precision, "channels_last": estimator.channels_last,
              "compiled": estimator.compiled, "threads": args.threads, "torch": torch.__version__,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "sizes": results}
    suffix = "_compiled" if args.compile else ""
    out = Path(args.json) if args.json else RESULTS / f"{args.model}_profile{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    for row in results:
        height, width = row["size"]
        print(f"\n{args.model} {height}x{width}, {estimator.precision}, channels_last {estimator.channels_last}: "
              f"{row['unprofiled_median_ms']:.0f} ms unprofiled, {row['profiled_ms_per_predict']:.0f} ms profiled")
        print("| stage | ms | share | top operators (self ms) |")
        print("|---|---|---|---|")
        for name, stage in row["stages"].items():
            ops = ", ".join(f"{op} {ms:.1f}" for op, ms in list(stage["top_operators_self_ms"].items())[:4])
            print(f"| {name} | {stage['ms']:.1f} | {100 * stage['share']:.0f} % | {ops} |")
        print("top operators overall (self ms): " + ", ".join(
            f"{op} {ms:.1f}" for op, ms in list(row["top_operators_self_ms"].items())[:10]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
