"""Stereo data sets in their standard on-disk layouts, as torch Datasets of sample dicts.

A sample is a plain dict: "left", "right" (uint8 HxWx3 RGB), "disparity" (float32 HxW, NaN where
there is no ground truth; absent for test splits), "name" (str), optional "nocc" (bool HxW, True =
non-occluded) and optional "calib" (dict from `read_middlebury_calib`).

Every folder data set takes `split_file`: a text file naming the cases to keep, one per line
(blank lines and lines starting with '#' are ignored). An entry is a case name as the data set
reports it in sample["name"]; a file suffix such as ".png" is ignored. Unknown entries are an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stereo_kd_core.distill.teacher_cache import dense_probability, read_teacher_file, teacher_file

from .augment import AugmentConfig, augment_sample
from .io import read_image_rgb, read_kitti_disparity, read_mask, read_middlebury_calib, read_pfm
from .synthetic import SyntheticStereoDataset


@dataclass(frozen=True)
class StereoCase:
    """Where the files of one stereo pair live; optional files are None."""

    name: str
    left: Path
    right: Path
    disparity: Path | None = None
    nocc: Path | None = None
    calib: Path | None = None


def _read_split_file(path: str | os.PathLike) -> list[str]:
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.replace("\\", "/"))
    return names


def _strip_suffix(name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and "/" not in suffix and suffix.lower() in {"png", "pfm", "jpg", "jpeg", "webp"} else name


class StereoFolderDataset(Dataset):
    """Base for folder data sets: a list of `StereoCase`, filtered by an optional split file."""

    def __init__(self, cases: Sequence[StereoCase], split_file: str | os.PathLike | None = None,
                 description: str = "data set") -> None:
        cases = sorted(cases, key=lambda case: case.name)
        if split_file is not None:
            by_name = {case.name: case for case in cases}
            wanted = [_strip_suffix(name) for name in _read_split_file(split_file)]
            missing = [name for name in wanted if name not in by_name]
            if missing:
                raise ValueError(f"{split_file}: {len(missing)} cases not in the {description}, e.g. {missing[:3]}")
            cases = [by_name[name] for name in wanted]
        if not cases:
            raise FileNotFoundError(f"no stereo pairs found for the {description}")
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def read_disparity(self, path: Path) -> np.ndarray:
        """Ground truth in pixels with NaN where unknown; PFM by default."""
        disparity = read_pfm(path)
        if disparity.ndim == 3:
            disparity = disparity[:, :, 0]
        disparity = disparity.copy()
        disparity[~np.isfinite(disparity)] = np.nan
        return disparity

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        sample = {"left": read_image_rgb(case.left), "right": read_image_rgb(case.right), "name": case.name}
        if case.disparity is not None:
            sample["disparity"] = self.read_disparity(case.disparity)
        if case.nocc is not None:
            sample["nocc"] = self.read_nocc(case.nocc)
        if case.calib is not None:
            sample["calib"] = read_middlebury_calib(case.calib)
        return sample

    def read_nocc(self, path: Path) -> np.ndarray:
        return read_mask(path, 255)


# --------------------------------------------------------------------------- SceneFlow

SCENEFLOW_SUBSET_DIRS = {
    "flyingthings3d": ("flyingthings3d", "FlyingThings3D"),
    "driving": ("driving", "Driving"),
    "monkaa": ("monkaa", "Monkaa"),
}


class SceneFlowDataset(StereoFolderDataset):
    """SceneFlow (FlyingThings3D, Driving, Monkaa) in the layout of the official archives.

    root/<subset>/frames_<pass>/.../left/NNNN.png with root/<subset>/disparity/.../left/NNNN.pfm.
    FlyingThings3D splits into TRAIN/TEST; Driving and Monkaa are training data only, so
    split="test" keeps FlyingThings3D TEST and split=None keeps everything.
    Names are left-image paths relative to root without suffix.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subsets: Sequence[str] = ("flyingthings3d", "driving", "monkaa"),
        render_pass: str = "finalpass",
        split: str | None = "train",
        split_file: str | os.PathLike | None = None,
    ) -> None:
        if render_pass not in ("finalpass", "cleanpass"):
            raise ValueError(f"render_pass must be 'finalpass' or 'cleanpass', got {render_pass!r}")
        if split not in ("train", "test", None):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        root = Path(root)
        cases = []
        for subset in subsets:
            if subset not in SCENEFLOW_SUBSET_DIRS:
                raise ValueError(f"unknown SceneFlow subset {subset!r}; known: {sorted(SCENEFLOW_SUBSET_DIRS)}")
            subset_root = next((root / d for d in SCENEFLOW_SUBSET_DIRS[subset] if (root / d).is_dir()), None)
            if subset_root is None:
                continue
            frames = subset_root / f"frames_{render_pass}"
            for left in frames.rglob("left/*.png"):
                relative = left.relative_to(frames)
                if subset == "flyingthings3d" and split is not None and relative.parts[0] != split.upper():
                    continue
                if subset != "flyingthings3d" and split == "test":
                    continue
                right = frames / relative.parent.parent / "right" / relative.name
                disparity = (subset_root / "disparity" / relative).with_suffix(".pfm")
                if right.is_file() and disparity.is_file():
                    name = left.relative_to(root).with_suffix("").as_posix()
                    cases.append(StereoCase(name, left, right, disparity))
        super().__init__(cases, split_file, f"SceneFlow {list(subsets)} {render_pass} split={split} under {root}")


