"""`dsnet`: the lean distilled student. The teacher's stage structure, thinner; regression
at cost-volume resolution and learned convex upsampling of the disparity."""

from __future__ import annotations

from collections.abc import Sequence

from .blocks import init_weights
from .frames import ConvexUpsamplingStereoNetwork


class DSNet(ConvexUpsamplingStereoNetwork):
    """Backbone to 1/4 with one or two blocks per stage (the teacher has 3/16/3/3), keeping the
    teacher's stage widths so `feat.gwc` (320 channels) and the 40-group `volume.gwc` match
    the teacher's shapes; correlation volume over max_disparity/4 levels, attention-filtered
    concatenation volume (2 x 8 channels), two hourglasses of 16 channels, three outputs,
    convex upsampling x4; ~1.6 M parameters."""

    arch = "dsnet"
    COST_STRIDE = 4
    LAYER_STRIDES = (1, 2, 1, 1)  # the teacher's: stem and layer1 at 1/2, layers 2-4 at 1/4
    NUM_HOURGLASSES = 2

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
        refine_channels: int = 0,
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
            refine_channels=refine_channels,
        )
        init_weights(self)
        if self.refinement is not None:
            self.refinement.start_as_identity()
