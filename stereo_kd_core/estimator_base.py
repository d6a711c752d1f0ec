"""The seam's interface: `StereoEstimator`, what it returns, and the input checks every backend shares.

The backends sit side by side below the loader and above this module: `sgbm_estimator`
(OpenCV), `network_estimator` (PyTorch), `onnx_runtime` (ONNX Runtime). None imports another;
`stereo_kd_core.estimator` picks one (`StereoEstimator.load`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from stereo_kd_core.rectification import resize_pair

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX-512 BF16): elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass
class StereoPrediction:
    disparity: np.ndarray   # float32 HxW, pixels, NaN where invalid
    confidence: np.ndarray  # float32 HxW in [0, 1]
    points: np.ndarray | None = None  # float32 HxWx3 metres (left optical frame) when geometry was given


@dataclass
class RawPrediction:
    """What `StereoEstimator.predict_raw` gives for a raw (unrectified) pair."""

    prediction: StereoPrediction
    left: np.ndarray                          # the left image the estimator saw: rectified, at its input size
    rectified_left: np.ndarray | None = None  # the rectified left image at full size, when asked for


def resolve_device(device: str) -> str:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got '{device}'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but torch sees no CUDA GPU; use device 'auto' or 'cpu'")
    return device


def _as_rgb(image: np.ndarray, side: str) -> np.ndarray:
    """Validate one input image; returns HxWx3 (uint8 or uint16)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{side} image must be a numpy array, got {type(image).__name__}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{side} image must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{side} image must be HxW or HxWx3, got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{side} image is too small: {image.shape[1]}x{image.shape[0]}")
    return image


def pair_peak(left: np.ndarray, right: np.ndarray) -> float:
    """Full-scale value of a pair: 255 for 8-bit; for 16-bit the pair's largest value, so 10-,
    12- and 16-bit sensors (mono16 from a 12-bit camera peaks at 4095) all use the full range."""
    if left.dtype == np.uint8:
        return 255.0
    return float(max(int(left.max()), int(right.max()), 1))


def check_pair(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images validated and as HxWx3; ValueError/TypeError naming the side at fault."""
    left, right = _as_rgb(left, "left"), _as_rgb(right, "right")
    if left.shape != right.shape or left.dtype != right.dtype:
        raise ValueError(f"left and right images differ: {left.shape} {left.dtype} vs {right.shape} {right.dtype}")
    return left, right


class StereoEstimator:
    """Disparity (and confidence) for rectified stereo pairs, from a network or OpenCV SGBM."""

    name: str
    backend: str = "python"  # "pytorch", "opencv", "onnxruntime (<execution provider>)"; subclasses say
    device: str
    precision: str
    max_disparity: int
    min_disparity: float = 0.0
    min_input_width: int = 2  # narrower pairs are refused with a ValueError

    # StereoEstimator.load(model, device=..., precision=..., ...) -> an estimator of the backend the
    # model needs: `stereo_kd_core.estimator.load`, installed there (the loader sits above the
    # backends, which sit above this class, so this module cannot import it).
    load: ClassVar[Callable[..., StereoEstimator]]

    def predict(self, left: np.ndarray, right: np.ndarray, geometry=None) -> StereoPrediction:
        """Disparity and confidence of a rectified pair; with `geometry` (a StereoGeometry) also
        the organized point cloud, computed on the estimator's device."""
        raise NotImplementedError

    # Where predict_raw rectifies and resizes: False = OpenCV on the CPU; True = on the
    # estimator's own device (networks only: torch grid_sample, no host round trip on a GPU).
    rectifies_on_device: bool = False
    # Whether it can do the latter (a PyTorch network, also one run at a scale of its own).
    can_rectify_on_device: bool = False

    def predict_raw(self, left: np.ndarray, right: np.ndarray, maps, size: tuple[int, int] | None = None,
                    geometry=None, rectified_left: bool = False) -> RawPrediction:
        """Rectify a raw pair with `maps` (left and right RectificationMaps), resize it to `size`
        (W, H; area interpolation; None = full size) and predict, as `predict` would on the
        rectified, resized pair; `geometry` is that of the resized pair (points as in `predict`).
        This implementation rectifies with OpenCV on the CPU."""
        left_maps, right_maps = maps
        full_left, full_right = left_maps.remap(left), right_maps.remap(right)
        if size is None:
            size = (full_left.shape[1], full_left.shape[0])
        small_left, small_right = resize_pair(full_left, full_right, size)
        prediction = self.predict(small_left, small_right, geometry=geometry)
        return RawPrediction(prediction, small_left, full_left if rectified_left else None)

    @staticmethod
    def _points(disparity: np.ndarray, geometry) -> np.ndarray | None:
        return None if geometry is None else geometry.points_from_disparity(disparity)
