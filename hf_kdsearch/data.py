"""Image data as batches of `pixel_values` and `labels`: the bundled MNIST digits, in-memory tensor datasets, and
image-classification datasets from the Hub or a local copy.

The bundled set (`assets/mnist10k.npz`, MIT licence beside it) holds 10,000 real MNIST digits. `load_mnist10k` gives
a fixed split, a seeded permutation with 8,000 samples for training and 2,000 held out, the same on every machine.

`load_image_dataset` reads a Hub id (`uoft-cs/cifar100`) or a local copy: parquet files, a folder written by
`save_to_disk`, or an image folder (`train/<class>/*.png`). `to_uint8_tensors` turns one split into a
`TensorImageDataset` of uint8 `(N, C, H, W)` images, the input of the GPU data path (`hf_kdsearch.fastpath`).
"""

from __future__ import annotations

import os
from importlib import resources

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .models.mnist import MNIST_MEAN, MNIST_STD

__all__ = [
    "TensorImageDataset",
    "load_mnist10k",
    "MNIST10K_PATH",
    "collate_tensor_batch",
    "DatasetLoadError",
    "load_image_dataset",
    "to_uint8_tensors",
]

MNIST10K_PATH = resources.files("hf_kdsearch") / "assets" / "mnist10k.npz"


class TensorImageDataset(Dataset):
    """Images and labels held as tensors; item `i` is `{"pixel_values": images[i], "labels": labels[i]}`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def collate_tensor_batch(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of `{"pixel_values", "labels"}` items into one batch dict."""
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


# ---- image-classification datasets from the Hub or a local copy ----------------------------------------------------


class DatasetLoadError(RuntimeError):
    """The dataset could not be loaded: offline without a local copy, or a path that holds no dataset."""


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def load_image_dataset(name: str | None = None, path: str | None = None, *, config: str | None = None):
    """Load an image-classification dataset as a `datasets.DatasetDict` of splits.

    Args:
        name: a Hub dataset id such as `"uoft-cs/cifar100"`; used when `path` is None. Reads the local cache first, so
            a copy downloaded once works offline.
        path: a local copy, which wins over `name`:
            - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            - a parquet file (it becomes the `train` split) or a folder of parquet files, such as a download of the
              Hub repo (`cifar100/train-*.parquet`, `cifar100/test-*.parquet`); splits come from the file names;
            - an image folder, `train/<class>/*.png` and `test/<class>/*.png` (columns `image`, `label`).
        config: the dataset configuration on the Hub, if it has several.

    Raises:
        DatasetLoadError: offline (or the Hub unreachable) with no cached copy, or `path` holds no dataset.
    """
    import datasets

    if path is not None:
        if not os.path.exists(path):
            raise DatasetLoadError(f"dataset path {path!r} does not exist")
        try:
            if os.path.isdir(path) and _is_saved_to_disk(path):
                loaded = datasets.load_from_disk(path)
            elif os.path.isfile(path) and path.endswith(".parquet"):
                loaded = datasets.load_dataset("parquet", data_files={"train": path})
            elif os.path.isdir(path):
                loaded = datasets.load_dataset(path)
            else:
                raise DatasetLoadError(
                    f"dataset path {path!r} is a file but not a .parquet file; pass a parquet file or a folder"
                )
        except DatasetLoadError:
            raise
        except Exception as err:  # `datasets` raises many types for "no dataset here"
            raise DatasetLoadError(
                f"no dataset found at {path!r} (expected parquet files, a save_to_disk folder or an image folder): "
                f"{type(err).__name__}: {err}"
            ) from err
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    if not name:
        raise DatasetLoadError("pass a Hub dataset id (name=) or a local copy (path=)")
    try:
        return datasets.load_dataset(name, config)
    except Exception as err:  # offline, unreachable Hub, unknown repo: all mean "not here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached or has no such repo"
        raise DatasetLoadError(
            f"could not load the dataset {name!r}: {reason}, and it is not in the local cache. Pass a local copy as "
            f"path= (parquet files, a save_to_disk folder or an image folder). Underlying error: "
            f"{type(err).__name__}: {err}"
        ) from err


def _find_column(dataset, wanted: str | None, kind: str, feature_type) -> str:
    columns = list(dataset.features)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{kind} column {wanted!r} is not in the dataset; its columns are {columns}")
        return wanted
    # The first match: CIFAR-100 lists fine_label before coarse_label, an image folder has one `label`.
    for column, feature in dataset.features.items():
        if isinstance(feature, feature_type):
            return column
    raise ValueError(
        f"the dataset has no {feature_type.__name__} column to use as the {kind} column; columns and types: "
        f"{ {c: type(f).__name__ for c, f in dataset.features.items()} }. Name it explicitly."
    )


def to_uint8_tensors(
    dataset,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    channels: int = 3,
    batch_size: int = 1000,
    desc: str = "decoding images",
) -> tuple[TensorImageDataset, list[str] | None]:
    """Decode a `datasets.Dataset` of images into uint8 `(N, C, H, W)` tensors, with a progress bar.

    Args:
        dataset: one split, with an `Image` column and an integer label column.
        image_column: defaults to the first `Image` column (`img` in CIFAR-100, `image` in an image folder).
        label_column: defaults to the first `ClassLabel` column (`fine_label` in CIFAR-100, `label` in an image
            folder).
        channels: 3 decodes as RGB, 1 as greyscale, whatever the stored mode.

    Returns:
        `(TensorImageDataset(images, labels), class_names)`; `class_names` comes from the label's `ClassLabel`
        feature, or is None when the label column is plain integers.
    """
    import datasets

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    image_column = _find_column(dataset, image_column, "image", datasets.Image)
    label_column = _find_column(dataset, label_column, "label", datasets.ClassLabel)
    if len(dataset) == 0:
        raise ValueError("the dataset split is empty")
    label_feature = dataset.features[label_column]
    class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    dataset = dataset.cast_column(image_column, datasets.Image(mode="RGB" if channels == 3 else "L"))
    dataset = dataset.select_columns([image_column, label_column]).with_format("numpy")
    chunks, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
        batch = dataset[start : start + batch_size]
        images = batch[image_column]
        if not isinstance(images, np.ndarray) or images.dtype == object:
            sizes = sorted({tuple(np.asarray(im).shape[:2]) for im in images})
            raise ValueError(f"images in column {image_column!r} differ in size {sizes}; resize them to one size first")
        chunks.append(torch.from_numpy(images if images.ndim == 4 else images[..., None]).permute(0, 3, 1, 2))
        labels.append(torch.from_numpy(np.asarray(batch[label_column], dtype=np.int64)))
    sizes = sorted({tuple(c.shape[2:]) for c in chunks})
    if len(sizes) > 1:
        raise ValueError(f"images in column {image_column!r} differ in size {sizes}; resize them to one size first")
    return TensorImageDataset(torch.cat(chunks).contiguous(), torch.cat(labels)), class_names
