"""Batch plumbing shared by the trainers, the teacher, FLOPs counting and the callbacks.

A batch is a dict: model inputs (`pixel_values` for images, `input_ids`/`attention_mask` for text, ...) plus the keys
in `LOSS_KEYS`, which steer the loss and are never passed to a model. A model is called in one of two styles:

- by keyword, `model(pixel_values=..., attention_mask=...)`, as transformers models are (their forward names
  `pixel_values` or takes `**kwargs`);
- with one positional tensor, `model(batch["pixel_values"])`, as timm models and plain `nn.Module`s are.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LOSS_KEYS", "batch_size", "forward_model", "logits_of", "num_classes", "takes_keywords", "unwrap"]

#: Batch keys that steer the loss and are never passed to a model.
#: `sample_index` and `view_index` name the stored teacher outputs (and augmentation) of a sample when training from
#: a teacher cache.
LOSS_KEYS = ("labels", "mix_labels", "mix_weights", "sample_index", "view_index")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers, at any depth."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, a mapping or ModelOutput with `logits`, or a tuple, logits first."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(outputs).__name__}: return a tensor, a dict or "
        "ModelOutput with 'logits', or a tuple whose first element is the logits"
    )


def takes_keywords(model: nn.Module) -> bool:
    """Whether `model.forward` takes named inputs (`pixel_values=`), as transformers models do, or one positional
    tensor, as timm models do. Reads the signature: call it once per model, not per batch."""
    params = inspect.signature(unwrap(model).forward).parameters.values()
    return any(p.kind == p.VAR_KEYWORD or p.name == "pixel_values" for p in params)


def forward_model(model: nn.Module, inputs: Mapping[str, Any], *, keywords: bool | None = None) -> Any:
    """Call `model` on a batch dict, leaving out labels so transformers models don't compute a loss of their own.

    `keywords` is the call style (`takes_keywords(model)`); pass it when calling the same model repeatedly, so its
    signature is read once rather than at every call.
    """
    if keywords is None:
        keywords = takes_keywords(model)
    if keywords:
        return model(**{k: v for k, v in inputs.items() if k not in LOSS_KEYS})
    if "pixel_values" not in inputs:
        raise KeyError(
            f"{type(unwrap(model)).__name__}.forward takes one positional tensor, so the batch must carry it as "
            f"'pixel_values'; got keys {sorted(inputs)}"
        )
    return model(inputs["pixel_values"])


def batch_size(inputs: Mapping[str, Any]) -> int:
    """The number of samples in a batch: the first dimension of its first tensor with one (0 when there is none)."""
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
    return 0


def num_classes(model: nn.Module) -> int | None:
    """The class count a model declares (transformers `config.num_labels`, timm `num_classes`), or None."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None
