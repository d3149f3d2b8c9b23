"""The GPU data path: uint8 image batches that are augmented and normalised on the device that trains on them.

At CIFAR size the GPU idles while Python launches kernels and the host decodes, crops and copies images. This path
removes the host work from the step:

- the dataset stays uint8 `(N, C, H, W)`, on the GPU (`DeviceImageDataset(..., device="cuda")`) or in pinned host
  memory, and a batch is one gather on that device; indices travel through pinned memory without a host sync;
- `random_crop_flip` crops (zero padding, 4 pixels by default) and flips every sample with one gather, from random
  numbers drawn on the device;
- `normalize_images` converts to float, normalises with one fused multiply-add and, for conv nets, writes
  channels_last;
- `DeviceAugment` applies both to a batch dict; `DistillationTrainer` (every trainer built on `LossMetricsMixin`)
  calls it on each batch when `DistillationArguments(device_augment=True)`, after the batch reached the device.

Nothing here reads a tensor's value on the host, so the CPU queues steps ahead of the GPU. On a machine without CUDA
the same code runs on CPU tensors: the CPU fallback is the same arithmetic, not a second implementation.

Random numbers come from the default generator of the batch's device, which the Trainer seeds and saves in its
checkpoints, so augmentation is reproducible and resumes where it stopped. Under DDP every rank draws from its own
device's generator; ranks seeded alike draw alike crop offsets for different images, as they draw alike dropout masks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batch import SampleIndexDataset, unwrap
from .config import DistillationArguments
from .data import TensorImageDataset, collate_tensor_batch

__all__ = [
    "DeviceAugment",
    "DeviceImageDataset",
    "crop_flip",
    "draw_crop_flip",
    "normalize_images",
    "random_crop_flip",
    "setup_fast_path",
]

logger = logging.getLogger(__name__)


def draw_crop_flip(
    num_samples: int,
    padding: int = 4,
    flip: bool = True,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The random parameters of `random_crop_flip` for `num_samples` images: `(offsets, mirror)`.

    `offsets` is `(N, 2)` int64 (row, column) in `[0, 2 * padding]`, or None when `padding == 0`; `mirror` is `(N,)`
    bool, or None when `flip` is off. The numbers are drawn in the order `random_crop_flip` draws them, so
    `crop_flip(images, *draw_crop_flip(...))` equals `random_crop_flip(images, ...)` for the same generator state.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    mirror = offsets = None
    if flip:
        mirror = (torch.rand((num_samples, 1), device=device, generator=generator) < 0.5).view(num_samples)
    if padding > 0:
        drawn = torch.randint(0, 2 * padding + 1, (2, num_samples, 1), device=device, generator=generator)
        offsets = drawn.view(2, num_samples).t()
    return offsets, mirror


def crop_flip(
    images: torch.Tensor, offsets: torch.Tensor | None, mirror: torch.Tensor | None, padding: int = 4
) -> torch.Tensor:
    """Crop each image of `images` at the given offsets of its zero-padded copy, and mirror it where `mirror` is set.

    The deterministic half of `random_crop_flip`: it replays stored augmentation parameters (`draw_crop_flip`'s, or a
    teacher cache's) with one gather on `images.device`.

    Args:
        images: `(N, C, H, W)` images of any dtype.
        offsets: `(N, 2)` integer (row, column) offsets in `[0, 2 * padding]`, or None for no crop.
        mirror: `(N,)` bool, True where the image is mirrored left-right, or None for no flip.
        padding: the zero padding the offsets refer to.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if mirror is not None:
        cols = torch.where(mirror.view(n, 1).to(device), (w - 1) - cols, cols)
    if offsets is not None and padding > 0:
        images = nn.functional.pad(images, (padding, padding, padding, padding))
        offsets = offsets.to(device=device, dtype=torch.long)
        rows, cols = rows + offsets[:, :1], cols + offsets[:, 1:]
    elif mirror is None:
        return images
    # images[i, ch, rows[i, y], cols[i, x]] for every i, ch, y, x in one indexing kernel.
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return images[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding, then random horizontal flip, per sample, as one gather on `images.device`.

    Matches `torchvision.transforms.RandomCrop(size, padding)` followed by `RandomHorizontalFlip()`: each sample's
    offsets are uniform over the `2 * padding + 1` positions per axis, and it is mirrored with probability 1/2.
    It is `crop_flip(images, *draw_crop_flip(len(images), padding, flip))`.

    Args:
        images: `(N, C, H, W)` images of any dtype; uint8 keeps the gather 4x cheaper than float.
        padding: zero padding on each side before cropping back to `(H, W)`; 0 disables the crop.
        flip: mirror half of the samples left-right.
        generator: a generator on `images.device`; the device's default generator when None.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    offsets, mirror = draw_crop_flip(images.shape[0], padding, flip, device=images.device, generator=generator)
    return crop_flip(images, offsets, mirror, padding)


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`(images / 255 - mean) / std` for uint8 images, as one conversion and one fused multiply-add.

    Args:
        images: `(N, C, H, W)` uint8 images.
        mean, std: per-channel statistics of images scaled to [0, 1] (timm's `pretrained_cfg["mean"/"std"]`). Python
            numbers are copied to the device on every call, which waits for the device; `DeviceAugment` keeps them
            there instead.
        channels_last: return an NHWC-strided tensor, the layout cuDNN's tensor-core convolutions prefer.
        dtype: floating dtype of the result.
    """
    scale, shift = _affine(mean, std, images, dtype)
    return _normalize(images, scale, shift, channels_last)


def _affine(mean, std, images: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift with `x / 255 * scale + shift == (x / 255 - mean) / std`, shaped `(1, C, 1, 1)`."""
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    if mean.shape[1] != images.shape[1] or std.shape[1] != images.shape[1]:
        raise ValueError(
            f"mean/std have {mean.shape[1]}/{std.shape[1]} channels but the images {images.shape[1]} "
            f"(shape {tuple(images.shape)})"
        )
    return (1.0 / (255.0 * std)).to(images.device, dtype), (-mean / std).to(images.device, dtype)


def _normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.addcmul(shift, images.to(dtype=scale.dtype, memory_format=memory_format), scale)


class DeviceAugment:
    """Augment and normalise uint8 image batches where they are, with no host synchronisation.

    Called on a batch dict after it reached the device: in training, `random_crop_flip` then `normalize_images`; in
    evaluation, `normalize_images` only. Other keys pass through untouched.

    Args:
        mean, std: per-channel statistics of images scaled to [0, 1].
        padding: crop padding in pixels (RepDistiller's CIFAR recipe: 4).
        flip: random horizontal flip.
        channels_last: return batches in channels_last memory format.

    Example:
    ```python
    augment = DeviceAugment(CIFAR100_MEAN, CIFAR100_STD, padding=4, flip=True, channels_last=True)
    batch = augment({"pixel_values": uint8_images.cuda(), "labels": labels.cuda()}, train=True)
    ```
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        padding: int,
        flip: bool,
        channels_last: bool,
    ):
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel; got mean={list(mean)} std={list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0 in every channel, got {list(std)}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.padding, self.flip, self.channels_last = int(padding), bool(flip), bool(channels_last)
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_args(cls, args: Any, model: nn.Module) -> DeviceAugment | None:
        """The augmentation `args` (`DataPathArguments`) ask for (`device_augment`, `augment_padding`, `augment_flip`,
        `image_mean`, `image_std`, `channels_last`), or None when `device_augment` is off.

        Mean and std default to the model's timm `pretrained_cfg`, the statistics it was built to expect.
        """
        if not args.device_augment:
            return None
        mean, std = args.image_mean, args.image_std
        if mean is None or std is None:
            cfg = getattr(unwrap(model), "pretrained_cfg", None) or {}
            if "mean" not in cfg or "std" not in cfg:
                raise ValueError(
                    f"device_augment=True normalises on the device but {type(model).__name__} carries no "
                    "pretrained_cfg mean/std; pass image_mean and image_std (per channel, for images in [0, 1])"
                )
            mean = cfg["mean"] if mean is None else mean
            std = cfg["std"] if std is None else std
        return cls(
            mean,
            std,
            padding=args.augment_padding,
            flip=args.augment_flip,
            channels_last=args.channels_last,
        )

    @staticmethod
    def _check(batch: Mapping[str, Any]) -> torch.Tensor:
        images = batch.get("pixel_values")
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else images
            raise TypeError(
                f"device_augment expects pixel_values as uint8 (N, C, H, W) images, got {got}. Keep the dataset as "
                "uint8 (hf_kdsearch.to_uint8_tensors, DeviceImageDataset) or turn device_augment off."
            )
        return images

    def __call__(self, batch: Mapping[str, Any], train: bool) -> dict[str, Any]:
        images = self._check(batch)
        if train:
            images = random_crop_flip(images, self.padding, self.flip)
        return {**batch, "pixel_values": self._normalized(images)}

    def replay(self, batch: Mapping[str, Any], offsets: torch.Tensor | None, mirror: torch.Tensor | None) -> dict:
        """A training batch augmented with given parameters (`draw_crop_flip`'s shapes) instead of random ones."""
        images = self._check(batch)
        return {**batch, "pixel_values": self._normalized(crop_flip(images, offsets, mirror, self.padding))}

    @property
    def augmentation(self) -> dict[str, Any]:
        """What training draws: the crop padding and whether it flips (normalisation is not augmentation)."""
        return {"padding": self.padding, "flip": self.flip}

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        if images.device not in self._affine:
            # Copied to the device once: a copy per step from pageable memory would wait for the queued kernels.
            self._affine[images.device] = _affine(self.mean, self.std, images, torch.float32)
        scale, shift = self._affine[images.device]
        return _normalize(images, scale, shift, self.channels_last)

    def __repr__(self) -> str:
        return (
            f"DeviceAugment(mean={self.mean}, std={self.std}, padding={self.padding}, flip={self.flip}, "
            f"channels_last={self.channels_last})"
        )


class DeviceImageDataset(TensorImageDataset):
    """A `TensorImageDataset` whose tensors live on a GPU, or in pinned host memory, for the GPU data path.

    `__getitems__` gathers a whole batch with one indexing operation, and hands the loader that batch dict; give the
    Trainer `data_collator=DeviceImageDataset.collate` and `remove_unused_columns=False` (the Trainer's column
    filter would iterate the dict as if it were a list of samples).

    - On a GPU the gather is one kernel on the device. The indices reach the device through pinned memory with a
      non-blocking copy: a plain copy from pageable memory would make the host wait for every queued kernel, once per
      step. Also set `dataloader_pin_memory=False` (such batches cannot be pinned, and need not be) and
      `dataloader_num_workers=0` (CUDA tensors cannot cross to worker processes).
    - On the CPU with `pin_memory=True` the images sit in page-locked memory; batches are gathered on the host and the
      Trainer's loader pins and copies them. `DistillationArguments(device_augment=True)` makes that copy
      non-blocking.

    Args:
        images: `(N, C, H, W)` images, uint8 for `DeviceAugment`.
        labels: `(N,)` integer labels.
        device: where to keep both; None keeps them where they are.
        pin_memory: page-lock host tensors (ignored on a GPU, and where no GPU exists to pin for).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
    ):
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        if pin_memory and images.device.type == "cpu" and torch.cuda.is_available():
            images, labels = images.pin_memory(), labels.pin_memory()
        super().__init__(images, labels)

    @classmethod
    def from_dataset(
        cls, dataset: TensorImageDataset, device: torch.device | str | None = None, pin_memory: bool = False
    ) -> DeviceImageDataset:
        """Move a `TensorImageDataset` (e.g. from `to_uint8_tensors`) to `device` or pinned memory."""
        return cls(dataset.images, dataset.labels, device=device, pin_memory=pin_memory)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @staticmethod
    def collate(batch: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collator: a batch from `__getitems__` is already stacked; a list of single samples is stacked."""
        if isinstance(batch, Mapping):
            return dict(batch)
        return collate_tensor_batch(batch)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        if self.images.device.type != "cpu":
            idx = idx.pin_memory().to(self.images.device, non_blocking=True)
        return {"pixel_values": self.images[idx], "labels": self.labels[idx]}


#: Why channels_last stays off on CPU: no speed there, and a defect of torch 2.14.1 that kills the process.
CHANNELS_LAST_ON_CPU = (
    "channels_last=True on CPU: torch 2.14.1's CPU backward of a 1x1 stride-2 convolution in channels_last with fewer "
    "than 8 input channels aborts the process ('double free or corruption', SIGABRT, no Python error); narrow "
    "ensemble students and searched students have such shortcuts. channels_last brings no speed on CPU: leave it off "
    "there (the recipes turn it on for CUDA only)"
)


def setup_fast_path(trainer: Any) -> DeviceAugment | None:
    """What a trainer built on `LossMetricsMixin` does with the fast-path settings of its `args`, once, at init.

    - `channels_last`: the model's 4-D weights move to channels_last (the teacher's are moved by
      `DistillationMixin`).
    - `device_augment`: checks that the loader can carry the datasets (device-resident tensors can be neither pinned
      nor sent to worker processes), warns about settings that still sync the host every step, and returns the
      `DeviceAugment` that `_prepare_inputs` applies to each batch; None when `device_augment` is off.
    """
    args, model = trainer.args, trainer.model
    if args.channels_last:
        if args.device.type == "cpu":
            warnings.warn(CHANNELS_LAST_ON_CPU, stacklevel=2)
        model.to(memory_format=torch.channels_last)
    augment = DeviceAugment.from_args(args, model)
    if augment is None:
        return None
    datasets = [trainer.train_dataset]
    eval_dataset = trainer.eval_dataset
    datasets += list(eval_dataset.values()) if isinstance(eval_dataset, Mapping) else [eval_dataset]
    datasets = [SampleIndexDataset.unwrap(d) for d in datasets]
    if args.remove_unused_columns and any(isinstance(d, DeviceImageDataset) for d in datasets):
        raise ValueError(
            "DeviceImageDataset hands the loader whole batches, which the Trainer's column filter would take apart: "
            "set remove_unused_columns=False (and data_collator=DeviceImageDataset.collate)"
        )
    on_device = [d for d in datasets if isinstance(d, DeviceImageDataset) and d.device.type != "cpu"]
    if on_device and args.dataloader_pin_memory:
        raise ValueError(
            f"the dataset lives on {on_device[0].device}, and such batches cannot be pinned: set "
            "dataloader_pin_memory=False (the data is already where it is needed)"
        )
    if on_device and args.dataloader_num_workers > 0:
        raise ValueError(
            f"the dataset lives on {on_device[0].device}, which worker processes cannot share: set "
            f"dataloader_num_workers=0 (got {args.dataloader_num_workers}); a batch is one gather on the device"
        )
    syncing = ["logging_nan_inf_filter"] if args.logging_nan_inf_filter else []
    if isinstance(args, DistillationArguments) and args.check_teacher_finite:
        syncing.append("check_teacher_finite")
    if syncing and torch.cuda.is_available():
        logger.warning(
            "device_augment keeps the data path free of host syncs, but %s=True still syncs once per step; "
            "set it to False for full speed",
            "=True and ".join(syncing),
        )
    return augment
