"""The recipe's data path on damaged or unusual data: what a user gets from `recipes/image_classification.py`.

Each case goes through the recipe's own functions (`load_raw`, `load_data`, `main` under `run_cli`), the code a user
runs, on a small folder or `save_to_disk` dataset written here. The library functions themselves are tested in
tests/test_data_faults.py and tests/test_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_image_recipe import load_recipe_module

from hf_kdsearch import save_student


@pytest.fixture(scope="module")
def recipe():
    return load_recipe_module()


def write_folder(root: Path, images: dict[str, list[tuple[str, np.ndarray]]]) -> Path:
    """`images[split]` = [(label, array)]: one PNG per array in `root/split/label/`; uint16 arrays give 16-bit PNGs."""
    for split, items in images.items():
        for i, (label, array) in enumerate(items):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / f"{i:03d}.png")
    return root


def ramp16(i: int) -> np.ndarray:
    """A 16x16 16-bit greyscale ramp: 256 distinct levels spread over 0..65535."""
    return (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257 + i).astype(np.uint16)


def base_args(dataset: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--method", "kd", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8",
        "--dataset_path", str(dataset), "--output_dir", str(tmp_path / "run"),
        "--use_cpu", "--max_steps", "1", "--teacher_max_steps", "1", "--save_strategy", "no",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--check_teacher_accuracy", "false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("loader", ["fast", "transforms"])
def test_16_bit_images_are_scaled_not_binarised_on_both_data_paths(recipe, tmp_path, loader):
    images = {split: [(str(i % 2), ramp16(i)) for i in range(4)] for split in ("train", "validation")}
    dataset = write_folder(tmp_path / "png16", images)
    r, args, _ = recipe.parse_args(base_args(dataset, tmp_path, "--loader", loader, "--image_size", "16"))
    raw = recipe.common.load_raw(r, args)
    student = timm.create_model("cifar_resnet8", num_classes=raw[4])
    data, _ = recipe.common.load_data(r, args, student, raw, "test")
    assert data.path == loader
    if loader == "fast":
        pixels = data.train.images[0, 0]  # uint8, as decoded
        assert pixels.unique().numel() == 256 and int(pixels.min()) == 0 and int(pixels.max()) == 255
    else:
        x = data.train[0]["pixel_values"][0]  # normalised; the ramp keeps 256 levels instead of 2
        assert torch.unique(x).numel() > 50  # augmented, so not all 256 survive; clipping would leave 2


def test_string_labels_become_class_labels_with_the_same_names_in_both_splits(recipe, tmp_path):
    import datasets

    pixels = [np.full((8, 8), v, np.uint8) for v in range(6)]
    features = datasets.Features({"image": datasets.Image(), "animal": datasets.Value("string")})
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": pixels, "animal": ["dog", "cat", "emu"] * 2}, features=features),
        validation=datasets.Dataset.from_dict({"image": pixels[:2], "animal": ["emu", "cat"]}, features=features),
    )
    splits.save_to_disk(tmp_path / "strings")
    r, args, _ = recipe.parse_args(base_args(tmp_path / "strings", tmp_path, "--label_column", "animal"))
    train, evaluation, _, label_column, num_classes, names = recipe.common.load_raw(r, args)
    assert (label_column, num_classes, names) == ("animal", 3, ["cat", "dog", "emu"])
    assert list(train["animal"]) == [1, 0, 2, 1, 0, 2] and list(evaluation["animal"]) == [2, 0]


def test_a_truncated_image_is_named_by_its_file(recipe, tmp_path, capsys):
    images = {split: [(str(i % 2), np.full((16, 16), 40 * i, np.uint8)) for i in range(4)] for split in ("train",)}
    images["validation"] = images["train"]
    dataset = write_folder(tmp_path / "broken", images)
    damaged = dataset / "train" / "1" / "003.png"
    noisy = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(noisy).save(damaged)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    code = recipe.common.run_cli(lambda: recipe.main(base_args(dataset, tmp_path, "--loader", "fast")), "HINT")
    err = capsys.readouterr().err
    assert code == 2 and str(damaged) in err and "Traceback" not in err


def test_an_outlier_label_is_named_instead_of_growing_the_head(recipe, tmp_path, capsys):
    import datasets

    pixels = [np.full((8, 8), v, np.uint8) for v in range(12)]
    labels = [i % 10 for i in range(11)] + [57]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": pixels, "label": labels}, features=features),
        validation=datasets.Dataset.from_dict({"image": pixels[:10], "label": list(range(10))}, features=features),
    ).save_to_disk(tmp_path / "outlier")
    code = recipe.common.run_cli(lambda: recipe.main(base_args(tmp_path / "outlier", tmp_path)), "HINT")
    err = capsys.readouterr().err
    assert code == 2 and "57" in err and "Traceback" not in err


def test_a_teacher_whose_class_names_are_in_another_order_is_refused(recipe, tmp_path, capsys):
    digits = [str(d) for d in range(10)]
    images = {
        split: [(d, np.full((16, 16), 20 * int(d), np.uint8)) for d in digits] for split in ("train", "validation")
    }
    dataset = write_folder(tmp_path / "digits", images)
    swapped = digits.copy()
    swapped[3], swapped[5] = "5", "3"
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=10)
    teacher = save_student(model, tmp_path / "teacher", card={"label_names": swapped})
    argv = base_args(dataset, tmp_path, "--loader", "fast")
    argv[argv.index("--teacher") + 1] = str(teacher)
    code = recipe.common.run_cli(lambda: recipe.main(argv), "HINT")
    err = capsys.readouterr().err
    assert code == 2 and "in another order" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "student").exists()
