"""Two training sets as one: the way to train on a mix of sources (e.g. real pairs with a
teacher's pseudo-labels and generated pairs with ground truth). Items keep their own teaching
signals ("source", "weight", "teacher_points": stereo_kd_core.distill.signals), so one batch
may hold samples of both sets."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate


class MixedDataset(Dataset):
    """Every item of `first`, followed by items of `second` making up `fraction` of the whole.

    Epoch e reads items e*k .. e*k + k - 1 of `second` (modulo its length, k = its share), so a
    large second set shows new samples each epoch; `set_epoch` reaches both sets.
    """

    def __init__(self, first: Dataset, second: Dataset | None, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the mixed-in fraction must be in [0, 1), got {fraction}")
        self.first, self.second = first, second
        empty = second is None or fraction == 0
        self.share = 0 if empty else max(1, round(fraction / (1 - fraction) * len(first)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for part in (self.first, self.second):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.first) + self.share

    def __getitem__(self, index: int) -> dict:
        if index < len(self.first):
            return self.first[index]
        return self.second[(self.epoch * self.share + index - len(self.first)) % len(self.second)]


def collate_mixed(items: list[dict]) -> dict:
    """`default_collate`, where the items without cached teacher outputs ("teacher_prob",
    "teacher_disparity": a set of real frames with a teacher's cost cache, mixed with replayed
    generated pairs) get empty ones (no mass, no disparity) and `teacher_points` False."""
    given = next((item for item in items if "teacher_prob" in item), None)
    if given is not None:
        empty = {"teacher_prob": torch.zeros_like(given["teacher_prob"]),
                 "teacher_disparity": torch.full_like(given["teacher_disparity"], float("nan")),
                 "teacher_points": torch.tensor(False)}
        items = [item if "teacher_prob" in item else {**item, **empty} for item in items]
    return default_collate(items)