# --------------------------------------------------------------------------- KITTI

KITTI_LAYOUT = {  # year -> (left dir, right dir, all-pixels disparity dir, non-occluded disparity dir)
    2012: ("colored_0", "colored_1", "disp_occ", "disp_noc"),
    2015: ("image_2", "image_3", "disp_occ_0", "disp_noc_0"),
}


class KittiDataset(StereoFolderDataset):
    """KITTI stereo 2012/2015: root/{training,testing}/<left dir>/NNNNNN_10.png.

    Ground truth is the all-pixels map (disp_occ*); "nocc" marks pixels that also have
    non-occluded ground truth (disp_noc*). The testing split has no ground truth.
    """

    def __init__(self, root: str | os.PathLike, year: int = 2015, split: str = "training",
                 split_file: str | os.PathLike | None = None) -> None:
        if year not in KITTI_LAYOUT:
            raise ValueError(f"KITTI year must be 2012 or 2015, got {year}")
        if split not in ("training", "testing"):
            raise ValueError(f"KITTI split must be 'training' or 'testing', got {split!r}")
        left_dir, right_dir, occ_dir, noc_dir = KITTI_LAYOUT[year]
        split_root = Path(root) / split
        cases = []
        for left in (split_root / left_dir).glob("*_10.png"):
            right = split_root / right_dir / left.name
            if not right.is_file():
                continue
            disparity = split_root / occ_dir / left.name
            nocc = split_root / noc_dir / left.name
            cases.append(StereoCase(
                left.stem, left, right,
                disparity if disparity.is_file() else None,
                nocc if nocc.is_file() else None,
            ))
        super().__init__(cases, split_file, f"KITTI {year} {split} under {root}")

    def read_disparity(self, path: Path) -> np.ndarray:
        return read_kitti_disparity(path)

    def read_nocc(self, path: Path) -> np.ndarray:
        return np.isfinite(read_kitti_disparity(path))


# --------------------------------------------------------------------------- Middlebury and ETH3D

MIDDLEBURY_GT_NAMES = ("disp0GT.pfm", "disp0.pfm")


