"""Fault and bad-input cases of the two recipes, each on the path a user runs (`main([...])` or a subprocess).

Both recipes are presets over `recipes/recipe_common.py`, so a case tested on one holds for the other; where a case
was seen in one recipe only, it is tested there. Data: the bundled MNIST digits as a 28x28 image folder (the fast
path), or random CIFAR-shaped images in the Hub's CIFAR-100 layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
from transformers import TrainerCallback

import hf_kdsearch
from hf_kdsearch import save_student
from hf_kdsearch.redact import REDACTED, redact_argv, redact_text

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"image": ROOT / "recipes" / "image_classification.py", "cifar": ROOT / "recipes" / "cifar100.py"}
FAKE_TOKEN = "hf_" + "FakeToken0123456789abcdefABCDEF"  # Hub-token-shaped, 30 characters after hf_


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe_faults", RECIPES[name])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image():
    return load("image")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """32 training and 16 validation MNIST digits, 28x28 greyscale PNGs in class folders."""
    root = tmp_path_factory.mktemp("digits")
    train, held = hf_kdsearch.load_mnist10k(normalize=False)
    for split, source, n in (("train", train, 32), ("validation", held, 16)):
        for i in range(n):
            folder = root / split / str(int(source.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (source.images[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_student(timm.create_model("cifar_resnet8", num_classes=10), tmp_path_factory.mktemp("t") / "r8")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """32 + 16 random 32x32 images stored as the Hub's CIFAR-100 repo stores them (`img`, `fine_label`)."""
    import datasets

    root = tmp_path_factory.mktemp("cifar100")
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=[f"c{i}" for i in range(100)])}
    )
    rng = np.random.default_rng(0)
    (root / "cifar100").mkdir()
    for split, n in (("train", 32), ("test", 16)):
        data = {"img": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]}
        data["fine_label"] = rng.integers(0, 100, n).tolist()
        datasets.Dataset.from_dict(data, features=features).to_parquet(root / "cifar100" / f"{split}-0.parquet")
    return root


def tiny(dataset: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in [
        "--dataset_path", dataset, "--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--use_cpu", "--seed", "0", "--check_teacher_accuracy", "false",
        "--dataloader_num_workers", "0", *extra,
    ]]  # fmt: skip


