"""Image data as batches of `pixel_values` and `labels`: the bundled MNIST digits, in-memory tensor datasets, and
image-classification datasets from the Hub or a local copy.

The bundled set (`assets/mnist10k.npz`, MIT licence beside it) holds 10,000 real MNIST digits. `load_mnist10k` gives
a fixed split, a seeded permutation with 8,000 samples for training and 2,000 held out, the same on every machine.

`load_image_dataset` reads a Hub id (`uoft-cs/cifar100`) or a local copy: parquet files, a folder written by
`save_to_disk`, or an image folder (`train/<class>/*.png`). `to_uint8_tensors` turns one split into a
`TensorImageDataset` of uint8 `(N, C, H, W)` images, the input of the GPU data path (`hf_kdsearch.fastpath`).

Before decoding, `prepare_labels` gives a training and an evaluation split's label set, checked: `encode_labels` turns
a string label column into class ids (the same sorted names in every split), and `check_labels` refuses labels outside
the label set and names the classes with no training example. Every image
goes through `to_mode`: 16-bit greyscale (Pillow's `I;16`, `I;16B`, `I`) is scaled to 8 bits, not clipped as Pillow's
own `convert("L")` does; an image that cannot be read (a truncated file) raises `ImageDecodeError` naming its file.

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
    "ImageDecodeError",
    "LabelError",
    "load_image_dataset",
    "encode_labels",
    "check_labels",
    "label_array",
    "prepare_labels",
    "to_mode",
    "decode_image",
    "undecoded",
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
        from huggingface_hub import constants

        reason = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else "the Hugging Face Hub could not be reached or has no such repo"
        )
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


# ---- labels --------------------------------------------------------------------------------------------------------
class LabelError(DatasetLoadError, ValueError):
    """A label column that cannot serve as class ids: strings in a stream, labels outside the label set, gaps.
    A `DatasetLoadError` (the dataset cannot be used as it is) and a `ValueError`."""


def _is_string(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def encode_labels(splits, label_column: str):
    """Splits whose string label column (`"cat"`, `"dog"`) becomes a `ClassLabel` column, with the same names in
    every split: the sorted union of the values of all splits, so class ids agree between training and evaluation.

    Args:
        splits: a `DatasetDict` or dict of split name -> `datasets.Dataset`, or a list/tuple of datasets.
        label_column: the label column; a `ClassLabel` or integer column is returned unchanged.

    Returns:
        The same kind of container with the label column cast to `ClassLabel(names=...)`.

    Raises:
        LabelError: the column is neither strings nor integers, or it holds strings in a streaming dataset (its class
            names are unknown before reading it all), or a missing (None) label.
    """
    import datasets

    items = list(splits.items()) if isinstance(splits, dict) else list(enumerate(splits))
    features = [ds.features[label_column] for _, ds in items]
    if not any(_is_string(f) for f in features):
        for f in features:
            if not isinstance(f, datasets.ClassLabel) and not (
                isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint"))
            ):
                raise LabelError(
                    f"the label column {label_column!r} holds {f!r}, not class labels; pass a column of class names "
                    "or ids with --label_column"
                )
        return splits
    if any(isinstance(ds, datasets.IterableDataset) for _, ds in items):
        raise LabelError(
            f"the label column {label_column!r} holds strings, and a stream's class names are unknown before reading "
            "it all; cast it to datasets.ClassLabel(names=...) first, or pass a column of class ids with --label_column"
        )
    values: set = set()
    for _, ds in items:
        if _is_string(ds.features[label_column]):
            values.update(ds.unique(label_column))
    if None in values:
        raise LabelError(f"the label column {label_column!r} has examples without a label (None); drop them first")
    names = sorted(values)
    label = datasets.ClassLabel(names=names)
    encoded = [
        (k, ds.cast_column(label_column, label) if _is_string(ds.features[label_column]) else ds) for k, ds in items
    ]
    if isinstance(splits, dict):
        return type(splits)(encoded) if isinstance(splits, datasets.DatasetDict) else dict(encoded)
    return type(splits)(ds for _, ds in encoded)


def check_labels(
    train_labels,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    eval_labels=None,
    inferred: bool = False,
    column: str = "label",
    log=None,
) -> list[int]:
    """Check a label set before a model of `num_classes` outputs is built for it; return the classes that have no
    training example.

    Args:
        train_labels, eval_labels: the training and evaluation labels: a tensor, an array, a list, or a `datasets`
            column (`dataset["label"]`, read through Arrow). `train_labels=None` (a stream) checks the evaluation
            labels only.
        num_classes: the size of the label set (the model's head).
        class_names: the names of the classes, used in the messages.
        inferred: `num_classes` was read off the data (largest label + 1), so a class without a training example is
            most likely an outlier label, and is an error rather than a warning.
        column: the label column, for the messages.
        log: called with the warning text (default: `logging.warning`).

    Raises:
        LabelError: a label < 0 or >= `num_classes`, or (with `inferred`) classes with no training example.
    """
    import logging

    train = None if train_labels is None else _int64(train_labels)
    if train is not None and train.numel() == 0:
        raise LabelError("the training split is empty")
    for split, labels in (("training", train), ("evaluation", eval_labels)):
        if labels is None:
            continue
        labels = _int64(labels)
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            values, counts = bad.unique(return_counts=True)
            listed = ", ".join(f"{v} ({c} example{'s' * (c > 1)})" for v, c in zip(values.tolist(), counts.tolist()))
            hint = "fix or drop those examples, or pass the label set's size with --num_labels"
            if (bad < 0).any():
                hint = (
                    "a negative label such as -1 usually marks unlabelled examples (a test split): evaluate on "
                    "another split (--eval_split) or hold out part of train (--validation_split_percentage)"
                )
            raise LabelError(
                f"the {split} split's label column {column!r} holds labels outside 0..{num_classes - 1}: {listed}"
                + (f" (the class names are {_short(class_names)})" if class_names else "")
                + f"; {hint}"
            )
    if train is None:  # a stream: its training labels are not known before training
        return []
    counts = torch.bincount(train, minlength=num_classes)
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if not empty:
        return empty
    named = _short([f"{c} ({class_names[c]})" if class_names else str(c) for c in empty])
    if inferred:
        present = (counts > 0).nonzero().flatten().tolist()
        rare = [c for c in present if counts[c] <= max(1, int(0.01 * counts.max()))]
        raise LabelError(
            f"the label column {column!r} holds labels 0..{num_classes - 1}, so the model would get {num_classes} "
            f"outputs, but {len(empty)} of those classes have no training example: {named}"
            + (f"; labels {_short(rare)} are rare (outliers?)" if rare else "")
            + ". Fix the outlier labels, or pass --num_labels to keep the empty classes"
        )
    message = (
        f"{len(empty)} of the {num_classes} classes of {column!r} have no training example: {named}; the model "
        "cannot learn them"
    )
    (log or logging.getLogger(__name__).warning)(message)
    return empty


def prepare_labels(train, evaluation, label_column: str, *, num_labels: int | None = None, log=None) -> tuple:
    """The label set of a training and an evaluation split, checked: `(train, evaluation, num_classes, names)`.

    String labels become class labels (`encode_labels`, the same names in both splits). The number of classes is the
    `ClassLabel`'s, else `num_labels`, else the largest label + 1 (then a class with no training example is an error:
    `check_labels` with `inferred=True`). Labels outside the set are refused; classes without a training example are
    named (`log`, default `logging.warning`). A streaming training split (`datasets.IterableDataset`) needs a
    `ClassLabel` column or `num_labels`, and only its evaluation labels are checked.

    Args:
        train, evaluation: `datasets.Dataset`s (the training split may be an `IterableDataset`).
        label_column: the label column, e.g. from `find_columns`.
        num_labels: the label set's size, for plain integer labels (`--num_labels`).

    Raises:
        LabelError: strings in a stream, a `num_labels` that disagrees with the names or the labels, plain integers
            in a stream without `num_labels`, labels outside the set, or (inferred size) classes without an example.
    """
    import datasets

    train, evaluation = encode_labels([train, evaluation], label_column)
    names = class_names(train.features, label_column)
    streaming = isinstance(train, datasets.IterableDataset)
    if names is not None and num_labels is not None and num_labels != len(names):
        raise LabelError(f"--num_labels {num_labels} but {label_column!r} names {len(names)} classes")
    train_labels = None if streaming else label_array(train, label_column)
    eval_labels = label_array(evaluation, label_column)
    if names is not None:
        num_classes = len(names)
    elif num_labels is not None:
        num_classes = num_labels
    elif streaming:
        raise LabelError(
            f"the label column {label_column!r} holds plain integers, and a stream's largest label is unknown before "
            "reading it all: pass --num_labels"
        )
    else:
        num_classes = int(max(train_labels.max(initial=-1), eval_labels.max(initial=-1))) + 1
    inferred = names is None and num_labels is None
    check_labels(
        train_labels,
        num_classes,
        class_names=names,
        eval_labels=eval_labels,
        inferred=inferred,
        column=label_column,
        log=log,
    )
    return train, evaluation, num_classes, names


def _int64(labels) -> torch.Tensor:
    if hasattr(labels, "source") and hasattr(labels, "column_name"):  # a datasets `Column`: read it through Arrow
        labels = label_array(labels.source, labels.column_name)
    return torch.as_tensor(np.asarray(labels, dtype=np.int64)).flatten()


def _short(items: Sequence, n: int = 10) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def label_array(dataset, label_column: str) -> np.ndarray:
    """The label column of a `datasets.Dataset` as an int64 array, read through Arrow in one go (a `Column` read
    element by element takes seconds per 50,000 labels).

    Raises:
        LabelError: the column holds strings (encode them with `encode_labels`), missing values or non-integers.
    """
    if _is_string(dataset.features[label_column]):
        raise LabelError(
            f"the label column {label_column!r} holds strings, not class ids; encode it first "
            f"(hf_kdsearch.data.encode_labels) or pass a column of class ids with --label_column"
        )
    try:
        column = dataset.select_columns([label_column]).with_format("arrow")[:][label_column]
        return np.array(column.to_numpy(), dtype=np.int64)  # a writable copy
    except (TypeError, ValueError) as err:
        raise LabelError(
            f"the label column {label_column!r} does not hold integer class ids ({err}); pass another with "
            "--label_column"
        ) from err


# ---- images ----------------------------------------------------------------------------------------------------------
class ImageDecodeError(DatasetLoadError, ValueError):
    """An image that cannot be read (a truncated or corrupt file); the message names its file, or its index.
    A `DatasetLoadError` and a `ValueError`."""


#: Pillow modes of 16-bit greyscale; `to_mode` divides them by 257 (65535 -> 255).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_mode(image, mode: str):
    """`image` (a PIL image) in the Pillow mode `mode` (`"RGB"` or `"L"`), with 16-bit greyscale scaled to 8 bits.

    Pillow's own `convert("L")`/`convert("RGB")` of a 16-bit image clips at 255, which turns every non-zero pixel of
    a 16-bit PNG white. Here `I;16`, `I;16L`, `I;16B` and `I;16N` are divided by 257 (so 65535 becomes 255); 32-bit
    `I` images whose values lie in 0..65535 (how older Pillow opens 16-bit PNGs) likewise, and any other `I` image
    is scaled from its own minimum and maximum to 0..255. Every other mode goes through `Image.convert`.
    """
    from PIL import Image

    if image.mode in WIDE_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode in WIDE_MODES or (lo >= 0 and hi <= 65535):
            values = values / 257
        else:
            values = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def decode_image(item, *, column: str = "image", index: int | None = None, label=None):
    """A fully loaded PIL image from a `datasets.Image(decode=False)` item (`{"bytes": ..., "path": ...}`), or a PIL
    image as it is.

    Raises:
        ImageDecodeError: the image cannot be read (a truncated file, not an image); the message names its file, or,
            for an image stored as bytes without a name, its index (when given), column and label.
    """
    import io

    from PIL import Image

    if not isinstance(item, dict):
        return item
    data, path = item.get("bytes"), item.get("path")
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()  # decode now: a truncated file fails here, not in a later transform
        return image
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for a bad file
        if path and data is None:
            where = f"the image file {path!r}"
        elif path:
            where = f"the image {path!r} stored in column {column!r}"
        else:
            where = f"the image stored as bytes in column {column!r}"
        if index is not None:
            where += f" (example {index})"
        elif label is not None:
            where += f" (label {label})"
        raise ImageDecodeError(f"cannot read {where}: {type(err).__name__}: {err}; fix or remove it") from err


def undecoded(dataset, image_column: str):
    """`dataset` (a `datasets.Dataset` or `IterableDataset`) with its image column left as file references
    (`datasets.Image(decode=False)`), for `ImageClassificationTransform`: it then decodes each image itself, so that
    an unreadable image is named by its file, and 16-bit images are scaled (`to_mode`)."""
    import datasets

    return dataset.cast_column(image_column, datasets.Image(decode=False))


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

    Each image is read with Pillow and converted by `to_mode` (16-bit greyscale is scaled to 8 bits, not clipped).

    Args:
        dataset: one split, with an `Image` column and an integer label column.
        image_column: defaults to the first `Image` column (`img` in CIFAR-100, `image` in an image folder).
        label_column: defaults to the first `ClassLabel` column (`fine_label` in CIFAR-100, `label` in an image
            folder). A string column must go through `encode_labels` first.
        channels: 3 decodes as RGB, 1 as greyscale, whatever the stored mode.

    Returns:
        `(TensorImageDataset(images, labels), class_names)`; `class_names` comes from the label's `ClassLabel`
        feature, or is None when the label column is plain integers.

    Raises:
        ImageDecodeError: an image cannot be read; the message names its file (or its index and column).
        LabelError: the label column holds strings or other non-integers.
        ValueError: the images differ in size, or the split is empty.
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
    labels = label_array(dataset, label_column)
    mode = "RGB" if channels == 3 else "L"
    raw = undecoded(dataset.select_columns([image_column]), image_column)
    chunks, shape = [], None
    for start in tqdm(range(0, len(raw), batch_size), desc=desc, unit="batch"):
        arrays = []
        for j, item in enumerate(raw[start : start + batch_size][image_column]):
            array = np.asarray(to_mode(decode_image(item, column=image_column, index=start + j), mode))
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                sizes = sorted({shape[:2], array.shape[:2]})
                raise ValueError(
                    f"images in column {image_column!r} differ in size {sizes} (example {start + j}); resize them to "
                    "one size first"
                )
            arrays.append(array)
        images = np.stack(arrays)
        chunks.append(torch.from_numpy(images if images.ndim == 4 else images[..., None]).permute(0, 3, 1, 2))
    return TensorImageDataset(torch.cat(chunks).contiguous(), torch.from_numpy(labels)), class_names


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
                if isinstance(features.get(c), datasets.Value)
                and (features[c].dtype.startswith(("int", "uint")) or _is_string(features[c]))
            ),
            None,
        )
        if label_column is None:
            raise ValueError(
                f"the dataset has no label column (no ClassLabel column, no integer or string column named one of "
                f"{list(LABEL_COLUMN_NAMES)}); its columns and types are {columns}. Name it with --label_column."
            )
    return image_column, label_column


def class_names(features, label_column: str) -> list[str] | None:
    """The class names of a `ClassLabel` column, or None for plain integers.

    Raises:
        LabelError: the column holds strings (encode them with `encode_labels` first) or other non-integers.
    """
    import datasets

    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if _is_string(feature):
        raise LabelError(
            f"the label column {label_column!r} holds strings, not class ids; encode it first "
            f"(hf_kdsearch.data.encode_labels) or pass a column of class ids with --label_column"
        )
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise LabelError(
            f"the label column {label_column!r} holds {feature!r}, not class labels; pass another with --label_column"
        )
    return None


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

    Images come decoded (PIL images) or, from a dataset passed through `undecoded`, as file references that are
    decoded here, so that an unreadable image raises `ImageDecodeError` naming its file. Either way each goes through
    `to_mode`: 16-bit greyscale is scaled to 8 bits, not clipped.

    Returns a batch `{"pixel_values": [tensor, ...], "labels": [tensor, ...]}`.
    """

    def __init__(self, transform, image_column: str, label_column: str, mode: str = "RGB"):
        self.transform, self.image_column, self.label_column, self.mode = transform, image_column, label_column, mode

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        labels = batch[self.label_column]
        images = [
            to_mode(decode_image(im, column=self.image_column, label=y), self.mode)
            for im, y in zip(batch[self.image_column], labels)
        ]
        return {
            "pixel_values": [self.transform(im) for im in images],
            "labels": [torch.tensor(int(y)) for y in labels],
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
