"""`--teacher_cache R` in the recipe: the first run builds the cache (the only teacher pass), the next reuses it
without a teacher forward, a run asking for another cache is refused before training, and the card says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_image_recipe import load_recipe_module

import hf_kdsearch
from hf_kdsearch import TeacherCache, save_student


@pytest.fixture(scope="module")
def digits_28(tmp_path_factory) -> Path:
    """Real digits at their own 28x28 size: one size, so the recipe takes the fast path the cache needs."""
    root = tmp_path_factory.mktemp("digits28")
    train, held = hf_kdsearch.load_mnist10k(normalize=False)
    order = np.random.default_rng(0).permutation(len(train.labels))  # the file is class-ordered
    for split, source, n in (("train", train, 48), ("validation", held, 16)):
        idx = order[:n] if split == "train" else np.random.default_rng(1).permutation(len(source.labels))[:n]
        for i in idx:
            folder = root / split / str(int(source.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((source.images[i, 0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_the_recipe_builds_the_teacher_cache_once_then_reuses_it(digits_28, tmp_path, monkeypatch, capsys):
    recipe = load_recipe_module()
    torch.manual_seed(0)
    teacher = save_student(timm.create_model("cifar_resnet8", num_classes=10), tmp_path / "teacher")
    builds = []
    build = TeacherCache._build.__func__
    monkeypatch.setattr(
        TeacherCache, "_build", classmethod(lambda cls, *a, **k: builds.append(1) or build(cls, *a, **k))
    )
    argv = [
        "--method", "kd", "--teacher", str(teacher), "--student", "cifar_resnet8", "--dataset_path", str(digits_28),
        "--output_dir", str(tmp_path / "run"), "--use_cpu", "--max_steps", "2", "--save_strategy", "no",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--seed", "0",
        "--check_teacher_accuracy", "false", "--teacher_cache", "2",
    ]  # fmt: skip
    recipe.main(argv)
    first = capsys.readouterr().out
    assert builds == [1] and "data path: fast" in first
    assert "teacher cache at" in first and "teacher accuracy on the stored views=" in first
    assert (tmp_path / "run" / "teacher-outputs-R2").is_dir()
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert "Distilled from a teacher cache of" in card and "R = 2 stored views per image" in card

    recipe.main(argv)  # the second run reads the stored outputs: no build, no teacher pass
    second = capsys.readouterr().out
    assert builds == [1] and "teacher accuracy on the stored views=" in second

    other = [*argv[:-1], "3", "--teacher_cache_path", str(tmp_path / "run" / "teacher-outputs-R2")]
    assert recipe.common.run_cli(lambda: recipe.main(other), "HINT") == 2
    err = capsys.readouterr().err
    assert "num_views: the cache has 2, this run 3" in err and builds == [1]


def test_teacher_cache_settings_are_checked_before_any_data_is_read(tmp_path):
    recipe = load_recipe_module()
    base = ["--teacher", "t", "--dataset_path", "nowhere", "--output_dir", str(tmp_path), "--use_cpu"]
    for extra, message in (
        (["--method", "unix", "--teacher_cache", "4"], "--teacher_cache works with --method kd only"),
        (["--method", "kd", "--teacher_cache", "0"], "must be >= 1"),
        (["--method", "kd", "--teacher_cache", "4", "--loader", "transforms"], "needs the fast data path"),
        (["--method", "kd", "--teacher_cache_top_k", "5"], "go with --teacher_cache R"),
    ):
        r, args, hub = recipe.parse_args([*base, *extra])
        with pytest.raises(recipe.common.RecipeError, match=message):
            recipe.common.validate(r, args, hub)
