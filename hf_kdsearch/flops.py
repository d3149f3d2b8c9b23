"""Forward FLOPs of a model, counted by `torch.utils.flop_counter`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .batch import forward_model

__all__ = ["count_flops", "input_size_of"]


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


def input_size_of(
    model: nn.Module, input_size: Sequence[int] | None = None, *, hint: str = "input_size=(C, H, W)"
) -> tuple[int, ...]:
    """The `(C, H, W)` of one sample to count `model`'s FLOPs on: `input_size` when given, else the model's timm
    `pretrained_cfg["input_size"]`; a `ValueError` telling the caller to pass `hint` when neither says."""
    if input_size is not None:
        return tuple(int(s) for s in input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not cfg.get("input_size"):
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; pass {hint}")
    return tuple(int(s) for s in cfg["input_size"])
