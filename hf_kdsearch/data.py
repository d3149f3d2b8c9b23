"""Image data as batches of `pixel_values` and `labels`: the bundled MNIST digits, in-memory tensor datasets, and
image-classification datasets from the Hub or a local copy.

The bundled set (`assets/mnist10k.npz`, MIT licence beside it) holds 10,000 real MNIST digits. `load_mnist10k` gives
a fixed split, a seeded permutation with 8,000 samples for training and 2,000 held out, the same on every machine.

`load_image_dataset` reads a Hub id (`uoft-cs/cifar100`) or a local copy: parquet files, a folder written by
`save_to_disk`, or an image folder (`train/<class>/*.png`). `to_uint8_tensors` turns one split into a
`TensorImageDataset` of uint8 `(N, C, H, W)` images, the input of the GPU data path (`hf_kdsearch.fastpath`).

Any other image dataset (variable sizes, RGB or greyscale, too large for memory) is decoded on the fly:
`data_config_for` reads the resolution and statistics a model expects (timm's `resolve_data_config`, or a
transformers image processor), `image_transforms` builds timm's training and evaluation transforms from it, and
`ImageClassificationTransform` applies them in `Dataset.with_transform` (or `IterableDataset.map`), i.e. in the
DataLoader workers. `split_stream_by_node` gives each rank its part of a streaming dataset, and
`NodeSplitLoaderMixin` makes the Trainer load that part as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    "find_columns",
    "class_names",
    "image_sizes",
    "data_config_for",
    "image_transforms",
    "ImageClassificationTransform",
    "split_stream_by_node",
    "NodeSplitLoaderMixin",
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


def load_image_dataset(
    name: str | None = None, path: str | None = None, *, config: str | None = None, streaming: bool = False
):
    """Load an image-classification dataset as a `datasets.DatasetDict` of splits (an `IterableDatasetDict` of
    streams with `streaming=True`: nothing is downloaded or decoded ahead; a `save_to_disk` folder is streamed
    from its Arrow files).

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
                if streaming:
                    loaded = _to_streams(loaded)
            elif os.path.isfile(path) and path.endswith(".parquet"):
                loaded = datasets.load_dataset("parquet", data_files={"train": path}, streaming=streaming)
            elif os.path.isdir(path):
                loaded = datasets.load_dataset(path, streaming=streaming)
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
        if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
            return loaded
        return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(train=loaded)
    if not name:
        raise DatasetLoadError("pass a Hub dataset id (name=) or a local copy (path=)")
    try:
        return datasets.load_dataset(name, config, streaming=streaming)
    except Exception as err:  # offline, unreachable Hub, unknown repo: all mean "not here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached or has no such repo"
        raise DatasetLoadError(
            f"could not load the dataset {name!r}: {reason}, and it is not in the local cache. Pass a local copy as "
            f"path= (parquet files, a save_to_disk folder or an image folder). Underlying error: "
            f"{type(err).__name__}: {err}"
        ) from err


def _to_streams(loaded):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded.to_iterable_dataset()
    return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})


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


# ---- any image-classification dataset: on-the-fly transforms, streaming -------------------------------------------
#: Integer label columns found by name when the dataset has no `ClassLabel` column.
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")


def find_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """The image and label columns of a dataset's `features`: the names given, else the first `Image` column and the
    first `ClassLabel` column (or an integer column named like a label, e.g. `label`).

    Raises:
        ValueError: a named column is missing, or no column of the kind exists; the message lists the columns.
    """
    import datasets

    columns = {c: type(f).__name__ for c, f in features.items()}
    for wanted, kind in ((image_column, "image"), (label_column, "label")):
        if wanted is not None and wanted not in features:
            raise ValueError(
                f"{kind} column {wanted!r} is not in the dataset; its columns are {list(features)}. "
                f"Pass --{kind}_column with one of them."
            )
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise ValueError(
                f"the dataset has no Image column; its columns and types are {columns}. Name the image column with "
                "--image_column (it must hold images, or paths/bytes of images cast with datasets.Image())."
            )
    if label_column is None:
        label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label_column is None:
        label_column = next(
            (
                c
                for c in LABEL_COLUMN_NAMES
                if isinstance(features.get(c), datasets.Value) and features[c].dtype.startswith(("int", "uint"))
            ),
            None,
        )
        if label_column is None:
            raise ValueError(
                f"the dataset has no label column (no ClassLabel column, no integer column named one of "
                f"{list(LABEL_COLUMN_NAMES)}); its columns and types are {columns}. Name it with --label_column."
            )
    return image_column, label_column


def class_names(features, label_column: str) -> list[str] | None:
    """The class names of a `ClassLabel` column, or None for plain integers."""
    import datasets

    feature = features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def image_sizes(dataset, image_column: str) -> set[tuple[int, int]]:
    """Every `(width, height)` in an image column, read from the files' headers without decoding the pixels."""
    import io

    import datasets
    from PIL import Image

    raw = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    sizes = set()
    for item in raw[image_column]:
        if item.get("bytes") is not None:
            with Image.open(io.BytesIO(item["bytes"])) as im:
                sizes.add(im.size)
        else:
            with Image.open(item["path"]) as im:
                sizes.add(im.size)
    return sizes


