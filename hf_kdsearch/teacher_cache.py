"""`TeacherCache`: the teacher's outputs on R augmented views of every training image, computed once and replayed.

In plain KD the teacher runs a forward pass on every sample of every epoch. Following FKD (Shen & Xing, ECCV 2022,
"A Fast Knowledge Distillation Framework for Visual Recognition"), the cache stores, for each training image, the
parameters of R random views (crop offsets, flip) and the teacher's logits on each. Training from the cache replays,
each epoch, one of the R stored views of each sample, with exactly its stored parameters, so teacher and student see
the same augmented image (Beyer et al., CVPR 2022, show why a cache of one fixed view per image hurts) and the
teacher never runs again.

```python
from hf_kdsearch import DistillationTrainer, TeacherCache

cache = TeacherCache.build_or_load("cache/", teacher, train_dataset, args, num_views=4, student=student)
trainer = DistillationTrainer(model=student, teacher_cache=cache, args=args, train_dataset=train_dataset)
```

- The teacher runs through `Teacher`, as in online KD: the same re-normalisation from the student's statistics into
  the teacher's, resize to `teacher_image_size`, dtype, autocast and device placement (`Teacher.from_args`).
- The build measures the teacher's accuracy on every stored view against the labels and writes it to the card; a
  teacher near chance or far below its model card is refused (`TeacherAccuracyCheck`) before anything is stored. A
  training set whose items change between reads (a random host-side transform) is refused (`check_replayable`), and
  so is a logit that is not finite once cast to `logits_dtype`.
- Under `accelerate launch` with N processes each rank runs the teacher on its share of the batches (batch b on rank
  b mod N); the shares are gathered, so every rank holds the whole cache, equal bit for bit to a 1-process build.
  `build_or_load` writes it once (the main process, atomically) and reuses a matching one without a teacher forward.
- The cache is a `datasets.Dataset` (`cache.dataset`), one row per training sample: `crop` (R, 2) int16 offsets,
  `flip` (R,) bool, and `logits` (R, C) float16 (or float32), or `topk_values` (R, k) float16 and `topk_indices`
  (R, k) int32. `cache.info` is its card: the teacher and its weights' fingerprint, R, the augmentation, k, the
  teacher's measured accuracy, the dataset's size and fingerprint.
- `args` (`DistillationArguments`) defines the augmentation, as on the device data path: with `device_augment=True`
  a view is a random crop of `augment_padding` and a flip if `augment_flip`; without it, the only view is the image as
  the dataset holds it (`num_views=1`).
- Training: `TeacherCache` is a `TeacherSource`. `DistillationTrainer` binds it to the run (`bind`: the dataset, class
  count, augmentation and callbacks must fit) and wraps the training set so that every batch carries `sample_index`;
  the view of sample i in epoch e is `view_ids(e)[i]`, drawn from `args.seed` and e alone, so gradient accumulation,
  DDP (each rank looks up its own samples) and resuming from a checkpoint all see the same views.
- With `top_k=k < C` the teacher's distribution is truncated to its k largest logits and renormalised over them (the
  others get probability 0); with k = C it is exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_folder
from .batch import SampleIndexDataset, num_classes, sample_index
from .config import DistillationArguments, upcast_arguments
from .data import collate_tensor_batch
from .fastpath import DeviceAugment, draw_crop_flip
from .teacher import DistillationRun, ImageStats, Teacher, TeacherAccuracyCheck, TeacherSource, image_stats

#: The README.md of a saved or pushed cache.
CARD_TEMPLATE = Path(__file__).parent / "templates" / "teacher_cache_card.md"

__all__ = ["TeacherCache", "CachedTeacher", "TeacherCacheError", "check_replayable", "dataset_fingerprint"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INFO_FILE = "teacher_cache.json"
#: Logits outside the stored top k sit this far below the k-th largest: probability 0 at any usual temperature.
TOPK_GAP = 1e4
#: What `build_or_load` compares between a cache on disk and the run before reusing it.
MATCHED_KEYS = (
    "teacher",
    "teacher_fingerprint",
    "teacher_image_size",
    "num_views",
    "top_k",
    "logits_dtype",
    "augmentation",
    "num_classes",
    "num_samples",
    "dataset_fingerprint",
)


class TeacherCacheError(ValueError):
    """The cache does not fit the run (other dataset, class count, augmentation), is incomplete, or cannot be built
    (a dataset that cannot be replayed, logits out of the storage dtype's range)."""


def dataset_fingerprint(dataset: Any) -> str:
    """A fingerprint of a training set's content, to tell a cache's dataset from another of the same size.

    - tensor datasets (`images`, `labels`: `TensorImageDataset`, `DeviceImageDataset`): SHA-256 of both tensors;
    - `datasets.Dataset`: its own `_fingerprint`, which follows its content and transforms;
    - anything else: SHA-256 of the first, middle and last items' tensors and numbers.
    """
    dataset = SampleIndexDataset.unwrap(dataset)
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    digest = hashlib.sha256()
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        for t in (images, labels):
            _hash_tensor(digest, t)
        return "sha256:" + digest.hexdigest()
    if isinstance(getattr(dataset, "_fingerprint", None), str):
        return "datasets:" + dataset._fingerprint
    n = len(dataset)
    for i in sorted({0, n // 2, n - 1}):
        for key, value in sorted(dict(dataset[i]).items()):
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            digest.update(key.encode() + value.tobytes())
    return "items:" + digest.hexdigest()


def _hash_tensor(digest: Any, t: torch.Tensor) -> None:
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _teacher_fingerprint(module: nn.Module) -> str:
    """SHA-256 of the teacher's parameters and buffers (BatchNorm's step counters aside, which its outputs ignore):
    two teachers of one architecture are told apart."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        digest.update(name.encode())
        _hash_tensor(digest, t)
    return "sha256:" + digest.hexdigest()


# ---- what can be replayed -------------------------------------------------------------------------------------------
_REPLAY_FIX = (
    "Move the random augmentation to the device (device_augment=True with augment_padding/augment_flip: the cache "
    "stores each view's parameters and training replays them), apply a deterministic transform once with "
    "Dataset.map, or distil online (teacher_model=), where teacher and student see each fresh view together."
)


def check_replayable(dataset: Any, probes: int = 8) -> None:
    """Refuse a training set whose items change from one read to the next: the cache stores the teacher's outputs on
    one read, and training would show the student another.

    A `datasets.Dataset` with a transform applied at every read (`with_transform`, `set_transform`) is refused as
    such; any dataset has `probes` items, spread over it, read twice and compared. Raises `TeacherCacheError`.
    """
    dataset = SampleIndexDataset.unwrap(dataset)
    fmt = getattr(dataset, "format", None)
    if isinstance(fmt, Mapping) and fmt.get("type") == "custom":
        transform = (fmt.get("format_kwargs") or {}).get("transform")
        name = getattr(transform, "__name__", type(transform).__name__)
        raise TeacherCacheError(
            f"the training set is a datasets.Dataset with a transform ({name}, set by with_transform or "
            "set_transform) that runs at every read, so the images the teacher is run on now need not be the ones "
            "the student is shown later: a teacher cache cannot replay them. " + _REPLAY_FIX
        )
    n = len(dataset)
    for i in sorted({round(k * (n - 1) / max(probes - 1, 1)) for k in range(probes)}):
        if not _same(dataset[i], dataset[i]):
            raise TeacherCacheError(
                f"the training set returned different items for index {i} on two reads (a random transform on the "
                "host?), so the stored teacher outputs would belong to other images than the student sees: a "
                "teacher cache cannot replay it. " + _REPLAY_FIX
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if isinstance(b, torch.Tensor):
        b = b.detach().cpu().numpy()
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except ValueError:  # ragged nested lists
        return bool(a == b)


# ---- building -------------------------------------------------------------------------------------------------------
def _plan(
    teacher: Any,
    train_dataset: Any,
    args: Any,
    num_views: int,
    top_k: int | None,
    *,
    student: nn.Module | None,
    logits_dtype: str,
    teacher_name: str | None,
    seed: int | None,
) -> tuple[Teacher, DeviceAugment | None, dict[str, Any]]:
    """The `Teacher` as online KD would run it, the views' augmentation, and the card of the cache to build (without
    what only the teacher pass tells: the accuracy; `num_classes` when the teacher does not say)."""
    if not (isinstance(num_views, int) and num_views >= 1):
        raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
    if logits_dtype not in ("float16", "float32"):
        raise ValueError(f"logits_dtype must be 'float16' or 'float32', got {logits_dtype!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    source = teacher if isinstance(teacher, Teacher) else Teacher.from_args(teacher, args, name=teacher_name)
    augment = DeviceAugment.from_args(args, student if student is not None else source.module)
    if augment is None and num_views > 1:
        raise ValueError(
            f"num_views={num_views} needs random views, but args.device_augment is off, so every view would be the "
            "same image: use num_views=1, or device_augment=True (uint8 images, crop and flip on the device)"
        )
    if augment is not None and augment.padding == 0 and not augment.flip and num_views > 1:
        raise ValueError(f"num_views={num_views} but the augmentation draws nothing (augment_padding=0, no flip)")
    # What the student is fed, as the trainer reads it: explicit image_mean/image_std, else the student's own.
    mean, std = args.image_mean, args.image_std
    if student is not None:
        stats = image_stats(student, mean=mean, std=std)
    elif mean is not None and std is not None:
        stats = ImageStats(tuple(map(float, mean)), tuple(map(float, std)), "explicit arguments")
    elif augment is not None:
        stats = ImageStats(augment.mean, augment.std, "the device augmentation's normalisation")
    else:
        stats = None
    source.expect_student(stats, num_classes(student) if student is not None else None)
    size = source.image_size
    info = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_name or source.name,
        "teacher_fingerprint": _teacher_fingerprint(source.module),
        "teacher_image_size": [size] if isinstance(size, int) else list(size) if size else None,
        "num_views": num_views,
        "num_samples": len(train_dataset),
        "num_classes": source.num_classes,
        "top_k": top_k,
        "logits_dtype": logits_dtype,
        "augmentation": augment.augmentation if augment is not None else None,
        "image_mean": list(augment.mean) if augment is not None else None,
        "image_std": list(augment.std) if augment is not None else None,
        "dataset_fingerprint": dataset_fingerprint(train_dataset),
        "seed": args.seed if seed is None else seed,
    }
    return source, augment, info


def _teacher_pass(
    source: Teacher,
    train_dataset: Any,
    args: Any,
    augment: DeviceAugment | None,
    num_views: int,
    seed: int,
    batch_size: int,
    collate: Callable,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Crop offsets `(N, R, 2)` int16, flips `(N, R)`, the teacher's float32 logits `(N, R, C)` and the labels `(N,)`,
    all on the CPU and on every rank.

    The views are drawn up front on the CPU from `seed` alone, so they do not depend on the device or the number of
    processes. Batch b (samples `[b * batch_size, (b + 1) * batch_size)`) runs on rank `b % world_size`, the same
    batches in any launch, so the logits are those of a 1-process build bit for bit. No host sync per batch.
    """
    from accelerate import Accelerator

    _ = args.device  # TrainingArguments set up Accelerate's state here; the trainer's Accelerator then agrees with ours
    accelerator = Accelerator(mixed_precision=getattr(args, "mixed_precision", None) or "no", cpu=args.use_cpu)
    source.prepare(accelerator)
    device = accelerator.device
    n = len(train_dataset)
    crops = flips = None
    if augment is not None:
        generator = torch.Generator().manual_seed(int(seed))
        offsets, mirror = draw_crop_flip(n * num_views, augment.padding, augment.flip, generator=generator)
        crops = offsets.view(n, num_views, 2).to(torch.int16) if offsets is not None else None
        flips = mirror.view(n, num_views) if mirror is not None else None
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = range(rank, -(-n // batch_size), world)
    outs = []
    bar = tqdm(total=len(mine) * num_views, desc="teacher cache", unit="batch", disable=not accelerator.is_main_process)
    with bar:
        for b in mine:
            lo, hi = b * batch_size, min((b + 1) * batch_size, n)
            batch = _batch(train_dataset, list(range(lo, hi)), collate)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            views = []
            for r in range(num_views):
                inputs = batch
                if augment is not None:
                    offsets = crops[lo:hi, r].to(device) if crops is not None else None
                    mirror = flips[lo:hi, r].to(device) if flips is not None else None
                    inputs = augment.replay(batch, offsets, mirror)
                views.append(source.logits(inputs).float())  # kept on the device: no host sync per batch
                bar.update(1)
            labels = batch.get("labels")
            labels = labels if isinstance(labels, torch.Tensor) and labels.ndim == 1 else None
            outs.append((b, torch.stack(views, dim=1), labels))
    shards = [(b, v.cpu(), y.cpu() if y is not None else None) for b, v, y in outs]
    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object(shards)
    shards.sort(key=lambda shard: shard[0])
    logits = torch.cat([v for _, v, _ in shards])
    labels = None if any(y is None for _, _, y in shards) else torch.cat([y for _, _, y in shards])
    return crops, flips, logits, labels


def _batch(dataset: Any, indices: list[int], collate: Callable) -> dict[str, Any]:
    getitems = getattr(dataset, "__getitems__", None)
    batch = getitems(indices) if getitems is not None else [dataset[i] for i in indices]
    return dict(batch) if isinstance(batch, Mapping) else collate(batch)


def _measured_accuracy(source: Teacher, logits: torch.Tensor, labels: torch.Tensor | None, args: Any) -> float | None:
    """The teacher's top-1 accuracy on every stored view; `TeacherCheckError` when near chance or far below its card
    (unless `args.check_teacher_accuracy` is False, which measures without judging)."""
    if labels is None or labels.is_floating_point():
        return None
    n, r, c = logits.shape
    check = TeacherAccuracyCheck(
        reported=source.reported_accuracy,
        scope=f"all {{n}} stored views ({r} per sample)",
        strict=args.check_teacher_accuracy,
        hint=" Nothing was stored: the cache was not built.",
    )
    batch = {"labels": labels.repeat_interleave(r)}
    flat = logits.reshape(n * r, c)
    if not check.applies_to(flat, batch):
        return None
    check.update(flat, batch)
    return check.result()


def _cast(values: torch.Tensor, dtype: str, what: str) -> np.ndarray:
    stored = values.to(torch.float16 if dtype == "float16" else torch.float32)
    bad = int((~torch.isfinite(stored)).sum())
    if bad:
        raise TeacherCacheError(
            f"{bad} of {stored.numel()} stored {what} are not finite after the cast to logits_dtype={dtype!r}: the "
            f"teacher's logits reach {float(values.abs().max()):.6g}, beyond the float16 range (65504). Build the "
            "cache with logits_dtype='float32'."
        )
    return stored.numpy()


class TeacherCache(TeacherSource):
    """The teacher's logits on `num_views` stored augmented views of every training sample; see the module docstring.

    Build it with `TeacherCache.build` (or `build_or_load`), reload it with `load_from_disk` / `load_from_hub`, and
    pass it to `DistillationTrainer(teacher_cache=...)` instead of a teacher.

    Attributes:
        dataset: the `datasets.Dataset`, one row per training sample.
        info: the card: `teacher`, `teacher_fingerprint`, `teacher_image_size`, `num_views`, `num_samples`,
            `num_classes`, `top_k`, `logits_dtype`, `augmentation` (`{"padding", "flip"}` or None), `image_mean`,
            `image_std`, `teacher_accuracy` (on every stored view), `dataset_fingerprint`, `seed`, `format_version`.
    """

    #: Stored outputs exist for the training views only: evaluation computes the task loss alone.
    answers_evaluation = False

    def __init__(self, dataset: Any, info: dict[str, Any]):
        self.dataset = dataset
        self.info = dict(info)
        self._check_columns()
        self._tensors: dict[str, torch.Tensor] | None = None
        self._replay: CachedTeacher | None = None

    # ---- building --------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        teacher: nn.Module | str | Teacher,
        train_dataset: Any,
        args: Any,
        num_views: int = 4,
        top_k: int | None = None,
        *,
        student: nn.Module | None = None,
        batch_size: int | None = None,
        logits_dtype: str = "float16",
        data_collator: Callable | None = None,
        teacher_name: str | None = None,
        seed: int | None = None,
    ) -> TeacherCache:
        """Run the teacher once over `num_views` random views of every sample of `train_dataset`, with a progress bar.

        Under `accelerate launch` with several processes, each runs its share of the batches and all get the whole
        cache. Nothing is written to disk (`save_to_disk`, or `build_or_load`).

        Args:
            teacher: an `nn.Module`, a local folder, a Hub id or a timm name (as `DistillationTrainer` takes), or a
                `Teacher`. It is run through `Teacher.from_args(teacher, args)`, exactly as online KD runs it.
            train_dataset: the training set, in the order training will index it (map-style), replayable: an item
                read twice is the same (`check_replayable`).
            args: the run's `DistillationArguments`: `device_augment`, `augment_padding`, `augment_flip`,
                `image_mean`/`image_std` (default: the student's, else the teacher's `pretrained_cfg`), the teacher's
                settings (`teacher_image_mean`/`teacher_image_std`, `teacher_image_size`, `teacher_dtype`), `bf16`/
                `fp16`, `check_teacher_accuracy`, `seed`, device.
            num_views: R, the views stored per sample; 1 without augmentation.
            top_k: store the k largest logits and their classes instead of all C; None stores all.
            student: the student, when it is at hand: its statistics and class count, as the trainer reads them.
            batch_size: images per teacher forward; default the larger of the train and eval batch sizes.
            logits_dtype: `"float16"` (default, half the memory) or `"float32"`, for stored logits and top-k values.
            data_collator: turns a list of items into a batch dict; default: stack tensors.
            teacher_name: the teacher as the card names it; default `Teacher.name` (the string given, the folder or
                Hub id it was loaded from, or the timm architecture).
            seed: seed of the views' parameters; default `args.seed`.

        Raises `TeacherCheckError` (a teacher near chance or far below its card), `TeacherCacheError` (a dataset that
        cannot be replayed, logits beyond `logits_dtype`) and `FloatingPointError` (non-finite logits).
        """
        args = upcast_arguments(args, DistillationArguments)
        plan = _plan(
            teacher,
            train_dataset,
            args,
            num_views,
            top_k,
            student=student,
            logits_dtype=logits_dtype,
            teacher_name=teacher_name,
            seed=seed,
        )
        return cls._build(*plan, train_dataset, args, batch_size, data_collator)

    @classmethod
    def build_or_load(
        cls,
        path: str | os.PathLike,
        teacher: nn.Module | str | Teacher,
        train_dataset: Any,
        args: Any,
        num_views: int = 4,
        top_k: int | None = None,
        **kwargs: Any,
    ) -> TeacherCache:
        """The cache at `path` when it was built for this run (read without any teacher forward), else one built
        with `build(...)` and saved there, atomically, by the main process.

        A cache at `path` built for something else (another teacher or teacher weights, R, k, dtype, augmentation,
        class count or dataset: `MATCHED_KEYS`) is refused with a `TeacherCacheError` naming both values, before
        anything is trained. Takes `build`'s arguments.
        """
        path = os.path.abspath(os.fspath(path))
        args = upcast_arguments(args, DistillationArguments)
        source, augment, info = _plan(
            teacher,
            train_dataset,
            args,
            num_views,
            top_k,
            student=kwargs.pop("student", None),
            logits_dtype=kwargs.pop("logits_dtype", "float16"),
            teacher_name=kwargs.pop("teacher_name", None),
            seed=kwargs.pop("seed", None),
        )
        if os.path.isfile(os.path.join(path, INFO_FILE)):
            cache = cls.load_from_disk(path)
            cache.check_matches(info, where=path)
            logger.info("reusing the teacher cache at %s: %r", path, cache)
            return cache
        cache = cls._build(source, augment, info, train_dataset, args, kwargs.pop("batch_size", None), **kwargs)
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            cache.save_to_disk(path)
        state.wait_for_everyone()
        return cache

    @classmethod
    def _build(
        cls,
        source: Teacher,
        augment: DeviceAugment | None,
        info: dict[str, Any],
        train_dataset: Any,
        args: Any,
        batch_size: int | None = None,
        data_collator: Callable | None = None,
    ) -> TeacherCache:
        check_replayable(train_dataset)
        num_views, top_k, logits_dtype = info["num_views"], info["top_k"], info["logits_dtype"]
        batch_size = batch_size or max(args.per_device_train_batch_size, args.per_device_eval_batch_size)
        crops, flips, logits, labels = _teacher_pass(
            source,
            train_dataset,
            args,
            augment,
            num_views,
            info["seed"],
            batch_size,
            data_collator or collate_tensor_batch,
        )
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                "the teacher returned non-finite logits while building the cache; check its weights, its input "
                "normalisation (image_mean/image_std, teacher_image_mean/teacher_image_std) and its precision"
            )
        classes = logits.shape[-1]
        if top_k is not None and top_k > classes:
            raise ValueError(f"top_k must be an int in [1, {classes}] (the teacher's classes) or None, got {top_k}")
        accuracy = _measured_accuracy(source, logits, labels, args)
        columns: dict[str, np.ndarray] = {}
        if crops is not None:
            columns["crop"] = crops.numpy()
        if flips is not None:
            columns["flip"] = flips.numpy()
        if top_k is None:
            columns["logits"] = _cast(logits, logits_dtype, "logits")
        else:
            values, indices = logits.topk(top_k, dim=-1)
            columns["topk_values"] = _cast(values, logits_dtype, "top-k logits")
            columns["topk_indices"] = indices.to(torch.int32).numpy()
        return cls(_to_dataset(columns), {**info, "num_classes": classes, "teacher_accuracy": accuracy})

    def check_matches(self, expected: Mapping[str, Any], where: str = "") -> None:
        """Raise `TeacherCacheError` naming every key of `MATCHED_KEYS` where this cache's card differs from
        `expected` (a card `build` would write for the run); a class count the teacher does not tell is not compared."""
        differ = [
            f"{key}: the cache has {self.info.get(key)!r}, this run {expected.get(key)!r}"
            for key in MATCHED_KEYS
            if not (key == "num_classes" and expected.get(key) is None)
            and _canonical(self.info.get(key)) != _canonical(expected.get(key))
        ]
        if differ:
            raise TeacherCacheError(
                f"the teacher cache {'at ' + repr(where) + ' ' if where else ''}was built for another run ("
                + "; ".join(differ)
                + "). Pass another cache path, or delete that folder to rebuild it."
            )

    # ---- what it holds -----------------------------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return int(self.info["num_views"])

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def top_k(self) -> int | None:
        return self.info["top_k"]

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        k = f"top-{self.top_k}" if self.top_k else f"all {self.num_classes} classes"
        return (
            f"TeacherCache(teacher={self.info['teacher']!r}, samples={len(self)}, views={self.num_views}, {k}, "
            f"augmentation={self.info['augmentation']}, "
            f"teacher accuracy on the stored views={_accuracy_text(self.info.get('teacher_accuracy'))})"
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The columns as CPU tensors: `crop` (N, R, 2), `flip` (N, R), `logits` (N, R, C) or top-k (N, R, k)."""
        if self._tensors is None:
            self._tensors = {name: _column_tensor(self.dataset, name) for name in self.dataset.column_names}
        return self._tensors

    def _check_columns(self) -> None:
        missing = [
            key for key in ("num_views", "num_samples", "num_classes", "top_k", "augmentation") if key not in self.info
        ]
        if missing:
            raise TeacherCacheError(f"the cache's card lacks {missing}; it was not written by TeacherCache.build")
        want = {"topk_values", "topk_indices"} if self.info["top_k"] else {"logits"}
        aug = self.info["augmentation"] or {}
        want |= {"crop"} if aug.get("padding", 0) > 0 else set()
        want |= {"flip"} if aug.get("flip") else set()
        have = set(self.dataset.column_names)
        if have != want or len(self.dataset) != self.info["num_samples"]:
            raise TeacherCacheError(
                f"the cache holds {len(self.dataset)} rows with columns {sorted(have)}, but its card promises "
                f"{self.info['num_samples']} rows with {sorted(want)}: it is incomplete or was altered. Rebuild it "
                "with TeacherCache.build."
            )

    # ---- saving and loading ------------------------------------------------------------------------------------------
    def card(self) -> str:
        """The README.md of a saved or pushed cache: YAML header, then what the cache holds and how to use it."""
        import jinja2  # as huggingface_hub's ModelCard.from_template does

        template = jinja2.Template(CARD_TEMPLATE.read_text(), keep_trailing_newline=True)
        return template.render(
            **self.info, measured=_accuracy_text(self.info.get("teacher_accuracy")), info_file=INFO_FILE
        )

    def save_to_disk(self, path: str | os.PathLike) -> str:
        """Write the cache to `path`, atomically: into a temporary folder beside it, then renamed into place.

        A kill at any point leaves either the old folder or the new one, never a mix; stale temporary folders of
        earlier interrupted saves are removed. A non-empty `path` that is not a teacher cache is refused.
        """
        path = os.path.abspath(os.fspath(path))
        ours = any(os.path.isfile(os.path.join(path, f)) for f in (INFO_FILE, "state.json"))  # complete or half-written
        if os.path.isdir(path) and os.listdir(path) and not ours:
            raise TeacherCacheError(f"{path} exists and holds files that are not a teacher cache; pick another folder")
        with atomic_folder(path, what="teacher cache") as tmp:
            self.dataset.save_to_disk(str(tmp))
            (tmp / "README.md").write_text(self.card())
            with open(tmp / INFO_FILE, "w") as f:  # written last: its presence marks a complete cache
                json.dump(self.info, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        return path

    @classmethod
    def load_from_disk(cls, path: str | os.PathLike) -> TeacherCache:
        """A cache written by `save_to_disk`; a clear `TeacherCacheError` if the folder is incomplete or altered."""
        import datasets

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no teacher cache at {path!r}: the folder does not exist")
        info_path = os.path.join(path, INFO_FILE)
        if not os.path.isfile(info_path):
            raise TeacherCacheError(
                f"{path!r} is not a complete teacher cache: it has no {INFO_FILE}, which save_to_disk writes last. A "
                "save was interrupted, or the folder holds something else. Rebuild it with TeacherCache.build."
            )
        with open(info_path) as f:
            info = json.load(f)
        if info.get("format_version") != FORMAT_VERSION:
            raise TeacherCacheError(
                f"{path!r} holds teacher-cache format {info.get('format_version')!r}; this hf_kdsearch reads "
                f"{FORMAT_VERSION}. Rebuild it with TeacherCache.build."
            )
        try:
            dataset = datasets.load_from_disk(path)
            cache = cls(dataset, info)
            cache.tensors()  # read every column now: a truncated file fails here, not in the middle of training
        except TeacherCacheError:
            raise
        except Exception as err:
            raise TeacherCacheError(
                f"{path!r} is not a readable teacher cache ({type(err).__name__}: {err}); it may be half-written. "
                "Rebuild it with TeacherCache.build."
            ) from err
        return cache

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None, commit_message: str | None = None
    ) -> str:
        """Push the cache to a Hub dataset repo (the `save_to_disk` folder and its card); returns the repo URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_to_disk(os.path.join(tmp, "cache"))
            url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=folder,
                commit_message=commit_message or f"teacher cache of {self.info['teacher']}",
            )
        return str(url)

    @classmethod
    def load_from_hub(cls, repo_id: str, *, revision: str | None = None, token: str | None = None) -> TeacherCache:
        """A cache pushed with `push_to_hub`, downloaded (or read from the local Hub cache) and checked."""
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token)
        return cls.load_from_disk(folder)

    # ---- TeacherSource: training from the cache ---------------------------------------------------------------------
    def bind(self, run: DistillationRun) -> _ReplayAugment:
        """Check that the cache fits the run, and return the batch transform that replays its stored views.

        Raises `TeacherCacheError`, before anything is trained or written, when the training set differs in size or
        content, the student predicts another number of classes, or the run's augmentation is not the cache's; and
        when a callback that mixes or re-draws the inputs (UNIX) is present.
        """
        dataset = run.train_dataset
        if dataset is None:
            raise TeacherCacheError("teacher_cache= needs the train_dataset it was built on")
        if len(dataset) != self.info["num_samples"]:
            raise TeacherCacheError(
                f"the teacher cache was built on {self.info['num_samples']} samples but the training set has "
                f"{len(dataset)}: it belongs to another dataset. Build a cache for this one (TeacherCache.build)."
            )
        fingerprint = dataset_fingerprint(dataset)
        if fingerprint != self.info["dataset_fingerprint"]:
            raise TeacherCacheError(
                f"the teacher cache was built on another dataset of the same size (fingerprint "
                f"{self.info['dataset_fingerprint']}, this training set {fingerprint}). Build a cache for this one."
            )
        if run.num_classes is not None and run.num_classes != self.num_classes:
            raise TeacherCacheError(
                f"the teacher cache holds logits over {self.num_classes} classes but the student predicts "
                f"{run.num_classes}"
            )
        augmentation = run.augment.augmentation if run.augment is not None else None
        if augmentation != self.info["augmentation"]:
            raise TeacherCacheError(
                f"the run's augmentation {augmentation} is not the cache's {self.info['augmentation']}: the student "
                "would see other images than the teacher did. Set device_augment/augment_padding/augment_flip as "
                "when the cache was built, or build a cache for these settings."
            )
        mixers = [type(cb).__name__ for cb in run.callbacks if not _cache_compatible(cb)]
        if mixers:
            raise TeacherCacheError(
                f"{', '.join(mixers)} mixes or re-draws the training images, so the stored teacher outputs would not "
                "match them: a teacher cache cannot be used with it. Pass teacher_model= instead."
            )
        self._replay = CachedTeacher(self, seed=run.seed)
        return self._replay.replay_augment(run.augment, run.epoch)

    def prepare(self, accelerator: Any) -> None:
        """Move the stored tables to the accelerator's device (once)."""
        self._bound().prepare(accelerator)

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The stored logits of the batch's samples (`sample_index`) and replayed views (`view_index`), float32."""
        return self._bound().logits(batch)

    def describe(self) -> dict[str, Any]:
        """For the student's card: the cache's teacher, and `teacher_cache` (R, k, dtype, measured accuracy, data)."""
        keys = ("num_views", "top_k", "logits_dtype", "teacher_accuracy", "num_samples", "dataset_fingerprint")
        return {"teacher": self.info["teacher"], "teacher_cache": {k: self.info.get(k) for k in keys}}

    def _bound(self) -> CachedTeacher:
        if self._replay is None:
            raise RuntimeError(
                "this TeacherCache is not bound to a run; DistillationTrainer(teacher_cache=...) binds it"
            )
        return self._replay


def _canonical(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so a card read from disk compares equal to a fresh one."""
    return json.loads(json.dumps(value))


def _accuracy_text(accuracy: float | None) -> str:
    return "not measured (no integer labels)" if accuracy is None else f"{accuracy:.4f}"


def _cache_compatible(callback: Any) -> bool:
    return bool(getattr(callback, "works_with_teacher_cache", True))


def _column_tensor(dataset: Any, name: str) -> torch.Tensor:
    """One fixed-shape column as a tensor of its stored dtype (the `datasets` formatters turn float16 into float32)."""
    import pyarrow as pa

    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    feature = dataset.features[name]
    array = dataset.data.column(name).combine_chunks()
    array = getattr(array, "storage", array)  # Array2D is an extension type over nested lists
    while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type):
        array = array.flatten()
    shape = tuple(feature.shape) if hasattr(feature, "shape") else (feature.length,)
    values = array.to_numpy(zero_copy_only=False).reshape(len(dataset), *shape)
    return torch.from_numpy(values.copy())


def _to_dataset(columns: dict[str, np.ndarray]) -> Any:
    import datasets

    features = {}
    for name, array in columns.items():
        dtype = str(array.dtype)
        if array.ndim == 2:
            features[name] = datasets.Sequence(datasets.Value(dtype), length=array.shape[1])
        else:
            features[name] = datasets.Array2D(shape=array.shape[1:], dtype=dtype)
    return datasets.Dataset.from_dict(
        {name: list(array) for name, array in columns.items()}, features=datasets.Features(features)
    )


class CachedTeacher:
    """The teacher as a `DistillationTrainer` sees it when it trains from a `TeacherCache`.

    - `view_ids(epoch)`: the stored view each sample replays in that epoch, `(N,)`, drawn from the run's seed and the
      epoch alone (the same on every rank, after a resume, under any gradient accumulation).
    - `replay_augment(device_augment, epoch_fn)`: what the trainer applies to each batch in place of the random
      augmentation: adds `view_index`, and crops and flips with the stored parameters.
    - `logits(batch)`: the stored logits of the batch's samples and views, `(n, C)` float32.
    """

    def __init__(self, cache: TeacherCache, seed: int):
        self.cache, self.seed = cache, int(seed)
        self._device: torch.device | None = None
        self._tables: dict[str, torch.Tensor] = {}
        self._views: dict[int, torch.Tensor] = {}

    def prepare(self, device: torch.device | Any) -> CachedTeacher:
        """Move the stored tables to `device` (or an `Accelerator`'s device), once."""
        device = torch.device(getattr(device, "device", device))
        if self._device != device:
            self._tables = {name: t.to(device) for name, t in self.cache.tensors().items()}
            self._views = {e: v.to(device) for e, v in self._views.items()}
            self._device = device
        return self

    def view_ids(self, epoch: int) -> torch.Tensor:
        if epoch not in self._views:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(epoch)) % 2**63)
            views = torch.randint(self.cache.num_views, (self.cache.info["num_samples"],), generator=g)
            self._views = {epoch: views.to(self._device) if self._device is not None else views}
        return self._views[epoch]

    def replay_augment(self, device_augment: DeviceAugment | None, epoch_fn: Callable[[], float | None]):
        return _ReplayAugment(self, device_augment, epoch_fn)

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        index, view = sample_index(batch, "training from a teacher cache"), batch.get("view_index")
        if view is None:
            raise KeyError("the batch has no 'view_index'; the trainer adds it when it replays the stored views")
        self.prepare(index.device)
        if self.cache.top_k is None:
            return self._tables["logits"][index, view].float()
        values = self._tables["topk_values"][index, view].float()
        indices = self._tables["topk_indices"][index, view].long()
        fill = values.amin(-1, keepdim=True) - TOPK_GAP
        out = fill.expand(values.shape[0], self.cache.num_classes).clone()
        return out.scatter_(1, indices, values)


class _ReplayAugment:
    """Stands in for `DeviceAugment` in the trainer: training batches get their stored views, evaluation batches the
    plain normalisation."""

    def __init__(self, cached: CachedTeacher, base: DeviceAugment | None, epoch_fn: Callable[[], float | None]):
        self.cached, self.base, self.epoch_fn = cached, base, epoch_fn

    def __call__(self, batch: Mapping[str, Any], train: bool) -> dict[str, Any]:
        if not train:
            return self.base(batch, train=False) if self.base is not None else dict(batch)
        index = sample_index(batch, "training from a teacher cache")
        self.cached.prepare(index.device)
        view = self.cached.view_ids(int(self.epoch_fn() or 0))[index]
        batch = {**batch, "view_index": view}
        if self.base is None:
            return batch
        tables = self.cached._tables
        offsets = tables["crop"][index, view] if "crop" in tables else None
        mirror = tables["flip"][index, view] if "flip" in tables else None
        return self.base.replay(batch, offsets, mirror)
