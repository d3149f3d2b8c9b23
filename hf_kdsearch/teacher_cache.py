"""`TeacherCache`: the teacher's outputs on R augmented views of every training image, computed once and replayed.

In plain KD the teacher runs a forward pass on every sample of every epoch. Following FKD (Shen & Xing, ECCV 2022,
"A Fast Knowledge Distillation Framework for Visual Recognition"), the cache stores, for each training image, the
parameters of R random views (crop offsets, flip) and the teacher's logits on each. Training from the cache replays,
each epoch, one of the R stored views of each sample, with exactly its stored parameters, so teacher and student see
the same augmented image (Beyer et al., CVPR 2022, show why a cache of one fixed view per image hurts) and the
teacher never runs again.

```python
from hf_kdsearch import DistillationTrainer, TeacherCache

cache = TeacherCache.build(teacher, train_dataset, args, num_views=4, top_k=None)   # one teacher pass
cache.save_to_disk("cache/"); cache = TeacherCache.load_from_disk("cache/"); cache.push_to_hub("me/r56-views")
trainer = DistillationTrainer(model=student, teacher_cache=cache, args=args, train_dataset=train_dataset)
```

- The cache is a `datasets.Dataset` (`cache.dataset`), one row per training sample: `crop` (R, 2) int16 offsets,
  `flip` (R,) bool, and `logits` (R, C) float16 (or float32), or `topk_values` (R, k) float16 and `topk_indices`
  (R, k) int32. `cache.info` is its card: the teacher, R, the augmentation, k, the dataset's size and fingerprint.
- `args` (`DistillationArguments`) defines the augmentation, as on the device data path: with `device_augment=True`
  a view is a random crop of `augment_padding` and a flip if `augment_flip`; without it, the only view is the image as
  the dataset holds it (`num_views=1`).
- Training: `DistillationTrainer` wraps the training set so that every batch carries `sample_index`; the view of
  sample i in epoch e is `view_ids(e)[i]`, drawn from `args.seed` and e alone, so gradient accumulation, DDP (each
  rank looks up its own samples) and resuming from a checkpoint all see the same views.
- With `top_k=k < C` the teacher's distribution is truncated to its k largest logits and renormalised over them (the
  others get probability 0); with k = C it is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_folder
from .batch import forward_model, logits_of, num_classes
from .data import collate_tensor_batch
from .fastpath import DeviceAugment, SampleIndexDataset, draw_crop_flip
from .teacher import freeze_teacher, load_teacher

__all__ = ["TeacherCache", "CachedTeacher", "TeacherCacheError", "dataset_fingerprint"]

FORMAT_VERSION = 1
INFO_FILE = "teacher_cache.json"
#: Logits outside the stored top k sit this far below the k-th largest: probability 0 at any usual temperature.
TOPK_GAP = 1e4


class TeacherCacheError(ValueError):
    """The cache does not fit the run (other dataset, class count, augmentation) or is incomplete."""


def dataset_fingerprint(dataset: Any) -> str:
    """A fingerprint of a training set's content, to tell a cache's dataset from another of the same size.

    - tensor datasets (`images`, `labels`: `TensorImageDataset`, `DeviceImageDataset`): SHA-256 of both tensors;
    - `datasets.Dataset`: its own `_fingerprint`, which follows its content and transforms;
    - anything else: SHA-256 of the first, middle and last items' tensors and numbers.
    """
    dataset = dataset.dataset if isinstance(dataset, SampleIndexDataset) else dataset
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    digest = hashlib.sha256()
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        for t in (images, labels):
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return "sha256:" + digest.hexdigest()
    if isinstance(getattr(dataset, "_fingerprint", None), str):
        return "datasets:" + dataset._fingerprint
    n = len(dataset)
    for i in sorted({0, n // 2, n - 1}):
        for key, value in sorted(dict(dataset[i]).items()):
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            digest.update(key.encode() + value.tobytes())
    return "items:" + digest.hexdigest()


def _run_teacher_on_views(
    teacher: nn.Module,
    train_dataset: Any,
    collate: Callable,
    batch_size: int,
    num_views: int,
    augment: DeviceAugment | None,
    generator: torch.Generator,
    autocast: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's float32 logits `(N, R, C)` on `num_views` random views of every sample, with the views' crop
    offsets `(N, R, 2)` and flips `(N, R)`, all on the CPU. One pass with a progress bar; no host sync per batch."""
    n = len(train_dataset)
    device = generator.device
    crops, flips, outs = [], [], []
    num_batches = -(-n // batch_size)
    with tqdm(total=num_batches * num_views, desc="teacher cache", unit="batch") as bar:
        for batch in _batches(train_dataset, batch_size, collate):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            b = batch["pixel_values"].shape[0]
            crop = torch.zeros(b, num_views, 2, dtype=torch.int16, device=device)
            flip = torch.zeros(b, num_views, dtype=torch.bool, device=device)
            views = []
            for r in range(num_views):
                if augment is not None:
                    offsets, mirror = draw_crop_flip(
                        b, augment.padding, augment.flip, device=device, generator=generator
                    )
                    if offsets is not None:
                        crop[:, r] = offsets.to(torch.int16)
                    if mirror is not None:
                        flip[:, r] = mirror
                    inputs = augment.replay(batch, offsets, mirror)
                else:
                    inputs = batch
                with (
                    torch.no_grad(),
                    torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None),
                ):
                    logits = logits_of(forward_model(teacher, inputs)).float()
                views.append(logits)  # kept on the device: no host sync per batch
                bar.update(1)
            crops.append(crop)
            flips.append(flip)
            outs.append(torch.stack(views, dim=1))  # (b, R, C)
    return torch.cat(crops).cpu(), torch.cat(flips).cpu(), torch.cat(outs).cpu()


