"""hf_kdsearch: knowledge distillation, student search, UNIX and online ensembles for the Hugging Face Trainer.

Importing the package registers the CIFAR and MNIST model families with timm and with transformers' Auto classes.
"""

from .config import DistillationArguments
from .flops import count_flops
from .losses import feature_mse, kd_loss, mixed_cross_entropy, soft_target_cross_entropy
from .models import cifar as _cifar  # noqa: F401  (registers cifar_* with timm)
from .models import mnist as _mnist  # noqa: F401  (registers mnist_* with timm)
from .teacher import TeacherLoadError, load_teacher
from .trainer import (
    DistillationCallback,
    DistillationMixin,
    DistillationTrainer,
    LossMetricsMixin,
    forward_model,
    logits_of,
)

__all__ = [
    "DistillationArguments",
    "TensorImageDataset",
    "load_mnist10k",
    "DistillationCallback",
    "DistillationMixin",
    "DistillationTrainer",
    "LossMetricsMixin",
    "TeacherLoadError",
    "count_flops",
    "feature_mse",
    "forward_model",
    "kd_loss",
    "load_teacher",
    "logits_of",
    "mixed_cross_entropy",
    "soft_target_cross_entropy",
]

# Later modules append their imports below, one block each.
# [hub]
# [gates]
# [selection]
# [ensemble]
from .data import TensorImageDataset, load_mnist10k  # noqa: E402
# [data]
