"""CPU backends study: one model in PyTorch (fp32, bf16 autocast, channels_last, torch.compile, PT2E
int8 compiled: stereo_kd_core.int8_cpu) and ONNX Runtime
(fp32 with graph optimisations, int8 static quantisation calibrated on synthetic pairs): latency at
the deployment size, accuracy on Motorcycle and the synthetic test split, and the CPU default that
stereo_kd_core.backend_choice's rule picks. Writes benchmarks/results/<label>_cpu_backends.json.

    python benchmarks/cpu_backends.py runs/dsnet-fast/final.pt --threads 2
    python benchmarks/cpu_backends.py dsnet-fast            # the shipped weights

ONNX graphs are exported at fixed sizes (the bench size and each evaluation size), so no pair is
resized or padded beyond what the network does itself; int8 graphs are calibrated per size on
synthetic pairs of seed 7 (not the seed-2026 test split). Latency: `repeats` rounds over all
variants in turn (so a burst of load on a shared machine hits them alike), each the median of
`runs` end-to-end predict() calls; the JSON keeps every round's median, the tables the median
over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from stereo_kd_core import StereoEstimator, registry
from stereo_kd_core.backend_choice import BackendCandidate, choose_cpu_default
from stereo_kd_core.bench import benchmark
from stereo_kd_core.checkpoint import load_model, sha256_of_file
from stereo_kd_core.evaluate import motorcycle_sample
from stereo_kd_core.export import export_model
from stereo_kd_core.metrics import aggregate_metrics, stereo_metrics
from stereo_kd_core.quantize import quantize_int8_static, synthetic_calibration_pairs

RESULTS = Path(__file__).resolve().parent / "results"
# The fixed synthetic test split of benchmarks/model_results.py: seed 2026, 256x512, scenes up to 0.8 x 128 px.
SYNTHETIC_SPLIT = {"seed": 2026, "height": 256, "width": 512, "max_disparity": 128}
VARIANTS = [("pytorch", "fp32"), ("pytorch", "bf16"), ("pytorch-channels-last", "fp32"),
            ("pytorch-channels-last", "bf16"), ("pytorch-channels-last-compiled", "bf16"), ("pytorch", "int8"),
            ("onnxruntime", "fp32"), ("onnxruntime", "int8")]


def checkpoint_path(model: str) -> Path:
    return Path(model) if Path(model).is_file() else registry.resolve_shipped(model)[0]


class Variants:
    """Estimators per (backend, precision) and input size; ONNX graphs exported/quantised once per size."""

    def __init__(self, model: str, work_dir: Path, threads: int, calibration_n: int):
        self.checkpoint = checkpoint_path(model)
        self.network = load_model(self.checkpoint)
        self.work_dir, self.threads, self.calibration_n = work_dir, threads, calibration_n
        self.sha256 = sha256_of_file(self.checkpoint)
        self.label = self.checkpoint.parent.name if self.checkpoint.name in ("final.pt", "last.pt") \
            else self.checkpoint.stem

    def onnx_path(self, precision: str, height: int, width: int) -> Path:
        fp32 = self.work_dir / f"{self.label}_{height}x{width}.onnx"
        if not fp32.is_file():
            export_model(self.network, fp32, "onnx", height, width, model_name=self.label, source_sha256=self.sha256)
        if precision == "fp32":
            return fp32
        int8 = self.work_dir / f"{self.label}_{height}x{width}_int8.onnx"
        if not int8.is_file():
            pairs = synthetic_calibration_pairs(self.calibration_n, height, width, SYNTHETIC_SPLIT["max_disparity"])
            quantize_int8_static(fp32, int8, pairs)
        return int8

    def estimator(self, backend: str, precision: str, height: int, width: int) -> StereoEstimator:
        if backend == "onnxruntime":
            return StereoEstimator.load(str(self.onnx_path(precision, height, width)), device="cpu",
                                        max_disparity=self.network.max_disparity, threads=self.threads)
        compiled = backend.endswith("-compiled")  # torch.compile (inductor, freezing), compiled here
        estimator = StereoEstimator.load(str(self.checkpoint), device="cpu", precision=precision,
                                         max_disparity=self.network.max_disparity,
                                         channels_last=backend.startswith("pytorch-channels-last"), compile=compiled)
        if estimator.compiled:  # torch.compile, or int8 (PT2E, compiled): built here, not in the timing
            seconds = estimator.warm_up(height, width)
            print(f"{backend} {precision} at {height}x{width}: start-up (compile or cache) {seconds:.1f} s", flush=True)
        return estimator


def measure_latency(variants: Variants, keys: list, height: int, width: int, runs: int, repeats: int) -> dict:
    estimators = {key: variants.estimator(*key, height, width) for key in keys}
    rounds: dict[tuple[str, str], list[dict]] = {key: [] for key in keys}
    for index in range(repeats):
        for key, estimator in estimators.items():
            rounds[key].append(benchmark(estimator, height, width, runs=runs, warmup=2))
        print(f"round {index + 1}/{repeats}: " + ", ".join(
            f"{'/'.join(key)} {values[-1]['median_ms']:.0f} ms (CPU {values[-1]['median_cpu_ms']:.0f})"
            for key, values in rounds.items()), flush=True)
    summary = {}
    for key, values in rounds.items():
        wall, cpu = [v["median_ms"] for v in values], [v["median_cpu_ms"] for v in values]
        summary[key] = {"median_ms": statistics.median(wall), "min_round_ms": min(wall), "rounds_ms": wall,
                        "median_cpu_ms": statistics.median(cpu), "rounds_cpu_ms": cpu}
    return summary


def measure_accuracy(variants: Variants, keys: list, samples: list[dict]) -> dict:
    """EPE etc. per variant, and the mean |disparity - PyTorch fp32's| over valid ground truth
    (keys[0] must be PyTorch fp32). A compiled variant compiles once per distinct pair size."""
    height, width = samples[0]["left"].shape[:2]
    estimators = {key: variants.estimator(*key, height, width) for key in keys}
    per_case: dict[tuple[str, str], list[dict]] = {key: [] for key in keys}
    for sample in samples:
        reference = None
        for key, estimator in estimators.items():
            if getattr(estimator, "compiled", False):  # a new size builds in the background: wait for it
                estimator.warm_up(*sample["left"].shape[:2])
            disparity = estimator.predict(sample["left"], sample["right"]).disparity
            metrics = stereo_metrics(disparity, sample["disparity"], max_disparity=variants.network.max_disparity)
            if reference is None:
                reference = disparity
            valid = np.isfinite(sample["disparity"]) & (sample["disparity"] > 0)
            metrics["abs_diff_vs_pytorch_fp32"] = float(np.nanmean(np.abs(disparity - reference)[valid]))
            per_case[key].append(metrics)
    summary = {}
    for key, cases in per_case.items():
        summary[key] = aggregate_metrics(cases)
        summary[key]["abs_diff_vs_pytorch_fp32"] = float(np.mean([c["abs_diff_vs_pytorch_fp32"] for c in cases]))
    return summary


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint path or registry name (e.g. dsnet-fast)")
    parser.add_argument("--weights-note", default="",
                        help="what the weights are, for the JSON (e.g. 'random init: EPE meaningless')")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--height", type=int, default=384, help="latency input height")
    parser.add_argument("--width", type=int, default=640, help="latency input width")
    parser.add_argument("--runs", type=int, default=10, help="timed predict() calls per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--synthetic-n", type=int, default=20, help="pairs of the synthetic test split (0: skip)")
    parser.add_argument("--calibration-n", type=int, default=16, help="synthetic pairs for int8 calibration")
    parser.add_argument("--skip-accuracy", action="store_true", help="latency only")
    parser.add_argument("--realval", default=None,
                        help="also score a Middlebury-layout validation folder (e.g. ../shared/realval)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated backend/precision subset (pytorch/fp32 is always measured)")
    parser.add_argument("--work-dir", default="runs/cpu_backends", help="where the ONNX graphs are written")
    parser.add_argument("--json", default=None, help="output (default benchmarks/results/<label>_cpu_backends.json)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    keys = list(VARIANTS)
    if args.variants:
        chosen_keys = {tuple(item.split("/")) for item in args.variants.split(",")} | {("pytorch", "fp32")}
        keys = [key for key in VARIANTS if key in chosen_keys]
    variants = Variants(args.model, Path(args.work_dir), args.threads, args.calibration_n)
    started = time.time()
    load_before = os.getloadavg()
    latency = measure_latency(variants, keys, args.height, args.width, args.runs, args.repeats)
    load_after = os.getloadavg()
    accuracy: dict[str, dict] = {}
    if not args.skip_accuracy:
        accuracy["motorcycle"] = measure_accuracy(variants, keys, [motorcycle_sample()])
        if args.realval:
            from stereo_kd_core.data import open_dataset

            realval = open_dataset("middlebury", args.realval)
            accuracy["realval"] = measure_accuracy(variants, keys, [realval[i] for i in range(len(realval))])
        if args.synthetic_n:
            from stereo_kd_core.data.synthetic import SyntheticStereoDataset

            split = SyntheticStereoDataset(args.synthetic_n, **SYNTHETIC_SPLIT)
            accuracy["synthetic"] = measure_accuracy(variants, keys, [split[i] for i in range(len(split))])

    candidates = [BackendCandidate(backend, precision, latency[(backend, precision)]["median_ms"],
                                   {name: table[(backend, precision)]["epe"] for name, table in accuracy.items()})
                  for backend, precision in keys]
    chosen, verdicts = choose_cpu_default(candidates)
    import onnxruntime

    result = {
        "model": args.model, "checkpoint_sha256": variants.sha256, "weights_note": args.weights_note,
        "size": [args.height, args.width], "threads": args.threads,
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs",
        "load_average_1min": {"before_latency": load_before[0], "after_latency": load_after[0]},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "runs_per_round": args.runs, "rounds": args.repeats, "seconds": round(time.time() - started, 1),
        "variants": [
            {"backend": backend, "precision": precision, **latency[(backend, precision)],
             **{name: table[(backend, precision)] for name, table in accuracy.items()}}
            for backend, precision in keys],
        "cpu_default": {"backend": chosen.backend, "precision": chosen.precision, "verdicts": verdicts},
    }
    out = Path(args.json) if args.json else RESULTS / f"{variants.label}_cpu_backends.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")

    print(f"{args.model} at {args.height}x{args.width}, {args.threads} threads, {result['machine']} "
          f"(load {load_before[0]:.1f} -> {load_after[0]:.1f})")
    print("| backend | precision | wall ms (median of rounds) | fastest round ms | CPU ms | Motorcycle EPE "
          "| synthetic EPE | realval EPE | mean abs diff vs fp32 (Motorcycle) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["variants"]:
        moto, syn, real = row.get("motorcycle", {}), row.get("synthetic", {}), row.get("realval", {})
        cells = [f"{moto['epe']:.3f}" if moto else "-", f"{syn['epe']:.3f}" if syn else "-",
                 f"{real['epe']:.3f}" if real else "-",
                 f"{moto['abs_diff_vs_pytorch_fp32']:.3f}" if moto else "-"]
        print(f"| {row['backend']} | {row['precision']} | {row['median_ms']:.0f} | {row['min_round_ms']:.0f} | "
              f"{row['median_cpu_ms']:.0f} | " + " | ".join(cells) + " |")
    print(f"CPU default by the rule: {chosen.backend} {chosen.precision}")
    for key, reason in verdicts.items():
        print(f"  {key}: {reason}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
