"""recipes/image_classification.py on images of mixed sizes and modes, offline; the pieces it is made of in-process.

The image folder is written by the tests: the bundled MNIST digits, each padded or resized at random to 20-48 px a
side and stored as greyscale (L) or RGB PNG, in `train/<digit>/` and `validation/<digit>/`. The recipe runs in a
subprocess (`python recipes/image_classification.py ...`) for a few steps with tiny models at 32 px on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoModelForImageClassification

import hf_kdsearch
from hf_kdsearch import DistillationTrainer, save_student
from hf_kdsearch.data import (
    DatasetLoadError,
    ImageClassificationTransform,
    data_config_for,
    find_columns,
    image_sizes,
    image_transforms,
    load_image_dataset,
    split_stream_by_node,
)
from hf_kdsearch.fastpath import resize_images

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification.py"
DIGITS = [str(d) for d in range(10)]


def write_digit_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """MNIST digits padded (with a random offset) or resized to random sizes in 20-48 px, half L and half RGB."""
    train, held = hf_kdsearch.load_mnist10k(normalize=False)
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        source = train if split == "train" else held
        for i in range(n):
            digit = (source.images[i, 0].numpy() * 255).round().astype(np.uint8)
            h, w = (int(s) for s in rng.integers(20, 49, size=2))
            if rng.random() < 0.5 and h >= 28 and w >= 28:
                canvas = np.zeros((h, w), dtype=np.uint8)
                y, x = int(rng.integers(0, h - 27)), int(rng.integers(0, w - 27))
                canvas[y : y + 28, x : x + 28] = digit
                image = Image.fromarray(canvas)
            else:
                image = Image.fromarray(digit).resize((w, h), Image.BILINEAR)
            if i % 2:
                image = image.convert("RGB")
            folder = root / split / str(int(source.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), {"train": 64, "validation": 24})


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """A CIFAR ResNet-8 teacher for the 10 digits whose config says it takes 40x40 inputs (the student gets 32)."""
    torch.manual_seed(0)
    teacher = timm.create_model("cifar_resnet8", num_classes=10)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "input_size": (3, 40, 40)}
    return save_student(teacher, tmp_path_factory.mktemp("teacher") / "cifar_resnet8")


def run_recipe(*args, tmp_path, env=None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.setdefault("HF_HOME", str(tmp_path / "hf_home"))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(RECIPE), *map(str, args)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny(dataset: Path, output_dir: Path, *extra) -> list:
    return [
        "--dataset_path", dataset,
        "--output_dir", output_dir,
        "--image_size", "32",
        "--max_steps", "2",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "24",
        "--save_strategy", "no",
        "--dataloader_num_workers", "1",
        "--use_cpu",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def assert_loadable(folder: Path, size: int = 32) -> torch.nn.Module:
    """timm and transformers load the folder and give the same logits; the labels and input size were recorded."""
    by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_transformers = AutoModelForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(by_timm(x), by_transformers(pixel_values=x).logits)
    assert by_transformers.config.id2label[7] == "7"
    assert tuple(by_timm.pretrained_cfg["input_size"]) == (3, size, size)
    return by_timm
