"""`dsnet-fast`: beyond the paper. The cost volume at 1/8 resolution, one hourglass, convex
upsampling of the disparity by 8."""

from __future__ import annotations

from .dsnet import DSNet


class DSNetFast(DSNet):
    """dsnet's layout and constructor arguments with every stage from layer1 on at half the
    resolution (layer1 downsamples too): 40-group correlation volume over max_disparity/8
    levels at 1/8, attention-filtered concatenation volume, one hourglass, two outputs, convex
    upsampling x8. Its feature maps are half the size of the teacher's from layer1 on."""

    arch = "dsnet-fast"
    COST_STRIDE = 8
    LAYER_STRIDES = (2, 2, 1, 1)  # stem at 1/2, layer1 at 1/4, layers 2-4 at 1/8
    NUM_HOURGLASSES = 1