def _batches(dataset: Any, batch_size: int, collate: Callable) -> Any:
    n = len(dataset)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(start + batch_size, n)))
        getitems = getattr(dataset, "__getitems__", None)
        batch = getitems(indices) if getitems is not None else [dataset[i] for i in indices]
        yield dict(batch) if isinstance(batch, Mapping) else collate(batch)


def _teacher_name(teacher: Any) -> str:
    if isinstance(teacher, str):
        return teacher
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(teacher).__name__


class TeacherCache:
    """The teacher's logits on `num_views` stored augmented views of every training sample; see the module docstring.

    Build it with `TeacherCache.build`, reload it with `load_from_disk` / `load_from_hub`, and pass it to
    `DistillationTrainer(teacher_cache=...)` instead of a teacher.

    Attributes:
        dataset: the `datasets.Dataset`, one row per training sample.
        info: the card: `teacher`, `num_views`, `num_samples`, `num_classes`, `top_k`, `logits_dtype`,
            `augmentation` (`{"padding", "flip"}` or None), `dataset_fingerprint`, `seed`, `format_version`.
    """

    def __init__(self, dataset: Any, info: dict[str, Any]):
        self.dataset = dataset
        self.info = dict(info)
        self._check_columns()
        self._tensors: dict[str, torch.Tensor] | None = None

    # ---- building --------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        teacher: nn.Module | str,
        train_dataset: Any,
        args: Any,
        num_views: int = 4,
        top_k: int | None = None,
        *,
        batch_size: int | None = None,
        logits_dtype: str = "float16",
        data_collator: Callable | None = None,
        teacher_name: str | None = None,
        seed: int | None = None,
    ) -> TeacherCache:
        """Run the teacher once over `num_views` random views of every sample of `train_dataset`, with a progress bar.

        Args:
            teacher: an `nn.Module`, a local folder, a Hub id or a timm name (as `DistillationTrainer` takes).
            train_dataset: the training set, in the order training will index it (map-style).
            args: the run's `DistillationArguments`: `device_augment`, `augment_padding`, `augment_flip`,
                `image_mean`/`image_std` (default: the teacher's `pretrained_cfg`), `bf16`/`fp16`, `seed`, device.
            num_views: R, the views stored per sample; 1 without augmentation.
            top_k: store the k largest logits and their classes instead of all C; None stores all.
            batch_size: images per teacher forward; default the larger of the train and eval batch sizes.
            logits_dtype: `"float16"` (default, half the memory) or `"float32"`, for stored logits and top-k values.
            data_collator: turns a list of items into a batch dict; default: stack tensors.
            teacher_name: the teacher as the card names it; default the string given or the timm architecture.
            seed: seed of the views' parameters; default `args.seed`.
        """
        if not (isinstance(num_views, int) and num_views >= 1):
            raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
        if logits_dtype not in ("float16", "float32"):
            raise ValueError(f"logits_dtype must be 'float16' or 'float32', got {logits_dtype!r}")
        name = teacher_name or _teacher_name(teacher)
        teacher = load_teacher(teacher) if isinstance(teacher, str) else teacher
        freeze_teacher(teacher)
        augment = DeviceAugment.from_args(args, teacher)
        if augment is None and num_views > 1:
            raise ValueError(
                f"num_views={num_views} needs random views, but args.device_augment is off, so every view would be the "
                "same image: use num_views=1, or device_augment=True (uint8 images, crop and flip on the device)"
            )
        if augment is not None and augment.padding == 0 and not augment.flip and num_views > 1:
            raise ValueError(f"num_views={num_views} but the augmentation draws nothing (augment_padding=0, no flip)")
        device = args.device
        teacher.to(device)
        if getattr(args, "channels_last", False):
            teacher.to(memory_format=torch.channels_last)
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        batch_size = batch_size or max(args.per_device_train_batch_size, args.per_device_eval_batch_size)
        collate = data_collator or collate_tensor_batch
        generator = torch.Generator(device=device).manual_seed(args.seed if seed is None else seed)
        store_dtype = torch.float16 if logits_dtype == "float16" else torch.float32

        crops, flips, logits = _run_teacher_on_views(
            teacher, train_dataset, collate, batch_size, num_views, augment, generator, autocast
        )
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                "the teacher returned non-finite logits while building the cache; check its weights, its input "
                "normalisation (image_mean/image_std) and its precision"
            )
        num_classes = logits.shape[-1]
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= num_classes):
            raise ValueError(f"top_k must be an int in [1, {num_classes}] (the teacher's classes) or None, got {top_k}")
        columns: dict[str, np.ndarray] = {}
        if augment is not None and augment.padding > 0:
            columns["crop"] = crops.numpy()
        if augment is not None and augment.flip:
            columns["flip"] = flips.numpy()
        if top_k is None:
            columns["logits"] = logits.to(store_dtype).numpy()
        else:
            values, indices = logits.topk(top_k, dim=-1)
            columns["topk_values"] = values.to(store_dtype).numpy()
            columns["topk_indices"] = indices.to(torch.int32).numpy()
        info = {
            "format_version": FORMAT_VERSION,
            "teacher": name,
            "num_views": num_views,
            "num_samples": len(train_dataset),
            "num_classes": num_classes,
            "top_k": top_k,
            "logits_dtype": logits_dtype,
            "augmentation": augment.augmentation if augment is not None else None,
            "image_mean": list(augment.mean) if augment is not None else None,
            "image_std": list(augment.std) if augment is not None else None,
            "dataset_fingerprint": dataset_fingerprint(train_dataset),
            "seed": args.seed if seed is None else seed,
        }
        return cls(_to_dataset(columns), info)

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
            f"augmentation={self.info['augmentation']})"
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
        info = self.info
        aug = info["augmentation"]
        aug_text = (
            "none (the images as the dataset holds them)"
            if not aug
            else f"random crop with {aug['padding']} px zero padding" + (", horizontal flip" if aug["flip"] else "")
        )
        stored = f"top-{info['top_k']} values and classes" if info["top_k"] else f"all {info['num_classes']} logits"
        rows = [
            ("teacher", f"`{info['teacher']}`"),
            ("views per sample (R)", info["num_views"]),
            ("augmentation", aug_text),
            ("stored", f"{stored}, {info['logits_dtype']}"),
            ("samples", info["num_samples"]),
            ("classes", info["num_classes"]),
            ("dataset fingerprint", f"`{info['dataset_fingerprint']}`"),
            ("seed of the views", info["seed"]),
        ]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return (
            "---\ntags:\n- hf_kdsearch\n- knowledge-distillation\n- teacher-cache\n---\n\n"
            "# Teacher cache\n\nSoft labels of a teacher on stored augmented views of every training image, for "
            "distillation without running the teacher (FKD-style replay).\n\n"
            f"| | |\n|---|---|\n{table}\n\n"
            "```python\nfrom hf_kdsearch import DistillationTrainer, TeacherCache\n\n"
            "cache = TeacherCache.load_from_hub(REPO_ID)   # or TeacherCache.load_from_disk(folder)\n"
            "trainer = DistillationTrainer(model=student, teacher_cache=cache, args=args, train_dataset=train)\n```\n\n"
            f"`{INFO_FILE}` holds the same facts for programs.\n"
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

    # ---- training ----------------------------------------------------------------------------------------------------
    def for_trainer(self, trainer: Any) -> CachedTeacher:
        """The `CachedTeacher` a `DistillationTrainer` uses, after checking that the cache fits its run.

        Raises `TeacherCacheError`, before anything is trained or written, when the training set differs in size or
        content, the student predicts another number of classes, or the run's augmentation is not the cache's; and
        when a callback that mixes or re-draws the inputs (UNIX) is present.
        """
        dataset = trainer.train_dataset
        if dataset is None:
            raise TeacherCacheError("teacher_cache= needs the train_dataset it was built on")
        dataset = dataset.dataset if isinstance(dataset, SampleIndexDataset) else dataset
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
        classes = num_classes(trainer.model)
        if classes is not None and classes != self.num_classes:
            raise TeacherCacheError(
                f"the teacher cache holds logits over {self.num_classes} classes but the student predicts {classes}"
            )
        run = trainer.device_augment.augmentation if trainer.device_augment is not None else None
        if run != self.info["augmentation"]:
            raise TeacherCacheError(
                f"the run's augmentation {run} is not the cache's {self.info['augmentation']}: the student would see "
                "other images than the teacher did. Set device_augment/augment_padding/augment_flip as when the "
                "cache was built, or build a cache for these settings."
            )
        mixers = [type(cb).__name__ for cb in trainer.callback_handler.callbacks if not _cache_compatible(cb)]
        if mixers:
            raise TeacherCacheError(
                f"{', '.join(mixers)} mixes or re-draws the training images, so the stored teacher outputs would not "
                "match them: a teacher cache cannot be used with it. Pass teacher_model= instead."
            )
        return CachedTeacher(self, seed=trainer.args.seed)


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
        index, view = _index(batch), batch.get("view_index")
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


def _index(batch: Mapping[str, Any]) -> torch.Tensor:
    index = batch.get("sample_index")
    if not isinstance(index, torch.Tensor):
        raise KeyError(
            "training from a teacher cache needs 'sample_index' in every batch (DistillationTrainer wraps its "
            f"train_dataset in SampleIndexDataset for this; a custom collator must keep the key); got {sorted(batch)}"
        )
    return index


class _ReplayAugment:
    """Stands in for `DeviceAugment` in the trainer: training batches get their stored views, evaluation batches the
    plain normalisation."""

    def __init__(self, cached: CachedTeacher, base: DeviceAugment | None, epoch_fn: Callable[[], float | None]):
        self.cached, self.base, self.epoch_fn = cached, base, epoch_fn

    def __call__(self, batch: Mapping[str, Any], train: bool) -> dict[str, Any]:
        if not train:
            return self.base(batch, train=False) if self.base is not None else dict(batch)
        index = _index(batch)
        self.cached.prepare(index.device)
        view = self.cached.view_ids(int(self.epoch_fn() or 0))[index]
        batch = {**batch, "view_index": view}
        if self.base is None:
            return batch
        tables = self.cached._tables
        offsets = tables["crop"][index, view] if "crop" in tables else None
        mirror = tables["flip"][index, view] if "flip" in tables else None
        return self.base.replay(batch, offsets, mirror)
