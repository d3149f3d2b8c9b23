"""Shared test set-up: offline Hub, few threads, tiny datasets of dict batches."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import hf_kdsearch  # noqa: E402,F401  (registers the model families)
from hf_kdsearch.data import TensorImageDataset  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def random_images(n: int, shape=(3, 32, 32), num_classes: int = 10, seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorImageDataset(torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))


@pytest.fixture
def images32():
    return random_images(64)
