"""The settings of every trainer here, as `TrainingArguments` subclasses: one class per trainer, one default per knob.

- `DataPathArguments`: the device data path and the student's image statistics (every trainer built on
  `LossMetricsMixin`: `ClassificationTrainer`, and the two below).
- `DistillationArguments(DataPathArguments)`: the teacher and the KD loss (`DistillationTrainer`, `DistillationMixin`).
- `OnlineEnsembleArguments(DataPathArguments)`: the online ensemble's loss and adapters (`OnlineEnsembleTrainer`).

`HfArgumentParser(DistillationArguments)` turns one into a command line, so recipes get `--temperature 4 --alpha 0.9`
beside the usual Trainer flags. A trainer given plain `TrainingArguments` converts them once with `upcast_arguments`
(as TRL's trainers do), so every setting is read from `args` and stated nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

__all__ = ["DataPathArguments", "DistillationArguments", "OnlineEnsembleArguments", "upcast_arguments"]

TEACHER_DTYPES = ("float32", "bfloat16", "float16")


def _check_number(name: str, value: Any, *, positive: bool = False) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {name}={value!r}")


def _check_stats(prefix: str, mean: Any, std: Any) -> None:
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
        raise ValueError(
            f"{prefix}image_mean and {prefix}image_std go together, one value per channel each; got "
            f"{prefix}image_mean={mean!r}, {prefix}image_std={std!r}"
        )
    if std is not None and any(s <= 0 for s in std):
        raise ValueError(f"{prefix}image_std must be > 0 in every channel, got {prefix}image_std={std!r}")


@dataclass
class DataPathArguments(TrainingArguments):
    """`TrainingArguments` plus the GPU data path (`hf_kdsearch/fastpath.py`) and the student's image statistics."""

    device_augment: bool = field(
        default=False,
        metadata={
            "help": "Take pixel_values as uint8 (N, C, H, W) images and, on the device, augment them in training "
            "(random crop with augment_padding zero padding, horizontal flip) and normalise them with "
            "image_mean/image_std, with no host sync. Keep the dataset as uint8 on the GPU or in pinned memory "
            "(hf_kdsearch.DeviceImageDataset). Host-to-device copies of pinned batches become non-blocking."
        },
    )
    augment_padding: int = field(
        default=4, metadata={"help": "Zero padding, in pixels, of the random crop under device_augment; 0: no crop."}
    )
    augment_flip: bool = field(
        default=True, metadata={"help": "Random horizontal flip under device_augment (training batches only)."}
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel mean of [0, 1] images the student is fed: device_augment normalises with it, and "
            "the teacher's input is re-normalised from it. Default: the student's timm pretrained_cfg mean, or its "
            "image processor's image_mean."
        },
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={"help": "Per-channel std the student is fed; goes with image_mean. Default as for image_mean."},
    )
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "Keep student and teacher weights (and, with device_augment, input batches) in channels_last "
            "memory format: faster convolutions on tensor-core GPUs. For conv nets."
        },
    )

    def __post_init__(self):
        if not isinstance(self.augment_padding, int) or self.augment_padding < 0:
            raise ValueError(f"augment_padding must be an integer >= 0, got augment_padding={self.augment_padding!r}")
        _check_stats("", self.image_mean, self.image_std)
        super().__post_init__()
        if self.device_augment and self.dataloader_pin_memory:
            # A blocking copy from pinned memory waits for every queued kernel: one host sync per step.
            self.accelerator_config.non_blocking = True