def data_config_for(
    model: torch.nn.Module | None = None,
    *,
    image_size: Sequence[int] | int | None = None,
    processor=None,
) -> dict:
    """A timm data config (`input_size`, `mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`) for a model.

    Args:
        model: a timm model; its `pretrained_cfg` gives the statistics and resolution it expects
            (`timm.data.resolve_data_config`).
        image_size: overrides the resolution: one int (square) or `(height, width)`.
        processor: a transformers image processor (`AutoImageProcessor`), used instead of the model's config: its
            `image_mean`, `image_std` and `size`/`crop_size`.
    """
    from timm.data import resolve_data_config

    if processor is not None:
        size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
        size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
        side = size.get("shortest_edge")
        hw = (size.get("height", side or 224), size.get("width", side or 224))
        mean, std = list(processor.image_mean), list(processor.image_std)
        cfg = {"input_size": (len(mean), *hw), "mean": tuple(mean), "std": tuple(std)}
        cfg.update(interpolation="bilinear", crop_pct=1.0, crop_mode="center")
    elif model is not None:
        cfg = resolve_data_config(model=getattr(model, "module", model))
    else:
        raise ValueError("data_config_for needs a model or an image processor")
    if image_size is not None:
        hw = _pair(image_size, "image_size")
        cfg = {**cfg, "input_size": (cfg["input_size"][0], *hw)}
    return cfg


def _pair(size: Sequence[int] | int, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = [size]
    size = [int(s) for s in size]
    if len(size) not in (1, 2) or any(s <= 0 for s in size):
        raise ValueError(f"{name} must be one or two positive ints (height width), got {size!r}")
    return (size[0], size[-1])


class ImageClassificationTransform:
    """Decode, transform and label a batch of a `datasets` image dataset, for `Dataset.with_transform` or
    `IterableDataset.map(batched=True)`. A class rather than a closure, so DataLoader workers can pickle it.

    Args:
        transform: a callable on one PIL image returning a `(C, H, W)` float tensor, e.g. timm's `create_transform`.
        image_column, label_column: the dataset's columns.
        mode: PIL mode every image is converted to first: `"RGB"` for 3 input channels, `"L"` for 1, whatever mode
            each image is stored in.

    Returns a batch `{"pixel_values": [tensor, ...], "labels": [tensor, ...]}`.
    """

    def __init__(self, transform, image_column: str, label_column: str, mode: str = "RGB"):
        self.transform, self.image_column, self.label_column, self.mode = transform, image_column, label_column, mode

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [self.transform(im.convert(self.mode)) for im in batch[self.image_column]],
            "labels": [torch.tensor(int(y)) for y in batch[self.label_column]],
        }


def image_transforms(data_config: dict, *, train_augment: bool = True) -> tuple:
    """`(train, eval)` transforms of one PIL image from a timm data config (`timm.data.create_transform`): random
    resized crop, flip and colour jitter for training; resize and centre crop for evaluation."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: data_config[k] for k in keys if k in data_config}
    return create_transform(**cfg, is_training=train_augment), create_transform(**cfg, is_training=False)


#: Set by `split_stream_by_node` on the stream it returns, as `(rank, world_size)`.
NODE_SPLIT_ATTR = "_hf_kdsearch_node_split"


def split_stream_by_node(dataset, rank: int, world_size: int):
    """This rank's part of a streaming `datasets.IterableDataset` (`datasets.distributed.split_dataset_by_node`).

    Whole shards go to each rank when the number of shards is a multiple of `world_size`; otherwise each rank keeps
    one example in `world_size`. The returned stream is marked, so that `NodeSplitLoaderMixin` loads it as it is
    instead of letting Accelerate shard it a second time.
    """
    from datasets.distributed import split_dataset_by_node

    part = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    setattr(part, NODE_SPLIT_ATTR, (rank, world_size))
    return part


class NodeSplitLoaderMixin:
    """A `Trainer` mixin: a training stream from `split_stream_by_node` is loaded as this rank's data, as it is.

    By default Accelerate either reads an `IterableDataset` on rank 0 and sends each rank a slice
    (`dispatch_batches`), or shards it once more per rank; a stream split by node would then lose data or be read
    by one process. This loader gives every rank its own part, decoded in its own DataLoader workers.
    """

    def get_train_dataloader(self):
        dataset = self.train_dataset
        split = getattr(dataset, NODE_SPLIT_ATTR, None)
        if split is None:
            return super().get_train_dataloader()
        if split != (self.args.process_index, self.args.world_size):
            raise ValueError(
                f"the training stream was split for rank {split[0]} of {split[1]}, but this process is rank "
                f"{self.args.process_index} of {self.args.world_size}"
            )
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        args = self.args
        loader = DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor,
        )
        # One process's view: no further sharding, batches moved to this rank's device.
        return prepare_data_loader(
            loader,
            device=self.accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
            non_blocking=args.dataloader_pin_memory,
        )
