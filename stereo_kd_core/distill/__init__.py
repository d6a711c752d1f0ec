"""Knowledge distillation from a stereo teacher to a lean student: losses, adapters, loss
weighting, and the `Distiller` objective that ties them to a student and a frozen teacher."""

from stereo_kd_core.distill.adapters import ChannelAdapter, resample_feature, resample_volume
from stereo_kd_core.distill.distiller import CachedTeacherDistiller, Distiller, SupervisedObjective, frozen_layers
from stereo_kd_core.distill.losses import (
    cosine_feature_loss,
    disparity_kl_loss,
    ground_truth_loss,
    hint_loss,
    pool_mask,
    teacher_agreement_mask,
    teacher_disparity_loss,
    teacher_valid_mask,
)
from stereo_kd_core.distill.weighting import (
    LossWeighting,
    ProgressiveStages,
    StepDecay,
    UncertaintyWeighting,
)

__all__ = [
    "CachedTeacherDistiller",
    "ChannelAdapter",
    "Distiller",
    "LossWeighting",
    "ProgressiveStages",
    "StepDecay",
    "SupervisedObjective",
    "UncertaintyWeighting",
    "cosine_feature_loss",
    "disparity_kl_loss",
    "frozen_layers",
    "ground_truth_loss",
    "hint_loss",
    "pool_mask",
    "resample_feature",
    "resample_volume",
    "teacher_agreement_mask",
    "teacher_disparity_loss",
    "teacher_valid_mask",
]
