"""The common forward frame of the stereo networks (`StereoNetwork`: normalise, pad, backbone,
volume, aggregation, regression, eval-mode confidence cues) and the students' frame with convex
upsampling and the image-guided refinement.

Shape letters as in blocks.py: B batch, C channels, D disparity levels at cost resolution,
H x W image size, h x w cost-volume size (padded H / cost_stride).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    FEATURE_STAGES,
    HOURGLASS_DIVISOR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttentionFilteredVolume,
    ConvexUpsampler,
    CostAggregation,
    FeatureExtractor,
    ResidualBlock,
    cat_channels,
    conv2d_bn_relu,
    convex_combine,
    pad_to_multiple,
    shift_rows,
    soft_argmin,
)
from .confidence import ConfidenceCalibration, distribution_statistics, image_cues
from .photometric import normalised_as_seen, sees_as_captured


def extrapolate_left_border(disparity: Tensor) -> Tensor:
    """Disparity (..., H, W) px with the left border band of each row, the pixels left of the row's
    first pixel whose match lies inside the right image (x - d(x) >= 0), given that pixel's
    disparity. Nothing in the right image can be matched there: a network's guess for it is worse
    than continuing the nearest matched surface (realval, three networks: 2 % lower EPE, every
    dataset better). A row with no such pixel stays as it is."""
    columns = torch.arange(disparity.shape[-1], device=disparity.device, dtype=disparity.dtype)
    matched = (columns - disparity >= 0).to(disparity.dtype)
    first = matched.argmax(dim=-1, keepdim=True)  # the first matched column; 0 in a row with none
    return torch.where(columns < first.to(disparity.dtype), disparity.gather(-1, first), disparity)


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
    # How the eval forward sees a pair's colour and exposure (models.photometric: set by the loaders
    # from a shipped entry's or a checkpoint's `saturation` and `match_exposure`); training sees it as given.
    input_saturation: float = 1.0
    match_exposure: bool = False
    # Whether the eval forward extrapolates the disparity of the pixels whose match falls left of
    # the right image (`extrapolate_left_border`); the raw output with False.
    extrapolate_border: bool = True

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

    def normalise(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] -> (images - mean) / std, as one multiply-add (half the time of the two)."""
        return torch.addcmul(-self.mean / self.std, images, 1.0 / self.std)

    def upsample_mask(self, left_correlation: Tensor) -> Tensor | None:
        """What the upsampling of every output shares, computed once per forward from the left
        correlation features (B, Cg, h, w): the students' convex weights (B, h, w, 9, stride^2); None
        for the teacher."""
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
        expected levels (B, h, w), `upsample_mask`'s convex weights (or an empty tensor) and the normalised,
        padded views (2B, 3, Hp, Wp). `cues_from_core` turns them into the confidence cues; the
        two are separate graphs for torch.compile (freezing folds weights in the first; the
        second has none, and inductor's freezing fails on the two together)."""
        batch = left.shape[0]
        images, stages, correlation, logits = self._last_costs(left, right)
        mask = self.upsample_mask(correlation[:batch])
        levels = soft_argmin(logits)
        unrefined = self.full_resolution_disparity(logits, levels, mask)  # (B, Hp, Wp)
        refined = self.refine(unrefined, stages)
        disparity = unrefined if refined is None else refined
        return disparity, unrefined, logits, levels, logits.new_zeros(0) if mask is None else mask, images

    def _last_costs(self, left: Tensor, right: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """The eval forward up to the last cost logits: (normalised padded views (2B, 3, Hp, Wp) as the
        network sees them (models.photometric), both views' backbone stages, correlation features
        (2B, Cg, h, w), logits (B, D, h, w))."""
        batch = left.shape[0]
        if self.training or sees_as_captured(self):
            images = self.normalise(torch.cat([left, right], dim=0))
        else:
            images = normalised_as_seen(self, left, right, self.mean, self.std)
        images = pad_to_multiple(images, self.stride)
        stages, correlation, concat = self.features(images)
        volume, _, _ = self.volume((correlation[:batch], correlation[batch:]), (concat[:batch], concat[batch:]))
        return images, stages, correlation, self.aggregation(volume, all_outputs=False)[-1]

    def coarse_disparity(self, left: Tensor, right: Tensor) -> Tensor:
        """The expected disparity at cost resolution, in input pixels, (B, Hp / stride, Wp / stride),
        float32: no upsampling, refinement or confidence. A cheap look at how near a scene is (the
        range probe of a scaled model: about half the time of the whole forward at 96x160)."""
        return soft_argmin(self._last_costs(left, right)[3]) * self.cost_stride

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
        output = disparity[:, :height, :width].float()
        if self.extrapolate_border:  # the cues stay those of the raw output: the calibration was fitted on them
            output = extrapolate_left_border(output)
        return output, {k: v[:, :height, :width].float() for k, v in cues.items()}

    def confidence_head(self, core: tuple[Tensor, ...], height: int, width: int) -> tuple[Tensor, Tensor]:
        """`infer_core`'s outputs -> (disparity, confidence), each (B, H, W): the eval output."""
        disparity, cues = self.cues_from_core(core, height, width)
        return disparity, self.confidence(cues)

    def infer_with_costs(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The eval output (disparity, confidence), each (B, H, W), and the last cost logits
        (B, D, h, w) of the same pass, their grid from the input's top-left corner (the padding
        at the bottom and right): a teacher's label and cost distribution in one pass."""
        core = self.infer_core(left, right)
        disparity, confidence = self.confidence_head(core, *left.shape[-2:])
        return disparity, confidence, core[2]

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
        images = pad_to_multiple(self.normalise(images), self.stride)
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
        warped = shift_rows(right_features, half[:, 0]).to(left_features.dtype)
        x = cat_channels([left_features, left_features - warped, (half * self.DISPARITY_SCALE).to(left_features.dtype)],
                         left_features)  # in the features' layout, as the difference
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
        return self.upsampler.weights(left_correlation)  # (B, h, w, 9, stride^2): the convex weights

    def full_resolution_disparity(self, logits: Tensor, levels: Tensor, mask: Tensor | None) -> Tensor:
        return self.upsampler(levels, mask)

    def upsample_cues(self, cues: Tensor, mask: Tensor | None) -> Tensor:
        """With the disparity's own convex weights (values unscaled)."""
        return convex_combine(cues / self.cost_stride, mask, self.cost_stride)
