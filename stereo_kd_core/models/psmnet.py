"""PSMNet (Chang & Chen, "Pyramid Stereo Matching Network", CVPR 2018), stacked-hourglass variant.

Written from the paper; submodule names follow the authors' release (JiaRenChang/PSMNet) so
that its pretrained checkpoints load strictly once the DataParallel prefix ``module.`` is
stripped. Inference follows the authors' test script: ImageNet normalisation, zero padding on
top and right to a multiple of 16, trilinear upsampling of the aggregated cost to full
resolution with ``align_corners=True`` (the setting the release notes prescribe for the
published weights), softmax over all disparities and soft-argmin.

PSMNet builds a concatenation volume, not a group-wise correlation one, so the features it
exposes for distillation are the backbone stages plus the final 32-channel SPP feature
(``feat.final.*``), from which that volume is built. The eval confidence is the one all
our networks report (``blocks.distribution_confidence`` on the cost-resolution logits).
The release needs inputs of at least 256 x 256 (its largest pooling window is 64 at 1/4);
here a window larger than the feature map pools the whole map, which changes nothing for
inputs the release accepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    FEATURE_STAGES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    concat_volume,
    conv2d_bn_relu,
    conv3d_bn_relu,
    init_weights,
    soft_argmin,
)
from .confidence import distribution_confidence

PAD_MULTIPLE = 16  # 1/4 backbone, then the hourglasses halve h and w twice
COST_STRIDE = 4
FEATURE_CHANNELS = 32
SPP_WINDOWS = (64, 32, 16, 8)  # pooling windows at 1/4 resolution, coarsest first


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv2d (no bias, size-keeping padding) + BatchNorm2d, nested as the release nests it."""
    return conv2d_bn_relu(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, relu=False)


