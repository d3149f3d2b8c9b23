"""recipes/cifar100.py end to end, offline, on a tiny dataset with the Hub CIFAR-100 schema; and its pieces.

The recipe runs in a subprocess (`python recipes/cifar100.py ...`) for 2 steps per stage with `cifar_resnet8` models,
on 32 random 32x32 images stored as the Hub repo stores them (`cifar100/train-*.parquet`, columns `img`,
`fine_label`, `coarse_label`) or as a `save_to_disk` folder. The pieces it is made of (dataset loading, the top-k
metric, the step decay, the method defaults) are tested in-process.
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
from hub_server import LoopbackHub
from transformers import AutoModelForImageClassification, EvalPrediction

from hf_kdsearch import TeacherLoadError, count_flops, save_student
from hf_kdsearch.data import DatasetLoadError, load_image_dataset, to_uint8_tensors
from hf_kdsearch.metrics import TOPK_ACCURACY_PATH, TopKAccuracy, load_topk_accuracy

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cifar100.py"
FINE = [f"fine{i}" for i in range(100)]
COARSE = [f"coarse{i}" for i in range(20)]


def cifar_split(n: int, seed: int):
    import datasets

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=FINE),
            "coarse_label": datasets.ClassLabel(names=COARSE),
        }
    )
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict(
        {
            "img": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)],
            "fine_label": rng.integers(0, 100, n).tolist(),
            "coarse_label": rng.integers(0, 20, n).tolist(),
        },
        features=features,
    )


@pytest.fixture(scope="module")
def cifar_copies(tmp_path_factory):
    """The same 32 + 16 images as the Hub's parquet layout and as a save_to_disk folder."""
    import datasets

    root = tmp_path_factory.mktemp("cifar100")
    splits = datasets.DatasetDict(train=cifar_split(32, seed=0), test=cifar_split(16, seed=1))
    (root / "parquet" / "cifar100").mkdir(parents=True)
    for name, split in splits.items():
        split.to_parquet(root / "parquet" / "cifar100" / f"{name}-00000-of-00001.parquet")
    splits.save_to_disk(root / "disk")
    return {"parquet": root / "parquet", "disk": root / "disk", "splits": splits}


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """A trained-weights teacher as a local folder (save_student format), as `--teacher` takes it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher") / "cifar_resnet8"
    save_student(timm.create_model("cifar_resnet8", num_classes=100), folder)
    return folder


def run_recipe(*args, tmp_path, env=None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.setdefault("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing on this machine is reused
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(RECIPE), *map(str, args)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}:\n{tail}")
    return proc


def tiny(dataset: Path, output_dir: Path, *extra) -> list:
    return [
        "--dataset_path",
        dataset,
        "--output_dir",
        output_dir,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--use_cpu",
        "--seed",
        "0",
        "--check_teacher_accuracy",  # the teachers here are untrained or trained for 2 steps
        "false",
        *extra,
    ]


def assert_loadable(folder: Path) -> torch.nn.Module:
    """Both loaders give the same logits, and the card and labels made it to the folder."""
    by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_transformers = AutoModelForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(by_timm(x), by_transformers(pixel_values=x).logits)
    assert by_transformers.config.id2label[7] == "fine7"  # class names from the dataset's features
    return by_timm


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the recipe, end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess run of the whole pipeline: CI's slow tier
def test_kd_trains_the_teacher_once_then_search_reuses_it_and_pushes(cifar_copies, tmp_path):
    out = tmp_path / "run"
    arch = ["--teacher", "cifar_resnet8"]
    kd = run_recipe(
        "--method", "kd", *arch, "--student", "cifar_resnet8", *tiny(cifar_copies["parquet"], out), tmp_path=tmp_path
    )
    cache = out / "teacher-cifar_resnet8"
    assert "stage 1: no trained weights for cifar_resnet8" in kd.stdout
    assert "data path: fast (uint8 tensors on cpu, augmented there" in kd.stdout  # device_augment
    assert (cache / "model.safetensors").is_file()
    assert "'loss_kd'" in kd.stdout and "'eval_top5'" in kd.stdout  # distilled, evaluated with top-k accuracy
    kd_student = assert_loadable(out / "student")
    card = (out / "student" / "README.md").read_text()
    assert "logit distillation" in card and "recipes/cifar100.py --method kd" in card
    assert "trained by stage 1" in card and "top1" in card and "top5" in card

    # Every stage saved a checkpoint of its channels_last model; --resume continues from the last one (here, the
    # end of the run) and gives the same student.
    assert (out / "kd" / "distill" / "checkpoint-2" / "trainer_state.json").is_file()
    student = file_hash(out / "student" / "model.safetensors")
    again = run_recipe(
        "--method", "kd", *arch, "--student", "cifar_resnet8", *tiny(cifar_copies["parquet"], out), "--resume",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert f"resuming from {out / 'kd' / 'distill' / 'checkpoint-2'}" in again.stdout
    assert file_hash(out / "student" / "model.safetensors") == student

    cached = file_hash(cache / "model.safetensors")
    with LoopbackHub(timeout=500) as hub:
        args = tiny(cifar_copies["parquet"], out, "--push_to_hub", "--hub_model_id", "user/cifar-search")
        search = run_recipe("--method", "search", *arch, *args, tmp_path=tmp_path, env=hub.env(tmp_path / "hf_home"))
        files = hub.files("user/cifar-search")
    assert "reusing the trained teacher cached at" in search.stdout and "stage 1: no trained" not in search.stdout
    assert file_hash(cache / "model.safetensors") == cached

    assert {"README.md", "config.json", "model.safetensors", "search_widths.png", "search_report.json"} <= set(files)
    readme = files["README.md"].decode()
    assert "Gu & Tresp" in readme and "![search_widths](search_widths.png)" in readme
    assert "--method search" in readme and "trained by stage 1" in readme
    assert files["model.safetensors"] == (out / "student" / "model.safetensors").read_bytes()
    assert json.loads(files["search_report.json"])  # the search phase's summary travels with the student
    student = assert_loadable(out / "student")
    teacher = timm.create_model(f"local-dir:{cache}", pretrained=True)
    # The budget is 0.25 of the teacher's FLOPs, within one unit's worth.
    assert count_flops(student) <= 0.3 * count_flops(teacher)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in kd_student.parameters())


@pytest.mark.slow
def test_unix_distils_from_a_local_teacher_folder(cifar_copies, teacher_folder, tmp_path):
    out = tmp_path / "run"
    args = tiny(cifar_copies["parquet"], out, "--student", "cifar_resnet8")
    proc = run_recipe("--method", "unix", "--teacher", teacher_folder, *args, tmp_path=tmp_path)
    assert "stage 1" not in proc.stdout  # the folder holds trained weights
    assert_loadable(out / "student")
    card = (out / "student" / "README.md").read_text()
    assert "UNIX" in card and str(teacher_folder) in card
    assert '"teacher_fraction": 0.75' in card  # 6 of 8 samples per batch went to the teacher


@pytest.mark.slow
def test_ensemble_saves_every_student_from_a_saved_dataset(cifar_copies, tmp_path):
    out = tmp_path / "run"
    args = tiny(cifar_copies["disk"], out, "--student", "cifar_resnet8", "--num_students", "2")
    proc = run_recipe("--method", "ensemble", *args, tmp_path=tmp_path)
    assert "stage 1" not in proc.stdout  # no teacher: the students teach each other
    wide, narrow = (assert_loadable(out / f"student{j}") for j in range(2))
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())
    card = (out / "student1" / "README.md").read_text()
    assert "online ensemble" in card and "ensemble_top1" in card


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kd_under_two_process_ddp(cifar_copies, teacher_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): one student, saved once, by the main process."""
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = ["--method", "kd", "--teacher", teacher_folder, "--student", "cifar_resnet8"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [*launch, str(RECIPE), *map(str, args), *map(str, tiny(cifar_copies["parquet"], out))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 process(es), MULTI_CPU" in proc.stdout
    assert proc.stdout.count("saved student to") == 1
    assert_loadable(out / "student")


@pytest.mark.slow  # a subprocess run of the whole pipeline: CI's slow tier
def test_offline_without_a_local_copy_names_dataset_path(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    proc = run_recipe("--output_dir", tmp_path / "run", "--use_cpu", tmp_path=tmp_path, env=env, check=False)
    assert proc.returncode == 2
    assert "--dataset_path" in proc.stderr and "uoft-cs/cifar100" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the pieces ----------------------------------------------------------------------------------------------------
def test_local_copies_load_with_the_cifar100_schema(cifar_copies):
    for key in ("parquet", "disk"):
        splits = load_image_dataset(path=str(cifar_copies[key]))
        assert sorted(splits) == ["test", "train"]
        data, names = to_uint8_tensors(splits["train"])
        assert names == FINE  # the first ClassLabel column is fine_label
        assert data.images.shape == (32, 3, 32, 32) and data.images.dtype == torch.uint8
        expected = np.stack([np.asarray(im) for im in cifar_copies["splits"]["train"]["img"]])
        assert torch.equal(data.images, torch.from_numpy(expected).permute(0, 3, 1, 2))
        assert data.labels.tolist() == cifar_copies["splits"]["train"]["fine_label"]
    coarse, names = to_uint8_tensors(load_image_dataset(path=str(cifar_copies["disk"]))["test"], "img", "coarse_label")
    assert names == COARSE and coarse.labels.max() < 20


def test_image_folder_and_single_parquet_file_load(cifar_copies, tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for label in ("cat", "dog"):
            (tmp_path / "folder" / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.full((8, 8, 3), 40 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "folder" / split / label / f"{i}.png")
    splits = load_image_dataset(path=str(tmp_path / "folder"))
    data, names = to_uint8_tensors(splits["train"])
    assert names == ["cat", "dog"] and data.images.shape == (6, 3, 8, 8)
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    grey, _ = to_uint8_tensors(splits["test"], channels=1)
    assert grey.images.shape == (4, 1, 8, 8)

    single = next((cifar_copies["parquet"] / "cifar100").glob("test-*.parquet"))
    assert len(load_image_dataset(path=str(single))["train"]) == 16


def test_dataset_errors_are_clear(tmp_path, cifar_copies):
    with pytest.raises(DatasetLoadError, match="'uoft-cs/cifar100': HF_HUB_OFFLINE is set"):
        load_image_dataset("uoft-cs/cifar100")
    with pytest.raises(DatasetLoadError, match="does not exist"):
        load_image_dataset(path=str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetLoadError, match="not a .parquet file"):
        load_image_dataset(path=str(tmp_path / "notes.txt"))
    train = cifar_copies["splits"]["train"]
    with pytest.raises(ValueError, match="label column 'label' is not in the dataset; its columns are"):
        to_uint8_tensors(train, label_column="label")
    with pytest.raises(ValueError, match="has no Image column"):
        to_uint8_tensors(train.remove_columns("img"))


def test_topk_metric_loads_offline_and_counts_ranked_hits():
    import evaluate

    metric = evaluate.load(TOPK_ACCURACY_PATH)
    ranked = [[3, 1, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]]
    assert metric.compute(predictions=ranked, references=[1, 0, 1, 0], top_k=(1, 2, 3)) == {
        "top1": 0.25,
        "top2": 0.5,
        "top3": 1.0,
    }
    with pytest.raises(ValueError, match=r"top_k=\(5,\) needs every k in \[1, 3\]"):
        load_topk_accuracy().compute(predictions=ranked, references=[1, 0, 1, 0], top_k=(5,))


def test_topk_accuracy_for_the_trainer_matches_a_direct_count():
    torch.manual_seed(0)
    logits, labels = torch.randn(200, 10), torch.randint(0, 10, (200,))
    accuracy = TopKAccuracy(top_k=(1, 5))
    ranked = accuracy.rank(logits)
    assert ranked.shape == (200, 5)
    got = accuracy(EvalPrediction(predictions=ranked.numpy(), label_ids=labels.numpy()))
    top5 = (logits.topk(5).indices == labels[:, None]).any(1).float().mean().item()
    assert got["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert got["top5"] == pytest.approx(top5)
    # Raw logits (no preprocess_logits_for_metrics) give the same numbers.
    assert accuracy(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy())) == got
    # (N, heads, C) logits: one set per head.
    heads = TopKAccuracy(heads=["a", "b"])
    both = torch.stack([logits, -logits], 1)
    per_head = heads(EvalPrediction(predictions=heads.rank(both).numpy(), label_ids=labels.numpy()))
    assert per_head["a_top1"] == got["top1"] and per_head["a_top5"] == got["top5"] and "b_top5" in per_head


def load_recipe_module():
    spec = importlib.util.spec_from_file_location("cifar100_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_method_defaults_follow_the_papers(tmp_path):
    recipe = load_recipe_module()
    r, args, hub = recipe.parse_args(["--output_dir", str(tmp_path), "--use_cpu"])
    assert (r.method, r.student, r.teacher) == ("kd", "cifar_resnet20", "cifar_resnet56")
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size) == (240, 0.05, 64)
    assert (args.weight_decay, args.optim_args, args.alpha, args.temperature) == (5e-4, "momentum=0.9", 0.9, 4.0)
    assert [round(m * 240) for m in r.lr_decay_at] == [150, 180, 210] and r.step_decay
    assert not args.channels_last and not args.push_to_hub and not hub["push"]  # channels_last: CUDA only
    assert not r.adam_l2 and recipe.common.optimizer_cls_and_kwargs(r, args) is None  # SGD from --optim

    r, args, _ = recipe.parse_args(["--method", "unix", "--output_dir", str(tmp_path), "--use_cpu"])
    assert (args.alpha, args.temperature, r.select_ratio) == (1.0, 4.0, 0.75)

    # The ensemble follows its authors' released CIFAR-100 configs: torch.optim.Adam (L2 weight decay, not AdamW's
    # decoupled one), x0.1 at epochs 200 and 300 of 350.
    r, args, _ = recipe.parse_args(["--method", "ensemble", "--output_dir", str(tmp_path), "--use_cpu"])
    assert (args.num_train_epochs, args.learning_rate, args.weight_decay) == (350, 1e-3, 1e-5)
    assert r.student == "cifar_resnet110"
    assert r.adam_l2 and args.optim_args is None and args.per_device_train_batch_size == 128
    optimizer_cls, kwargs = recipe.common.optimizer_cls_and_kwargs(r, args)
    assert optimizer_cls is torch.optim.Adam and kwargs["lr"] == 1e-3
    assert [round(m * 350) for m in r.lr_decay_at] == [200, 300]
    r, args, _ = recipe.parse_args(["--method", "ensemble", "--output_dir", str(tmp_path), "--optim", "sgd"])
    assert not r.adam_l2 and recipe.common.optimizer_cls_and_kwargs(r, args) is None  # an explicit --optim wins
    r, args, _ = recipe.parse_args(["--method", "ensemble", "--output_dir", str(tmp_path), "--adam_l2", "false"])
    assert recipe.common.optimizer_cls_and_kwargs(r, args) is None and args.optim == "adamw_torch"
    assert args.save_strategy == "epoch" and not args.channels_last  # channels_last on CUDA only
    _, args, _ = recipe.parse_args(["--method", "ensemble", "--output_dir", str(tmp_path), "--channels_last", "true"])
    assert args.channels_last  # forced: the trainer warns on CPU (tests/test_recipe_faults.py)

    r, args, hub = recipe.parse_args(
        ["--output_dir", str(tmp_path), "--use_cpu", "--learning_rate", "0.01", "--lr_scheduler_type", "cosine"]
        + ["--push_to_hub", "--hub_model_id", "user/x"]
    )
    assert args.learning_rate == 0.01 and not r.step_decay
    assert hub["push"] and hub["repo_id"] == "user/x" and not args.push_to_hub  # the recipe pushes, not the Trainer
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output_dir", str(tmp_path), "--push_to_hub"])


def test_step_decay_multiplies_the_rate_at_each_fraction(tmp_path):
    from transformers import Trainer, TrainingArguments

    recipe = load_recipe_module()
    trainer_cls = recipe.common.with_step_decay(Trainer, [0.5, 0.75], 0.1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.1, optim="sgd")
    trainer = trainer_cls(model=torch.nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    rates = []
    for _ in range(100):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[0] == rates[49] == pytest.approx(0.1)
    assert rates[50] == rates[74] == pytest.approx(0.01)
    assert rates[75] == rates[99] == pytest.approx(0.001)


# ---- reliability: checks before training, seeds, kill and resume, local first ----------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "unix", "--select_ratio", "1.5"], r"--method unix: select_ratio must lie in \(0, 1\], got 1.5"),
        (["--method", "unix", "--uncertainty", "bogus"], r"--method unix: uncertainty must be one of"),
        (["--method", "search", "--target_flops_ratio", "1.5"], r"target_flops_ratio must lie in \(0, 1\], got 1.5"),
        (["--student", "cifar_resnet9000"], r"--student 'cifar_resnet9000' is not a timm architecture"),
        (["--lr_decay_at", "0.5", "150"], r"--lr_decay_at takes fractions of the run in \(0, 1\]"),
        (["--push_to_hub", "--hub_model_id", "no-namespace"], r"--hub_model_id must look like user/name"),
    ],
)
def test_bad_settings_fail_before_anything_is_loaded_or_trained(tmp_path, flags, message):
    recipe = load_recipe_module()
    out = tmp_path / "run"
    with pytest.raises(recipe.common.RecipeError, match=message):
        recipe.main(["--teacher", "cifar_resnet8", "--dataset_path", str(tmp_path / "no_data"),
                     "--output_dir", str(out), "--use_cpu", *flags])  # fmt: skip
    assert not (out / "stage1_teacher").exists()  # the dataset was not even read: it does not exist


def test_a_non_empty_teacher_cache_dir_and_an_unwritable_search_folder_fail_before_stage_1(tmp_path):
    recipe = load_recipe_module()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_text("someone else's folder")
    common = ["--teacher", "cifar_resnet8", "--dataset_path", str(tmp_path / "no_data"), "--use_cpu"]
    out = tmp_path / "run"
    with pytest.raises(recipe.common.RecipeError, match=r"--teacher_cache_dir .*cache' is not empty and holds no"):
        recipe.main([*common, "--teacher_cache_dir", str(cache), "--output_dir", str(out)])
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"] and not (out / "stage1_teacher").exists()
    # A cache holding another architecture is refused before training, too.
    save_student(timm.create_model("cifar_resnet20", num_classes=10), tmp_path / "r20")
    with pytest.raises(recipe.common.RecipeError, match=r"is a cifar_resnet20, not a cifar_resnet8"):
        recipe.main([*common, "--teacher_cache_dir", str(tmp_path / "r20"), "--output_dir", str(out)])
    # The search report's folder is checked at the start, not after the search.
    out.mkdir(exist_ok=True)
    (out / "search").write_text("a file where the report's folder goes")
    with pytest.raises(recipe.common.RecipeError, match=r"the search report's folder .*search' is not writable"):
        recipe.main([*common, "--method", "search", "--output_dir", str(out)])


def test_the_teacher_cache_is_written_whole_and_a_failed_rename_keeps_the_teacher(tmp_path):
    recipe = load_recipe_module()
    teacher = timm.create_model("cifar_resnet8", num_classes=10)
    stale = tmp_path / ".cache.tmp"
    stale.mkdir()
    (stale / "config.json").write_text("{half written by a killed run")
    recipe.common.cache_teacher(teacher, tmp_path / "cache", card={}, name="t")
    assert not stale.exists() and {"config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "cache").iterdir()
    }
    # The cache got filled by someone else during stage 1: the trained teacher is kept and named, not thrown away.
    with pytest.raises(
        TeacherLoadError, match=r"could not be moved to .*cache.* it is kept, complete, at .*\.cache\.tmp"
    ):
        recipe.common.cache_teacher(teacher, tmp_path / "cache", card={}, name="t")
    kept = timm.create_model(f"local-dir:{stale}", pretrained=True)
    torch.testing.assert_close(kept.state_dict(), teacher.state_dict())
    nan = timm.create_model("cifar_resnet8", num_classes=10)
    with torch.no_grad():
        nan.fc.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="the stage-1 teacher has NaN"):
        recipe.common.cache_teacher(nan, tmp_path / "other", card={}, name="the stage-1 teacher")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow  # a subprocess run of the whole pipeline: CI's slow tier
def test_an_unreachable_flops_budget_fails_before_stage_1_trains_the_teacher(cifar_copies, tmp_path):
    out = tmp_path / "run"
    args = tiny(cifar_copies["parquet"], out, "--method", "search", "--teacher", "cifar_resnet8")
    proc = run_recipe(*args, "--target_flops_ratio", "0.001", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--target_flops_ratio" in proc.stderr and "Nothing was trained." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stage 1" not in proc.stdout and not (out / "stage1_teacher").exists()


def last_checkpoint_step(folder: Path) -> int:
    return max(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def kd_reference(cifar_copies, tmp_path_factory):
    """An uninterrupted kd run with the recipe's defaults (channels_last, a checkpoint every epoch), stage 1
    included: 2 epochs of 4 steps per stage on 32 images."""
    tmp_path = tmp_path_factory.mktemp("kd_reference")
    out = tmp_path / "run"
    run_recipe(*kd_defaults(cifar_copies["parquet"], out), tmp_path=tmp_path)
    return out


def kd_defaults(dataset: Path, out: Path) -> list:
    return [
        "--method", "kd", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8", "--dataset_path", dataset,
        "--output_dir", out, "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--use_cpu", "--seed", "3",
        "--check_teacher_accuracy", "false",  # a stage-1 teacher of 8 steps is near chance, as the check would say
    ]  # fmt: skip


@pytest.mark.slow
def test_seed_makes_two_identical_runs_give_identical_students(cifar_copies, kd_reference, tmp_path):
    # The stage-1 teacher and the student are built after the seed is set, each from the seed alone.
    out = tmp_path / "run"
    run_recipe(*kd_defaults(cifar_copies["parquet"], out), tmp_path=tmp_path)
    for name in ("teacher-cifar_resnet8", "student"):
        assert file_hash(out / name / "model.safetensors") == file_hash(kd_reference / name / "model.safetensors")
    assert last_checkpoint_step(kd_reference / "kd" / "distill") == 8  # defaults: a checkpoint every epoch


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_student(cifar_copies, kd_reference, tmp_path):
    out = tmp_path / "run"
    args = kd_defaults(cifar_copies["parquet"], out)
    killer = [sys.executable, str(ROOT / "tests" / "scripts" / "recipe_killed_after_save.py"), "distill", "--"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([*killer, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "[killed] after the checkpoint at step 4" in killed.stdout
    assert not (out / "student").exists() and last_checkpoint_step(out / "kd" / "distill") == 4
    # A checkpoint cut short by a later kill (no trainer_state.json yet) is skipped by --resume.
    (out / "kd" / "distill" / "checkpoint-6").mkdir()
    resumed = run_recipe(*args, "--resume", tmp_path=tmp_path)
    assert "reusing the trained teacher cached at" in resumed.stdout
    assert f"resuming from {out / 'kd' / 'distill' / 'checkpoint-4'}" in resumed.stdout
    assert file_hash(out / "student" / "model.safetensors") == file_hash(kd_reference / "student" / "model.safetensors")


@pytest.mark.slow
def test_search_resumed_with_restored_callback_states_publishes_its_report(cifar_copies, teacher_folder, tmp_path):
    out = tmp_path / "run"
    args = tiny(cifar_copies["parquet"], out, "--method", "search", "--teacher", teacher_folder)
    args = [a for a in args if a != "--max_steps" and a != "2"]  # whole epochs: 4 steps each
    args += ["--search_epochs", "2", "--num_train_epochs", "1", "--restore_callback_states_from_checkpoint", "True"]
    killer = [sys.executable, str(ROOT / "tests" / "scripts" / "recipe_killed_after_save.py"), "search", "--"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([*killer, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-3000:]
    run_recipe(*args, "--resume", tmp_path=tmp_path)
    files = {p.name for p in (out / "student").iterdir()}
    assert {"search_report.json", "search_widths.png"} <= files
    assert json.loads((out / "student" / "search_report.json").read_text())["search"]["global_step"] == 8
    assert "![search_widths](search_widths.png)" in (out / "student" / "README.md").read_text()


@pytest.mark.slow
def test_ensemble_push_with_the_hub_down_saves_every_student_first(cifar_copies, tmp_path):
    out = tmp_path / "run"
    args = tiny(cifar_copies["disk"], out, "--student", "cifar_resnet8", "--num_students", "2")
    hub = LoopbackHub().start()
    env = hub.env(tmp_path / "hf_home")
    hub.stop()  # the endpoint now refuses connections: the Hub is down
    proc = run_recipe(
        "--method", "ensemble", *args, "--push_to_hub", "--hub_model_id", "user/ens", tmp_path=tmp_path, env=env,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    for j in range(2):
        assert_loadable(out / f"student{j}")
        assert str(out / f"student{j}") in proc.stderr
        assert f"hf upload user/ens-student{j} {out / f'student{j}'}" in proc.stderr
    assert "Pushed: none" in proc.stderr and "Traceback" not in proc.stderr
