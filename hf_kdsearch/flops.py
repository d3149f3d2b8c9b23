"""Forward FLOPs of a model, counted by `torch.utils.flop_counter`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .batch import forward_model

__all__ = ["count_flops"]


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> int:
    """Forward FLOPs of one sample of shape `input_size`, as `torch.utils.flop_counter` counts them.

    The counter counts a multiply-add as 2 FLOPs and covers matmuls and convolutions (the ops that dominate a CNN or
    MLP); element-wise ops and batch norm are not counted. The model runs once in eval mode on zeros, on the device
    of its parameters, and its train/eval mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward_model(model, {"pixel_values": x})
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
