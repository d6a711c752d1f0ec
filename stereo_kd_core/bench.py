"""Latency and memory of an estimator's network (or SGBM) at a given size."""

from __future__ import annotations

import platform
import resource
import statistics
import time

import numpy as np
import torch

from stereo_kd_core.estimator import StereoEstimator
from stereo_kd_core.registry import describe_estimator


def machine_description(device: str, estimator: StereoEstimator | None = None) -> str:
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
        return f"GPU {device}"
    cpu = f"{platform.processor() or platform.machine()} CPU"
    session = getattr(estimator, "session", None)
    if session is not None:
        threads = session.get_session_options().intra_op_num_threads
        return f"{cpu}, {threads or 'default'} onnxruntime threads"
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def benchmark(estimator: StereoEstimator, height: int, width: int, runs: int = 50, warmup: int = 5,
              seed: int = 0, model: str | None = None) -> dict:
    """Median / p90 wall time per predict() of random real-size uint8 pairs (end to end: H2D and D2H
    included), the median CPU time of the process per predict() (median_cpu_ms: all threads,
    spin-waiting included; on a machine shared with other work it varies far less than wall
    time), plus peak memory (peak_rss_mb is the process's lifetime peak resident set). On CUDA
    the same span is also timed with CUDA events (median_cuda_event_ms) and the peak GPU
    memory allocated by torch is reported. What ran: `registry.describe_estimator(estimator, model)`
    (`model`: the spec the estimator was loaded from; None leaves its file and SHA-256 out)."""
    rng = np.random.default_rng(seed)
    left = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    right = np.roll(left, -8, axis=1)
    device = estimator.device
    cuda = device.startswith("cuda") and torch.cuda.is_available()  # ONNX on CUDA needs no torch CUDA
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        estimator.predict(left, right)
    times_ms = []
    cpu_ms = []
    network_ms = []
    for _ in range(runs):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start, start_cpu = time.perf_counter(), time.process_time()
        estimator.predict(left, right)
        times_ms.append((time.perf_counter() - start) * 1e3)
        cpu_ms.append((time.process_time() - start_cpu) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            network_ms.append(begin.elapsed_time(end))
    result = {
        **describe_estimator(estimator, model),
        "machine": machine_description(device, estimator),
        "height": height, "width": width, "runs": runs,
        "median_ms": statistics.median(times_ms),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "median_cpu_ms": statistics.median(cpu_ms),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if cuda:
        result["median_cuda_event_ms"] = statistics.median(network_ms)
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result
