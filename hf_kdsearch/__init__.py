"""hf_kdsearch: knowledge distillation, student search, UNIX and online ensembles for the Hugging Face Trainer.

Importing the package registers the CIFAR and MNIST model families (and `kdsearch_resnet`, a sliced timm ResNet) with
timm, so `timm.create_model` and transformers' `AutoModelForImageClassification` can build and reload them.
"""

from .batch import resize_images
from .config import DataPathArguments, DistillationArguments, OnlineEnsembleArguments
from .data import (
    DatasetLoadError,
    ImageClassificationTransform,
    NodeSplitLoaderMixin,
    TensorImageDataset,
    data_config_for,
    image_transforms,
    load_image_dataset,
    load_mnist10k,
    split_stream_by_node,
    to_uint8_tensors,
)
from .ensemble import OnlineEnsemble, OnlineEnsembleTrainer, build_ensemble
from .fastpath import DeviceAugment, DeviceImageDataset, normalize_images, random_crop_flip
from .flops import count_flops
from .gates import add_gates, extract_student, flops_weighted_l1, gate_parameter_names, gate_parameters
from .hub import HubUnavailableError, load_student, push_student, save_student
from .losses import feature_mse, kd_loss, mixed_cross_entropy, soft_target_cross_entropy
from .metrics import TopKAccuracy, load_topk_accuracy
from .models import cifar as _cifar  # noqa: F401  (registers cifar_* with timm)
from .models import mnist as _mnist  # noqa: F401  (registers mnist_* with timm)
from .search import GateSearchCallback, plot_widths, search_report
from .selection import (
    Selection,
    UncertaintyMixupCallback,
    apply_selection,
    num_selected,
    rank_mixup_mask,
    select_uncertain,
    uncertainty_scores,
    unix_cost_ratio,
)
from .teacher import Teacher, TeacherCheckError, TeacherLoadError, TeacherSource, load_teacher
from .teacher_cache import CachedTeacher, TeacherCache, TeacherCacheError
from .trainer import (
    ClassificationTrainer,
    DistillationCallback,
    DistillationMixin,
    DistillationTrainer,
    LossMetricsMixin,
    forward_model,
    logits_of,
)
from .versions import version

__version__ = version("hf_kdsearch")

__all__ = [
    "add_gates",
    "apply_selection",
    "build_ensemble",
    "CachedTeacher",
    "ClassificationTrainer",
    "count_flops",
    "data_config_for",
    "DatasetLoadError",
    "DeviceAugment",
    "DeviceImageDataset",
    "DataPathArguments",
    "DistillationArguments",
    "DistillationCallback",
    "DistillationMixin",
    "DistillationTrainer",
    "extract_student",
    "feature_mse",
    "flops_weighted_l1",
    "forward_model",
    "gate_parameter_names",
    "gate_parameters",
    "GateSearchCallback",
    "HubUnavailableError",
    "image_transforms",
    "ImageClassificationTransform",
    "kd_loss",
    "load_image_dataset",
    "load_mnist10k",
    "load_student",
    "load_teacher",
    "load_topk_accuracy",
    "logits_of",
    "LossMetricsMixin",
    "mixed_cross_entropy",
    "NodeSplitLoaderMixin",
    "normalize_images",
    "num_selected",
    "OnlineEnsemble",
    "OnlineEnsembleArguments",
    "OnlineEnsembleTrainer",
    "plot_widths",
    "push_student",
    "random_crop_flip",
    "rank_mixup_mask",
    "resize_images",
    "save_student",
    "search_report",
    "select_uncertain",
    "Selection",
    "soft_target_cross_entropy",
    "split_stream_by_node",
    "Teacher",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherCheckError",
    "TeacherLoadError",
    "TeacherSource",
    "TensorImageDataset",
    "to_uint8_tensors",
    "TopKAccuracy",
    "uncertainty_scores",
    "UncertaintyMixupCallback",
    "unix_cost_ratio",
]
