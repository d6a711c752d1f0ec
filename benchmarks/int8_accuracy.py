"""Accuracy of precision int8 on the CPU (stereo_kd_core.int8_cpu) against eager fp32 on real pairs
with ground truth: ../shared/realval (validation only) and scikit-image's Motorcycle.

Every pair is padded (edge-replicated) to one size, so that one int8 graph (one calibration, one
inductor build) serves all of them, and both variants see the same padded input; the EPE is taken
on the original pixels. Writes benchmarks/results/<model>_int8_accuracy.json.

    PYTHONPATH=. python benchmarks/int8_accuracy.py dsnet-fast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from stereo_kd_core import StereoEstimator, int8_cpu
from stereo_kd_core.data.io import read_image_rgb, read_pfm
from stereo_kd_core.estimator import cpu_has_native_bf16
from stereo_kd_core.evaluate import motorcycle_sample

RESULTS = Path(__file__).resolve().parent / "results"
REALVAL = Path(__file__).resolve().parents[2] / "shared" / "realval"


def tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="dsnet-fast")
    parser.add_argument("--size", type=int, nargs=2, default=[576, 1248], help="padded height width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = args.size
    network = StereoEstimator.load(args.model, device="cpu", precision="fp32").inference_network  # what predict runs
    bf16 = cpu_has_native_bf16()
    core = int8_cpu.quantize_core(network, height, width, bf16=bf16)
    cases = [(d.name, read_image_rgb(d / "im0.png"), read_image_rgb(d / "im1.png"), read_pfm(d / "disp0GT.pfm"))
             for d in sorted(REALVAL.iterdir()) if (d / "disp0GT.pfm").is_file()]
    moto = motorcycle_sample()
    cases.append(("motorcycle", moto["left"], moto["right"], moto["disparity"]))
    rows = []
    with torch.inference_mode():
        for name, left, right, truth in cases:
            h, w = left.shape[:2]
            pad = ((0, height - h), (0, width - w), (0, 0))
            left_t, right_t = (tensor(np.pad(v, pad, mode="edge")) for v in (left, right))
            fp32 = network(left_t, right_t)[0][0, :h, :w].numpy()
            int8 = network.confidence_head(core(left_t, right_t), height, width)[0][0, :h, :w].float().numpy()
            valid = np.isfinite(truth) & (truth > 0)
            row = {"pair": name, "epe_fp32": float(np.abs(fp32 - truth)[valid].mean()),
                   "epe_int8": float(np.abs(int8 - truth)[valid].mean())}
            rows.append(row)
            print(f"{name:20s} fp32 {row['epe_fp32']:.3f} int8 {row['epe_int8']:.3f} "
                  f"({row['epe_int8'] - row['epe_fp32']:+.3f})", flush=True)
    real = [r for r in rows if r["pair"] != "motorcycle"]
    summary = {"realval_epe_fp32": float(np.mean([r["epe_fp32"] for r in real])),
               "realval_epe_int8": float(np.mean([r["epe_int8"] for r in real])),
               "motorcycle_epe_fp32": rows[-1]["epe_fp32"], "motorcycle_epe_int8": rows[-1]["epe_int8"],
               "worst_pair_change": max(r["epe_int8"] - r["epe_fp32"] for r in rows)}
    print(json.dumps(summary, indent=1))
    out = args.json or RESULTS / f"{args.model}_int8_accuracy.json"
    out.write_text(json.dumps({"model": args.model, "padded_size": [height, width], "bf16_elsewhere": bf16,
                               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "summary": summary,
                               "pairs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
