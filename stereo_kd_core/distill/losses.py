"""Distillation and ground-truth losses.

Every loss returns a scalar tensor: the mean over the pixels (or voxels) it is defined on, or
zero (connected to the graph) when none are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from stereo_kd_core.distill.adapters import resample_volume

OUTPUT_WEIGHTS = (0.5, 0.7, 1.0)  # weights of the last three outputs (coarse -> final)
GROUND_TRUTH_KINDS = ("smooth_l1", "log_l1")
HINT_KINDS = ("mse", "smooth_l1")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    count = mask.sum()
    if count == 0:
        return values.sum() * 0.0
    return values[mask].sum() / count


def cosine_feature_loss(student: torch.Tensor, teacher: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 - cosine similarity over channels (dim 1), per pixel or voxel; two zero
    vectors count as similar, one zero vector against a non-zero one as orthogonal.

    student, teacher: (B, C, H, W) or (B, C, D, H, W); mask: broadcastable to (B, H, W) /
    (B, D, H, W), True where the term counts.
    """
    teacher = teacher.to(student.dtype)
    student_norm, teacher_norm = student.norm(dim=1), teacher.norm(dim=1)
    similarity = (student * teacher).sum(dim=1) / (student_norm * teacher_norm).clamp_min(1e-12)
    # two all-zero vectors (common after a ReLU) agree perfectly
    both_zero = (student_norm == 0) & (teacher_norm == 0)
    similarity = torch.where(both_zero, torch.ones_like(similarity), similarity)
    return _masked_mean(1.0 - similarity, mask)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise hint loss (MSE or smooth L1) between adapted student and teacher tensors.

    mask: broadcastable to the tensors (e.g. (B, 1, H, W)), True where the term counts.
    """
    teacher = teacher.to(student.dtype)
    if kind == "mse":
        values = (student - teacher) ** 2
    elif kind == "smooth_l1":
        values = F.smooth_l1_loss(student, teacher, reduction="none")
    else:
        raise ValueError(f"unknown hint loss {kind!r}; known: {', '.join(HINT_KINDS)}")
    return _masked_mean(values, mask)


def rebin_disparity_distribution(probability: torch.Tensor, levels_out: int) -> torch.Tensor:
    """Move a distribution over D_in disparity levels onto D_out levels of the same range.

    Level i of the input sits at i * D_out / D_in output levels (origin aligned); its mass is
    split linearly between the two nearest output levels (the adjoint of linear interpolation),
    so total mass and the expected disparity are kept and no level is dropped. Mass beyond
    the last output level goes to it. (B, D_in, H, W) -> (B, D_out, H, W).
    """
    levels_in = probability.shape[1]
    if levels_in == levels_out:
        return probability
    position = torch.arange(levels_in, device=probability.device, dtype=probability.dtype) * (levels_out / levels_in)
    target = torch.arange(levels_out, device=probability.device, dtype=probability.dtype)
    weights = (1.0 - (position[:, None] - target[None, :]).abs()).clamp(min=0.0)  # (D_in, D_out)
    beyond = position > levels_out - 1
    weights[beyond] = 0.0
    weights[beyond, -1] = 1.0
    return torch.einsum("bdhw,de->behw", probability, weights)


def disparity_kl_loss(student_cost: torch.Tensor, teacher_cost: torch.Tensor,
                      temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between softmax distributions over disparity levels, times T^2.

    student_cost: (B, D_s, H_s, W_s) logits; teacher_cost: (B, D_t, H_t, W_t) logits. The teacher
    is resampled spatially to the student's grid, turned into probabilities, and its distribution
    re-binned onto the student's D_s levels (rebin_disparity_distribution: probabilities, not
    logits, so a sharp peak between two student levels is split, never dropped). mask:
    (B, H_s, W_s), True where the term counts; pixels where the teacher's logits are not all
    finite never count.
    """
    teacher_cost = resample_volume(teacher_cost, (teacher_cost.shape[1], *student_cost.shape[2:])).float()
    finite = torch.isfinite(teacher_cost).all(dim=1)  # (B, H_s, W_s)
    mask = finite if mask is None else mask & finite
    teacher_cost = torch.where(torch.isfinite(teacher_cost), teacher_cost, torch.zeros_like(teacher_cost))
    return _kl_on_student_grid(student_cost, F.softmax(teacher_cost / temperature, dim=1), temperature, mask)


