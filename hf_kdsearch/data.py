"""Image data as batches of `pixel_values` and `labels`: the bundled MNIST digits, and in-memory tensor datasets.

The bundled set (`assets/mnist10k.npz`, MIT licence beside it) holds 10,000 real MNIST digits. `load_mnist10k` gives
a fixed split, a seeded permutation with 8,000 samples for training and 2,000 held out, the same on every machine.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch.utils.data import Dataset

from .models.mnist import MNIST_MEAN, MNIST_STD

__all__ = ["TensorImageDataset", "load_mnist10k", "MNIST10K_PATH", "collate_tensor_batch"]

MNIST10K_PATH = resources.files("hf_kdsearch") / "assets" / "mnist10k.npz"


class TensorImageDataset(Dataset):
    """Images and labels held as tensors; item `i` is `{"pixel_values": images[i], "labels": labels[i]}`.

    `__getitems__` lets a `DataLoader` fetch a whole batch with one indexing operation instead of one per sample.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {"pixel_values": self.images[idx], "labels": self.labels[idx]}


def collate_tensor_batch(batch):
    """Collator for `TensorImageDataset`: batches fetched by `__getitems__` arrive already stacked."""
    if isinstance(batch, dict):
        return batch
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def load_mnist10k(
    split_seed: int = 0, train_size: int = 8000, normalize: bool = True
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The bundled MNIST digits as `(train, held_out)` datasets of `(1, 28, 28)` float images.

    Args:
        split_seed: seed of the permutation that splits the (class-ordered) file; keep 0 for the documented split.
        train_size: samples in the training part; the rest are held out.
        normalize: standardise with the MNIST mean/std (0.1307, 0.3081), as the `mnist_*` models expect.
    """
    with MNIST10K_PATH.open("rb") as f, np.load(f) as npz:
        images = torch.from_numpy(npz["images"].copy())
        labels = torch.from_numpy(npz["labels"].copy()).long()
    if not 0 < train_size < len(labels):
        raise ValueError(f"train_size must lie in (0, {len(labels)}), got {train_size}")
    x = images.float().div_(255).unsqueeze(1)
    if normalize:
        x = (x - MNIST_MEAN[0]) / MNIST_STD[0]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    train, held = perm[:train_size], perm[train_size:]
    return TensorImageDataset(x[train], labels[train]), TensorImageDataset(x[held], labels[held])
