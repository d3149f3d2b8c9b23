"""hf_kdsearch: knowledge distillation, student search, UNIX and online ensembles for the Hugging Face Trainer.

Importing the package registers the CIFAR and MNIST model families with timm and with transformers' Auto classes.
"""

__version__ = "0.1.0"

from .config import DistillationArguments
from .flops import count_flops
from .losses import feature_mse, kd_loss, mixed_cross_entropy, soft_target_cross_entropy
from .models import cifar as _cifar  # noqa: F401  (registers cifar_* with timm)
from .models import mnist as _mnist  # noqa: F401  (registers mnist_* with timm)
from .teacher import TeacherLoadError, load_teacher
from .trainer import (
    ClassificationTrainer,
    DistillationCallback,
    DistillationMixin,
    DistillationTrainer,
    LossMetricsMixin,
    forward_model,
    logits_of,
)

__all__ = [
    "HubUnavailableError",
    "load_student",
    "push_student",
    "save_student",
    "OnlineEnsemble",
    "OnlineEnsembleTrainer",
    "build_ensemble",
    "ClassificationTrainer",
    "DistillationArguments",
    "TensorImageDataset",
    "load_mnist10k",
    "DatasetLoadError",
    "DeviceAugment",
    "DeviceImageDataset",
    "TopKAccuracy",
    "load_image_dataset",
    "load_topk_accuracy",
    "normalize_images",
    "random_crop_flip",
    "to_uint8_tensors",
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
    "GateSearchCallback",
    "add_gates",
    "extract_student",
    "flops_weighted_l1",
    "gate_parameters",
    "plot_widths",
    "search_report",
    "Selection",
    "UncertaintyMixupCallback",
    "apply_selection",
    "num_selected",
    "rank_mixup_mask",
    "select_uncertain",
    "uncertainty_scores",
    "unix_cost_ratio",
]

# Later modules append their imports below, one block each.
# [ensemble]
from .data import DatasetLoadError, TensorImageDataset, load_image_dataset, load_mnist10k, to_uint8_tensors  # noqa: E402

# [selection]
from .ensemble import OnlineEnsemble, OnlineEnsembleTrainer, build_ensemble  # noqa: E402
from .fastpath import DeviceAugment, DeviceImageDataset, normalize_images, random_crop_flip  # noqa: E402

# [hub]
from .gates import add_gates, extract_student, flops_weighted_l1, gate_parameters  # noqa: E402
from .hub import HubUnavailableError, load_student, push_student, save_student  # noqa: E402
from .metrics import TopKAccuracy, load_topk_accuracy  # noqa: E402
from .search import GateSearchCallback, plot_widths, search_report  # noqa: E402

# [gates]
from .selection import (  # noqa: E402
    Selection,
    UncertaintyMixupCallback,
    apply_selection,
    num_selected,
    rank_mixup_mask,
    select_uncertain,
    uncertainty_scores,
    unix_cost_ratio,
)

# [data]