def _kl_on_student_grid(student_cost: torch.Tensor, teacher_prob: torch.Tensor, temperature: float,
                        mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) * T^2; teacher_prob (B, D_t, H_s, W_s) already on the student's grid."""
    teacher_prob = rebin_disparity_distribution(teacher_prob, student_cost.shape[1])
    teacher_log_prob = torch.log(teacher_prob.clamp(min=1e-12))
    student_log_prob = F.log_softmax(student_cost.float() / temperature, dim=1)
    kl = (teacher_prob * (teacher_log_prob - student_log_prob)).sum(dim=1)  # (B, H, W)
    return _masked_mean(kl, mask) * temperature**2


def cached_distribution_kl_loss(student_cost: torch.Tensor, teacher_prob: torch.Tensor,
                                mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) with the teacher given as a cached probability distribution.

    student_cost: (B, D_s, H_s, W_s) logits; teacher_prob: (B, D_t, H_t, W_t) probabilities (each
    column sums to 1, or 0 where the cache has no target). The teacher is resampled spatially
    (a convex combination of distributions is one) and re-binned onto the student's levels.
    """
    teacher_prob = resample_volume(teacher_prob.float(), (teacher_prob.shape[1], *student_cost.shape[2:]))
    has_target = teacher_prob.sum(dim=1) > 0.5  # (B, H_s, W_s): padding has no mass
    mask = has_target if mask is None else mask & has_target
    total = teacher_prob.sum(dim=1, keepdim=True)
    teacher_prob = torch.where(total > 0, teacher_prob / total.clamp(min=1e-12), torch.zeros_like(teacher_prob))
    return _kl_on_student_grid(student_cost, teacher_prob, 1.0, mask)


def teacher_valid_mask(teacher_disparity: torch.Tensor, max_disparity: float) -> torch.Tensor:
    """Pixels where the teacher's disparity can serve as a target: finite, in [0, max)."""
    return torch.isfinite(teacher_disparity) & (teacher_disparity >= 0) & (teacher_disparity < max_disparity)


def teacher_agreement_mask(teacher_disparity: torch.Tensor, ground_truth: torch.Tensor, valid: torch.Tensor,
                           max_error_px: float) -> torch.Tensor:
    """Pixels where the teacher may teach (B, H, W): where a label exists, only if the teacher's
    disparity is within `max_error_px` of it (a teacher that is wrong there would teach its error);
    every pixel without a label (sparse labels, or none: what distillation is for)."""
    labelled = valid & torch.isfinite(ground_truth)
    agrees = (teacher_disparity.float() - ground_truth.float()).abs() <= max_error_px  # NaN: False
    return ~labelled | agrees


