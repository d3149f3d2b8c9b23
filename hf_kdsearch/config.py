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
    check_teacher_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop with an error naming the step when the teacher's logits hold NaN or inf, before the update. "
            "Costs one host sync per step; turn off for the last bit of GPU speed."
        },
    )

    def __post_init__(self):
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1] (it weights the KD term against CE), got alpha={self.alpha!r}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got temperature={self.temperature!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES} or None, got {self.teacher_dtype!r}")
        super().__post_init__()
