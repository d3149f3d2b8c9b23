"""`DistillationArguments`: every knob of the distillation trainers, as a `TrainingArguments` subclass.

`HfArgumentParser(DistillationArguments)` turns it into a command line, so recipes get `--temperature 4 --alpha 0.9`
beside the usual Trainer flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["DistillationArguments"]

TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DistillationArguments(TrainingArguments):
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

    # ---- GPU data path (hf_kdsearch/fastpath.py) ------------------------------------------------------------------
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

    # ---- teacher at its own resolution (appended; see the check at the end of __post_init__) ----------------------
    teacher_image_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "Resize each batch to this size (one int, or height width) for the teacher, on the device, "
            "bilinear with antialiasing: a teacher trained at another resolution than the student. Default: the "
            "student's input as it is."
        },
    )

    def __post_init__(self):
        if not isinstance(self.augment_padding, int) or self.augment_padding < 0:
            raise ValueError(f"augment_padding must be an integer >= 0, got augment_padding={self.augment_padding!r}")
        if (self.image_mean is None) != (self.image_std is None) or (
            self.image_mean is not None and len(self.image_mean) != len(self.image_std)
        ):
            raise ValueError(
                "image_mean and image_std go together, one value per channel each; got "
                f"image_mean={self.image_mean!r}, image_std={self.image_std!r}"
            )
        if self.image_std is not None and any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be > 0 in every channel, got image_std={self.image_std!r}")
        if (self.teacher_image_mean is None) != (self.teacher_image_std is None) or (
            self.teacher_image_mean is not None and len(self.teacher_image_mean) != len(self.teacher_image_std)
        ):
            raise ValueError(
                "teacher_image_mean and teacher_image_std go together, one value per channel each; got "
                f"teacher_image_mean={self.teacher_image_mean!r}, teacher_image_std={self.teacher_image_std!r}"
            )
        if self.teacher_image_std is not None and any(s <= 0 for s in self.teacher_image_std):
            raise ValueError(f"teacher_image_std must be > 0 in every channel, got {self.teacher_image_std!r}")
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1] (it weights the KD term against CE), got alpha={self.alpha!r}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got temperature={self.temperature!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES} or None, got {self.teacher_dtype!r}")
        # ---- teacher_image_size -------------------------------------------------------------------------------------
        if self.teacher_image_size is not None:
            size = [self.teacher_image_size] if isinstance(self.teacher_image_size, int) else self.teacher_image_size
            if not (1 <= len(size) <= 2 and all(isinstance(s, int) and s > 0 for s in size)):
                raise ValueError(
                    "teacher_image_size must be one or two positive ints (height width), got "
                    f"teacher_image_size={self.teacher_image_size!r}"
                )
            self.teacher_image_size = [size[0], size[-1]]
        super().__post_init__()
        if self.device_augment and self.dataloader_pin_memory:
            # A blocking copy from pinned memory waits for every queued kernel: one host sync per step.
            self.accelerator_config.non_blocking = True