class MiddleburyDataset(StereoFolderDataset):
    """Any folder of CASE/im0.png, CASE/im1.png (found at any depth), e.g. Middlebury 2014.

    Optional per case: disp0GT.pfm or disp0.pfm (+inf or 0 = no ground truth), mask0nocc.png
    (255 = non-occluded), calib.txt. Names are CASE paths relative to root.
    """

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike | None = None) -> None:
        root = Path(root)
        cases = []
        for left in root.rglob("im0.png"):
            case_dir = left.parent
            right = case_dir / "im1.png"
            if not right.is_file():
                continue
            disparity = next((case_dir / n for n in MIDDLEBURY_GT_NAMES if (case_dir / n).is_file()), None)
            nocc, calib = case_dir / "mask0nocc.png", case_dir / "calib.txt"
            name = case_dir.relative_to(root).as_posix()
            cases.append(StereoCase(
                name if name != "." else case_dir.name, left, right, disparity,
                nocc if nocc.is_file() else None, calib if calib.is_file() else None,
            ))
        super().__init__(cases, split_file, f"Middlebury-layout folder {root}")

    def read_disparity(self, path: Path) -> np.ndarray:
        disparity = super().read_disparity(path)
        disparity[disparity == 0] = np.nan
        return disparity


class TeacherCacheDataset(MiddleburyDataset):
    """A Middlebury-layout folder whose cases also hold teacher outputs (`CASE/teacher.npz`,
    written by `stereo-kd cache-teacher`). Adds "teacher_disparity" (float32 HxW, NaN where
    none) and "teacher_prob" (float32 (D/s, H/s, W/s): the teacher's cost distribution at its
    cost stride s, "teacher_stride")."""

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike | None = None) -> None:
        super().__init__(root, split_file)
        missing = [case.name for case in self.cases if not teacher_file(case.left.parent).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} cases of {root} have no teacher outputs (e.g. "
                                    f"{missing[:3]}): run `stereo-kd cache-teacher --data {root}` first")

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        cached = read_teacher_file(teacher_file(self.cases[index].left.parent))
        sample["teacher_disparity"] = cached["disparity"].astype(np.float32)
        sample["teacher_prob"] = dense_probability(cached["cost_index"], cached["cost_prob"], int(cached["levels"]))
        sample["teacher_stride"] = int(cached["stride"])
        return sample


class ETH3DDataset(StereoFolderDataset):
    """ETH3D two-view: root/two_view_<split>/CASE/{im0,im1}.png, calib.txt and, for training,
    root/two_view_training_gt/CASE/{disp0GT.pfm, mask0nocc.png} (+inf = no ground truth)."""

    def __init__(self, root: str | os.PathLike, split: str = "training",
                 split_file: str | os.PathLike | None = None) -> None:
        if split not in ("training", "test"):
            raise ValueError(f"ETH3D split must be 'training' or 'test', got {split!r}")
        root = Path(root)
        images, ground_truth = root / f"two_view_{split}", root / f"two_view_{split}_gt"
        cases = []
        for case_dir in (p for p in images.iterdir() if p.is_dir()) if images.is_dir() else ():
            left, right = case_dir / "im0.png", case_dir / "im1.png"
            if not (left.is_file() and right.is_file()):
                continue
            disparity = ground_truth / case_dir.name / "disp0GT.pfm"
            nocc = ground_truth / case_dir.name / "mask0nocc.png"
            calib = case_dir / "calib.txt"
            cases.append(StereoCase(
                case_dir.name, left, right,
                disparity if disparity.is_file() else None, nocc if nocc.is_file() else None,
                calib if calib.is_file() else None,
            ))
        super().__init__(cases, split_file, f"ETH3D two-view {split} under {root}")

    def read_disparity(self, path: Path) -> np.ndarray:
        disparity = super().read_disparity(path)
        disparity[disparity == 0] = np.nan
        return disparity


