"""Model size and cost: parameter count and forward FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, height: int = 576, width: int = 960) -> int:
    """Forward FLOPs of one eval-mode pass on a batch of one height x width pair.

    Counted by torch's FlopCounterMode, which covers convolutions, transposed convolutions
    and matrix products (a multiply-add counts as 2 FLOPs); elementwise operations, softmax
    and interpolation are not counted. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    parameter = next(model.parameters())
    images = torch.rand(2, 1, 3, height, width, dtype=parameter.dtype, device=parameter.device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images[0], images[1])
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
