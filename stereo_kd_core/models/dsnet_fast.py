"""`dsnet-fast`: beyond the paper. The cost volume at 1/8 resolution, one hourglass, convex
upsampling of the disparity by 8."""

from __future__ import annotations

from collections.abc import Sequence

from .blocks import ConvexUpsamplingStereoNetwork, init_weights


class DSNetFast(ConvexUpsamplingStereoNetwork):
    """dsnet's layout with every stage from layer1 on at half the resolution (layer1
    downsamples too): 40-group correlation volume over max_disparity/8 levels at 1/8,
    attention-filtered concatenation volume, one hourglass, two outputs, convex upsampling x8.
    Its feature maps are half the size of the teacher's from layer1 on."""

    arch = "dsnet-fast"
    COST_STRIDE = 8
    LAYER_STRIDES = (2, 2, 1, 1)  # stem at 1/2, layer1 at 1/4, layers 2-4 at 1/8
    NUM_HOURGLASSES = 1

    def __init__(
        self,
        max_disparity: int = 192,
        stem_channels: int = 32,
        layer_channels: Sequence[int] = (32, 64, 128, 128),
        layer_blocks: Sequence[int] = (1, 2, 1, 1),
        groups: int = 40,
        concat_channels: int = 8,
        attention_channels: int = 8,
        aggregation_channels: int = 16,
        mask_channels: int = 64,
    ):
        super().__init__(
            max_disparity=max_disparity,
            stem_channels=stem_channels,
            layer_channels=layer_channels,
            layer_blocks=layer_blocks,
            groups=groups,
            concat_channels=concat_channels,
            attention_channels=attention_channels,
            aggregation_channels=aggregation_channels,
            mask_channels=mask_channels,
        )
        init_weights(self)