def pool_mask(mask: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """A (B, H, W) pixel mask on a coarser (h, w) grid: a cell is kept only if all its pixels are
    (None, meaning everywhere, stays None)."""
    if mask is None or tuple(mask.shape[-2:]) == tuple(size):
        return mask
    rejected = F.adaptive_max_pool2d((~mask).float().unsqueeze(1), size).squeeze(1)
    return rejected < 0.5


def teacher_disparity_loss(student_disparity: torch.Tensor, teacher_disparity: torch.Tensor,
                           max_disparity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth L1 between student and teacher disparity (B, H, W) on teacher-valid pixels (and
    within `mask`, when given)."""
    valid = teacher_valid_mask(teacher_disparity, max_disparity)
    if mask is not None:
        valid = valid & mask
    target = torch.where(valid, teacher_disparity, torch.zeros_like(teacher_disparity))
    values = F.smooth_l1_loss(student_disparity.float(), target.float(), reduction="none")
    return _masked_mean(values, valid)


def ground_truth_loss(disparities: Sequence[torch.Tensor], ground_truth: torch.Tensor,
                      valid: torch.Tensor, kind: str = "smooth_l1",
                      output_weights: Sequence[float] = OUTPUT_WEIGHTS,
                      pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over the model's outputs of a loss to a target disparity (ground truth or a
    pseudo-label).

    disparities: K tensors (B, H, W), coarse to final; output_weights are aligned to the last K
    outputs (with K = 2 and the default weights: 0.7, 1.0). ground_truth: (B, H, W) pixels;
    valid: (B, H, W) bool. kind: "smooth_l1" or "log_l1" (mean of log(1 + |error|)).
    pixel_weight: (B, H, W) >= 0, e.g. a pseudo-label's confidence: the loss is the weighted mean
    over valid pixels (a pixel of weight 0 has no effect); None = weight 1 everywhere.
    """
    if kind not in GROUND_TRUTH_KINDS:
        raise ValueError(f"unknown ground-truth loss {kind!r}; known: {', '.join(GROUND_TRUTH_KINDS)}")
    if len(disparities) > len(output_weights):
        raise ValueError(f"{len(disparities)} outputs but only {len(output_weights)} output weights")
    weights = list(output_weights)[-len(disparities):]
    valid = valid & torch.isfinite(ground_truth)
    if pixel_weight is not None:
        valid = valid & (pixel_weight > 0)
    target = torch.where(valid, ground_truth, torch.zeros_like(ground_truth)).float()
    total = disparities[0].new_zeros((), dtype=torch.float32)
    for weight, disparity in zip(weights, disparities, strict=True):
        if kind == "smooth_l1":
            values = F.smooth_l1_loss(disparity.float(), target, reduction="none")
        else:
            values = torch.log1p((disparity.float() - target).abs())
        total = total + weight * _weighted_mean(values, valid, pixel_weight)
    return total


def _weighted_mean(values: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum(weight * values) / sum(weight) over `mask` (the masked mean when weight is None)."""
    if weight is None:
        return _masked_mean(values, mask)
    if not mask.any():
        return values.sum() * 0.0
    weight = weight.float()
    return (values * weight)[mask].sum() / weight[mask].sum()


# --- self-supervision (no labels): the left view rebuilt from the right ------------------
SSIM_WEIGHT = 0.85  # of (1 - SSIM) / 2 against L1 in the photometric error (Monodepth's mix)
_SSIM_C1, _SSIM_C2 = 0.01**2, 0.03**2


def warp_right_to_left(right: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The right image sampled at x - d(x): the left view as the disparity predicts it.

    right: (B, C, H, W); disparity: (B, H, W) pixels. Returns the warped image (B, C, H, W) and
    (B, H, W) bool, True where x - d falls inside the right image.
    """
    batch, _, height, width = right.shape
    xs = torch.arange(width, device=right.device, dtype=torch.float32).view(1, 1, width)
    ys = torch.arange(height, device=right.device, dtype=torch.float32).view(1, height, 1)
    source_x = xs - disparity.float()  # (B, H, W)
    grid = torch.stack((2.0 * source_x / max(width - 1, 1) - 1.0,
                        (2.0 * ys / max(height - 1, 1) - 1.0).expand(batch, height, width)), dim=-1)
    warped = F.grid_sample(right.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = (source_x >= 0) & (source_x <= width - 1)
    return warped, inside


def ssim_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1 - SSIM) / 2 over 3x3 windows, per pixel and channel, in [0, 1]. (B, C, H, W) -> same."""
    # reflection padding keeps the border windows full
    x, y = F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x**2
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y**2
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * sigma_xy + _SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + _SSIM_C1) * (sigma_x + sigma_y + _SSIM_C2))
    return ((1.0 - ssim) / 2.0).clamp(0.0, 1.0)


def photometric_loss(left: torch.Tensor, right: torch.Tensor, disparity: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM + L1 error between the left image and the right one warped by `disparity`.

    left, right: (B, 3, H, W) in [0, 1]; disparity: (B, H, W) pixels; mask: (B, H, W) bool.
    Pixels whose match falls outside the right image do not count.
    """
    warped, inside = warp_right_to_left(right, disparity)
    left = left.float()
    error = (SSIM_WEIGHT * ssim_error(warped, left) + (1.0 - SSIM_WEIGHT) * (warped - left).abs()).mean(1)
    mask = inside if mask is None else inside & mask
    return _masked_mean(error, mask)


def edge_aware_smoothness(disparity: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Mean |gradient| of the mean-normalised disparity, down-weighted across image edges
    (exp(-|image gradient|)). disparity: (B, H, W); image: (B, 3, H, W) in [0, 1]."""
    disparity = disparity.float()
    normalised = disparity / disparity.mean(dim=(1, 2), keepdim=True).abs().clamp_min(1e-3)
    grad_x = (normalised[:, :, 1:] - normalised[:, :, :-1]).abs()
    grad_y = (normalised[:, 1:, :] - normalised[:, :-1, :]).abs()
    image = image.float()
    edge_x = torch.exp(-(image[:, :, :, 1:] - image[:, :, :, :-1]).abs().mean(1))
    edge_y = torch.exp(-(image[:, :, 1:, :] - image[:, :, :-1, :]).abs().mean(1))
    return (grad_x * edge_x).mean() + (grad_y * edge_y).mean()
