"""stereo-kd core library: models, distillation, data, training, evaluation, inference."""

from stereo_kd_core.estimator import StereoEstimator, StereoPrediction

__all__ = ["StereoEstimator", "StereoPrediction"]
__version__ = "0.1.0"
