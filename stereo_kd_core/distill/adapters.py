"""Adapters that bring student tensors into the teacher's channel space, and resampling that
brings teacher tensors to the student's resolution.

Channels are adapted on the student side (a learned 1x1 / 1x1x1 convolution, so the student is
not forced to have the teacher's width); resolutions are matched on the teacher side (no
gradient flows into the frozen teacher, and the student's own grid is what it is judged on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelAdapter(nn.Module):
    """1x1 conv2d (features) or 1x1x1 conv3d (volumes) from student to teacher channels.

    Identity when the channel counts already agree, so coinciding student and teacher outputs
    give exactly zero distillation loss.
    """

    def __init__(self, student_channels: int, teacher_channels: int, volumetric: bool) -> None:
        super().__init__()
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        if student_channels == teacher_channels:
            self.project: nn.Module = nn.Identity()
        elif volumetric:
            self.project = nn.Conv3d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.project = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        # (B, Cs, H, W) -> (B, Ct, H, W)   or   (B, Cs, D, H, W) -> (B, Ct, D, H, W)
        return self.project(student)


def resample_feature(teacher: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of a feature map to (H, W); returned unchanged when already there."""
    # (B, C, H_t, W_t) -> (B, C, H, W)
    if tuple(teacher.shape[-2:]) == tuple(size):
        return teacher
    return F.interpolate(teacher, size=size, mode="bilinear", align_corners=False)


def _grid_axis(source_size: int, target_size: int, origin_aligned: bool,
               device: torch.device) -> torch.Tensor:
    """Normalized (align_corners=True convention) source coordinates of each target index."""
    target = torch.arange(target_size, device=device, dtype=torch.float32)
    if origin_aligned:
        # disparity level j of the target means the same disparity as level j * ratio of the
        # source: level 0 is disparity 0 on every grid.
        source = target * (source_size / target_size)
    else:
        source = (target + 0.5) * (source_size / target_size) - 0.5  # pixel centres
    source = source.clamp(0, source_size - 1)
    if source_size == 1:
        return torch.zeros_like(source)
    return source * (2.0 / (source_size - 1)) - 1.0


def resample_volume(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a disparity volume to (D, H, W).

    The disparity axis is origin-aligned (level 0 is disparity 0 at every stride), the spatial
    axes are aligned at pixel centres. Accepts (B, C, D, H, W) or cost logits (B, D, H, W).
    """
    squeeze = volume.dim() == 4
    if squeeze:
        volume = volume.unsqueeze(1)
    # (B, C, D_t, H_t, W_t) -> (B, C, D, H, W)
    if tuple(volume.shape[-3:]) != tuple(size):
        d, h, w = size
        src_d, src_h, src_w = volume.shape[-3:]
        dev = volume.device
        gd = _grid_axis(src_d, d, True, dev)
        gh = _grid_axis(src_h, h, False, dev)
        gw = _grid_axis(src_w, w, False, dev)
        zz, yy, xx = torch.meshgrid(gd, gh, gw, indexing="ij")
        grid = torch.stack((xx, yy, zz), dim=-1).unsqueeze(0).expand(volume.shape[0], -1, -1, -1, -1)
        volume = F.grid_sample(volume, grid.to(volume.dtype), mode="bilinear",
                               padding_mode="border", align_corners=True)
    return volume.squeeze(1) if squeeze else volume
