"""Training augmentation on sample dicts: scaling, cropping, photometric jitter, occlusion patches.

Order: scale -> crop -> photometric -> occlusion. Geometric steps move left, right, disparity,
confidence and nocc together (disparity is scaled by the horizontal factor); photometric and occlusion steps
touch images only, and occlusion patches only the right image, whose content the left-view
ground truth does not depend on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class AugmentConfig:
    """Augmentation recipe; ranges are inclusive."""

    random_crop: bool = True  # False: centred crop
    photometric: bool = True
    brightness: float = 0.2  # gain drawn from [1 - brightness, 1 + brightness]
    contrast: float = 0.2  # stretch around the mean grey, factor from [1 - contrast, 1 + contrast]
    saturation: float = 0.2  # factor from [1 - saturation, 1 + saturation]
    gamma: tuple[float, float] = (0.8, 1.2)
    asymmetric_prob: float = 0.2  # chance that left and right get independent photometric draws
    occlusion_prob: float = 0.5  # chance of one patch in the right image filled with its mean colour
    occlusion_size: tuple[int, int] = (50, 100)  # patch side lengths, pixels
    scale_range: tuple[float, float] | None = None  # isotropic resize factor range before cropping


def scale_sample(sample: dict, scale: float) -> dict:
    """Resize every map by `scale`; disparity is multiplied by the realised horizontal factor."""
    height, width = sample["left"].shape[:2]
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = dict(sample)
    for key in ("left", "right"):
        out[key] = cv2.resize(sample[key], (new_width, new_height), interpolation=interpolation)
    if "disparity" in sample:
        # nearest keeps sparse ground truth sparse and does not blend across depth edges
        resized = cv2.resize(sample["disparity"], (new_width, new_height), interpolation=cv2.INTER_NEAREST)
        out["disparity"] = resized * np.float32(new_width / width)
    if "confidence" in sample:  # a pseudo-label's per-pixel confidence follows its disparity
        out["confidence"] = cv2.resize(sample["confidence"], (new_width, new_height), interpolation=cv2.INTER_NEAREST)
    if "nocc" in sample:
        nocc = cv2.resize(sample["nocc"].astype(np.uint8), (new_width, new_height), interpolation=cv2.INTER_NEAREST)
        out["nocc"] = nocc.astype(bool)
    out.pop("calib", None)  # intrinsics no longer match
    return out


def crop_sample(sample: dict, top: int, left: int, crop_size: tuple[int, int]) -> dict:
    """Cut the same window out of every map; windows beyond the image are padded (black, no ground truth)."""
    crop_h, crop_w = crop_size
    height, width = sample["left"].shape[:2]
    pad_h, pad_w = max(0, top + crop_h - height), max(0, left + crop_w - width)
    out = dict(sample)
    fills = {"left": 0, "right": 0, "disparity": np.nan, "confidence": 0.0, "nocc": False, "teacher_disparity": np.nan}
    for key, fill in fills.items():
        if key not in sample:
            continue
        array = sample[key]
        if pad_h or pad_w:
            padding = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
            array = np.pad(array, padding, constant_values=fill)
        out[key] = np.ascontiguousarray(array[top:top + crop_h, left:left + crop_w])
    if "teacher_prob" in sample:  # (D/s, H/s, W/s) at the teacher's cost stride s
        stride = sample["teacher_stride"]
        if top % stride or left % stride or crop_h % stride or crop_w % stride:
            raise ValueError(f"a crop of cached teacher costs must sit on their {stride}-pixel grid")
        prob = sample["teacher_prob"]
        if pad_h or pad_w:  # zero mass: no target there
            prob = np.pad(prob, ((0, 0), (0, -(-pad_h // stride)), (0, -(-pad_w // stride))))
        rows, cols = slice(top // stride, (top + crop_h) // stride), slice(left // stride, (left + crop_w) // stride)
        out["teacher_prob"] = np.ascontiguousarray(prob[:, rows, cols])
    out.pop("calib", None)  # the principal point moved
    return out


def _photometric_draw(rng: np.random.Generator, config: AugmentConfig) -> tuple[float, float, float, float]:
    return (
        rng.uniform(1 - config.brightness, 1 + config.brightness),
        rng.uniform(1 - config.contrast, 1 + config.contrast),
        rng.uniform(1 - config.saturation, 1 + config.saturation),
        rng.uniform(*config.gamma),
    )


def adjust_photometric(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                       gamma: float) -> np.ndarray:
    """Brightness gain, contrast and saturation around the grey level, then gamma; float32 in [0, 255]."""
    image = image.astype(np.float32) * brightness
    grey = image.mean(axis=2, keepdims=True)
    image = (image - grey.mean()) * contrast + grey.mean()
    grey = image.mean(axis=2, keepdims=True)
    image = grey + saturation * (image - grey)
    image = np.clip(image, 0, 255)
    return (255.0 * (image / 255.0) ** gamma).astype(np.float32)


def occlude(image: np.ndarray, rng: np.random.Generator, size_range: tuple[int, int]) -> np.ndarray:
    """Fill one random rectangle with the image's mean colour."""
    height, width = image.shape[:2]
    patch_h = min(height, int(rng.integers(size_range[0], size_range[1] + 1)))
    patch_w = min(width, int(rng.integers(size_range[0], size_range[1] + 1)))
    top, left = int(rng.integers(height - patch_h + 1)), int(rng.integers(width - patch_w + 1))
    out = image.astype(np.float32, copy=True)
    out[top:top + patch_h, left:left + patch_w] = image.reshape(-1, image.shape[2]).mean(axis=0)
    return out


def augment_sample(sample: dict, rng: np.random.Generator, crop_size: tuple[int, int] | None,
                   config: AugmentConfig | None) -> dict:
    """Apply `config` (None = no augmentation, centred crop only) and crop to `crop_size` (None = keep size)."""
    if config is not None and config.scale_range is not None and "teacher_prob" in sample:
        raise ValueError("augment.scale_range cannot be used with cached teacher outputs")
    if config is not None and config.scale_range is not None:
        scale = rng.uniform(*config.scale_range)
        if crop_size is not None:  # never scale below the crop
            height, width = sample["left"].shape[:2]
            scale = max(scale, crop_size[0] / height, crop_size[1] / width)
        sample = scale_sample(sample, scale)
    if crop_size is not None:
        height, width = sample["left"].shape[:2]
        spare_h, spare_w = max(0, height - crop_size[0]), max(0, width - crop_size[1])
        if config is not None and config.random_crop:
            top, left = int(rng.integers(spare_h + 1)), int(rng.integers(spare_w + 1))
        else:
            top, left = spare_h // 2, spare_w // 2
        if "teacher_prob" in sample:  # cached teacher costs: crops on their grid
            stride = sample["teacher_stride"]
            top, left = top - top % stride, left - left % stride
        sample = crop_sample(sample, top, left, crop_size)
    if config is None:
        return sample
    sample = dict(sample)
    if config.photometric:
        left_draw = _photometric_draw(rng, config)
        right_draw = _photometric_draw(rng, config) if rng.random() < config.asymmetric_prob else left_draw
        sample["left"] = adjust_photometric(sample["left"], *left_draw)
        sample["right"] = adjust_photometric(sample["right"], *right_draw)
    if rng.random() < config.occlusion_prob:
        sample["right"] = occlude(sample["right"], rng, config.occlusion_size)
    return sample
