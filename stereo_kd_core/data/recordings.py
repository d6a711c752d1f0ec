"""Recordings of the user's own camera as training frames (`stereo-kd adapt`): every source (a
rosbag2 bag, or a folder of rectified pairs in Middlebury layout, KITTI layout or `left/` +
`right/`) is read in time order (bags: log order of the node's exact-stamp pairs; folders: name
order) and subsampled; the last fraction of each source is held out. Bag frames are written
once to `frames/` as PNG."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stereo_kd_core.rectification import input_size
from stereo_kd_core.scaled_estimator import disparity_to_size, resize_image

from .bag import read_stereo_frames
from .datasets import KITTI_LAYOUT, MiddleburyDataset, PairFolderDataset, StereoFolderDataset
from .io import write_image_rgb

BAG_SUFFIXES = (".db3", ".mcap")
FRAMES_DIR = "frames"


@dataclass(frozen=True)
class Frame:
    """One stereo pair of a recording: case `index` of `dataset` (a folder data set)."""

    source: int            # which --data
    name: str              # the label file stem: Middlebury case, KITTI / left/ stem, bag index
    dataset: StereoFolderDataset
    index: int
    scale: float = 1.0     # the pair as the student sees it: resized by its working scale

    @property
    def key(self) -> str:
        """Cache file stem, unique over all sources (and scales: labels of an enlarged pair differ)."""
        return f"{self.source}/{self.name}" + ("" if self.scale == 1.0 else f"@x{self.scale:g}")

    def sample(self) -> dict:
        return scale_sample(self.dataset[self.index], self.scale)


def scale_sample(sample: dict, scale: float) -> dict:
    """A pair sample resized by `scale` as ScaledEstimator resizes what it is given (images
    bilinear to enlarge, area to shrink); a ground-truth disparity follows (values in the resized
    pixels, invalid pixels kept invalid)."""
    if scale == 1.0:
        return sample
    height, width = sample["left"].shape[:2]
    size = input_size(width, height, scale)
    resized = {**sample, "left": resize_image(sample["left"], size), "right": resize_image(sample["right"], size)}
    if sample.get("disparity") is not None:
        resized["disparity"] = disparity_to_size(np.asarray(sample["disparity"], np.float32), size)
    return resized


def open_folder(root: Path) -> StereoFolderDataset:
    """A folder of rectified pairs: `left/` + `right/`, KITTI layout (image_2/ + image_3/ or
    colored_0/ + colored_1/, optionally under training/ or testing/), or Middlebury layout."""
    if (root / "left").is_dir() and (root / "right").is_dir():
        return PairFolderDataset(root, "left", "right")
    for base in (root, root / "training", root / "testing"):
        for left_dir, right_dir, occ_dir, _ in KITTI_LAYOUT.values():
            if (base / left_dir).is_dir() and (base / right_dir).is_dir():
                return PairFolderDataset(base, left_dir, right_dir, occ_dir if (base / occ_dir).is_dir() else None)
    if next(root.rglob("im0.png"), None) is not None:
        return MiddleburyDataset(root)
    raise FileNotFoundError(f"{root}: no stereo pairs: expected left/ + right/, KITTI layout (image_2/ + "
                            "image_3/) or Middlebury layout (CASE/im0.png + CASE/im1.png)")


def extract_bag(path: Path, frames_dir: Path, topics: Mapping[str, str | None] | None) -> StereoFolderDataset:
    """Write a bag's usable stereo pairs as frames_dir/NNNNNN/{im0,im1}.png (six-digit index
    among the pairs, time order) once, and open them as a folder data set."""
    done = frames_dir / "complete.json"
    if not done.is_file():
        skipped: Counter = Counter()
        count = 0
        for frame in tqdm(read_stereo_frames(path, dict(topics or {}), skipped), desc=f"frames {path.name}",
                          unit="pair", disable=None):
            case = frames_dir / f"{frame.index:06d}"
            case.mkdir(parents=True, exist_ok=True)
            for name, image in (("im0.png", frame.left), ("im1.png", frame.right)):
                rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
                if rgb.dtype != np.uint8:  # 10-16 bit sensors: scaled by the pair's peak
                    rgb = np.round(rgb.astype(np.float32) * (255.0 / max(int(frame.left.max()), 1))).astype(np.uint8)
                write_image_rgb(case / name, rgb)
            count += 1
        done.write_text(json.dumps({"bag": str(path), "pairs": count, "skipped": dict(skipped)}) + "\n")
    return MiddleburyDataset(frames_dir)


def open_recordings(sources: Sequence[str | os.PathLike], out_dir: Path, every: int = 1,
                    topics: Mapping[str, str | None] | None = None, scale: float = 1.0) -> list[list[Frame]]:
    """The frames of every source, each list in time order and subsampled by `every`, each pair
    resized by `scale` when read (the working scale of the student being adapted)."""
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    recordings = []
    for number, source in enumerate(sources):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"--data {path}: no such file or folder")
        is_bag = path.suffix in BAG_SUFFIXES or (path.is_dir() and (path / "metadata.yaml").is_file())
        dataset = extract_bag(path, out_dir / FRAMES_DIR / str(number), topics) if is_bag else open_folder(path)
        frames = [Frame(number, dataset.cases[index].name, dataset, index, scale)
                  for index in range(0, len(dataset), every)]
        recordings.append(frames)
    return recordings


def split_holdout(recordings: Sequence[Sequence[Frame]], holdout: float) -> tuple[list[Frame], list[Frame]]:
    """(training frames, hold-out frames): the last `holdout` fraction of each source (rounded
    up) is held out, but every source keeps at least one training frame; ValueError when
    holdout > 0 leaves no hold-out frame at all."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {holdout}")
    train, held = [], []
    for frames in recordings:
        count = min(math.ceil(holdout * len(frames)), len(frames) - 1) if holdout > 0 else 0
        train.extend(frames[:len(frames) - count])
        held.extend(frames[len(frames) - count:])
    if holdout > 0 and not held:
        raise ValueError(f"too few frames ({len(train)}) for --holdout {holdout}: give --holdout 0 or more frames")
    return train, held
