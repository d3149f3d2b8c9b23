"""The teacher: one object that loads, freezes, places, checks and asks the teacher.

`Teacher` is what `DistillationMixin` holds. It

- loads a teacher named by a string (`load_teacher`: a local folder, a Hub id or a timm name);
- freezes it: its parameters do not require grad, it runs in eval mode (enforced at every call, since the Trainer
  calls `model.train()` on whatever it finds), under `no_grad`, and it never enters a checkpoint because the Trainer
  only saves `trainer.model`;
- knows its call style (keywords for transformers models, one positional tensor for timm) and its input statistics
  (`ImageStats`: from explicit arguments, timm's `pretrained_cfg`, or a transformers image processor), and
  re-normalises the student's images into its own (`Teacher.adapt`);
- prepares itself on first use under Accelerate (`accelerator.prepare_model(teacher, evaluation_mode=True)`: placed,
  autocast under bf16/fp16 with fp32 outputs, no DDP wrapper);
- checks its answers: the class count, finite logits (blaming the input batch when that is what holds the NaN), and
  its accuracy on the first training batches (`TeacherAccuracyCheck`);
- answers `logits(batch)`.

`TeacherSource` is the interface the trainer relies on: `bind(run)` once at construction (`DistillationRun` says
what the run is), `prepare(accelerator)` on first use, `logits(batch)` per step, `describe()` for the model card.
`Teacher` and `TeacherCache` (stored logits on replayed views) implement it; anything else that answers teacher logits
for a batch can stand in for a `Teacher` by subclassing it.
"""

from __future__ import annotations

import abc
import copy
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batch import FROZEN_FLAG, forward_model, logits_of, num_classes, resize_images, takes_keywords, unwrap

__all__ = [
    "TeacherLoadError",
    "TeacherCheckError",
    "TeacherSource",
    "DistillationRun",
    "Teacher",
    "ImageStats",
    "TeacherAccuracyCheck",
    "image_stats",
    "load_teacher",
    "freeze_teacher",
    "prepare_teacher",
    "input_normalization",
]

logger = logging.getLogger(__name__)


class TeacherLoadError(RuntimeError):
    """The teacher named by a string could not be loaded."""


class TeacherCheckError(RuntimeError):
    """The teacher's accuracy on the first training batches says it does not understand its input."""


def load_teacher(name_or_path: str, **kwargs: Any) -> nn.Module:
    """Load a teacher from a local folder, a Hub id, or a timm name with pretrained weights (`loading.load_model`).

    A timm architecture without weights (every `cifar_*` and `mnist_*` name) is refused, since a randomly initialised
    teacher would teach noise. A missing folder, an unreachable Hub or an unknown format is a `TeacherLoadError` that
    says which, and suggests a local path.
    """
    from .loading import HubUnavailableError, ModelLoadError, ModelNotFoundError, load_model

    try:
        return load_model(name_or_path, role="teacher", **kwargs)
    except (ModelNotFoundError, ModelLoadError, HubUnavailableError) as err:
        raise TeacherLoadError(str(err)) from err


