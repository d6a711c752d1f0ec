"""Teacher outputs computed once per training pair and stored beside it, so a student can be
distilled for many epochs at the cost of one teacher pass per pair (PSMNet: about 1 s per
160x320 pair on a 2-core CPU, too slow to run at every step).

What is kept of the teacher, per Middlebury-layout CASE folder, in `CASE/teacher.npz`:

    disparity   float16 (H, W)          the teacher's final disparity, pixels (NaN: none)
    cost_index  uint8   (K, H/s, W/s)   the K most probable disparity levels of the teacher's
    cost_prob   float16 (K, H/s, W/s)   final aggregated cost distribution (softmax over its D/s
                                        levels) at the teacher's cost resolution 1/s, and their
                                        probabilities; the rest of the mass is dropped (top-K
                                        keeps >99 % of it for a peaked teacher)
    levels, stride, max_disparity       int: D/s, s and D

Distillation from the cache uses the paper's output-side points: the aggregated cost
distribution (KL) and the disparity. Feature and cost-volume points need the teacher's
internal tensors at every augmentation, which a cache would multiply in size; they remain
available by running the teacher live (`Distiller`).

This module is the file format and the teacher pass of one pair; `stereo_kd_core.train.label_cache`
fills a folder (`stereo-kd cache-teacher`) and `data.datasets.TeacherCacheDataset` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stereo_kd_core.distill.objective import frozen_layers

TEACHER_FILE = "teacher.npz"
DEFAULT_TOP_K = 8


def teacher_file(case_dir: str | os.PathLike) -> Path:
    return Path(case_dir) / TEACHER_FILE


@torch.no_grad()
def teacher_targets(teacher: nn.Module, left: np.ndarray, right: np.ndarray, top_k: int = DEFAULT_TOP_K,
                    precision: str = "fp32") -> dict[str, np.ndarray]:
    """Run `teacher` once on one pair (uint8 HxWx3 RGB, sides multiples of 32) and return the
    arrays of a teacher.npz."""
    height, width = left.shape[:2]
    if height % 32 or width % 32:
        raise ValueError(f"teacher cache: image size {height}x{width} must be a multiple of 32")
    device = next(teacher.parameters()).device

    def tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255).unsqueeze(0).to(device)

    autocast = precision == "bf16"
    with frozen_layers(teacher), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = teacher(tensor(left), tensor(right))
    last = teacher.num_costs - 1
    cost = outputs[f"cost.{last}"][0]  # (D/s, H/s, W/s) logits
    return {"disparity": outputs["disp"].float()[0].cpu().numpy().astype(np.float16),
            **top_k_costs(cost, top_k, height // cost.shape[1], teacher.max_disparity)}


def top_k_costs(cost: torch.Tensor, top_k: int, stride: int, max_disparity: int) -> dict[str, np.ndarray]:
    """One pair's last cost logits (levels, h, w) -> the cost arrays of a teacher.npz (its top-K
    levels and their probabilities, levels, stride, max_disparity)."""
    levels = cost.shape[0]
    if levels > 256:
        raise ValueError(f"teacher cache: {levels} cost levels do not fit uint8 indices")
    probability = F.softmax(cost.float(), dim=0)
    top_prob, top_index = probability.topk(min(top_k, levels), dim=0)  # (K, h, w)
    return {
        "cost_index": top_index.cpu().numpy().astype(np.uint8),
        "cost_prob": top_prob.cpu().numpy().astype(np.float16),
        "levels": np.int64(levels),
        "stride": np.int64(stride),
        "max_disparity": np.int64(max_disparity),
    }


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Compressed .npz written atomically (a killed run leaves no half file that a resumed run
    would trust); teacher caches here and in `stereo-kd adapt` use it."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    os.replace(partial, path)


def read_teacher_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def dense_probability(cost_index: np.ndarray, cost_prob: np.ndarray, levels: int) -> np.ndarray:
    """(K, h, w) top-K indices and probabilities -> (levels, h, w) float32 distribution, renormalised
    to sum 1 where any mass is kept (all-zero columns stay zero: no target there)."""
    k, height, width = cost_index.shape
    dense = np.zeros((levels, height, width), np.float32)
    rows, cols = np.mgrid[0:height, 0:width]
    for i in range(k):
        np.add.at(dense, (cost_index[i].astype(np.int64), rows, cols), cost_prob[i].astype(np.float32))
    total = dense.sum(axis=0, keepdims=True)
    return np.divide(dense, total, out=np.zeros_like(dense), where=total > 0)
