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
from hf_kdsearch.batch import resize_images
from hf_kdsearch.data import (
    ImageClassificationTransform,
    data_config_for,
    find_columns,
    image_sizes,
    image_transforms,
    load_image_dataset,
    split_stream_by_node,
)

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
        raise AssertionError(
            f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
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
        "--check_teacher_accuracy", "false",  # the teachers here are untrained: the check would rightly stop them
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


def load_recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_classification_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


# ---- the recipe, end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess run of the whole pipeline: CI's slow tier
def test_kd_on_mixed_sizes_trains_evaluates_and_saves_a_loadable_student(digit_folder, teacher_folder, tmp_path):
    out = tmp_path / "run"
    args = tiny(digit_folder, out, "--student", "resnet18")
    proc = run_recipe("--method", "kd", "--teacher", teacher_folder, *args, tmp_path=tmp_path)
    assert (
        "data path: transforms (decoded on the fly in 1 DataLoader worker(s), timm transforms at 32x32)" in proc.stdout
    )
    assert "images come in" in proc.stdout  # why the fast path was not taken
    assert "64 training and 24 evaluation images, 10 classes" in proc.stdout
    assert "the teacher expects 40x40 inputs, the student gets 32x32" in proc.stdout
    assert "'loss_kd'" in proc.stdout and "'eval_top1'" in proc.stdout  # distilled, then evaluated
    student = assert_loadable(out / "student")
    assert student.pretrained_cfg["architecture"] == "resnet18"
    card = (out / "student" / "README.md").read_text()
    assert "image_classification.py --method kd" in card and "on validation" in card


@pytest.mark.slow
def test_unix_and_search_on_mixed_sizes(digit_folder, teacher_folder, tmp_path):
    out = tmp_path / "unix"
    proc = run_recipe(
        "--method", "unix", "--teacher", teacher_folder, *tiny(digit_folder, out, "--student", "cifar_resnet8"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "data path: transforms" in proc.stdout
    assert_loadable(out / "student")
    assert '"teacher_fraction": 0.75' in (out / "student" / "README.md").read_text()  # 6 of 8 samples a batch

    out = tmp_path / "search"
    proc = run_recipe("--method", "search", "--teacher", teacher_folder, *tiny(digit_folder, out), tmp_path=tmp_path)
    assert "search phase done: found student" in proc.stdout
    found = assert_loadable(out / "student")
    teacher = timm.create_model(f"local-dir:{teacher_folder}", pretrained=True)
    assert sum(p.numel() for p in found.parameters()) < sum(p.numel() for p in teacher.parameters())


@pytest.mark.slow
def test_ensemble_takes_the_fast_path_on_small_images_of_one_size(tmp_path):
    """Digits of one size (28x28, L) are small: the recipe decodes them once into uint8 tensors and says so."""
    folder = tmp_path / "fixed"
    train, held = hf_kdsearch.load_mnist10k(normalize=False)
    for split, source, n in (("train", train, 32), ("test", held, 16)):
        for i in range(n):
            (folder / split / str(int(source.labels[i]))).mkdir(parents=True, exist_ok=True)
            pixels = (source.images[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / split / str(int(source.labels[i])) / f"{i}.png")
    out = tmp_path / "run"
    args = [a for a in tiny(folder, out, "--student", "cifar_resnet8", "--num_students", "2") if a != "--image_size"]
    args.remove("32")
    proc = run_recipe("--method", "ensemble", *args, tmp_path=tmp_path)
    assert "data path: fast (uint8 tensors on cpu" in proc.stdout and "all 48 images are 28x28" in proc.stdout
    wide, narrow = (assert_loadable(out / f"student{j}", size=28) for j in range(2))
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())


def test_ensemble_defaults_are_its_authors_schedule(tmp_path):
    """torch.optim.Adam with L2 weight decay 1e-5, lr 1e-3, batch 128, x0.1 at 57 % and 86 %; explicit flags win."""
    recipe = load_recipe_module()
    base = ["--method", "ensemble", "--dataset_path", "x", "--use_cpu", "--output_dir", str(tmp_path)]
    r, args, _ = recipe.parse_args(base)
    assert r.adam_l2 and r.step_decay and [round(m * 350) for m in r.lr_decay_at] == [200, 300]
    assert (args.learning_rate, args.weight_decay, args.per_device_train_batch_size) == (1e-3, 1e-5, 128)
    optimizer_cls, kwargs = recipe.common.optimizer_cls_and_kwargs(r, args)
    assert optimizer_cls is torch.optim.Adam and kwargs["lr"] == 1e-3
    r, args, _ = recipe.parse_args([*base, "--optim", "sgd", "--lr_scheduler_type", "cosine"])
    assert not r.adam_l2 and not r.step_decay and recipe.common.optimizer_cls_and_kwargs(r, args) is None
    r, _, _ = recipe.parse_args(["--method", "kd", "--teacher", "t", *base[2:]])
    assert not r.adam_l2 and not r.step_decay  # the other methods keep --optim (SGD) and the cosine schedule


@pytest.mark.slow
@pytest.mark.multiprocess
def test_streaming_under_two_process_ddp_gives_ranks_disjoint_samples(digit_folder, teacher_folder, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: the stream is split by node, each rank trains on its
    own images (hashes of the decoded inputs, augmentation off), and both ranks end with the same parameters."""
    script = ROOT / "tests" / "scripts" / "ddp_image_stream.py"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = ["--method", "kd", "--teacher", teacher_folder, "--student", "cifar_resnet8", "--streaming"]
    args += ["--train_augment", "false", "--shuffle_buffer_size", "16"]
    args += tiny(digit_folder, tmp_path / "run")
    args[args.index("--max_steps") + 1] = "3"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [*launch, str(script), str(tmp_path), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "stream split across 2 rank(s)" in proc.stdout and "2 process(es), MULTI_CPU" in proc.stdout
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [set(r["samples"]) for r in ranks]
    assert [len(r["samples"]) for r in ranks] == [3 * 8, 3 * 8]  # 3 steps of 8 on each rank
    assert all(len(s) == 24 for s in seen)  # 24 different images per rank: one pass, no repeats within 32
    assert not seen[0] & seen[1]  # disjoint
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["moved"] > 0
    assert_loadable(tmp_path / "run" / "student")


# ---- the pieces ----------------------------------------------------------------------------------------------------
def test_teacher_at_another_resolution_gets_its_own_size_inside_its_forward(tmp_path):
    """teacher_image_size resizes the student's batch once, on the device, before the teacher's forward."""
    from conftest import random_images, tiny_args

    torch.manual_seed(0)
    student = timm.create_model("cifar_resnet8", num_classes=10)
    teacher = timm.create_model("cifar_resnet8", num_classes=10)
    seen = []

    def check_input(module, args):
        seen.append(tuple(args[0].shape))
        assert args[0].shape[-2:] == (40, 48), f"the teacher got {tuple(args[0].shape)}"

    teacher.register_forward_pre_hook(check_input)
    args = tiny_args(tmp_path, max_steps=2, per_device_train_batch_size=8, teacher_image_size=[40, 48])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=random_images(16))
    trainer.train()
    assert seen == [(8, 3, 40, 48), (8, 3, 40, 48)]
    assert all(h["loss_kd"] > 0 for h in trainer.state.log_history if "loss_kd" in h)

    with pytest.raises(ValueError, match=r"teacher_image_size must be one or two positive ints.*\[0\]"):
        tiny_args(tmp_path, teacher_image_size=[0])
    assert tiny_args(tmp_path, teacher_image_size=[40]).teacher_image_size == [40, 40]


def test_resize_images_is_bilinear_with_antialias_and_commutes_with_normalisation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 40, generator=g)
    small = resize_images(x, [24, 20])
    expected = torch.nn.functional.interpolate(x, size=(24, 20), mode="bilinear", antialias=True)
    torch.testing.assert_close(small, expected)
    aliased = torch.nn.functional.interpolate(x, size=(12, 10), mode="bilinear", antialias=False)
    assert not torch.allclose(resize_images(x, [12, 10]), aliased, atol=1e-3)  # 4x down: antialiasing averages more
    assert resize_images(x, 48).shape == (2, 3, 48, 48) and resize_images(x, [48, 40]) is x
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(resize_images((x - mean) / std, 32), (resize_images(x, 32) - mean) / std)
    with pytest.raises(ValueError, match="one or two positive ints"):
        resize_images(x, [1, 2, 3])


def test_transforms_come_from_the_models_data_config(digit_folder):
    from transformers import ViTImageProcessor

    student = timm.create_model("resnet18", num_classes=10)
    cfg = data_config_for(student)
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == student.pretrained_cfg["mean"]
    assert data_config_for(student, image_size=[32, 40])["input_size"] == (3, 32, 40)
    processor = ViTImageProcessor(size={"height": 48, "width": 40}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    from_processor = data_config_for(processor=processor)
    assert from_processor["input_size"] == (3, 48, 40) and from_processor["std"] == (0.25, 0.25, 0.25)

    train = load_image_dataset(path=str(digit_folder))["train"]
    assert len(image_sizes(train, "image")) > 10  # the folder really has mixed sizes
    modes = {im.mode for im in train.select(range(8))["image"]}
    assert modes == {"L", "RGB"}
    train_tf, eval_tf = image_transforms(data_config_for(student, image_size=32))
    batch = train.select(range(8)).with_transform(ImageClassificationTransform(eval_tf, "image", "label"))[:8]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in batch["pixel_values"])
    assert [int(y) for y in batch["labels"]] == train.select(range(8))["label"]
    # Normalised with the student's statistics: a black pixel becomes -mean/std.
    black = -torch.tensor(student.pretrained_cfg["mean"]) / torch.tensor(student.pretrained_cfg["std"])
    torch.testing.assert_close(batch["pixel_values"][0][:, 0, 0], black, atol=1e-4, rtol=0)
    grey = ImageClassificationTransform(image_transforms({**cfg, "input_size": (1, 32, 32), "mean": (0.5,),
                                                          "std": (0.5,)})[1], "image", "label", mode="L")  # fmt: skip
    assert grey({"image": train.select(range(2))["image"], "label": [0, 1]})["pixel_values"][1].shape == (1, 32, 32)


def test_a_stream_split_by_node_gives_each_rank_its_own_samples(digit_folder):
    stream = load_image_dataset(path=str(digit_folder), streaming=True)["train"]
    parts = [
        [hashlib.sha256(ex["image"].tobytes()).hexdigest() for ex in split_stream_by_node(stream, r, 2)] for r in (0, 1)
    ]
    everything = [hashlib.sha256(ex["image"].tobytes()).hexdigest() for ex in stream]
    assert len(parts[0]) == len(parts[1]) == 32 and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)


def test_columns_and_splits_errors_are_clear(digit_folder, tmp_path, capsys):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    assert find_columns(features) == ("img", "label")  # an integer column named label, without ClassLabel
    with pytest.raises(ValueError, match=r"no Image column.*--image_column"):
        find_columns(datasets.Features({"path": datasets.Value("string"), "label": datasets.Value("int64")}))
    with pytest.raises(ValueError, match=r"no label column.*--label_column"):
        find_columns(datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    with pytest.raises(
        ValueError, match=r"label column 'fine' is not in the dataset; its columns are \['img', 'label'\]"
    ):
        find_columns(features, label_column="fine")

    recipe = load_recipe_module()
    only_train = tmp_path / "only_train"
    write_digit_folder(only_train, {"train": 20})
    base = ["--method", "kd", "--teacher", "t", "--dataset_path", str(only_train), "--output_dir", str(tmp_path)]
    r, args, _ = recipe.parse_args([*base, "--use_cpu"])
    with pytest.raises(recipe.common.RecipeError, match=r"no evaluation split \(it has \['train'\]\): pass "
                       r"--validation_split_percentage 10"):  # fmt: skip
        recipe.common.load_raw(r, args)
    assert recipe.common.run_cli(lambda: recipe.main([*base, "--use_cpu"]), "HINT") == 2  # one message, no traceback
    err = capsys.readouterr().err
    assert "error: the dataset has no evaluation split" in err and "Traceback" not in err and "HINT" not in err
    r, args, _ = recipe.parse_args([*base, "--use_cpu", "--validation_split_percentage", "25"])
    train, held, image_column, label_column, num_classes, names = recipe.common.load_raw(r, args)
    assert (len(train), len(held), image_column, label_column, num_classes) == (15, 5, "image", "label", 10)
    assert r.eval_split == "25 % of train held out"

    small = timm.create_model("cifar_resnet8", num_classes=4)
    data = type("Data", (), {"num_classes": 10})()
    with pytest.raises(
        recipe.common.RecipeError, match="the label column 'label' has 10 classes but the student's head has 4"
    ):
        recipe.common.check_head(small, data, "label")
    with pytest.raises(SystemExit):
        recipe.parse_args([*base, "--use_cpu", "--streaming"])  # a stream needs --max_steps


def test_the_data_path_is_chosen_from_the_images(digit_folder, tmp_path):
    recipe = load_recipe_module()
    cfg = data_config_for(timm.create_model("cifar_resnet8"))
    mixed = load_image_dataset(path=str(digit_folder))
    r, _, _ = recipe.parse_args(["--teacher", "t", "--dataset_path", "x", "--use_cpu", "--output_dir", str(tmp_path)])
    path, why = recipe.common.choose_path(r, mixed["train"], mixed["validation"], "image", cfg)
    assert path == "transforms" and why.startswith("images come in")
    r.loader = "fast"
    with pytest.raises(recipe.common.RecipeError, match="--loader fast needs images of one size"):
        recipe.common.choose_path(r, mixed["train"], mixed["validation"], "image", cfg)

    import datasets

    fixed = datasets.Dataset.from_dict(
        {"image": [np.zeros((28, 28), np.uint8)] * 6, "label": [0, 1] * 3},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    r.loader = "auto"
    got = recipe.common.choose_path(r, fixed, fixed, "image", cfg)
    assert got == ("fast", "all 12 images are 28x28 (0.0 MiB as uint8)")
    r.fast_path_max_bytes = 1000
    assert recipe.common.choose_path(r, fixed, fixed, "image", cfg)[0] == "transforms"
    r.fast_path_max_bytes, r.image_size = 2**30, [32]
    assert recipe.common.choose_path(r, fixed, fixed, "image", {**cfg, "input_size": (3, 32, 32)}) == (
        "transforms",
        "--image_size 32x32 differs from the images' 28x28",
    )


def test_offline_hub_dataset_exits_with_one_message(tmp_path, capsys, monkeypatch):
    recipe = load_recipe_module()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    argv = ["--teacher", "t", "--dataset_name", "beans", "--use_cpu", "--output_dir", str(tmp_path)]
    for extra in ([], ["--streaming", "--max_steps", "10"]):
        code = recipe.common.run_cli(lambda extra=extra: recipe.main(argv + extra), "HINT --dataset_path")
        err = capsys.readouterr().err
        assert code == 2 and "could not load the dataset 'beans': HF_HUB_OFFLINE is set" in err
        assert "HINT --dataset_path" in err and "Traceback" not in err


def test_a_transformers_teacher_gets_its_image_processors_size_and_statistics(tmp_path):
    """A transformers teacher has no timm pretrained_cfg: the recipe reads its image processor instead, and the
    trainer then re-normalises (ImageNet statistics -> 0.5/0.5) and resizes (32 -> 40) the student's batch for it."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from hf_kdsearch.teacher import input_normalization

    recipe = load_recipe_module()
    config = ViTConfig(image_size=40, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=10)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 40, "width": 40}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path / "vit"
    )
    teacher = hf_kdsearch.load_teacher(str(tmp_path / "vit"))
    cfg = recipe.common.teacher_inputs(teacher, str(tmp_path / "vit"))
    assert cfg == {"input_size": (3, 40, 40), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    student = timm.create_model("resnet18", num_classes=10)
    scale, shift = input_normalization(student, teacher)
    imagenet_std = torch.tensor(student.pretrained_cfg["std"])
    torch.testing.assert_close(scale.flatten(), imagenet_std / 0.5)
    assert recipe.common.teacher_inputs(timm.create_model("cifar_resnet8"), "cifar_resnet8")["input_size"] == (
        3,
        32,
        32,
    )