#: Set on a teacher by `freeze_teacher`; `add_gates` reads it to thaw a deep copy meant as a student.


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put `teacher` in eval mode and stop gradients into its parameters. Returns the same object.

    Eval mode is also enforced at every use (`Teacher.logits`), rather than by overriding the
    teacher's `train()`: an override would follow the object into `copy.deepcopy`, and a student copied from a used
    teacher would silently never train.
    """
    teacher.requires_grad_(False)
    teacher.eval()
    setattr(teacher, FROZEN_FLAG, True)
    return teacher


def prepare_teacher(
    teacher: nn.Module,
    accelerator,
    *,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    deepspeed_plugin=None,
) -> nn.Module:
    """Place and cast the teacher the way Accelerate does the student, but without wrapping it for training.

    - Plain, DDP and FSDP runs: `accelerator.prepare_model(teacher, evaluation_mode=True)` moves it to the device and,
      under bf16/fp16, runs its forward in autocast with fp32 outputs. Every rank holds a full copy: the teacher is not
      sharded under FSDP (moving it by hand, since Accelerate leaves placement to FSDP there).
    - DeepSpeed ZeRO-3: the teacher is initialised as an inference engine with the same ZeRO stage, so its weights are
      partitioned like the student's (the approach TRL takes). Untested here: no DeepSpeed on CPU.
    """
    if dtype is not None:
        teacher = teacher.to(dtype)
    if deepspeed_plugin is not None:
        teacher = _prepare_deepspeed_teacher(teacher, accelerator, deepspeed_plugin)
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        if accelerator.distributed_type.name == "FSDP":
            teacher = teacher.to(accelerator.device)
        # evaluation-mode preparation must not enrol the teacher among the models the Trainer checkpoints or prepares.
        if teacher in accelerator._models:
            accelerator._models.remove(teacher)
    if compile:
        teacher.forward = torch.compile(teacher.forward)
    return freeze_teacher(teacher)


def _prepare_deepspeed_teacher(teacher: nn.Module, accelerator, plugin) -> nn.Module:
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.module.eval()
    return engine


# ---- the interface the trainer relies on ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillationRun:
    """What a `TeacherSource` is told about the run it serves, by the trainer, once, in its `__init__`.

    Attributes:
        train_dataset: the training set as the user gave it (not the trainer's `SampleIndexDataset` wrapper).
        num_classes: the classes the student predicts (None when the model does not say).
        student_stats: the statistics the student's images are normalised with (None when unknown).
        augment: the device augmentation the run would apply to each batch (`DeviceAugment`), or None.
        callbacks: the trainer's callbacks.
        seed: the run's seed (`args.seed`).
        epoch: returns the current (fractional) epoch while training.
    """

    train_dataset: Any
    num_classes: int | None
    student_stats: ImageStats | None
    augment: Any
    callbacks: tuple
    seed: int
    epoch: Callable[[], float | None]


class TeacherSource(abc.ABC):
    """What `DistillationMixin` asks of a teacher. `Teacher` (a live model) and `TeacherCache` (stored outputs)
    implement it; subclass it to plug in any other source of teacher logits.

    - `bind(run)`: called once by the trainer's `__init__`, before anything is trained or written. Check that the
      source fits the run (`DistillationRun`), raising otherwise, and return the batch transform the trainer applies
      to every batch on the device: `run.augment` unless the source needs another (a cache replays its stored views).
    - `prepare(accelerator)`: called on first use, once Accelerate is set up (not in `__init__`: the Trainer prepares
      the student for `evaluate()` only while Accelerate holds no model). Idempotent.
    - `logits(batch) -> Tensor`: the teacher's `(N, C)` logits for a batch dict (model inputs plus `labels` and the
      other `LOSS_KEYS`), float, on the batch's device, with no gradient.
    - `describe() -> dict`: what the student's model card says about the source; `teacher` names the teacher.
    - `answers_evaluation`: False when the source has outputs for training batches only (a cache of training views):
      evaluation then computes the task loss alone.
    - `reported_accuracy`: the accuracy the teacher's own card reports, for the trainer's accuracy check, or None.
    """

    answers_evaluation: bool = True
    reported_accuracy: float | None = None

    def bind(self, run: DistillationRun) -> Any:
        return run.augment

    def prepare(self, accelerator: Any) -> None:  # noqa: B027  (optional hook: nothing to do by default)
        pass

    @abc.abstractmethod
    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]:
        return {"teacher": type(self).__name__}


# ---- input statistics -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageStats:
    """Per-channel mean and std a model's images are normalised with (`x = (pixels - mean) / std`, pixels in [0, 1]),
    and where they were found (for messages)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self):
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(
                f"image statistics need one mean and one std > 0 per channel; got mean={self.mean} std={self.std} "
                f"(from {self.source})"
            )