def run(name: str, *args, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    env.setdefault("HF_HOME", str(tmp_path / "hf_home"))
    command = [sys.executable, str(RECIPES[name]), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


# ---- 1. students lost on a failed push ------------------------------------------------------------------------------
@pytest.mark.slow
def test_ensemble_of_three_with_the_hub_down_saves_every_student_then_exits_3(digits, tmp_path):
    from hub_server import LoopbackHub

    hub = LoopbackHub().start()
    env = hub.env(tmp_path / "hf_home")
    hub.stop()  # the endpoint now refuses connections
    out = tmp_path / "run"
    args = tiny(digits, out, "--student", "cifar_resnet8", "--num_students", "3", "--max_steps", "1")
    args += ["--channels_last", "false"]  # the publishing path alone (channels_last on CPU is case 3)
    proc = run("image", "--method", "ensemble", *args, "--push_to_hub", "--hub_model_id", "user/ens",
               tmp_path=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 3, explain(proc)
    assert [(out / f"student{j}" / "model.safetensors").is_file() for j in range(3)] == [True] * 3
    for j in range(3):
        assert f"hf upload user/ens-student{j} {out / f'student{j}'}" in proc.stderr
    assert "Pushed: none" in proc.stderr and "Traceback" not in proc.stderr


# ---- 2. another method resumed from kd's checkpoint -----------------------------------------------------------------
@pytest.mark.slow
def test_unix_after_kd_in_one_folder_never_resumes_kds_checkpoint(image, digits, teacher_folder, tmp_path):
    out = tmp_path / "run"
    common = ["--teacher", str(teacher_folder), "--student", "cifar_resnet8", *tiny(digits, out)]
    image.main(["--method", "kd", *common])
    kd_student = file_hash(out / "student" / "model.safetensors")
    with pytest.raises(image.common.RecipeError, match=r"holds a kd run, not a unix run.*--method kd"):
        image.main(["--method", "unix", *common, "--resume"])
    assert file_hash(out / "student" / "model.safetensors") == kd_student  # nothing was overwritten
    # Without --resume, unix trains in its own folder: its own steps, its own student and card.
    image.main(["--method", "unix", *common])
    assert sorted(p.name for p in (out / "unix" / "distill").glob("checkpoint-*")) == ["checkpoint-2"]
    assert file_hash(out / "student" / "model.safetensors") != kd_student
    card = (out / "student" / "README.md").read_text()
    assert "measured over training: null" not in card and '"teacher_fraction": 0.75' in card


# ---- 3. the defaults on CPU ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, method, extra",
    [
        ("cifar", "ensemble", []),  # 5 cifar_resnet110 widths
        ("cifar", "search", ["--teacher_max_steps", "1", "--search_max_steps", "1"]),  # cifar_resnet56, 25 % FLOPs
        ("image", "ensemble", []),  # 5 cifar_resnet20 widths
        ("image", "search", ["--teacher", "cifar_resnet20", "--teacher_max_steps", "1", "--search_max_steps", "1"]),
    ],
)
def test_ensemble_and_search_with_their_defaults_train_on_cpu(name, method, extra, digits, cifar, tmp_path):
    # In a subprocess: torch 2.14.1 aborts (SIGABRT) in the CPU backward of narrow channels_last convs, which would
    # take pytest down with it.
    data = cifar if name == "cifar" else digits
    out = tmp_path / "run"
    args = ["--method", method, "--dataset_path", data, "--output_dir", out, "--max_steps", "1", "--use_cpu"]
    args += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--save_strategy", "no"]
    args += ["--check_teacher_accuracy", "false", "--dataloader_num_workers", "0", *extra]
    proc = run(name, *args, tmp_path=tmp_path)
    assert proc.returncode == 0, explain(proc)
    saved = ["student"] if method == "search" else [f"student{j}" for j in range(5)]
    for folder in saved:
        assert (out / folder / "model.safetensors").is_file()


def test_channels_last_forced_on_cpu_warns_naming_the_torch_defect(image, tmp_path):
    from conftest import random_images, tiny_args

    from hf_kdsearch import ClassificationTrainer

    _, args, _ = image.parse_args(["--teacher", "t", "--dataset_path", "x", "--use_cpu", "--output_dir", str(tmp_path)])
    assert not args.channels_last  # the default on CPU
    model = timm.create_model("cifar_resnet8", num_classes=10)
    with pytest.warns(UserWarning, match=r"torch 2.14.1.*1x1 stride-2 convolution.*double free or corruption"):
        ClassificationTrainer(model=model, args=tiny_args(tmp_path, channels_last=True), train_dataset=random_images(8))


# ---- 4. the image recipe has every check of the CIFAR one ---------------------------------------------------------
@pytest.mark.slow
def test_image_recipe_seed_gives_identical_teacher_and_student(image, digits, tmp_path):
    hashes = []
    for run_dir in (tmp_path / "a", tmp_path / "b"):
        models = ["--teacher", "cifar_resnet8", "--student", "cifar_resnet8"]
        image.main(["--method", "kd", *models, *tiny(digits, run_dir)])
        hashes.append([file_hash(run_dir / f / "model.safetensors") for f in ("teacher-cifar_resnet8", "student")])
    assert hashes[0] == hashes[1]


def test_image_recipe_refuses_bad_settings_and_a_foreign_cache_before_stage_1(image, digits, tmp_path):
    out = tmp_path / "run"
    base = ["--teacher", "cifar_resnet8", "--student", "cifar_resnet8", *tiny(digits, out)]
    with pytest.raises(image.common.RecipeError, match=r"--method unix: select_ratio must lie in \(0, 1\], got 1.5"):
        image.main(["--method", "unix", "--select_ratio", "1.5", *base])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_text("someone else's folder")
    with pytest.raises(image.common.RecipeError, match=r"--teacher_cache_dir .*cache' is not empty and holds no"):
        image.main(["--method", "kd", "--teacher_cache_dir", str(cache), *base])
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]  # no orphaned teacher beside it either
    assert not list(tmp_path.glob(".cache*")) and not list(out.rglob("stage1_teacher"))


@pytest.mark.slow
def test_image_recipe_resume_skips_a_checkpoint_cut_short(image, digits, teacher_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--method", "kd", "--teacher", str(teacher_folder), "--student", "cifar_resnet8", *tiny(digits, out)]
    args += ["--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2"]
    image.main(args)
    stage = next(out.rglob("distill"))
    (stage / "checkpoint-3").mkdir()  # a disk-full crash: the folder, without trainer_state.json
    capsys.readouterr()
    image.main([*args, "--resume"])
    assert f"resuming from {stage / 'checkpoint-2'}" in capsys.readouterr().out


# ---- 5. --resume compares the run's record -------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_a_changed_setting_or_dataset_naming_both_values(image, digits, teacher_folder, tmp_path):
    out = tmp_path / "run"
    args = ["--method", "kd", "--teacher", str(teacher_folder), "--student", "cifar_resnet8", *tiny(digits, out)]
    image.main(args)
    with pytest.raises(image.common.RecipeError, match=r"temperature: the run has 4.0, this command 2.0"):
        image.main([*args, "--resume", "--temperature", "2"])
    with pytest.raises(image.common.RecipeError, match=r"alpha: the run has 0.9, this command 0.5"):
        image.main([*args, "--resume", "--alpha", "0.5"])
    with pytest.raises(image.common.RecipeError, match=r"dataset: the run trained on .*fingerprint"):
        image.main([*args, "--resume", "--max_train_samples", "16"])
    image.main([*args, "--resume", "--logging_steps", "7"])  # not a defining setting
    record = json.loads((out / "kd" / "run.json").read_text())
    assert record["settings"]["temperature"] == 4.0 and len(record["commands"]) == 2
    card = (out / "student" / "README.md").read_text()
    assert "--logging_steps 7" in card and card.count("image_classification.py --method kd") == 2
    # Without --resume the run starts anew: the earlier run's checkpoints go, so no later --resume continues them.
    stale = out / "kd" / "distill" / "checkpoint-99"
    stale.mkdir()
    (stale / "trainer_state.json").write_text("{}")
    image.main([*args, "--temperature", "2"])
    assert not stale.exists() and json.loads((out / "kd" / "run.json").read_text())["settings"]["temperature"] == 2.0


# ---- 8. the ensemble's adapters on a stream ------------------------------------------------------------------------
class AdapterWatch(TrainerCallback):
    """Whether the adapters moved, after each optimizer step."""

    def __init__(self):
        self.moved, self.initial = [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = [p.detach().clone() for p in model.adapters.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = list(model.adapters.parameters())
        self.moved.append(any(not torch.equal(p, q) for p, q in zip(now, self.initial)))


@pytest.mark.slow
def test_ensemble_on_a_stream_updates_its_adapters_after_the_freeze(image, digits, tmp_path):
    watch = AdapterWatch()
    args = tiny(digits, tmp_path / "run", "--student", "cifar_resnet8", "--num_students", "2", "--streaming")
    args[args.index("--max_steps") + 1] = "4"
    image.main(["--method", "ensemble", *args, "--num_train_epochs", "2", "--save_strategy", "no"], callbacks=[watch])
    # A stream has no epoch length: the freeze (1 epoch) is 4 steps / 2 epochs = 2 optimizer steps.
    assert watch.moved == [False, False, True, True]


# ---- 9. no token in any file ----------------------------------------------------------------------------------------
def test_redaction_of_token_flags_and_hub_shaped_tokens():
    argv = ["run.py", "--hub_token", FAKE_TOKEN, "--my_token=abc", "--note", f"x={FAKE_TOKEN}.", "--seed", "1"]
    assert redact_argv(argv) == [
        "run.py", "--hub_token", REDACTED, f"--my_token={REDACTED}", "--note", f"x={REDACTED}.", "--seed", "1"
    ]  # fmt: skip
    assert redact_text(f"token {FAKE_TOKEN}.") == f"token {REDACTED}." and redact_text("hf_short") == "hf_short"


@pytest.mark.slow
def test_a_hub_token_on_the_command_line_reaches_no_file(digits, tmp_path):
    out = tmp_path / "run"
    args = ["--method", "kd", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8", *tiny(digits, out)]
    proc = run("image", *args, "--hub_token", FAKE_TOKEN, "--save_strategy", "steps", "--save_steps", "1",
               tmp_path=tmp_path)  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and (out / "teacher-cifar_resnet8" / "README.md").is_file()
    leaked = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    assert "hf auth login" in proc.stdout + proc.stderr
    assert f"--hub_token '{REDACTED}'" in (out / "student" / "README.md").read_text()  # shlex-quoted


def test_adapter_freeze_on_a_finite_dataset_is_one_epoch_of_optimizer_steps(tmp_path):
    from conftest import random_images, tiny_args

    from hf_kdsearch import OnlineEnsembleArguments, OnlineEnsembleTrainer, build_ensemble
    from hf_kdsearch.data import collate_tensor_batch

    watch = AdapterWatch()
    ens = build_ensemble("cifar_resnet8", num_students=2, num_classes=10)
    # 32 samples, batch 8, 2 micro-batches per step: 2 optimizer steps an epoch, so the freeze ends after step 2.
    args = tiny_args(tmp_path, OnlineEnsembleArguments, max_steps=4, per_device_train_batch_size=8)
    args.gradient_accumulation_steps = 2
    trainer = OnlineEnsembleTrainer(
        model=ens, args=args, train_dataset=random_images(32), data_collator=collate_tensor_batch, callbacks=[watch]
    )
    trainer.train()
    assert trainer.adapter_freeze_steps() == 2 and watch.moved == [False, False, True, True]
