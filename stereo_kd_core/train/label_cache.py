"""Teacher outputs computed once per training pair and kept on disk, so training never waits for
a teacher: adapt's pseudo-labels (`LabelCache`: disparity and confidence per recorded frame)
and distillation's cost distributions (`cache_teacher`: CASE/teacher.npz, format in
`stereo_kd_core.distill.teacher_cache`).

Pseudo-labels: the teacher runs once per frame; `labels/` holds the disparity and a per-pixel
confidence as compressed float16 (resumable). The confidence is the teacher's own (from its
disparity distribution) where the teacher agrees with itself run on the mirrored, swapped pair
(left-right check within `lr_check_px`) and, with `use_agreement`, agrees with SGBM and/or the
starting student (distill/label_confidence.py's rule), else 0. `labels:DIR` teachers read
precomputed files instead (confidence 1 wherever the file has a value).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from stereo_kd_core import registry
from stereo_kd_core.checkpoint import CheckpointError, load_model, sha256_of_file
from stereo_kd_core.data.datasets import MiddleburyDataset
from stereo_kd_core.data.io import read_image_rgb, read_kitti_disparity, read_pfm
from stereo_kd_core.data.recordings import Frame
from stereo_kd_core.distill.label_confidence import (
    AGREEMENT_NEEDS,
    ConfidenceEvidence,
    ConfidenceRule,
    label_confidence,
    right_view_disparity,
)
from stereo_kd_core.distill.signals import SOURCE_PSEUDO_LABEL
from stereo_kd_core.distill.teacher_cache import (
    DEFAULT_TOP_K,
    dense_probability,
    read_teacher_file,
    teacher_file,
    teacher_targets,
    top_k_costs,
    write_npz_atomic,
)
from stereo_kd_core.estimator import StereoEstimator
from stereo_kd_core.models.photometric import photometric_settings
from stereo_kd_core.rectification import input_size
from stereo_kd_core.scaled_estimator import disparity_to_size
from stereo_kd_core.teachers import convert_psmnet_checkpoint, default_cache_dir, fetch_psmnet_kitti2015

LABELS_PREFIX = "labels:"
NO_TEACHER = "none"
LABEL_SUFFIXES = (".pfm", ".png", ".npy")
LABELS_DIR = "labels"
TEACHER_RECORD = "teacher.json"
COST_SUFFIX = ".cost.npz"  # beside a frame's label: the teacher's top-K cost distribution


# --- teachers ----------------------------------------------------------------------------
class Teacher:
    """Where pseudo-labels come from. label(frame, left, right) -> (disparity, confidence)."""

    name: str
    network: nn.Module | None = None  # a project network: internal distillation points
    max_disparity: int | None = None

    def identity(self) -> dict:
        raise NotImplementedError

    def label(self, frame: Frame, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class EstimatorTeacher(Teacher):
    """Any StereoEstimator (network, ONNX model, SGBM); confidence = its own where the
    left-right check on the mirrored, swapped pair passes, else 0."""

    def __init__(self, estimator: StereoEstimator, identity: dict, lr_check_px: float) -> None:
        self.estimator, self._identity, self.lr_check_px = estimator, identity, float(lr_check_px)
        self.name = estimator.name
        self.max_disparity = estimator.max_disparity
        network = getattr(estimator, "network", None)
        self.network = network if hasattr(network, "feature_stages") else None

        self.agreement, self.student, self._student_name = "none", None, None
        self.photometric_max_error: float | None = None

    def costs(self, left: np.ndarray, right: np.ndarray, top_k: int = DEFAULT_TOP_K) -> dict[str, np.ndarray]:
        """The teacher's top-K cost distribution on one frame (teacher_cache's arrays)."""
        return self._costs_of(self._predict_with_costs(left, right)[1], top_k, left.shape[:2])

    def _predict_with_costs(self, left: np.ndarray, right: np.ndarray):
        """The teacher's prediction and its last cost logits (levels, h, w) from one pass."""
        if self.network is None or not hasattr(self.estimator, "predict_with_costs"):
            raise ValueError(f"teacher {self.name} is not a project network with cost volumes: "
                             "its cost distributions cannot be cached (adapt.internal needs one)")
        return self.estimator.predict_with_costs(left, right)

    def _costs_of(self, cost, top_k: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Last cost logits (levels, h, w) from the frame's top-left -> teacher_cache's arrays on
        the grid of the frame padded to a multiple of 32 (bottom and right), the cells wholly
        outside the frame emptied (no mass: no target)."""
        height, width = size
        stride = int(self.network.cost_stride)
        targets = top_k_costs(cost, top_k, stride, self.network.max_disparity)
        grid_rows, grid_cols = -(-height // 32) * 32 // stride, -(-width // 32) * 32 // stride
        rows, cols = -(-height // stride), -(-width // stride)
        for key in ("cost_index", "cost_prob"):
            grid = np.zeros(targets[key].shape[:1] + (grid_rows, grid_cols), targets[key].dtype)
            grid[:, :rows, :cols] = targets[key][:, :rows, :cols]
            targets[key] = grid
        return targets

    def label_with_costs(self, frame: Frame, left: np.ndarray, right: np.ndarray, top_k: int = DEFAULT_TOP_K
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """`label` and `costs` from one teacher pass on the pair (and the left-right check's pass
        on the mirrored pair): (disparity, confidence, cost arrays)."""
        prediction, cost = self._predict_with_costs(left, right)
        return (*self._label_from(prediction, left, right), self._costs_of(cost, top_k, left.shape[:2]))

    def use_agreement(self, agreement: str, student: StereoEstimator | None = None, student_name: str | None = None,
                      photometric_max_error: float | None = None) -> None:
        """Labels must also agree with independent estimators (distill/label_confidence.py's rule):
        "sgbm", "student", "either" (SGBM where it has a disparity, else the student), "both" or
        "none"; `student` is the student adapt starts from. `photometric_max_error`: and the left
        image must match the right one warped by the label (None: not tested)."""
        if "student" in AGREEMENT_NEEDS.get(agreement, ()) and student is None:
            raise ValueError(f"adapt.agreement {agreement!r} needs the starting student")
        self.agreement, self.student, self._student_name = agreement, student, student_name
        self.photometric_max_error = None if photometric_max_error is None else float(photometric_max_error)

    def identity(self) -> dict:
        identity = {**self._identity, "lr_check_px": self.lr_check_px}
        if self.agreement != "none":
            identity.update(agreement=self.agreement, student=self._student_name)
        if self.photometric_max_error is not None:
            identity.update(photometric_max_error=self.photometric_max_error)
        return identity

    def label(self, frame: Frame, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._label_from(self.estimator.predict(left, right), left, right)

    def _label_from(self, prediction, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's prediction on (left, right) -> (disparity, label confidence)."""
        disparity_right = right_view_disparity(self.estimator, left, right)
        sgbm = student = None
        needs = AGREEMENT_NEEDS.get(self.agreement, ())
        if "sgbm" in needs:
            try:  # SGBM checks left-right itself: NaN where it fails
                sgbm = StereoEstimator.load("sgbm", max_disparity=self.max_disparity,
                                             align_rows=False).predict(left, right).disparity
            except ValueError:  # narrower than SGBM's range: no SGBM evidence anywhere
                sgbm = np.full(left.shape[:2], np.nan, np.float32)
        if "student" in needs:
            student = self.student.predict(left, right).disparity
        evidence = ConfidenceEvidence(prediction.disparity, disparity_right, prediction.confidence,
                                      sgbm, student)
        rule = ConfidenceRule(lr_check_px=self.lr_check_px, agreement=self.agreement,
                              photometric_max_error=self.photometric_max_error)
        return prediction.disparity, label_confidence(evidence, left, right, rule=rule)


def label_file(directory: Path, name: str) -> Path:
    """DIR/<name>.pfm, .png (16-bit KITTI) or .npy; FileNotFoundError naming all three."""
    for suffix in LABEL_SUFFIXES:
        path = directory / f"{name}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"labels: no {' / '.join(f'{name}{s}' for s in LABEL_SUFFIXES)} in {directory}")


def read_label(path: Path) -> np.ndarray:
    """Disparity (H, W) float32 pixels, NaN where the file has none (0, inf, NaN)."""
    if path.suffix == ".png":
        disparity = read_kitti_disparity(path)
    else:
        disparity = read_pfm(path) if path.suffix == ".pfm" else np.load(path).astype(np.float32)
        if disparity.ndim == 3:
            disparity = disparity[:, :, 0]
    disparity = np.array(disparity, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        disparity[~(np.isfinite(disparity) & (disparity > 0))] = np.nan
    return disparity


class FileTeacher(Teacher):
    """`labels:DIR`: precomputed disparity files, one per frame, named after the frame."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--teacher labels:{directory}: no such folder")
        self.name = f"{LABELS_PREFIX}{self.directory}"

    def identity(self) -> dict:
        return {"teacher": f"{LABELS_PREFIX}{self.directory.resolve()}"}

    def label(self, frame: Frame, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        disparity = read_label(label_file(self.directory, frame.name))
        if frame.scale != 1.0 and input_size(disparity.shape[1], disparity.shape[0], frame.scale) == left.shape[1::-1]:
            disparity = disparity_to_size(disparity, left.shape[1::-1])  # the frame as the student sees it
        if disparity.shape != left.shape[:2]:
            raise ValueError(f"label of frame {frame.name} is {disparity.shape[1]}x{disparity.shape[0]}, "
                             f"the frame {left.shape[1]}x{left.shape[0]}")
        return disparity, np.isfinite(disparity).astype(np.float32)


def psmnet_checkpoint() -> Path:
    """The official PSMNet KITTI 2015 weights as our checkpoint, fetched, verified and converted
    into the cache on first use (as `stereo-kd fetch-teacher` does)."""
    converted = default_cache_dir() / "psmnet_kitti2015.pt"
    if not converted.is_file():
        convert_psmnet_checkpoint(fetch_psmnet_kitti2015(), converted)
    return converted


def load_teacher(spec: str, device: str = "auto", lr_check_px: float = 1.0,
                 precision: str = "fp32") -> Teacher | None:
    """`none`, `labels:DIR`, a registry name (`psmnet` is fetched on first use), a checkpoint,
    or an ONNX file (through StereoEstimator.load: output-level distillation only). `precision`:
    the network teacher's labelling precision (ONNX teachers run fp32); a non-fp32 one is part of
    the label cache's identity, so labels of another precision are never mixed in."""
    if spec == NO_TEACHER:
        return None
    if spec.startswith(LABELS_PREFIX):
        return FileTeacher(spec[len(LABELS_PREFIX):])
    if spec == "psmnet" and "psmnet" not in registry.shipped_models():
        path = psmnet_checkpoint()
        return EstimatorTeacher(StereoEstimator.load(str(path), device=device, precision=precision, align_rows=False),
                                {"teacher": "psmnet", "sha256": sha256_of_file(path), **_tagged(precision)},
                                lr_check_px)
    if spec.endswith(".onnx"):
        precision = "fp32"
    try:
        # labels of pairs as given (row alignment: the caches made before it hold)
        estimator = StereoEstimator.load(spec, device=device, precision=precision, align_rows=False)
    except CheckpointError as error:
        if spec.endswith(".onnx"):  # StereoEstimator.load runs ONNX files where its ONNX Runtime backend exists
            raise ValueError(f"--teacher {spec}: this install's StereoEstimator cannot run ONNX models "
                             f"({error})") from None
        raise
    path = Path(spec)
    identity = {"teacher": spec, "sha256": sha256_of_file(path)} if path.is_file() else {
        "teacher": spec, "sha256": registry.shipped_models().get(spec, {}).get("sha256")}
    return EstimatorTeacher(estimator, {**identity, **_tagged(precision), **_seen_as(estimator)}, lr_check_px)


def _tagged(precision: str) -> dict:
    """The precision entry of a teacher's identity: none for fp32 (caches made before it existed)."""
    return {} if precision == "fp32" else {"precision": precision}


def _seen_as(estimator: StereoEstimator) -> dict:
    """How a network teacher sees colour and exposure where that is not as captured (models.photometric:
    the same weights label differently), as entries of its identity; none otherwise (older caches hold)."""
    network = getattr(getattr(estimator, "inner", estimator), "inference_network", None)
    return {} if network is None else photometric_settings(network)


def teacher_precision(choice: str, device: str) -> str:
    """adapt.teacher_precision -> the labelling precision: auto = bf16 on a CPU with native bf16,
    fp32 elsewhere (CUDA included: labels stay exact where they are cheap)."""
    from stereo_kd_core.estimator import cpu_has_native_bf16

    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"adapt.teacher_precision must be auto, fp32 or bf16, got {choice!r}")
    if choice != "auto":
        return choice
    return "bf16" if device == "cpu" and cpu_has_native_bf16() else "fp32"


# --- the pseudo-label cache --------------------------------------------------------------
class LabelCache:
    """out_dir/labels/<source>/<name>.npz: float16 disparity (NaN invalid) and confidence,
    compressed; written atomically, so a killed run loses at most the frame in flight. With
    `costs`, also <name>.cost.npz: the teacher's top-K cost distribution (teacher_cache's format,
    `EstimatorTeacher.costs`), the source of adapt's cached internal points."""

    def __init__(self, out_dir: Path, teacher: Teacher, costs: bool = False) -> None:
        self.root = out_dir / LABELS_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        record = self.root / TEACHER_RECORD
        identity = teacher.identity()
        if record.is_file():
            stored = json.loads(record.read_text())
            if stored != identity:
                raise ValueError(f"{self.root} holds labels of another teacher ({stored}, now {identity}): "
                                 "give a new --out, or delete that folder to relabel")
        else:
            record.write_text(json.dumps(identity, indent=2) + "\n")
        if costs and not isinstance(teacher, EstimatorTeacher):
            raise ValueError(f"teacher {teacher.name} has no cost volumes to cache")
        self.teacher, self.costs = teacher, bool(costs)
        self.computed = 0  # frames the teacher ran on in this process

    def path(self, frame: Frame) -> Path:
        return self.root / f"{frame.key}.npz"

    def cost_path(self, frame: Frame) -> Path:
        return self.root / f"{frame.key}{COST_SUFFIX}"

    def fill(self, frames: Sequence[Frame]) -> None:
        """Run the teacher on every frame without a cached label (and cost distribution, with
        `costs`); progress bar."""
        missing = [frame for frame in frames if not self.path(frame).is_file()
                   or (self.costs and not self.cost_path(frame).is_file())]
        for frame in tqdm(missing, desc="teacher labels", unit="frame", disable=None):
            sample = frame.sample()
            path = self.path(frame)
            path.parent.mkdir(parents=True, exist_ok=True)
            costs = None
            if not path.is_file():
                if self.costs and not self.cost_path(frame).is_file():  # one teacher pass for both
                    disparity, confidence, costs = self.teacher.label_with_costs(frame, sample["left"], sample["right"])
                else:
                    disparity, confidence = self.teacher.label(frame, sample["left"], sample["right"])
                write_npz_atomic(path, {"disparity": disparity.astype(np.float16),
                                        "confidence": np.clip(confidence, 0, 1).astype(np.float16)})
            if self.costs and not self.cost_path(frame).is_file():
                if costs is None:
                    costs = self.teacher.costs(sample["left"], sample["right"])
                write_npz_atomic(self.cost_path(frame), costs)
            self.computed += 1

    def cost_targets(self, frame: Frame, confident: np.ndarray) -> tuple[np.ndarray, int]:
        """(teacher_prob (levels, h/s, w/s) float32, stride s) of a frame, emptied in the cells
        where fewer than half the pixels carry a confident label (`confident` (H, W) bool): the
        distribution teaches only where the label's evidence holds."""
        cached = read_teacher_file(self.cost_path(frame))
        prob = dense_probability(cached["cost_index"], cached["cost_prob"], int(cached["levels"]))
        stride = int(cached["stride"])
        height, width = confident.shape
        cells = np.zeros((prob.shape[1] * stride, prob.shape[2] * stride), np.float32)
        cells[:height, :width] = confident
        share = cells.reshape(prob.shape[1], stride, prob.shape[2], stride).mean(axis=(1, 3))
        prob[:, share < 0.5] = 0.0
        return prob, stride

    def read(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """(disparity, confidence), float32 (H, W)."""
        with np.load(self.path(frame)) as stored:
            return stored["disparity"].astype(np.float32), stored["confidence"].astype(np.float32)

    def confident(self, frame: Frame, min_confidence: float) -> np.ndarray:
        """The label where its confidence is at least min_confidence, NaN elsewhere (H, W)."""
        disparity, confidence = self.read(frame)
        return np.where(confidence >= min_confidence, disparity, np.nan).astype(np.float32)



class AdaptFrames(Dataset):
    """Training frames as sample dicts of source pseudo-label; "disparity" is the pseudo-label
    where its confidence is at least min_confidence, NaN elsewhere (all NaN without a teacher)."""

    def __init__(self, frames: Sequence[Frame], cache: LabelCache | None, min_confidence: float) -> None:
        self.frames, self.cache, self.min_confidence = list(frames), cache, float(min_confidence)
        self.costs = cache is not None and cache.costs  # + teacher_prob, teacher_stride, teacher_disparity

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        frame = self.frames[index]
        sample = frame.sample()
        if self.cache is None:
            disparity = np.full(sample["left"].shape[:2], np.nan, dtype=np.float32)
        else:
            disparity, confidence = self.cache.read(frame)
            disparity = np.where(confidence >= self.min_confidence, disparity, np.nan).astype(np.float32)
        item = {"left": sample["left"], "right": sample["right"], "disparity": disparity, "name": frame.name,
                "source": SOURCE_PSEUDO_LABEL}
        if self.costs:
            item["teacher_prob"], item["teacher_stride"] = self.cache.cost_targets(frame, np.isfinite(disparity))
            item["teacher_disparity"] = disparity
        return item


# --- distillation's cache of teacher outputs --------------------------------------------
def cache_teacher(teacher_path: str | os.PathLike, data_root: str | os.PathLike, top_k: int = DEFAULT_TOP_K,
                  precision: str = "fp32", device: str = "cpu", progress: bool = True) -> int:
    """Write CASE/teacher.npz for every case of a Middlebury-layout folder that lacks one
    (resumable: existing files are kept). Returns the number of files written."""
    teacher = load_model(teacher_path, device=device)
    dataset = MiddleburyDataset(data_root)
    todo = [case for case in dataset.cases if not teacher_file(case.left.parent).is_file()]
    for case in tqdm(todo, desc="teacher cache", disable=not progress):
        targets = teacher_targets(teacher, read_image_rgb(case.left), read_image_rgb(case.right), top_k, precision)
        write_npz_atomic(teacher_file(case.left.parent), targets)
    return len(todo)