# --------------------------------------------------------------------------- paired folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class PairFolderDataset(StereoFolderDataset):
    """A left folder and a right folder with matching file names (e.g. `left/` + `right/`, or a
    KITTI-style recording's `image_2/` + `image_3/`), optional ground truth in a third folder
    (`.pfm`, or 16-bit KITTI `.png`, with the left image's stem). Names are file stems."""

    def __init__(self, root: str | os.PathLike, left_dir: str = "left", right_dir: str = "right",
                 disparity_dir: str | None = None, split_file: str | os.PathLike | None = None) -> None:
        root = Path(root)
        cases = []
        for left in sorted((root / left_dir).iterdir()) if (root / left_dir).is_dir() else ():
            right = root / right_dir / left.name
            if left.suffix.lower() not in IMAGE_SUFFIXES or not right.is_file():
                continue
            disparity = None
            if disparity_dir is not None:
                disparity = next((root / disparity_dir / (left.stem + suffix) for suffix in (".pfm", ".png")
                                  if (root / disparity_dir / (left.stem + suffix)).is_file()), None)
            cases.append(StereoCase(left.stem, left, right, disparity))
        super().__init__(cases, split_file, f"{left_dir}/ + {right_dir}/ pairs under {root}")

    def read_disparity(self, path: Path) -> np.ndarray:
        return read_kitti_disparity(path) if path.suffix.lower() == ".png" else super().read_disparity(path)


# --------------------------------------------------------------------------- registry


def _synthetic(root: str | os.PathLike | None = None, **kwargs) -> SyntheticStereoDataset:
    return SyntheticStereoDataset(**kwargs)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "sceneflow": SceneFlowDataset,
    "flyingthings3d": lambda root, **kw: SceneFlowDataset(root, subsets=("flyingthings3d",), **kw),
    "driving": lambda root, **kw: SceneFlowDataset(root, subsets=("driving",), **kw),
    "monkaa": lambda root, **kw: SceneFlowDataset(root, subsets=("monkaa",), **kw),
    "kitti2012": lambda root, **kw: KittiDataset(root, year=2012, **kw),
    "kitti2015": lambda root, **kw: KittiDataset(root, year=2015, **kw),
    "middlebury": MiddleburyDataset,
    "teacher-cache": TeacherCacheDataset,
    "eth3d": ETH3DDataset,
    "synthetic": _synthetic,
}


def open_dataset(name: str, root: str | os.PathLike | None, **kwargs) -> Dataset:
    """Open a data set by registry name; "synthetic" ignores root and takes n, seed, height, width."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    if root is None and name != "synthetic":
        raise ValueError(f"data set {name!r} needs a root folder")
    return DATASETS[name](root, **kwargs)


# --------------------------------------------------------------------------- training view


class TrainingDataset(Dataset):
    """Crops and augments samples of `base` into training tensors.

    Item: "left", "right" float32 (3, h, w) in [0, 1]; "disparity" float32 (h, w), 0 where invalid;
    "valid" bool (h, w) = finite & > 0 & < max_disparity. Random draws depend on (seed, epoch,
    index) only, so a run is reproducible with any number of loader workers; call `set_epoch`
    at the start of each epoch to get fresh augmentations.
    """

    def __init__(self, base: Dataset, crop_size: tuple[int, int] | None = None,
                 augment: AugmentConfig | None = None, max_disparity: float = 192, seed: int = 0) -> None:
        self.base = base
        self.crop_size = crop_size
        self.augment = augment
        self.max_disparity = float(max_disparity)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        if "disparity" not in sample:
            raise ValueError(f"sample {sample.get('name', index)!r} has no ground truth; cannot train on it")
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        sample = augment_sample(sample, rng, self.crop_size, self.augment)
        disparity = sample["disparity"]
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(disparity) & (disparity > 0) & (disparity < self.max_disparity)

        def image_tensor(image: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0

        item = {
            "left": image_tensor(sample["left"]),  # (3, h, w)
            "right": image_tensor(sample["right"]),  # (3, h, w)
            "disparity": torch.from_numpy(np.where(valid, disparity, 0).astype(np.float32)),  # (h, w)
            "valid": torch.from_numpy(valid),  # (h, w)
        }
        if "teacher_disparity" in sample:
            item["teacher_disparity"] = torch.from_numpy(sample["teacher_disparity"])  # (h, w), NaN: none
            item["teacher_prob"] = torch.from_numpy(sample["teacher_prob"])  # (D/s, h/s, w/s)
        return item
