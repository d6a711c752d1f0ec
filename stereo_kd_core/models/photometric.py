"""How a network's eval forward sees a pair's colour and exposure: settings of a shipped model or
checkpoint (manifest entry / checkpoint `extra` keys), applied to the RGB views before they are
normalised, in the eval forward only (training sees the pairs as given).

* `saturation` (number in [0, 1], default 1): how much of the colour the network sees; each view
  is moved toward its grey (ITU-R BT.601 luma in all three channels) by 1 - saturation.
* `match_exposure` (bool, default false): the right view's brightness and contrast matched to the
  left view's, per channel (mean and standard deviation), for cameras whose exposure, gain, tone
  curve or white balance differ.

Measured on real pairs (benchmarks/saturation_study.py): two cameras' colour differs more than
the generated training pairs taught the network to expect, and their exposure may differ too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ITU-R BT.601 luma of RGB, as OpenCV's RGB2GRAY: what `desaturate` keeps of the colour at saturation 0
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
DEFAULTS = {"saturation": 1.0, "match_exposure": False}
# the network attribute each setting lives in
ATTRIBUTES = {"saturation": "input_saturation", "match_exposure": "match_exposure"}


def check_saturation(value) -> float:
    """`saturation`: a number in [0, 1]; anything else is a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"saturation must be a number in [0, 1] (1: the colour as captured, 0: grey), "
                         f"got {value!r}")
    return float(value)


def check_match_exposure(value) -> bool:
    """`match_exposure`: true or false; anything else is a ValueError naming it."""
    if not isinstance(value, bool):
        raise ValueError(f"match_exposure must be true or false, got {value!r}")
    return value


CHECKS = {"saturation": check_saturation, "match_exposure": check_match_exposure}


def set_photometric(network: nn.Module, entry: Mapping, where: str) -> nn.Module:
    """Give `network` the photometric settings `entry` (a manifest entry, a checkpoint's extra) has,
    checked; a malformed one is a ValueError that starts with `where`. Returns the network."""
    for key, check in CHECKS.items():
        if key in entry:
            try:
                setattr(network, ATTRIBUTES[key], check(entry[key]))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
    return network


def photometric_settings(network: nn.Module) -> dict:
    """The settings `network` runs with that differ from the defaults, as an entry's keys (what a
    checkpoint written from it must carry to run the same)."""
    settings = {key: getattr(network, ATTRIBUTES[key], default) for key, default in DEFAULTS.items()}
    return {key: value for key, value in settings.items() if value != DEFAULTS[key]}


def colour_matrix(saturation: float) -> Tensor:
    """The 3 x 3 matrix M of `desaturate` (out = M @ rgb): saturation * I + (1 - saturation) * luma rows."""
    luma = torch.tensor(LUMA_WEIGHTS).view(1, 3).expand(3, 3)
    return saturation * torch.eye(3) + (1.0 - saturation) * luma


def desaturate(images: Tensor, saturation: float) -> Tensor:
    """RGB images (B, 3, H, W) moved toward their grey (LUMA_WEIGHTS, in all three channels) by
    1 - `saturation`: 1 leaves them as they are, 0 makes them grey. Brightness is kept."""
    if saturation == 1.0:
        return images
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    grey = (images * weights).sum(dim=1, keepdim=True)
    return torch.lerp(grey.expand_as(images), images, saturation)


# exposure statistics are taken on every STATS_STRIDE-th row and column (a 480x800 view: 24000 pixels)
STATS_STRIDE = 4


def channel_statistics(images: Tensor, stride: int = STATS_STRIDE) -> tuple[Tensor, Tensor]:
    """Per image and channel mean and standard deviation of (B, C, H, W) over every `stride`-th row
    and column, (B, C) each."""
    sample = images[..., ::stride, ::stride].float()
    mean = sample.mean(dim=(2, 3))
    spread = ((sample * sample).mean(dim=(2, 3)) - mean * mean).clamp(min=0.0).sqrt()
    return mean, spread


