"""`acv-teacher`: the ACVNet-class teacher (attention concatenation volume, two stacked
hourglasses, cost upsampled to full resolution before the soft argmin)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .blocks import full_resolution_regression, init_weights
from .frames import StereoNetwork


class AcvTeacher(StereoNetwork):
    """Backbone to 1/4 (layer2+3+4 = 320 correlation channels), 40-group correlation volume
    over max_disparity/4 levels, attention-filtered concatenation volume (2 x 32 channels),
    two hourglasses of 32 channels, three outputs; ~7 M parameters."""

    arch = "acv-teacher"
    COST_STRIDE = 4
    LAYER_STRIDES = (1, 2, 1, 1)  # stem and layer1 at 1/2, layers 2-4 at 1/4
    NUM_HOURGLASSES = 2

    def __init__(
        self,
        max_disparity: int = 192,
        stem_channels: int = 32,
        layer_channels: Sequence[int] = (32, 64, 128, 128),
        layer_blocks: Sequence[int] = (3, 16, 3, 3),
        groups: int = 40,
        concat_channels: int = 32,
        attention_channels: int = 32,
        aggregation_channels: int = 32,
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
        )
        init_weights(self)

    def full_resolution_disparity(self, logits: Tensor, levels: Tensor, mask: Tensor | None) -> Tensor:
        # The paper's regression: the cost, not the disparity, is upsampled (to max_disparity x H x W).
        size = (logits.shape[-2] * self.cost_stride, logits.shape[-1] * self.cost_stride)
        return full_resolution_regression(logits, self.max_disparity, size)
