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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "FROZEN_FLAG",
    "LOSS_KEYS",
    "SampleIndexDataset",
    "batch_size",
    "forward_model",
    "logits_of",
    "num_classes",
    "resize_images",
    "sample_index",
    "takes_keywords",
    "unwrap",
]

#: Set on a module frozen as a teacher (`teacher.freeze_teacher`), so that `add_gates` can thaw a copy of it.
FROZEN_FLAG = "_hf_kdsearch_frozen_teacher"

#: Batch keys that steer the loss and are never passed to a model.
#: `sample_index` and `view_index` name the stored teacher outputs (and augmentation) of a sample when training from
#: a teacher cache.
LOSS_KEYS = ("labels", "mix_labels", "mix_weights", "sample_index", "view_index")


def unwrap(model: nn.Module, *, timm_wrapper: bool = False) -> nn.Module:
    """The module inside DDP / DataParallel / FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers, at any
    depth. With `timm_wrapper=True` also inside transformers' `TimmWrapperForImageClassification` (`.timm_model`, what
    `AutoModelForImageClassification` returns for a timm folder): the timm model that holds the weights."""
    attrs = ("module", "_orig_mod", "timm_model") if timm_wrapper else ("module", "_orig_mod")
    while True:
        for attr in attrs:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


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
    """The number of samples in a batch: the first dimension of its first model input with one, else of its first
    tensor with one (labels alone); 0 when there is none."""
    tensors = [(k, v) for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.ndim > 0]
    for key, value in tensors:
        if key not in LOSS_KEYS:
            return value.shape[0]
    return tensors[0][1].shape[0] if tensors else 0


def sample_index(inputs: Mapping[str, Any], needed_by: str) -> torch.Tensor:
    """The batch's `sample_index` (its samples' positions in the training set, from `SampleIndexDataset`); a
    `KeyError` saying what `needed_by` it when the batch has none."""
    index = inputs.get("sample_index")
    if not isinstance(index, torch.Tensor):
        raise KeyError(
            f"{needed_by} needs 'sample_index' in every batch: DistillationTrainer wraps its train_dataset in "
            "SampleIndexDataset for this when the callback or cache is passed at construction; a custom collator "
            f"must keep the key. Got keys {sorted(inputs)}"
        )
    return index


class SampleIndexDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items (and `__getitems__` batches) also carry `sample_index`, their position.

    Training from a teacher cache, and UNIX with free scoring, look samples up by that index; `DistillationTrainer`
    wraps its training set in this when either is asked for. Under DDP each rank's batches carry their own indices.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    @classmethod
    def wrap(cls, dataset: Any) -> SampleIndexDataset:
        return dataset if isinstance(dataset, cls) else cls(dataset)

    @classmethod
    def unwrap(cls, dataset: Any) -> Any:
        """The dataset as the user gave it."""
        return dataset.dataset if isinstance(dataset, cls) else dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "sample_index": torch.tensor(int(i))}

    def __getitems__(self, indices: list[int]) -> Any:
        inner = getattr(self.dataset, "__getitems__", None)
        if inner is None:
            return [self[i] for i in indices]
        batch = inner(indices)
        if isinstance(batch, Mapping):
            return {**batch, "sample_index": torch.as_tensor(indices, dtype=torch.long)}
        return [{**item, "sample_index": torch.tensor(int(i))} for item, i in zip(batch, indices)]

    def __getattr__(self, name: str) -> Any:
        # `images`, `labels`, `device`, `collate` ... of the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def resize_images(images: torch.Tensor, size: Sequence[int] | int) -> torch.Tensor:
    """Bilinear resize of `(N, C, H, W)` float images to `size` (one int, or `(height, width)`), with antialiasing,
    on the images' device; the images themselves when they already have that size.

    A per-channel normalisation commutes with it (the weights of each output pixel sum to 1), so normalised batches
    can be resized as they are. Used to feed a teacher at its own resolution from the student's batch, once per
    batch, without decoding the images twice.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    size = [size] if isinstance(size, int) else list(size)
    if len(size) not in (1, 2) or any(int(s) <= 0 for s in size):
        raise ValueError(f"size must be one or two positive ints (height width), got {size!r}")
    hw = (int(size[0]), int(size[-1]))
    if tuple(images.shape[-2:]) == hw:
        return images
    return nn.functional.interpolate(images, size=hw, mode="bilinear", antialias=True, align_corners=False)


def num_classes(model: nn.Module) -> int | None:
    """The class count a model declares (transformers `config.num_labels`, timm `num_classes`), or None."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None