def exposure_gain(right: Tensor, left: Tensor, stride: int = STATS_STRIDE) -> tuple[Tensor, Tensor]:
    """(gain, offset), (B, C) each: gain * right + offset has the left view's channel statistics
    (`channel_statistics`); a flat right channel (nothing to scale) is shifted only."""
    right_mean, right_spread = channel_statistics(right, stride)
    left_mean, left_spread = channel_statistics(left, stride)
    gain = torch.where(right_spread > 1e-3, left_spread / right_spread.clamp(min=1e-3), torch.ones_like(right_spread))
    return gain, left_mean - gain * right_mean


def match_exposure(right: Tensor, left: Tensor) -> Tensor:
    """`right` (B, C, H, W) with each channel's mean and spread made the left's (`exposure_gain`)."""
    gain, offset = exposure_gain(right, left)
    return right * gain[..., None, None] + offset[..., None, None]


def as_seen(network: nn.Module, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """The views (B, 3, H, W) RGB in [0, 1] as `network`'s eval forward sees them: `desaturate`, then
    with match_exposure the right view `match_exposure`d to the left (the definition that
    `normalised_as_seen` computes in one pass)."""
    saturation = getattr(network, ATTRIBUTES["saturation"], 1.0)
    left, right = desaturate(left, saturation), desaturate(right, saturation)
    if getattr(network, ATTRIBUTES["match_exposure"], False):
        right = match_exposure(right, left)
    return left, right


def sees_as_captured(network: nn.Module) -> bool:
    """Whether `network`'s eval forward sees pairs as given (the default settings)."""
    return not photometric_settings(network)


def _colour_affine(view: Tensor, weight: Tensor, shift: Tensor) -> Tensor:
    """weight (3, 3) @ each pixel's colour + shift (3,), float32, in the view's layout: a 1 x 1
    convolution on channels_last views (0.3 ms at 480x800 on the CPU), a channel contraction on
    others (where oneDNN's convolution took 17 ms)."""
    view = view.float()
    if view.is_contiguous(memory_format=torch.channels_last):
        return F.conv2d(view, weight[..., None, None], shift)
    return torch.einsum("dc,bchw->bdhw", weight, view) + shift.view(1, -1, 1, 1)


def normalised_as_seen(network: nn.Module, left: Tensor, right: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """((as_seen(network, left, right)) - mean) / std, left views then right views along the batch,
    (2B, 3, H, W) float32 whatever the autocast: the colour matrix, the exposure match and the
    normalisation are one affine map of each pixel's colour per view (`_colour_affine`: 1.6 ms for a
    480x800 pair where the three passes took 21 ms)."""
    matrix = colour_matrix(getattr(network, ATTRIBUTES["saturation"], 1.0)).to(left.device)
    scale, shift = 1.0 / std.flatten().float(), -(mean.flatten().float() / std.flatten().float())
    weight = scale[:, None] * matrix                                                    # (3, 3)
    with torch.autocast(left.device.type, enabled=False):
        views = [_colour_affine(left, weight, shift)]
        if not getattr(network, ATTRIBUTES["match_exposure"], False):
            views.append(_colour_affine(right, weight, shift))
        else:
            # exposure_gain of the desaturated views: the colour matrix applied to their stats grid only
            left_grid, right_grid = (
                torch.einsum("dc,bchw->bdhw", matrix, view[..., ::STATS_STRIDE, ::STATS_STRIDE].float())
                for view in (left, right))
            gain, offset = exposure_gain(right_grid, left_grid, stride=1)                # (B, 3) each
            for index in range(right.shape[0]):  # the gain differs per pair: one map per right view
                views.append(_colour_affine(right[index:index + 1], (scale * gain[index])[:, None] * matrix,
                                            shift + scale * offset[index]))
    return torch.cat(views, dim=0)
