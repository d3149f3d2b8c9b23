"""Shared test set-up: offline Hub, few threads, tiny datasets of dict batches."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import hf_kdsearch  # noqa: E402,F401  (registers the model families)
from hf_kdsearch import DistillationArguments  # noqa: E402
from hf_kdsearch.data import TensorImageDataset  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def random_images(n: int, shape=(3, 32, 32), num_classes: int = 10, seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorImageDataset(torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))


def tiny_args(tmp_path, cls: type[TrainingArguments] = DistillationArguments, **overrides) -> TrainingArguments:
    """Settings of a few-step CPU run: SGD at a constant lr, nothing saved, nothing reported, logs every step, no
    teacher accuracy check (the teachers here are untrained).

    `cls` picks the arguments class (`DistillationArguments`, `OnlineEnsembleArguments`, plain `TrainingArguments`).
    """
    settings = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        max_steps=3,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
    )
    if "check_teacher_accuracy" in {f.name for f in dataclasses.fields(cls)}:
        settings["check_teacher_accuracy"] = False  # the teachers here are untrained: the check would rightly stop them
    return cls(**{**settings, **overrides})


@pytest.fixture
def images32():
    return random_images(64)