@dataclass
class DistillationArguments(DataPathArguments):
    """`TrainingArguments` plus the distillation settings.

    The loss is `alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels)` (Hinton et al. 2015,
    arXiv 1503.02531). Published conventions: CRD/RepDistiller CIFAR-100 uses alpha 0.9, T 4; UNIX uses alpha 1, T 4.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher, when the trainer is not given teacher_model=: a local folder (timm or transformers "
            "format), a Hub id, or a timm name with pretrained weights."
        },
    )
    temperature: float = field(default=4.0, metadata={"help": "Softmax temperature T of the KD loss; must be > 0."})
    alpha: float = field(
        default=0.9,
        metadata={"help": "Weight of the KD term, in [0, 1]; the cross-entropy on labels gets 1 - alpha."},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Cast the teacher's weights to this dtype (float32, bfloat16, float16) to save memory. "
            "Default: keep them, and let --bf16/--fp16 autocast the teacher's forward."
        },
    )
    teacher_compile: bool = field(default=False, metadata={"help": "torch.compile the teacher's forward."})
    teacher_image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel mean of [0, 1] images the teacher was trained with, when neither its timm "
            "pretrained_cfg nor an image processor saved with it says. The student's images are re-normalised into "
            "the teacher's statistics before the teacher sees them."
        },
    )
    teacher_image_std: list[float] | None = field(
        default=None, metadata={"help": "Per-channel std the teacher was trained with; goes with teacher_image_mean."}
    )
    check_teacher_accuracy: bool = field(
        default=True,
        metadata={
            "help": "At the start of training, measure the teacher's accuracy on the first optimizer step's batches "
            "(the logits the loss needs anyway: no extra forward) and stop with an error naming the likely causes "
            "when it is near chance or far below the accuracy its model card reports. Logged as teacher_accuracy."
        },
    )
    check_teacher_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop with an error naming the step when the teacher's logits hold NaN or inf, before the update. "
            "Costs one host sync per step; turn off for the last bit of GPU speed."
        },
    )

    teacher_image_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "Resize each batch to this size (one int, or height width) for the teacher, on the device, "
            "bilinear with antialiasing: a teacher trained at another resolution than the student. Default: the "
            "student's input as it is."
        },
    )

    def __post_init__(self):
        _check_stats("teacher_", self.teacher_image_mean, self.teacher_image_std)
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1] (it weights the KD term against CE), got alpha={self.alpha!r}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got temperature={self.temperature!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES} or None, got {self.teacher_dtype!r}")
        if self.teacher_image_size is not None:
            size = [self.teacher_image_size] if isinstance(self.teacher_image_size, int) else self.teacher_image_size
            if not (1 <= len(size) <= 2 and all(isinstance(s, int) and s > 0 for s in size)):
                raise ValueError(
                    "teacher_image_size must be one or two positive ints (height width), got "
                    f"teacher_image_size={self.teacher_image_size!r}"
                )
            self.teacher_image_size = [size[0], size[-1]]
        super().__post_init__()


@dataclass
class OnlineEnsembleArguments(DataPathArguments):
    """`TrainingArguments` plus the online ensemble's settings, for `OnlineEnsembleTrainer`.

    The loss is `ce_weight * sum_j CE(z_j, y) + feature_weight * L_int + kd_weight * L_KD` at temperature T
    (Walawalkar et al. 2020, https://arxiv.org/abs/2011.07449); the defaults are the paper's. The adapter settings
    follow the authors' released code. The GPU data path (`device_augment`, `channels_last`, `image_mean`/`image_std`)
    comes from `DataPathArguments`; there is no teacher, so no teacher settings.
    """

    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the KD term from the students' mean; must be > 0."}
    )
    ce_weight: float = field(default=0.7, metadata={"help": "Weight of the summed cross-entropy of every student."})
    feature_weight: float = field(
        default=0.15,
        metadata={"help": "Weight of L_int, the MSE between adapted narrow-student stage outputs and student 0's."},
    )
    kd_weight: float = field(
        default=0.15, metadata={"help": "Weight of L_KD, every student distilled from the students' detached mean."}
    )
    adapter_lr_scale: float = field(
        default=0.5,
        metadata={"help": "The 1x1 adapters' learning rate as a fraction of learning_rate (authors' code: 0.5)."},
    )
    adapter_freeze_epochs: float = field(
        default=1.0,
        metadata={
            "help": "The adapters are not updated in the first this many epochs' worth of optimizer steps (1: not in "
            "the first epoch, as in the authors' code; 0: from the start). The feature loss still trains the students "
            "through them. On a stream (no epoch length) an epoch counts as max_steps / num_train_epochs steps."
        },
    )
    adapter_freeze_steps: int | None = field(
        default=None,
        metadata={"help": "The adapters' freeze in optimizer steps; replaces adapter_freeze_epochs when set."},
    )

    def __post_init__(self):
        for name in ("ce_weight", "feature_weight", "kd_weight", "adapter_lr_scale", "adapter_freeze_epochs"):
            _check_number(name, getattr(self, name))
        if self.adapter_freeze_steps is not None:
            _check_number("adapter_freeze_steps", self.adapter_freeze_steps)
        _check_number("temperature", self.temperature, positive=True)
        super().__post_init__()


def upcast_arguments(args: TrainingArguments | None, cls: type[TrainingArguments]) -> TrainingArguments:
    """`args` as an instance of `cls`: returned as is when it already is one, else converted once (TRL's pattern).

    Every field `args` shares with `cls` keeps its value, and `cls`'s own fields get their defaults. A field of `args`
    that `cls` lacks (a sibling's setting, such as `DistillationArguments.alpha` given to the online ensemble, or one
    of your own `TrainingArguments` subclass) cannot be honoured: a `TypeError` names it, rather than drop it.
    None gives `cls(output_dir="trainer_output")`, the Trainer's own default.
    """
    if isinstance(args, cls):
        return args
    if args is None:
        return cls(output_dir="trainer_output")
    own = {f.name for f in dataclasses.fields(cls) if f.init}
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict masks tokens
    foreign = sorted(set(values) - own)
    if foreign:
        raise TypeError(
            f"{type(args).__name__} has settings that {cls.__name__} does not: {', '.join(foreign)}. Pass "
            f"{cls.__name__} (or a subclass of it with your own fields) to this trainer"
        )
    return cls(**values)