def conv_bn_3d(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 Conv3d (no bias) + BatchNorm3d."""
    return conv3d_bn_relu(in_channels, out_channels, 3, stride=stride, relu=False)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-bn with a skip; PSMNet applies no activation after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(conv_bn(in_channels, out_channels, 3, stride, dilation), nn.ReLU(inplace=True))
        self.conv2 = conv_bn(out_channels, out_channels, 3, dilation=dilation)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x)) + skip


def residual_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int, dilation: int) -> nn.Sequential:
    blocks = [ResidualBlock(in_channels, out_channels, stride, dilation)]
    blocks += [ResidualBlock(out_channels, out_channels, 1, dilation) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class WindowAveragePool(nn.Module):
    """Average pooling over fixed square windows (stride = window), as the SPP branches do.

    A map narrower than the window in some dimension is pooled over its whole extent there,
    so small inputs work; for maps at least as large as the window this is plain AvgPool2d.
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (min(self.window, x.shape[-2]), min(self.window, x.shape[-1]))
        return F.avg_pool2d(x, kernel, stride=kernel)


class SPPFeatureExtractor(nn.Module):
    """Residual backbone to 1/4 resolution + spatial pyramid pooling, fused to 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.firstconv = nn.Sequential(
            conv_bn(3, 32, 3, stride=2),
            nn.ReLU(inplace=True),
            conv_bn(32, 32, 3),
            nn.ReLU(inplace=True),
            conv_bn(32, 32, 3),
            nn.ReLU(inplace=True),
        )
        self.layer1 = residual_stage(32, 32, 3, stride=1, dilation=1)
        self.layer2 = residual_stage(32, 64, 16, stride=2, dilation=1)
        self.layer3 = residual_stage(64, 128, 3, stride=1, dilation=1)
        self.layer4 = residual_stage(128, 128, 3, stride=1, dilation=2)
        for index, window in enumerate(SPP_WINDOWS, start=1):
            self.add_module(
                f"branch{index}", nn.Sequential(WindowAveragePool(window), conv_bn(128, 32, 1), nn.ReLU(inplace=True))
            )
        # layer2 (64) + layer4 (128) + four pyramid branches (4 x 32) = 320 channels
        self.lastconv = nn.Sequential(
            conv_bn(320, 128, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, FEATURE_CHANNELS, 1, bias=False),
        )

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised image -> stage features; ``final`` is (B, 32, H/4, W/4)."""
        stem = self.firstconv(image)  # (B, 32, H/2, W/2)
        layer1 = self.layer1(stem)  # (B, 32, H/2, W/2)
        layer2 = self.layer2(layer1)  # (B, 64, H/4, W/4)
        layer3 = self.layer3(layer2)  # (B, 128, H/4, W/4)
        layer4 = self.layer4(layer3)  # (B, 128, H/4, W/4)
        size = layer4.shape[-2:]
        # Concatenation order of the release: finest pyramid branch first.
        pyramid = [
            F.interpolate(getattr(self, f"branch{i}")(layer4), size=size, mode="bilinear", align_corners=True)
            for i in range(len(SPP_WINDOWS), 0, -1)
        ]
        final = self.lastconv(torch.cat([layer2, layer4, *pyramid], dim=1))
        return {"stem": stem, "layer1": layer1, "layer2": layer2, "layer3": layer3, "layer4": layer4, "final": final}


class Hourglass(nn.Module):
    """3D encoder-decoder (1/4 -> 1/16 -> 1/4) whose mid-level states feed the next hourglass."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = channels * 2
        self.conv1 = nn.Sequential(conv_bn_3d(channels, wide, stride=2), nn.ReLU(inplace=True))
        self.conv2 = conv_bn_3d(wide, wide)
        self.conv3 = nn.Sequential(conv_bn_3d(wide, wide, stride=2), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(conv_bn_3d(wide, wide), nn.ReLU(inplace=True))
        self.conv5 = nn.Sequential(
            nn.ConvTranspose3d(wide, wide, 3, stride=2, padding=1, output_padding=1, bias=False), nn.BatchNorm3d(wide)
        )
        self.conv6 = nn.Sequential(
            nn.ConvTranspose3d(wide, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm3d(channels),
        )

    def forward(
        self, x: torch.Tensor, skip_1_8: torch.Tensor | None, previous_up_1_8: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, D, h, w) -> (out (B, C, D, h, w), down (B, 2C, D/2, h/2, w/2), up (same as down)).

        ``previous_up_1_8`` is added before the first downsampling's activation, ``skip_1_8``
        to the upsampled 1/8 state (else this hourglass's own 1/8 state is used).
        """
        down = self.conv2(self.conv1(x))
        down = F.relu(down if previous_up_1_8 is None else down + previous_up_1_8)
        bottom = self.conv4(self.conv3(down))
        up = F.relu(self.conv5(bottom) + (down if skip_1_8 is None else skip_1_8))
        return self.conv6(up), down, up


class PSMNet(nn.Module):
    """SPP backbone to 1/4 (32-channel matching feature), concatenation volume over
    max_disparity/4 levels, three stacked hourglasses of 32 channels, three outputs; 5.22 M
    parameters. Loads the authors' checkpoints strictly (after stripping ``module.``)."""

    arch = "psmnet"
    stride = PAD_MULTIPLE
    cost_stride = COST_STRIDE
    num_outputs = 3
    num_costs = 3
    feature_stages = FEATURE_STAGES  # firstconv is "stem", layer1..layer4 keep their names

    def __init__(self, max_disparity: int = 192) -> None:
        super().__init__()
        if max_disparity % PAD_MULTIPLE:
            raise ValueError(f"max_disparity must be a multiple of {PAD_MULTIPLE}, got {max_disparity}")
        self.max_disparity = max_disparity
        self.config = {"arch": self.arch, "max_disparity": max_disparity}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.feature_extraction = SPPFeatureExtractor()
        self.dres0 = nn.Sequential(
            conv_bn_3d(2 * FEATURE_CHANNELS, 32), nn.ReLU(inplace=True), conv_bn_3d(32, 32), nn.ReLU(inplace=True)
        )
        self.dres1 = nn.Sequential(conv_bn_3d(32, 32), nn.ReLU(inplace=True), conv_bn_3d(32, 32))
        self.dres2 = Hourglass(32)
        self.dres3 = Hourglass(32)
        self.dres4 = Hourglass(32)
        self.classif1 = self._classifier()
        self.classif2 = self._classifier()
        self.classif3 = self._classifier()
        init_weights(self)

    @staticmethod
    def _classifier() -> nn.Sequential:
        return nn.Sequential(conv_bn_3d(32, 32), nn.ReLU(inplace=True), nn.Conv3d(32, 1, 3, padding=1, bias=False))

    def _full_resolution_cost(self, cost: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, D/4, h, w) -> (B, D, height, width), trilinear as in the release."""
        return F.interpolate(
            cost.unsqueeze(1), size=(self.max_disparity, height, width), mode="trilinear", align_corners=True
        ).squeeze(1)

    def _trunk(self, left: torch.Tensor, right: torch.Tensor):
        """Features of both views, the concatenation volume and the three cost logits
        (B, D/4, Hp/4, Wp/4), at the padded size (zero rows on top, zero columns on the right)."""
        height, width = left.shape[-2:]
        pad_top = -height % PAD_MULTIPLE
        pad_right = -width % PAD_MULTIPLE
        # Normalise first, then pad with zeros: the release pads the normalised tensor.
        left = F.pad((left - self.mean) / self.std, (0, pad_right, pad_top, 0))
        right = F.pad((right - self.mean) / self.std, (0, pad_right, pad_top, 0))

        left_features = self.feature_extraction(left)
        right_features = self.feature_extraction(right)
        volume = concat_volume(
            left_features["final"], right_features["final"], self.max_disparity // COST_STRIDE
        )  # (B, 64, D/4, Hp/4, Wp/4)

        cost0 = self.dres0(volume)
        cost0 = self.dres1(cost0) + cost0  # (B, 32, D/4, Hp/4, Wp/4)
        out1, down1, up1 = self.dres2(cost0, None, None)
        out1 = out1 + cost0
        out2, _, up2 = self.dres3(out1, down1, up1)
        out2 = out2 + cost0
        out3, _, _ = self.dres4(out2, down1, up2)
        out3 = out3 + cost0
        cost1 = self.classif1(out1).squeeze(1)  # (B, D/4, Hp/4, Wp/4)
        cost2 = self.classif2(out2).squeeze(1) + cost1
        cost3 = self.classif3(out3).squeeze(1) + cost2
        return left_features, right_features, volume, (cost1, cost2, cost3)

    def _eval_output(self, cost: torch.Tensor, pad_top: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last cost logits (B, D/4, Hp/4, Wp/4) -> (disparity, confidence) (B, H, W), float32."""
        padded_height, padded_width = cost.shape[-2] * COST_STRIDE, cost.shape[-1] * COST_STRIDE
        full_cost = self._full_resolution_cost(cost, padded_height, padded_width)
        disparity = soft_argmin(full_cost)  # (B, Hp, Wp)
        # Same confidence as the other networks: from the cost-resolution distribution.
        confidence = distribution_confidence(cost, soft_argmin(cost))  # (B, Hp/4, Wp/4)
        confidence = F.interpolate(
            confidence.unsqueeze(1), size=(padded_height, padded_width), mode="bilinear"
        ).squeeze(1)
        return (disparity[:, pad_top:, :width].float(), confidence[:, pad_top:, :width].clamp(0.0, 1.0).float())

    def infer_with_costs(self, left: torch.Tensor, right: torch.Tensor):
        """The eval output (disparity, confidence), each (B, H, W), and the last cost logits
        (B, D/4, h, w) of the same pass, from the input's top-left corner (the rows the release
        pads on top are left out; the padding on the right stays): a teacher's label and cost
        distribution in one pass."""
        pad_top = -left.shape[-2] % PAD_MULTIPLE
        cost = self._trunk(left, right)[3][-1]
        disparity, confidence = self._eval_output(cost, pad_top, left.shape[-1])
        return disparity, confidence, cost[:, :, pad_top // COST_STRIDE:]

    def forward(self, left: torch.Tensor, right: torch.Tensor):
        """left, right: (B, 3, H, W) RGB in [0, 1], any H, W.

        Training: dict of distillation points (see module docstring); features, volume and
        costs are at the padded size Hp x Wp (zero rows on top, zero columns on the right,
        none when H and W are multiples of 16).
        Eval: (disparity (B, H, W), confidence (B, H, W)), float32.
        """
        height, width = left.shape[-2:]
        pad_top = -height % PAD_MULTIPLE
        left_features, right_features, volume, (cost1, cost2, cost3) = self._trunk(left, right)
        if not self.training:
            return self._eval_output(cost3, pad_top, width)

        padded_height, padded_width = height + pad_top, width + (-width % PAD_MULTIPLE)
        outputs: dict[str, torch.Tensor] = {}
        for stage in (*self.feature_stages, "final"):
            outputs[f"feat.{stage}.left"] = left_features[stage]
            outputs[f"feat.{stage}.right"] = right_features[stage]
        outputs["volume.concat"] = volume
        for index, cost in enumerate((cost1, cost2, cost3)):
            outputs[f"cost.{index}"] = cost  # (B, D/4, Hp/4, Wp/4) logits, padded size
            full_cost = self._full_resolution_cost(cost, padded_height, padded_width)
            outputs[f"disp.{index}"] = soft_argmin(full_cost)[:, pad_top:, :width]  # (B, H, W)
        outputs["disp"] = outputs[f"disp.{self.num_outputs - 1}"]
        return outputs
