"""Static int8 quantisation of an exported stereo ONNX model, calibrated on stereo pairs.

Convolutions (2D and 3D, and the transposed ones of the hourglasses) get int8 weights (per
output channel) and uint8 activations in ONNX Runtime's QDQ format, with activation ranges
taken from the calibration pairs (min/max). The rest (correlation matmul, softmax, soft argmin,
convex upsampling) stays fp32: the regression needs sub-pixel precision, int8 would cost it.
Calibration pairs are fed exactly as OnnxEstimator feeds pairs at run time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stereo_kd_core.export import read_onnx_metadata, write_onnx_metadata
from stereo_kd_core.onnx_runtime import METADATA_PREFIX, OnnxEstimator

QUANTIZED_OP_TYPES = ["Conv", "ConvTranspose"]
QUANTIZATION_LABEL = "int8-static"


def synthetic_calibration_pairs(n: int, height: int, width: int, max_disparity: int,
                                seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` pairs of the synthetic generator (seed 7: not the 2026 test split) for calibration."""
    from stereo_kd_core.data.synthetic import SyntheticStereoGenerator

    generator = SyntheticStereoGenerator(height, width, max_disparity, seed=seed)
    return [(sample["left"], sample["right"]) for sample in map(generator.sample, range(n))]


def quantize_int8_static(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike,
                         calibration_pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write an int8 copy of `onnx_in` (its metadata kept, `stereo_kd.quantization` set)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    estimator = OnnxEstimator(onnx_in, device="cpu")
    feeds = [estimator._feeds(left, right) for left, right in calibration_pairs]
    if not feeds:
        raise ValueError("int8 calibration needs at least one pair")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._items, None)

    onnx_out = Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    metadata = read_onnx_metadata(onnx_in)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(onnx_in), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(onnx_out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=QUANTIZED_OP_TYPES, calibrate_method=CalibrationMethod.MinMax)
    write_onnx_metadata(onnx_out, {**metadata, METADATA_PREFIX + "quantization": f'"{QUANTIZATION_LABEL}"'})
    return onnx_out
