"""Training augmentation on sample dicts: swapped views, scaling, cropping, photometric jitter, occlusion patches.

Order: swap -> scale -> crop -> photometric -> occlusion. Geometric steps move left, right, disparity,
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
    # per-channel gains from [1 - white_balance, 1 + white_balance] (a camera's colour response), drawn
    # with the other photometric factors; 0: none drawn (recipes without it keep their random stream)
    white_balance: float = 0.0
    occlusion_prob: float = 0.5  # chance of one patch in the right image filled with its mean colour
    occlusion_size: tuple[int, int] = (50, 100)  # patch side lengths, pixels
    scale_range: tuple[float, float] | None = None  # isotropic resize factor range before cropping
    # chance of training on the mirrored right view (swap_views): the labels of both views, so that the
    # network's right-view answers (its own left-right check) learn what its left-view answers learn
    swap_views_prob: float = 0.0


def right_view_maps(disparity: np.ndarray, *maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """The left view's (H, W) disparity (NaN = no label) carried to the right view, and `maps`
    (e.g. its confidence) with it: each labelled pixel x lands on the right-view columns either side
    of x - d, the nearest surface (largest disparity) winning where several land. Right-view pixels
    no label lands on (occluded in the left view, or unlabelled) are NaN (maps: 0)."""
    height, width = disparity.shape
    rows, cols = np.nonzero(np.isfinite(disparity) & (disparity >= 0))
    values = disparity[rows, cols]
    source = rows * width + cols  # flat index of each labelled left pixel
    target = cols - values  # (N,) right-view column, sub-pixel
    winner = np.full(height * width, -1, dtype=np.int64)  # flat left index that lands on each right pixel
    order = np.argsort(values, kind="stable")  # ascending: the largest disparity is written last and wins
    for column in (np.floor(target), np.floor(target) + 1):
        inside = (column >= 0) & (column <= width - 1) & (np.abs(column - target) < 1)
        chosen = order[inside[order]]
        winner[rows[chosen] * width + column[chosen].astype(np.int64)] = source[chosen]
    landed = winner >= 0
    out = []
    for values_map, empty in ((disparity, np.nan), *((m, 0) for m in maps)):
        right = np.full(height * width, empty, dtype=values_map.dtype)
        right[landed] = values_map.reshape(-1)[winner[landed]]
        out.append(right.reshape(height, width))
    return tuple(out)


def swap_views(sample: dict) -> dict:
    """The mirrored right view as the left: left' = flip(right), right' = flip(left), labels carried to
    the right view (right_view_maps) and flipped; disparities keep their values (x'_left - x'_right =
    x_left - x_right). Cached teacher costs have no right view: their distribution is emptied."""
    out = dict(sample)
    out["left"] = np.ascontiguousarray(sample["right"][:, ::-1])
    out["right"] = np.ascontiguousarray(sample["left"][:, ::-1])
    extra = [key for key in ("confidence",) if key in sample]
    carried = right_view_maps(sample["disparity"], *(sample[key] for key in extra))
    for key, values in zip(("disparity", *extra), carried, strict=True):
        out[key] = np.ascontiguousarray(values[:, ::-1])
    if "nocc" in sample:  # visible in both views: where a left-view pixel landed
        out["nocc"] = np.isfinite(out["disparity"])
    if "teacher_disparity" in sample:
        out["teacher_disparity"] = out["disparity"]
    if "teacher_prob" in sample:
        out["teacher_prob"] = np.zeros_like(sample["teacher_prob"])
    out.pop("calib", None)  # a mirrored rig
    return out


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


def _photometric_draw(rng: np.random.Generator, config: AugmentConfig) -> tuple:
    draw = (
        rng.uniform(1 - config.brightness, 1 + config.brightness),
        rng.uniform(1 - config.contrast, 1 + config.contrast),
        rng.uniform(1 - config.saturation, 1 + config.saturation),
        rng.uniform(*config.gamma),
    )
    if config.white_balance <= 0:
        return draw
    return (*draw, rng.uniform(1 - config.white_balance, 1 + config.white_balance, size=3))


def adjust_photometric(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                       gamma: float, channel_gains: np.ndarray | None = None) -> np.ndarray:
    """Brightness gain (times per-channel `channel_gains` of a colour image: white balance),
    contrast and saturation around the grey level, then gamma; float32 in [0, 255]."""
    image = image.astype(np.float32) * brightness
    if channel_gains is not None and image.ndim == 3 and image.shape[2] == len(channel_gains):
        image = image * np.asarray(channel_gains, np.float32)
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
    # drawn only when enabled, so that recipes without it keep their random stream
    if config is not None and config.swap_views_prob > 0 and rng.random() < config.swap_views_prob:
        sample = swap_views(sample)
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