def _architecture(model: nn.Module) -> str | None:
    """timm's architecture name of a model (`pretrained_cfg["architecture"]`), or None."""
    cfg = getattr(unwrap(model), "pretrained_cfg", None)
    return cfg.get("architecture") if isinstance(cfg, Mapping) else None


def _model_name_or_path(model: nn.Module) -> str | None:
    config = getattr(unwrap(model), "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def _processor_stats(name_or_path: str) -> ImageStats | None:
    """`image_mean`/`image_std` of the transformers image processor saved with a model (folder or Hub id)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    # No preprocessor_config.json, an unknown processor type, or offline without a cached copy: statistics unknown.
    except (OSError, ValueError, KeyError):
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None
    if not getattr(processor, "do_normalize", True):
        return ImageStats(
            (0.0,) * len(mean), (1.0,) * len(std), f"image processor of {name_or_path} (no normalisation)"
        )
    return ImageStats(tuple(map(float, mean)), tuple(map(float, std)), f"image processor of {name_or_path}")


def image_stats(
    model: nn.Module,
    *,
    name_or_path: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageStats | None:
    """The input statistics `model` expects, or None when nothing says.

    In order: explicit `mean`/`std`; timm's `pretrained_cfg` (also inside DDP, `torch.compile` and transformers'
    `TimmWrapper`); the transformers image processor saved beside the model (`AutoImageProcessor` on `name_or_path`,
    else on the folder or Hub id the model was loaded from).
    """
    if mean is not None and std is not None:
        return ImageStats(tuple(map(float, mean)), tuple(map(float, std)), "explicit arguments")
    inner = unwrap(model, timm_wrapper=True)
    for cfg in (
        getattr(inner, "pretrained_cfg", None),
        getattr(getattr(inner, "config", None), "pretrained_cfg", None),
    ):
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return ImageStats(tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])), "timm pretrained_cfg")
    for path in dict.fromkeys(p for p in (name_or_path, _model_name_or_path(model)) if p):
        stats = _processor_stats(path)
        if stats is not None:
            return stats
    return None


def input_normalization(
    student: nn.Module | ImageStats | None, teacher: nn.Module | ImageStats | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scale and shift that turn the student's normalised input into the teacher's, or None when they agree or one
    side is unknown.

    With `x_s = (x - m_s) / s_s` the teacher wants `x_t = (x - m_t) / s_t = x_s * (s_s / s_t) + (m_s - m_t) / s_t`,
    one fused multiply-add per channel. Models are read with `image_stats`.
    """
    s = student if isinstance(student, ImageStats | None) else image_stats(student)
    t = teacher if isinstance(teacher, ImageStats | None) else image_stats(teacher)
    if s is None or t is None or len(s.mean) != len(t.mean) or (s.mean, s.std) == (t.mean, t.std):
        return None
    s_mean, s_std = torch.tensor(s.mean), torch.tensor(s.std)
    t_mean, t_std = torch.tensor(t.mean), torch.tensor(t.std)
    scale = (s_std / t_std).view(1, -1, 1, 1)
    shift = ((s_mean - t_mean) / t_std).view(1, -1, 1, 1)
    return scale, shift


# ---- the teacher's own reported accuracy ----------------------------------------------------------------------------
def reported_accuracy(name_or_path: str | None) -> float | None:
    """The top-1 accuracy a teacher's model card reports (its `model-index` results), as a fraction; None if none."""
    if not name_or_path:
        return None
    from huggingface_hub import ModelCard

    path = os.path.join(name_or_path, "README.md") if os.path.isdir(name_or_path) else None
    if path is not None and not os.path.isfile(path):
        return None
    try:
        card = ModelCard.load(path or name_or_path)
    # The card is optional metadata: missing, unreachable, offline or malformed all mean "no reported accuracy".
    except Exception:  # noqa: BLE001
        return None
    for result in getattr(card.data, "eval_results", None) or []:
        if str(result.metric_type).lower() in ("accuracy", "top1", "top-1", "top_1", "acc"):
            value = float(result.metric_value)
            return value / 100 if value > 1 else value
    return None


