"""Shared vocabulary of the stereo networks: convolutions, backbone, cost volumes,
3D aggregation, regression, upsampling, and the common forward frame.

Shape letters: B batch, C channels, G correlation groups, D disparity levels at cost
resolution, H x W image size, h x w cost-volume size (padded H / cost_stride).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .confidence import ConfidenceCalibration, distribution_statistics, image_cues

FEATURE_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The 3D hourglass halves D, h and w twice, so they must be multiples of this.
HOURGLASS_DIVISOR = 4


def conv2d_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding for odd kernels) + BatchNorm2d [+ ReLU]."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv_layout(volume: Tensor) -> Tensor:
    """Swap the disparity and width axes: (B, C, D, h, w) <-> (B, C, w, h, D), a view.

    The 3D convolutions of every network run on the (w, h, D)-ordered volume, on every device
    (the weights are trained that way). Their kernels, strides and paddings are the same along
    all three axes, so this is only a memory order; it matters on the CPU, where PyTorch picks
    its oneDNN kernel (5x faster here) only when B x C x the first two spatial sizes exceeds
    20480, which (C, D, h)-sized volumes of the students miss and (C, w, h) ones meet.
    """
    return volume.transpose(2, 4)


def conv3d_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv3d (no bias, 'same' padding) + BatchNorm3d [+ ReLU]."""
    layers: list[nn.Module] = [
        nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
        nn.BatchNorm3d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (fan_out, ReLU), BatchNorm to weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    """ResNet basic block (two 3x3 convs); a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv2d_bn_relu(in_channels, out_channels, stride=stride, dilation=dilation)
        self.conv2 = conv2d_bn_relu(out_channels, out_channels, dilation=dilation, relu=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv2d_bn_relu(in_channels, out_channels, 1, stride=stride, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class FeatureExtractor(nn.Module):
    """GwcNet/ACVNet-style backbone: a stem of three 3x3 convs (stride 2), then four residual
    stages. The correlation feature is layer2 + layer3 + layer4 concatenated; a small head
    projects it to the few channels of the concatenation volume.

    The stage strides are per network: (1, 2, 1, 1) gives features at 1/4, (2, 2, 1, 1) at 1/8.
    Layer4 is dilated (2) to widen the receptive field without further downsampling.
    """

    def __init__(
        self,
        stem_channels: int,
        layer_channels: tuple[int, int, int, int],
        layer_blocks: tuple[int, int, int, int],
        layer_strides: tuple[int, int, int, int],
        concat_channels: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            conv2d_bn_relu(3, stem_channels, stride=2),
            conv2d_bn_relu(stem_channels, stem_channels),
            conv2d_bn_relu(stem_channels, stem_channels),
        )
        dilations = (1, 1, 1, 2)
        layers = []
        in_channels = stem_channels
        for channels, blocks, stride, dilation in zip(
            layer_channels, layer_blocks, layer_strides, dilations, strict=True
        ):
            stage = [ResidualBlock(in_channels, channels, stride, dilation)]
            stage += [ResidualBlock(channels, channels, 1, dilation) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.correlation_channels = sum(layer_channels[1:])
        self.concat_head = nn.Sequential(
            conv2d_bn_relu(self.correlation_channels, 4 * concat_channels),
            nn.Conv2d(4 * concat_channels, concat_channels, 1, bias=False),
        )

    def forward(self, image: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(B, 3, H, W) normalised image -> (stage features, correlation feature
        (B, Cg, h, w), concat feature (B, Cc, h, w))."""
        stages = {"stem": self.stem(image)}
        x = stages["stem"]
        for name in FEATURE_STAGES[1:]:
            x = getattr(self, name)(x)
            stages[name] = x
        correlation = torch.cat([stages["layer2"], stages["layer3"], stages["layer4"]], dim=1)
        return stages, correlation, self.concat_head(correlation)


def shifted_right_features(right: Tensor, num_disparities: int) -> Tensor:
    """All disparity shifts of the right features: out[:, :, d, :, x] = right[:, :, :, x - d],
    zero where x - d < 0. (B, C, h, w) -> (B, C, D, h, w)."""
    width = right.shape[-1]
    padded = F.pad(right, (num_disparities - 1, 0))  # (B, C, h, w + D - 1)
    windows = padded.unfold(3, width, 1).permute(0, 1, 3, 2, 4)  # window k starts at shift D - 1 - k
    return windows.flip(2)


# Columns per tile of the correlation matmul; each tile meets TILE + D - 1 right columns.
CORRELATION_TILE = 16


def group_correlation_volume(left: Tensor, right: Tensor, num_disparities: int, groups: int) -> Tensor:
    """Group-wise correlation (GwcNet): mean over each group's channels of
    left(x) * right(x - d); zero where x - d falls outside the image.
    (B, C, h, w) x2 -> (B, G, D, h, w).

    One batched matmul instead of a (B, C, D, h, w) product: the row is cut into tiles of
    T columns, each tile's left features meet the T + D - 1 right columns it can match, and
    the band of D valid pairs is cut out of each T x (T + D - 1) score matrix by padding
    every row by one more element (a skew), so that row i's band starts at column 0.
    """
    batch, channels, height, width = left.shape
    if channels % groups:
        raise ValueError(f"{channels} feature channels do not split into {groups} groups")
    group_channels = channels // groups
    levels, tile = num_disparities, CORRELATION_TILE
    num_tiles = -(-width // tile)
    padded_width = num_tiles * tile
    left_tiles = F.pad(left, (0, padded_width - width))
    left_tiles = left_tiles.view(batch, groups, group_channels, height, num_tiles, tile)
    right_windows = F.pad(right, (levels - 1, padded_width - width)).unfold(3, tile + levels - 1, tile)
    right_windows = right_windows.view(batch, groups, group_channels, height, num_tiles, tile + levels - 1)
    scores = torch.matmul(
        left_tiles.permute(0, 1, 3, 4, 5, 2),  # (B, G, h, n, T, c)
        right_windows.permute(0, 1, 3, 4, 2, 5),  # (B, G, h, n, c, T + D - 1)
    )  # scores[..., i, j] = left(x) . right(x + j - i - (D - 1)) at x = tile start + i
    skewed = F.pad(scores.flatten(-2), (0, tile)).view(batch, groups, height, num_tiles, tile, tile + levels)
    band = skewed[..., :levels]  # band[..., i, k] = scores[..., i, i + k]: disparity D - 1 - k
    volume = band.flip(-1).permute(0, 1, 5, 2, 3, 4).reshape(batch, groups, levels, height, padded_width)
    return volume[..., :width] / group_channels


def concat_volume(left: Tensor, right: Tensor, num_disparities: int) -> Tensor:
    """Concatenation volume: [left(x), right(x - d)], both zero where x - d < 0.
    (B, C, h, w) x2 -> (B, 2C, D, h, w)."""
    width = left.shape[-1]
    levels = torch.arange(num_disparities, device=left.device).view(-1, 1)
    columns = torch.arange(width, device=left.device).view(1, -1)
    in_range = (columns >= levels).to(left.dtype).view(1, 1, num_disparities, 1, width)
    return torch.cat([left.unsqueeze(2) * in_range, shifted_right_features(right, num_disparities)], dim=1)


class Hourglass3d(nn.Module):
    """3D encoder-decoder (GwcNet): two stride-2 stages down, two transposed convs up,
    with 1x1x1 skip connections. (B, C, D, h, w) -> same; D, h, w multiples of 4."""

    def __init__(self, channels: int):
        super().__init__()
        self.down1 = nn.Sequential(
            conv3d_bn_relu(channels, 2 * channels, stride=2),
            conv3d_bn_relu(2 * channels, 2 * channels),
        )
        self.down2 = nn.Sequential(
            conv3d_bn_relu(2 * channels, 4 * channels, stride=2),
            conv3d_bn_relu(4 * channels, 4 * channels),
        )
        self.up2 = self._upsample(4 * channels, 2 * channels)
        self.up1 = self._upsample(2 * channels, channels)
        self.skip2 = conv3d_bn_relu(2 * channels, 2 * channels, kernel_size=1, relu=False)
        self.skip1 = conv3d_bn_relu(channels, channels, kernel_size=1, relu=False)

    @staticmethod
    def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        half = self.down1(x)  # (B, 2C, D/2, h/2, w/2)
        quarter = self.down2(half)  # (B, 4C, D/4, h/4, w/4)
        half = F.relu(self.up2(quarter) + self.skip2(half))
        return F.relu(self.up1(half) + self.skip1(x))


def cost_head(channels: int) -> nn.Conv3d:
    """3D features -> one logit per disparity level: (B, C, D, h, w) -> (B, 1, D, h, w).
    A single linear conv: the head is run at cost resolution for every output."""
    return nn.Conv3d(channels, 1, 3, padding=1, bias=False)


class AttentionFilteredVolume(nn.Module):
    """ACVNet's attention concatenation volume: a small hourglass turns the group-wise
    correlation volume into attention weights (softmax over disparity) that filter the
    concatenation volume."""

    def __init__(self, groups: int, attention_channels: int, num_disparities: int):
        super().__init__()
        self.groups = groups
        self.num_disparities = num_disparities
        self.attention = nn.Sequential(
            # Pointwise entry: the hourglass gives the spatial context, and a 3x3x3 conv over
            # all groups at full cost resolution would cost more than the hourglass itself.
            conv3d_bn_relu(groups, attention_channels, kernel_size=1),
            Hourglass3d(attention_channels),
            cost_head(attention_channels),
        )

    def forward(
        self, correlation: tuple[Tensor, Tensor], concat: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (filtered concat volume (B, 2Cc, D, h, w), group-wise volume (B, G, D, h, w),
        attention weights (B, 1, D, h, w))."""
        gwc = group_correlation_volume(*correlation, self.num_disparities, self.groups)
        weights = torch.softmax(conv_layout(self.attention(conv_layout(gwc))), dim=2)
        return weights * concat_volume(*concat, self.num_disparities), gwc, weights


class CostAggregation(nn.Module):
    """Stacked-hourglass 3D aggregation (GwcNet/ACVNet): an entry conv, a residual conv pair, then
    `num_hourglasses` hourglasses; one cost head after the conv pair and one per hourglass.
    (B, Cin, D, h, w) -> list of (B, D, h, w) logits, coarse to fine."""

    def __init__(self, in_channels: int, channels: int, num_hourglasses: int):
        super().__init__()
        self.entry = conv3d_bn_relu(in_channels, channels)
        self.refine = nn.Sequential(conv3d_bn_relu(channels, channels), conv3d_bn_relu(channels, channels, relu=False))
        self.hourglasses = nn.ModuleList(Hourglass3d(channels) for _ in range(num_hourglasses))
        self.heads = nn.ModuleList(cost_head(channels) for _ in range(num_hourglasses + 1))

    def forward(self, volume: Tensor, all_outputs: bool) -> list[Tensor]:
        """All heads when `all_outputs`, else only the final one (a 1-element list)."""
        x = self.entry(conv_layout(volume))  # (B, C, w, h, D)
        x = self.refine(x) + x
        stages = [x]
        for hourglass in self.hourglasses:
            x = hourglass(x)
            stages.append(x)
        if not all_outputs:
            return [conv_layout(self.heads[-1](stages[-1])).squeeze(1)]
        return [conv_layout(head(stage)).squeeze(1) for head, stage in zip(self.heads, stages, strict=True)]


def soft_argmin(logits: Tensor) -> Tensor:
    """Expected disparity level under softmax(logits) over dim 1 (GC-Net's soft argmin,
    written for logits where higher means more likely). (B, D, h, w) -> (B, h, w) in levels.
    Computed in float32 whatever the input: half precision has 1-pixel steps above 128."""
    probability = torch.softmax(logits.float(), dim=1)
    levels = torch.arange(logits.shape[1], device=logits.device, dtype=probability.dtype)
    return (probability * levels.view(1, -1, 1, 1)).sum(1)


def full_resolution_regression(logits: Tensor, max_disparity: int, size: tuple[int, int]) -> Tensor:
    """ACVNet/GwcNet regression: upsample the cost to (max_disparity, H, W), softmax over
    disparity, soft argmin. (B, D, h, w) -> (B, H, W) in pixels.

    Spatial axes are bilinear (align_corners=False). The disparity axis is linear with its origin
    aligned: full-resolution level j reads cost level j * D / max_disparity, so cost level i means
    i * max_disparity / D pixels, the same convention as the students' regression at cost
    resolution (a plain trilinear upsampling would put level i at 4 i + 1.5 px and make the
    teacher's and students' cost volumes disagree by 3/8 of a level under distillation)."""
    levels = logits.shape[1]
    cost = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)  # (B, D, H, W)
    position = torch.arange(max_disparity, device=logits.device, dtype=torch.float32) * (levels / max_disparity)
    lower = position.floor().long().clamp(max=levels - 1)
    upper = (lower + 1).clamp(max=levels - 1)
    weight = (position - lower.float()).view(1, -1, 1, 1)
    fine = cost[:, lower] * (1.0 - weight) + cost[:, upper] * weight  # (B, max_disparity, H, W)
    return soft_argmin(fine)


def convex_upsample(field: Tensor, mask_logits: Tensor, factor: int) -> Tensor:
    """RAFT's convex upsampling: each fine pixel is a convex combination of the 3x3 coarse
    neighbourhood of its coarse pixel, weights = softmax of the mask. Values are multiplied by
    `factor`, so a disparity in coarse pixels becomes one in fine pixels. Borders replicate.
    (B, C, h, w), (B, 9 * factor**2, h, w) -> (B, C, h * factor, w * factor), float32."""
    batch, channels, height, width = field.shape
    weights = mask_logits.float().view(batch, 1, 9, factor, factor, height, width).softmax(dim=2)
    neighbourhoods = F.unfold(F.pad(factor * field.float(), (1, 1, 1, 1), mode="replicate"), 3)
    neighbourhoods = neighbourhoods.view(batch, channels, 9, 1, 1, height, width)
    fine = (weights * neighbourhoods).sum(2)  # (B, C, f, f, h, w)
    return fine.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels, factor * height, factor * width)


class ConvexUpsampler(nn.Module):
    """Learned convex upsampling of a coarse disparity, the mask predicted from the left
    correlation features. (B, h, w) levels -> (B, h*f, w*f) pixels."""

    # RAFT scales the mask logits down; it keeps the initial weights near uniform.
    MASK_SCALE = 0.25

    def __init__(self, feature_channels: int, hidden_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.mask = nn.Sequential(
            conv2d_bn_relu(feature_channels, hidden_channels),
            nn.Conv2d(hidden_channels, 9 * factor * factor, 1),
        )

    def mask_logits(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, 9 f^2, h, w)."""
        return self.MASK_SCALE * self.mask(features)

    def forward(self, coarse_disparity: Tensor, mask_logits: Tensor) -> Tensor:
        return convex_upsample(coarse_disparity.unsqueeze(1), mask_logits, self.factor).squeeze(1)


def pad_to_multiple(image: Tensor, multiple: int) -> Tensor:
    """Replicate-pad bottom and right so H and W become multiples of `multiple`."""
    height, width = image.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image
    return F.pad(image, (0, pad_right, 0, pad_bottom), mode="replicate")


class StereoNetwork(nn.Module):
    """Common frame of the networks: normalise, pad, shared-weight backbone on both views,
    attention-filtered volume, stacked-hourglass aggregation, regression, crop.

    Subclasses set `arch`, `COST_STRIDE`, `LAYER_STRIDES`, `NUM_HOURGLASSES` and define
    `full_resolution_disparity`. Training mode returns the dict of named tensors used for
    distillation; eval mode returns (disparity, confidence), each (B, H, W).
    """

    arch: str
    COST_STRIDE: int
    LAYER_STRIDES: tuple[int, int, int, int]
    NUM_HOURGLASSES: int
    feature_stages = FEATURE_STAGES
    # Set by checkpoint.load_model from the checkpoint's calibration table, when there is one.
    confidence_calibration: ConfidenceCalibration | None = None

    def __init__(
        self,
        max_disparity: int,
        stem_channels: int,
        layer_channels: Sequence[int],
        layer_blocks: Sequence[int],
        groups: int,
        concat_channels: int,
        attention_channels: int,
        aggregation_channels: int,
    ):
        super().__init__()
        disparity_multiple = HOURGLASS_DIVISOR * self.COST_STRIDE
        if max_disparity <= 0 or max_disparity % disparity_multiple:
            raise ValueError(
                f"{self.arch}: max_disparity must be a positive multiple of {disparity_multiple} "
                f"(4 x cost stride {self.COST_STRIDE}), got {max_disparity}"
            )
        self.max_disparity = max_disparity
        self.cost_stride = self.COST_STRIDE
        self.num_disparities = max_disparity // self.cost_stride
        self.stride = disparity_multiple
        self.num_costs = self.NUM_HOURGLASSES + 1  # aggregated cost volumes (cost.0 .. cost.K-1)
        self.num_outputs = self.num_costs  # full-resolution disparities (disp.0 ..); + 1 with a refinement
        self.config = {
            "arch": self.arch,
            "max_disparity": max_disparity,
            "stem_channels": stem_channels,
            "layer_channels": list(layer_channels),
            "layer_blocks": list(layer_blocks),
            "groups": groups,
            "concat_channels": concat_channels,
            "attention_channels": attention_channels,
            "aggregation_channels": aggregation_channels,
        }
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.features = FeatureExtractor(
            stem_channels, tuple(layer_channels), tuple(layer_blocks), self.LAYER_STRIDES, concat_channels
        )
        self.volume = AttentionFilteredVolume(groups, attention_channels, self.num_disparities)
        self.aggregation = CostAggregation(2 * concat_channels, aggregation_channels, self.NUM_HOURGLASSES)

    def upsample_mask(self, left_correlation: Tensor) -> Tensor | None:
        """What the upsampling of every output shares, computed once per forward from the left
        correlation features (B, Cg, h, w): the students' convex mask; None for the teacher."""
        return None

    def full_resolution_disparity(self, logits: Tensor, levels: Tensor, mask: Tensor | None) -> Tensor:
        """Cost logits (B, D, h, w), their expected level (B, h, w) and `upsample_mask`'s result
        -> disparity in pixels at padded size (B, h * cost_stride, w * cost_stride)."""
        raise NotImplementedError

    def refine(self, disparity: Tensor, stages: dict[str, Tensor]) -> Tensor | None:
        """The final disparity (B, Hp, Wp) refined with the image (`stages`: both views' backbone
        features, left then right along the batch), or None for networks without a refinement."""
        return None

    def upsample_cues(self, cues: Tensor, mask: Tensor | None) -> Tensor:
        """Cost-resolution cues (B, C, h, w) -> (B, C, H, W) as the disparity is upsampled; here bilinear."""
        return F.interpolate(cues, scale_factor=self.cost_stride, mode="bilinear")

    def confidence(self, cues: dict[str, Tensor]) -> Tensor:
        """Cues -> confidence (B, H, W) in [0, 1]: the calibration's P(|error| <= 2 px) when the
        network has one (`confidence_calibration`), else the full-resolution peak probability."""
        if self.confidence_calibration is None:
            return cues["peak"]
        return self.confidence_calibration(cues)

    def infer_core(self, left: Tensor, right: Tensor) -> tuple[Tensor, ...]:
        """The weighted part of the eval forward, from left, right (B, 3, H, W) RGB in [0, 1]:
        (disparity, unrefined disparity) (B, Hp, Wp) px, the last cost logits (B, D, h, w), their
        expected levels (B, h, w), the upsampling mask (or an empty tensor) and the normalised,
        padded views (2B, 3, Hp, Wp). `cues_from_core` turns them into the confidence cues; the
        two are separate graphs for torch.compile (freezing folds weights in the first; the
        second has none, and inductor's freezing fails on the two together)."""
        batch = left.shape[0]
        images = pad_to_multiple((torch.cat([left, right], dim=0) - self.mean) / self.std, self.stride)
        stages, correlation, concat = self.features(images)
        volume, _, _ = self.volume((correlation[:batch], correlation[batch:]), (concat[:batch], concat[batch:]))
        logits = self.aggregation(volume, all_outputs=False)[-1]  # (B, D, h, w)
        mask = self.upsample_mask(correlation[:batch])
        levels = soft_argmin(logits)
        unrefined = self.full_resolution_disparity(logits, levels, mask)  # (B, Hp, Wp)
        refined = self.refine(unrefined, stages)
        disparity = unrefined if refined is None else refined
        return disparity, unrefined, logits, levels, logits.new_zeros(0) if mask is None else mask, images

    def cues_from_core(self, core: tuple[Tensor, ...], height: int, width: int) -> tuple[Tensor, dict[str, Tensor]]:
        """`infer_core`'s outputs -> the disparity (B, H, W) px cropped to the input size and the
        uncalibrated confidence cues (B, H, W) each (stereo_kd_core.models.confidence)."""
        disparity, unrefined, logits, levels, mask, images = core
        batch = disparity.shape[0]
        peak, spread = distribution_statistics(logits, levels)
        coarse_edge = F.max_pool2d(levels.unsqueeze(1), 3, 1, 1) + F.max_pool2d(-levels.unsqueeze(1), 3, 1, 1)
        in_pixels = levels.new_tensor([1.0, self.cost_stride, self.cost_stride]).view(1, 3, 1, 1)
        upsampled = self.upsample_cues(torch.stack([peak, spread, coarse_edge[:, 0]], dim=1) * in_pixels,
                                       mask if mask.numel() else None)
        cues = {"peak": upsampled[:, 0].clamp(0.0, 1.0), "spread": upsampled[:, 1], "coarse_edge": upsampled[:, 2],
                "refinement": (disparity - unrefined).abs().float(), "disparity": disparity.float(),
                **image_cues(disparity, images[:batch], images[batch:])}
        return disparity[:, :height, :width].float(), {k: v[:, :height, :width].float() for k, v in cues.items()}

    def confidence_head(self, core: tuple[Tensor, ...], height: int, width: int) -> tuple[Tensor, Tensor]:
        """`infer_core`'s outputs -> (disparity, confidence), each (B, H, W): the eval output."""
        disparity, cues = self.cues_from_core(core, height, width)
        return disparity, self.confidence(cues)

    def infer_with_cues(self, left: Tensor, right: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Eval-mode disparity (B, H, W) px and the uncalibrated confidence cues (B, H, W) each
        (stereo_kd_core.models.confidence), from left, right (B, 3, H, W) RGB in [0, 1]."""
        return self.cues_from_core(self.infer_core(left, right), *left.shape[-2:])

    def forward(self, left: Tensor, right: Tensor) -> dict[str, Tensor] | tuple[Tensor, Tensor]:
        """left, right: (B, 3, H, W) RGB in [0, 1]."""
        if not self.training:
            return self.confidence_head(self.infer_core(left, right), *left.shape[-2:])
        batch, _, height, width = left.shape
        images = torch.cat([left, right], dim=0)
        images = pad_to_multiple((images - self.mean) / self.std, self.stride)
        stages, correlation, concat = self.features(images)  # (2B, Cg, h, w), (2B, Cc, h, w)
        correlation_pair = correlation[:batch], correlation[batch:]
        volume, gwc, attention = self.volume(correlation_pair, (concat[:batch], concat[batch:]))
        logits = self.aggregation(volume, all_outputs=True)  # K x (B, D, h, w)
        mask = self.upsample_mask(correlation_pair[0])

        outputs: dict[str, Tensor] = {}
        for name in self.feature_stages:
            outputs[f"feat.{name}.left"] = stages[name][:batch]
            outputs[f"feat.{name}.right"] = stages[name][batch:]
        outputs["feat.gwc.left"], outputs["feat.gwc.right"] = correlation_pair
        outputs["volume.gwc"] = gwc  # (B, G, D, h, w)
        outputs["volume.attention"] = attention  # (B, 1, D, h, w)
        for index, cost in enumerate(logits):
            outputs[f"cost.{index}"] = cost  # (B, D, h, w), padded size
            disparity = self.full_resolution_disparity(cost, soft_argmin(cost), mask)
            outputs[f"disp.{index}"] = disparity[:, :height, :width]  # (B, H, W)
        refined = self.refine(disparity, stages)
        if refined is not None:
            outputs[f"disp.{len(logits)}"] = refined[:, :height, :width]
        outputs["disp"] = outputs[f"disp.{self.num_outputs - 1}"]
        return outputs


class DisparityRefinement(nn.Module):
    """Image-guided residual refinement of the full-resolution disparity (StereoNet's idea), at
    half resolution from the stem features: input the left stem features, their difference to
    the right ones warped by the disparity (where the match fails) and the disparity; dilated
    residual blocks; a sub-pixel (pixel-shuffle x2) residual in pixels, so edges can move at
    full-resolution granularity. The last layer starts at zero: a network gains the module as an
    identity and keeps its outputs until training changes them."""

    DILATIONS = (1, 2, 4)
    DISPARITY_SCALE = 1.0 / 16.0  # input scaling of the disparity (pixels at half resolution)

    def __init__(self, feature_channels: int, channels: int):
        super().__init__()
        self.head = conv2d_bn_relu(2 * feature_channels + 1, channels)
        self.blocks = nn.Sequential(*[ResidualBlock(channels, channels, dilation=d) for d in self.DILATIONS])
        self.residual = nn.Conv2d(channels, 4, 3, padding=1)  # 2 x 2 sub-pixels per half-resolution pixel
        self.start_as_identity()

    def start_as_identity(self) -> None:
        """Zero the last layer (call again after a whole-network weight init)."""
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def forward(self, disparity: Tensor, left_features: Tensor, right_features: Tensor) -> Tensor:
        """disparity (B, H, W) pixels; features (B, C, H/2, W/2) -> refined (B, H, W) pixels."""
        half = F.avg_pool2d(disparity.unsqueeze(1).float(), 2) * 0.5  # (B, 1, H/2, W/2) half-res pixels
        height, width = half.shape[-2:]
        xs = torch.arange(width, device=half.device, dtype=half.dtype).view(1, 1, width) - half[:, 0]
        ys = torch.arange(height, device=half.device, dtype=half.dtype).view(1, height, 1).expand_as(xs)
        grid = torch.stack([xs * (2.0 / max(width - 1, 1)) - 1.0, ys * (2.0 / max(height - 1, 1)) - 1.0], dim=-1)
        warped = F.grid_sample(right_features.float(), grid, mode="bilinear", padding_mode="border",
                               align_corners=True).to(left_features.dtype)
        x = torch.cat([left_features, left_features - warped, (half * self.DISPARITY_SCALE).to(left_features.dtype)],
                      dim=1)
        residual = F.pixel_shuffle(self.residual(self.blocks(self.head(x))), 2)  # (B, 1, H, W)
        return disparity + residual[:, 0].float()


class ConvexUpsamplingStereoNetwork(StereoNetwork):
    """Student frame (`dsnet`, `dsnet-fast`): soft argmin at cost resolution, then learned
    convex upsampling of the disparity by the cost stride, the mask predicted from the left
    correlation features with `mask_channels` hidden channels; with `refine_channels` > 0 an
    image-guided refinement (DisparityRefinement) of the final disparity, one more output."""

    def __init__(self, *, mask_channels: int, refine_channels: int = 0, **network_args):
        super().__init__(**network_args)
        self.config["mask_channels"] = mask_channels
        self.config["refine_channels"] = refine_channels
        self.upsampler = ConvexUpsampler(self.features.correlation_channels, mask_channels, factor=self.cost_stride)
        self.refinement: DisparityRefinement | None = None
        if refine_channels:  # the stem is at half resolution in every network
            self.refinement = DisparityRefinement(self.config["stem_channels"], refine_channels)
            self.num_outputs = self.num_costs + 1

    def refine(self, disparity: Tensor, stages: dict[str, Tensor]) -> Tensor | None:
        if self.refinement is None:
            return None
        batch = disparity.shape[0]
        stem = stages["stem"]
        return self.refinement(disparity, stem[:batch], stem[batch:])

    def upsample_mask(self, left_correlation: Tensor) -> Tensor:
        return self.upsampler.mask_logits(left_correlation)  # (B, 9 * stride^2, h, w)

    def full_resolution_disparity(self, logits: Tensor, levels: Tensor, mask: Tensor | None) -> Tensor:
        return self.upsampler(levels, mask)

    def upsample_cues(self, cues: Tensor, mask: Tensor | None) -> Tensor:
        """With the disparity's own convex weights (values unscaled)."""
        return convex_upsample(cues / self.cost_stride, mask, self.cost_stride)
