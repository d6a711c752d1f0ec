"""Teaching signals and the one training objective: losses, adapters, loss weighting, the
teacher-output cache format, and `TrainingObjective`, which ties them to a student (and a
teacher) for every recipe (`SupervisedObjective`, `Distiller`, `CachedTeacherDistiller` are its
configurations)."""

from stereo_kd_core.distill.adapters import ChannelAdapter, resample_feature, resample_volume
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
from stereo_kd_core.distill.objective import (
    PHOTOMETRIC_TERM,
    CachedTeacherDistiller,
    Distiller,
    SupervisedObjective,
    TrainingObjective,
    frozen_layers,
)
from stereo_kd_core.distill.signals import SOURCE_GROUND_TRUTH, SOURCE_PSEUDO_LABEL
from stereo_kd_core.distill.weighting import (
    LossWeighting,
    ProgressiveStages,
    StepDecay,
    UncertaintyWeighting,
)

__all__ = [
    "PHOTOMETRIC_TERM",
    "SOURCE_GROUND_TRUTH",
    "SOURCE_PSEUDO_LABEL",
    "CachedTeacherDistiller",
    "ChannelAdapter",
    "Distiller",
    "LossWeighting",
    "ProgressiveStages",
    "StepDecay",
    "SupervisedObjective",
    "TrainingObjective",
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