# ---- the accuracy check ---------------------------------------------------------------------------------------------
class TeacherAccuracyCheck:
    """The teacher's top-1 accuracy on the first training batches, and a verdict on it.

    `update` adds a batch (on the device, no host sync); `result` syncs once and returns the accuracy, raising
    `TeacherCheckError` when it is near chance, or far below `reported` (the accuracy the teacher's card gives).

    - Chance is the larger of 1/C and the share of the most frequent label in the checked samples (a teacher that
      always answers the majority class is at chance too). Near chance: at most chance + 2 standard errors of a
      chance-level guesser on this many samples, or chance + 10% of the way to 1 when that is larger.
    - Far below the reported accuracy: more than max(0.2, 3 standard errors) below it.

    With mixup batches (`mix_labels`, `mix_weights`), each sample counts against its dominant label. `scope` names
    the checked samples in the message (`{n}` is their count); with `strict=False` the accuracy is measured and
    returned without a verdict.
    """

    def __init__(
        self,
        *,
        reported: float | None = None,
        hint: str = "",
        scope: str = "the first {n} training samples",
        strict: bool = True,
    ):
        self.reported, self.hint, self.scope, self.strict = reported, hint, scope, strict
        self._correct: torch.Tensor | None = None
        self._label_counts: torch.Tensor | None = None
        self.samples = 0
        self.num_classes = 0

    @staticmethod
    def applies_to(logits: torch.Tensor, batch: Mapping[str, Any]) -> bool:
        labels = batch.get("labels")
        return (
            isinstance(labels, torch.Tensor)
            and not labels.is_floating_point()
            and labels.ndim == 1
            and logits.ndim == 2
            and labels.shape[0] == logits.shape[0]
        )

    def update(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        labels = batch["labels"]
        if batch.get("mix_labels") is not None and batch.get("mix_weights") is not None:
            labels = torch.where(batch["mix_weights"] > 0.5, batch["mix_labels"], labels)
        valid = (labels >= 0) & (labels < logits.shape[-1])  # -100 marks ignored samples in HF datasets
        correct = ((logits.argmax(-1) == labels) & valid).sum()
        counts = torch.bincount(labels[valid], minlength=logits.shape[-1])
        self._correct = correct if self._correct is None else self._correct + correct
        self._label_counts = counts if self._label_counts is None else self._label_counts + counts
        self.num_classes = logits.shape[-1]

    def result(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
        """The accuracy (None when no sample was checked); raises `TeacherCheckError` on a failed check.

        `reduce` sums a tensor over processes (`lambda t: accelerator.reduce(t, "sum")`), so that every rank judges
        the same counts and reaches the same verdict: a rank that stopped alone would leave the others waiting.
        """
        if self._correct is None:
            return None
        totals = torch.cat([self._correct.view(1), self._label_counts])
        if reduce is not None:
            totals = reduce(totals)
        correct, *counts = totals.tolist()
        n = sum(counts)
        if n == 0:
            return None
        self.samples = n
        accuracy = correct / n
        chance = max(1.0 / self.num_classes, max(counts) / n)
        near_chance = max(chance + 2 * math.sqrt(chance * (1 - chance) / n), chance + 0.1 * (1 - chance))
        problem = None
        if accuracy <= near_chance:
            problem = f"near chance ({chance:.3f}: 1/{self.num_classes} classes or the most frequent label)"
        elif self.reported is not None:
            margin = max(0.2, 3 * math.sqrt(self.reported * (1 - self.reported) / n))
            if accuracy < self.reported - margin:
                problem = f"far below the {self.reported:.3f} its model card reports"
        if problem is not None and self.strict:
            raise TeacherCheckError(
                f"the teacher's accuracy on {self.scope.format(n=n)} is {accuracy:.3f}, {problem}. It does "
                "not understand what it is fed, and would distil noise. Likely causes: the input normalisation (the "
                "teacher sees the student's normalised images; give the teacher's statistics with teacher_image_mean/"
                "teacher_image_std, or the student's with image_mean/image_std), the label order (the dataset's class "
                "ids must mean the same classes as the teacher's outputs), the resolution, or the channels (RGB vs "
                f"grayscale, channel order).{self.hint} To skip this check, set check_teacher_accuracy=False."
            )
        return accuracy


# ---- the teacher object ---------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Teacher(TeacherSource):
    """A frozen teacher model that answers `logits(batch)`; see the module docstring.

    Args:
        model: an `nn.Module`, or a local folder, Hub id or timm name for `load_teacher`.
        name: how the model card names the teacher. Default: the string `model`, else the folder or Hub id it was
            loaded from, else its timm architecture, else its class name.
        image_mean, image_std: the teacher's input statistics when nothing attached to the model gives them.
        dtype: cast the teacher's weights (`"float32"`, `"bfloat16"`, `"float16"`); default: keep them.
        compile: `torch.compile` the teacher's forward when it is prepared.
        channels_last: move the teacher's 4-D weights to channels_last.
        check_finite: raise `FloatingPointError` on non-finite logits (one host sync per call).
        image_size: the teacher's input resolution (one int, or height and width) when it differs from the student's:
            each batch is resized on the device (`batch.resize_images`), once, after the re-normalisation.

    Before the first call, `expect_student(stats, num_classes)` tells it what the student is fed and predicts.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike,
        *,
        name: str | None = None,
        image_mean: Sequence[float] | None,
        image_std: Sequence[float] | None,
        dtype: str | torch.dtype | None,
        compile: bool,
        channels_last: bool,
        check_finite: bool,
        image_size: int | Sequence[int] | None,
    ):
        source = os.fspath(model) if isinstance(model, str | os.PathLike) else None
        module = load_teacher(source) if source is not None else model
        if not isinstance(module, nn.Module):
            raise TypeError(f"a teacher must be an nn.Module or a name to load one from, got {type(model).__name__}")
        self.module: nn.Module = freeze_teacher(module)
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.source = source or _model_name_or_path(module)
        self.name = name or self.source or _architecture(module) or type(unwrap(module)).__name__
        self.keywords = takes_keywords(module)
        self.num_classes = num_classes(module)
        self.stats = image_stats(module, name_or_path=self.source, mean=image_mean, std=image_std)
        self.reported_accuracy = reported_accuracy(self.source)
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.compile, self.check_finite = compile, check_finite
        self.image_size = image_size
        self.student_stats: ImageStats | None = None
        self._renorm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._expected_classes: int | None = None
        self._checked_classes = False
        self._accelerator = None
        self._warned_stats = False

    @classmethod
    def from_args(cls, model: nn.Module | str | os.PathLike, args: Any, *, name: str | None = None) -> Teacher:
        """The teacher as a run with these `DistillationArguments` uses it (`teacher_image_mean`/`teacher_image_std`,
        `teacher_dtype`, `teacher_compile`, `channels_last`, `check_teacher_finite`, `teacher_image_size`). Online KD
        and the teacher cache both build their teacher here."""
        return cls(
            model,
            name=name,
            image_mean=args.teacher_image_mean,
            image_std=args.teacher_image_std,
            dtype=args.teacher_dtype,
            compile=args.teacher_compile,
            channels_last=args.channels_last,
            check_finite=args.check_teacher_finite,
            image_size=args.teacher_image_size,
        )

    def __repr__(self) -> str:
        stats = f"{self.stats.source}" if self.stats else "unknown"
        return f"Teacher({self.name!r}, keywords={self.keywords}, input statistics: {stats})"

    def expect_student(self, stats: ImageStats | None, num_classes: int | None) -> None:
        """What the student is fed (its input statistics) and how many classes it predicts.

        A class count that differs from the teacher's is an error here when both models expose one, else at the first
        batch. The statistics decide the re-normalisation of the teacher's images (none when both agree).
        """
        if self.num_classes is not None and num_classes is not None and self.num_classes != num_classes:
            raise ValueError(
                f"teacher predicts {self.num_classes} classes but the student {num_classes}; they must agree"
            )
        self._expected_classes = num_classes
        self.student_stats = stats
        self._renorm = input_normalization(stats, self.stats)

    # ---- TeacherSource ---------------------------------------------------------------------------------------------
    def bind(self, run: DistillationRun) -> Any:
        """Told what the student is fed and predicts (`expect_student`); the run's augmentation is kept."""
        self.expect_student(run.student_stats, run.num_classes)
        return run.augment

    def describe(self) -> dict[str, Any]:
        return {"teacher": self.name}

    def prepare(self, accelerator: Any) -> None:
        """Place and autocast the teacher under `accelerator` (once; see `prepare_teacher`)."""
        if self._accelerator is accelerator:
            return
        from accelerate.utils import DistributedType

        plugin = (
            accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
        )
        self.module = prepare_teacher(
            self.module, accelerator, dtype=self.dtype, compile=self.compile, deepspeed_plugin=plugin
        )
        if self._renorm is not None:
            self._renorm = tuple(t.to(accelerator.device) for t in self._renorm)
        self._accelerator = accelerator

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The teacher's logits for `batch` under `no_grad`, in eval mode, on the adapted input; checked."""
        if self.module.training:  # BN statistics and dropout of the teacher must never move, whoever called train()
            self.module.eval()
        with torch.no_grad():
            logits = logits_of(forward_model(self.module, self.adapt(batch), keywords=self.keywords))
        self._check(logits, batch)
        return logits

    # ---- input adapter ---------------------------------------------------------------------------------------------
    def adapt(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The student's batch as the teacher needs it: images re-normalised into the teacher's statistics, then
        resized to the teacher's resolution (`image_size`). The one place where the teacher's input differs from the
        student's.
        """
        images = batch.get("pixel_values")
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            return batch
        if self._renorm is None:
            self._warn_unknown_stats()
        else:
            scale, shift = self._renorm
            images = torch.addcmul(shift, images, scale)
        if self.image_size:
            images = resize_images(images, self.image_size)
        return {**batch, "pixel_values": images}

    def _warn_unknown_stats(self) -> None:
        if self._warned_stats or (self.stats is not None and self.student_stats is not None):
            return
        self._warned_stats = True
        unknown = [who for who, s in (("teacher", self.stats), ("student", self.student_stats)) if s is None]
        logger.warning(
            "hf_kdsearch cannot tell the %s's input statistics (no timm pretrained_cfg, no image processor, no "
            "explicit values), so the teacher sees the student's images as they are. If the two were trained on "
            "differently normalised images, pass teacher_image_mean/teacher_image_std (and image_mean/image_std for "
            "the student) in DistillationArguments.",
            " and the ".join(unknown),
        )

    # ---- checks ----------------------------------------------------------------------------------------------------
    def _check(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        if not self._checked_classes:
            if self._expected_classes is not None and logits.shape[-1] != self._expected_classes:
                raise ValueError(
                    f"teacher logits have {logits.shape[-1]} classes but the student's {self._expected_classes}; "
                    "teacher and student must predict the same label set"
                )
            self._checked_classes = True
        if self.check_finite and not torch.isfinite(logits).all():
            # Only now, once the teacher has failed, are the inputs inspected: no extra sync on healthy steps.
            bad_inputs = [
                k
                for k, v in batch.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
            ]
            if bad_inputs:
                raise FloatingPointError(
                    f"the input batch holds NaN or inf (in {', '.join(bad_inputs)}), so the teacher's logits are not "
                    "finite either. The teacher is fine; check the data pipeline (a division by a zero std, a corrupt "
                    "image, an augmentation)."
                )
            raise FloatingPointError(
                "the teacher returned non-finite logits (NaN or inf) on a finite input batch. Check the teacher's "
                "weights and its input normalisation, or its precision (teacher_dtype)."
            )
