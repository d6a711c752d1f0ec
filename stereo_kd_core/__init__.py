"""stereo-kd core library: models, distillation, data, training, evaluation, inference."""

from stereo_kd_core.estimator import RawPrediction, StereoEstimator, StereoPrediction

__all__ = ["RawPrediction", "StereoEstimator", "StereoPrediction"]
__version__ = "0.1.0"
