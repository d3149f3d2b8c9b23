"""The image-classification distillation recipe: KD, UNIX, student search and online ensembles, written once.

`recipes/image_classification.py` (any dataset) and `recipes/cifar100.py` (the papers' CIFAR-100 settings) are
presets over this module: a `Preset` holds a recipe's name, its default settings per method and the hint it prints
when no dataset can be loaded; `main(preset, argv)` runs it. One run is:

1. `parse_args`: the command line over the preset's defaults (every `DistillationArguments` flag works);
2. `validate`: every check that needs neither data nor training;
3. `load_raw` (data loading: the dataset's splits, columns and label set) and `check_run_record`: the run folder's
   record (`<output_dir>/<method>/run.json`) is compared with this command when it resumes, and written;
4. `load_data`: the fast path (uint8 tensors on the device) or transforms on the fly; `validate_with_data`;
5. the stages: stage 1 (a teacher architecture without weights is trained and cached), then the method's stages,
   each in `<output_dir>/<method>/<stage>`, checkpointed, resumable from its last complete checkpoint;
6. `publish`: every student checked and saved, then pushed when asked.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_kdsearch import (
    ClassificationTrainer,
    DataPathArguments,
    DistillationArguments,
    DistillationTrainer,
    GateSearchCallback,
    OnlineEnsembleArguments,
    OnlineEnsembleTrainer,
    TeacherCache,
    TeacherCacheError,
    TeacherCheckError,
    TeacherLoadError,
    UncertaintyMixupCallback,
    add_gates,
    build_ensemble,
    count_flops,
    extract_student,
    load_student,
    load_teacher,
    push_student,
    save_student,
)
from hf_kdsearch.batch import resize_images
from hf_kdsearch.checks import LabelNamesError, check_finite_weights, check_label_names
from hf_kdsearch.data import (
    DatasetLoadError,
    ImageClassificationTransform,
    ImageDecodeError,
    LabelError,
    NodeSplitLoaderMixin,
    collate_tensor_batch,
    data_config_for,
    find_columns,
    image_sizes,
    image_transforms,
    load_image_dataset,
    prepare_labels,
    split_stream_by_node,
    to_uint8_tensors,
    undecoded,
)
from hf_kdsearch.ensemble import adam_l2
from hf_kdsearch.fastpath import DeviceImageDataset
from hf_kdsearch.gates import check_budget, gate_plan
from hf_kdsearch.hub import HubUnavailableError
from hf_kdsearch.metrics import TopKAccuracy
from hf_kdsearch.redact import redact_argv
from hf_kdsearch.teacher import input_normalization

METHODS = ("kd", "unix", "search", "ensemble")
EVAL_SPLITS = ("validation", "test", "valid", "val")
LOADERS = ("auto", "fast", "transforms")
#: The fast path's "small": the largest side it takes automatically (CIFAR, MNIST, SVHN, Tiny-ImageNet).
FAST_PATH_MAX_SIDE = 64
RUN_RECORD = "run.json"


def local_copy_hint(parquet: str, eval_split: str) -> str:
    """What to do when no dataset could be loaded, in the preset's words."""
    return (
        f"Without the Hub, give a local copy with --dataset_path: {parquet}, a folder written by "
        f"`datasets.load_dataset(...).save_to_disk(DIR)`, or an image folder (train/<class>/*.png, "
        f"{eval_split}/<class>/*.png)."
    )


class RecipeError(ValueError):
    """A setting, dataset or model the recipe cannot use as given, found before any stage trains; the message names
    the flag that fixes it."""


@dataclass
class Preset:
    """What makes a recipe: its name, script, defaults and the dataset hint.

    Attributes:
        name: the log tag.
        script: the recipe's file, for the command its cards record.
        runs: the default output folder is `runs/<runs>_<method>`.
        defaults: `RecipeArguments` / `DistillationArguments` defaults for every method.
        method_defaults: per method, defaults that replace those (the `student` among them).
        dataset_hint: printed under a dataset that could not be loaded.
    """

    name: str
    script: str
    runs: str
    defaults: dict
    method_defaults: dict[str, dict]
    dataset_hint: str

    def parse_args(self, argv: list[str] | None = None) -> tuple:
        return parse_args(self, argv)

    def main(self, argv: list[str] | None = None, callbacks=()) -> list[str]:
        return main(self, argv, callbacks)

    def cli(self) -> int:
        return run_cli(self.main, self.dataset_hint)


@dataclass
class RecipeArguments:
    """What the recipe adds to `DistillationArguments`. Defaults marked "preset" depend on the recipe."""

    method: str = field(default="kd", metadata={"help": f"One of {METHODS}.", "choices": METHODS})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local folder, a Hub id (user/repo, hf-hub:...), a timm name with pretrained weights, "
            "or a timm architecture without weights, which is trained first (stage 1) and cached. Not used by "
            "--method ensemble. Default: preset (cifar100.py: cifar_resnet56)."
        },
    )
    student: str | None = field(
        default=None,
        metadata={
            "help": "Student: a timm architecture or a local folder of a trained student to continue from. Not used "
            "by --method search, which finds its student. Default: preset (cifar100.py: cifar_resnet20, "
            "cifar_resnet110 for the ensemble; image_classification.py: resnet18, cifar_resnet20 for the ensemble)."
        },
    )
    pretrained_student: bool = field(
        default=False, metadata={"help": "Start the student from timm's pretrained weights (new classifier head)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (preset; cifar100.py: uoft-cs/cifar100)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if several."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A local copy instead: parquet file(s), a save_to_disk folder, or an image folder."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Default: the first Image column."})
    label_column: str | None = field(
        default=None,
        metadata={"help": "Default: the first ClassLabel column, else an integer column named label, labels, ..."},
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes, for a stream with plain integer labels (no ClassLabel names)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": f"Split to evaluate on. Default: the first of {EVAL_SPLITS} that exists."}
    )
    validation_split_percentage: float | None = field(
        default=None,
        metadata={"help": "Without an evaluation split: hold out this percentage of the training split (seeded)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation samples (streaming default: 2000)."}
    )
    image_size: list[int] | None = field(
        default=None,
        metadata={"help": "Student input size, one int or height width. Default: the student's timm data config."},
    )
    image_processor: str | None = field(
        default=None,
        metadata={
            "help": "A transformers image processor (folder or Hub id) whose mean, std and size the transforms use "
            "instead of the student's timm data config."
        },
    )
    train_augment: bool = field(
        default=True,
        metadata={"help": "Random training augmentation (timm's); false trains on the evaluation transform."},
    )
    loader: str = field(
        default="auto",
        metadata={
            "help": "auto: the fast path (uint8 on the device) for small images of one size, else transforms on the "
            "fly. fast / transforms force one.",
            "choices": LOADERS,
        },
    )
    fast_path_max_bytes: int = field(
        default=4 * 2**30, metadata={"help": "auto picks the fast path only for datasets up to this many bytes."}
    )
    data_on_device: bool = field(
        default=True,
        metadata={"help": "Fast path: keep the uint8 dataset on the GPU (else in pinned host memory)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the training split (IterableDataset, split across ranks); needs --max_steps."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Streaming: shuffle buffer, in samples."})
    lr_decay_at: list[float] | None = field(
        default=None,
        metadata={
            "help": "Step decay points, as fractions of each stage's optimizer steps (e.g. 0.625 0.75 0.875); they "
            "replace --lr_scheduler_type. Default: preset (cifar100.py: 150/180/210 of 240 epochs; both: 0.57 0.86 "
            "for the ensemble, i.e. 200/300 of 350); an explicit --lr_scheduler_type alone turns the default off."
        },
    )
    lr_decay_factor: float = field(default=0.1, metadata={"help": "Learning-rate factor at each decay point."})
    adam_l2: bool = field(
        default=False,
        metadata={
            "help": "Train with torch.optim.Adam, whose weight decay is an L2 term added to the gradient (coupled), "
            "instead of --optim; --learning_rate, --weight_decay, --adam_beta1/2 and --adam_epsilon set it. Default "
            "for --method ensemble (its authors' optimizer); an explicit --optim turns it off."
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where stage 1 caches the trained teacher. Default <output_dir>/teacher-<name>."},
    )
    teacher_epochs: float | None = field(
        default=None, metadata={"help": "Stage-1 epochs. Default: --num_train_epochs."}
    )
    teacher_cache: int | None = field(
        default=None,
        metadata={
            "help": "kd: distil from a teacher cache of R stored views per image (the teacher runs once, before "
            "training); built at --teacher_cache_path, reused when it fits this run, refused otherwise. Needs the "
            "fast data path."
        },
    )
    teacher_cache_top_k: int | None = field(
        default=None, metadata={"help": "kd with --teacher_cache: store the k largest logits per view (default: all)."}
    )
    teacher_cache_path: str | None = field(
        default=None,
        metadata={"help": "kd with --teacher_cache: the cache's folder. Default: <output_dir>/teacher-outputs-R<R>."},
    )
    teacher_max_steps: int | None = field(default=None, metadata={"help": "Stage-1 steps. Default: --max_steps."})
    select_ratio: float = field(default=0.75, metadata={"help": "unix: share of each batch the teacher sees."})
    uncertainty: str = field(default="entropy", metadata={"help": "unix: entropy, least_confidence, margin, random."})
    mixup: bool = field(default=True, metadata={"help": "unix: mix confident samples by rank."})
    target_flops_ratio: float = field(default=0.25, metadata={"help": "search: FLOPs budget relative to the teacher."})
    l1_weight: float = field(default=1.0, metadata={"help": "search: initial weight of the gate L1 penalty."})
    search_epochs: float = field(
        default=10, metadata={"help": "search: epochs of the search phase (preset; cifar100.py: 30)."}
    )
    search_max_steps: int | None = field(default=None, metadata={"help": "search: steps. Default: --max_steps."})
    num_students: int = field(default=5, metadata={"help": "ensemble: number of students S."})
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run in --output_dir: each stage from its last complete checkpoint. Refused when the "
            "run folder records another method, dataset or defining setting."
        },
    )


#: What both presets train with unless a method or the preset says otherwise: the papers' SGD (RepDistiller / UNIX),
#: a checkpoint and an evaluation every epoch, nothing reported.
TRAINING_DEFAULTS = dict(
    per_device_train_batch_size=64,
    learning_rate=0.05,
    weight_decay=5e-4,
    optim="sgd",
    optim_args="momentum=0.9",
    warmup_steps=0,
    # The papers do not clip. The Trainer's default (1.0) would clip most KD steps (T^2-scaled gradients) and few
    # CE steps: a hidden learning-rate cut for the distilled student only (README, "A note on gradient clipping").
    max_grad_norm=0.0,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    report_to="none",
    remove_unused_columns=False,
    # It reads the loss on the host every step (a sync); the recipe's own divergence check reads the logged terms.
    logging_nan_inf_filter=False,
    # Every parameter takes part in every forward; searching for unused ones costs a graph traversal per step.
    ddp_find_unused_parameters=False,
)
#: The online ensemble's optimiser and schedule in its authors' released CIFAR-100 configs: `torch.optim.Adam` with L2
#: weight decay (`adam_l2`), lr 1e-3, weight decay 1e-5, batch 128, x0.1 at epochs 200 and 300 of 350. `adamw_torch`
#: is what `--adam_l2 false` falls back to. Both presets' `--method ensemble` defaults.
ENSEMBLE_DEFAULTS = dict(
    adam_l2=True,
    optim="adamw_torch",
    optim_args=None,
    learning_rate=1e-3,
    weight_decay=1e-5,
    per_device_train_batch_size=128,
    lr_decay_at=[200 / 350, 300 / 350],
)
#: The loss settings of the papers' recipes (docs/methods.md): RepDistiller / UNIX for kd, unix, search.
KD_DEFAULTS = {
    "kd": dict(alpha=0.9, temperature=4.0),
    "unix": dict(alpha=1.0, temperature=4.0),
    "search": dict(alpha=0.9, temperature=4.0),
}


def log(args, message: str, tag: str = "recipe") -> None:
    if args.process_index == 0:
        print(f"[{tag}] {message}", flush=True)


# ---- command line ---------------------------------------------------------------------------------------------------
def parse_args(preset: Preset, argv: list[str] | None) -> tuple[RecipeArguments, DistillationArguments, dict]:
    """Parse the command line over the preset's defaults for the method; returns the hub request separately.

    A `--hub_token` moves from the arguments to this process's `HF_TOKEN` (which `huggingface_hub` reads) and to the
    returned hub request, so no file the Trainer writes (`training_args.bin`) holds it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="kd", choices=METHODS)
    method = pre.parse_known_args(argv)[0].method

    parser = HfArgumentParser((RecipeArguments, DistillationArguments))
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    parser.set_defaults(**{**preset.defaults, "bf16": bf16, **preset.method_defaults[method]})

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    command = recipe_command(preset, argv)
    if not given("--output_dir"):
        argv += ["--output_dir", f"runs/{preset.runs}_{method}"]
    recipe, args = parser.parse_args_into_dataclasses(argv)
    recipe.command = command
    if given("--lr_scheduler_type") and not given("--lr_decay_at"):
        recipe.lr_decay_at = None  # an explicit Trainer schedule replaces the preset's step decay
    recipe.step_decay = recipe.lr_decay_at is not None
    if given("--optim") and not given("--adam_l2"):
        recipe.adam_l2 = False  # an explicit Trainer optimizer replaces the method's default Adam
    if method != "ensemble" and not recipe.teacher:
        parser.error(f"--method {method} needs --teacher (a folder, a Hub id or a timm name)")
    if not (recipe.dataset_name or recipe.dataset_path):
        parser.error("pass --dataset_name (a Hub id, e.g. beans) or --dataset_path (a local copy)")
    if recipe.streaming and args.max_steps <= 0:
        parser.error("--streaming reads a stream without a known length: give the training length as --max_steps")
    if recipe.streaming and recipe.loader == "fast":
        parser.error("--loader fast holds the whole dataset in memory; it does not stream")
    if recipe.validation_split_percentage is not None and not 0 < recipe.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must lie in (0, 100), got {recipe.validation_split_percentage}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name")
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and method in ("search", "ensemble"):
        parser.error(
            f"--method {method} needs the whole model on every rank (gate extraction, student export); "
            "launch it with DDP (recipes/accelerate_configs/multi_gpu.yaml) instead of FSDP"
        )
    changes = {"push_to_hub": False}  # the Trainer would push checkpoints in its own format; the recipe pushes
    if not given("--channels_last"):
        # Faster convolutions on CUDA; none on CPU, where torch 2.14.1 aborts in the backward of some narrow convs.
        changes["channels_last"] = args.device.type == "cuda"
    hub = {"push": args.push_to_hub, "repo_id": args.hub_model_id, "token": args.hub_token}
    hub["private"] = args.hub_private_repo
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
        changes["hub_token"] = None
        log(
            args,
            "warning: --hub_token on a command line is visible to other users of this machine and kept in the shell "
            "history; log in once with `hf auth login` or set HF_TOKEN instead. It is kept out of every file this "
            "run writes (cards, training_args.bin, the run record).",
            preset.name,
        )
    return recipe, dataclasses.replace(args, **changes), hub


def recipe_command(preset: Preset, argv: list[str]) -> str:
    """The command as the user typed it, with every token redacted."""
    # accelerate launch and torchrun set LOCAL_RANK; the script's own arguments are exact either way.
    launcher = "accelerate launch" if "LOCAL_RANK" in os.environ else "python"
    ran = os.path.abspath(sys.argv[0]) == os.path.abspath(preset.script)
    script = sys.argv[0] if ran else f"recipes/{os.path.basename(preset.script)}"
    return f"{launcher} {shlex.join(redact_argv([script, *argv]))}"


# ---- checks before any data is read ---------------------------------------------------------------------------------
def check_writable(folder: str | Path, what: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise RecipeError(f"{what} {str(folder)!r} is not writable ({type(err).__name__}: {err})") from err


def method_dir(recipe, args) -> str:
    """`<output_dir>/<method>`: the run record and every stage's checkpoints. Methods never share a stage folder."""
    return os.path.join(args.output_dir, recipe.method)


def stage_args(recipe, args: DistillationArguments, name: str, **changes) -> DistillationArguments:
    return dataclasses.replace(args, output_dir=os.path.join(method_dir(recipe, args), name), **changes)


def is_architecture(name: str) -> bool:
    return not os.path.exists(name) and "/" not in name and ":" not in name and timm.is_model(name)


def has_pretrained_weights(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict))


def trains_teacher(recipe) -> bool:
    """Whether stage 1 trains the teacher: an architecture without pretrained weights."""
    return (
        recipe.method != "ensemble" and is_architecture(recipe.teacher) and not has_pretrained_weights(recipe.teacher)
    )


def teacher_cache(recipe, args) -> Path:
    return Path(recipe.teacher_cache_dir or os.path.join(args.output_dir, f"teacher-{recipe.teacher}"))


def validate(recipe, args, hub) -> None:
    """Every check that needs neither data nor training, so that a typo never costs a trained stage."""

    def fail(message: str):
        raise RecipeError(message)

    check_writable(args.output_dir, "--output_dir")
    if recipe.lr_decay_at is not None and not all(0 < m <= 1 for m in recipe.lr_decay_at):
        fail(f"--lr_decay_at takes fractions of the run in (0, 1], got {recipe.lr_decay_at}")
    if not recipe.lr_decay_factor > 0:
        fail(f"--lr_decay_factor must be > 0, got {recipe.lr_decay_factor}")
    for flag in ("teacher_epochs", "teacher_max_steps", "search_max_steps"):
        value = getattr(recipe, flag)
        if value is not None and not value > 0:
            fail(f"--{flag} must be > 0, got {value}")
    if recipe.method != "search" and not (os.path.isdir(recipe.student) or timm.is_model(recipe.student)):
        fail(f"--student {recipe.student!r} is not a timm architecture (nor a folder of a trained student)")
    try:
        if recipe.method == "unix":
            UncertaintyMixupCallback(select_ratio=recipe.select_ratio, uncertainty=recipe.uncertainty)
        if recipe.method == "search":
            GateSearchCallback(target_flops_ratio=recipe.target_flops_ratio, l1_weight=recipe.l1_weight)
            check_writable(stage_args(recipe, args, "search").output_dir, "the search report's folder")
            if not recipe.search_epochs > 0:
                fail(f"--search_epochs must be > 0, got {recipe.search_epochs}")
        if recipe.method == "ensemble" and recipe.num_students < 1:
            fail(f"--num_students must be >= 1, got {recipe.num_students}")
        if recipe.teacher_cache is not None:
            if recipe.method != "kd":
                fail(f"--teacher_cache works with --method kd only (--method {recipe.method} needs the live teacher)")
            if recipe.teacher_cache < 1 or (recipe.teacher_cache_top_k or 1) < 1:
                fail(f"--teacher_cache and --teacher_cache_top_k must be >= 1, got {recipe.teacher_cache}, "
                     f"{recipe.teacher_cache_top_k}")  # fmt: skip
            if recipe.streaming or recipe.loader == "transforms":
                fail("--teacher_cache replays stored views, which needs the fast data path (images decoded once, "
                     "augmented on the device): drop --streaming / --loader transforms, or distil online")  # fmt: skip
        elif recipe.teacher_cache_top_k is not None or recipe.teacher_cache_path is not None:
            fail("--teacher_cache_top_k and --teacher_cache_path go with --teacher_cache R")
    except ValueError as err:
        raise RecipeError(f"--method {recipe.method}: {err}") from err
    if hub["push"]:
        repo = hub["repo_id"]
        if repo.count("/") != 1 or not all(repo.split("/")):
            fail(f"--hub_model_id must look like user/name, got {repo!r}")
    if trains_teacher(recipe):
        check_teacher_cache(recipe, args)


def check_teacher_cache(recipe, args) -> None:
    """The stage-1 cache is reused when it holds this teacher, written when it is new or empty; anything else is
    refused now, before stage 1 trains a teacher that could not be stored."""
    cache = teacher_cache(recipe, args)
    if not cache.exists():
        check_writable(cache.parent, "the folder of --teacher_cache_dir")
        return
    if not cache.is_dir():
        raise RecipeError(f"--teacher_cache_dir {str(cache)!r} is a file, not a folder")
    if (cache / "model.safetensors").is_file():
        try:
            arch = json.loads((cache / "config.json").read_text()).get("architecture")
        except (OSError, ValueError) as err:
            raise RecipeError(f"the cached teacher at {str(cache)!r} has no readable config.json: {err}") from err
        if arch != recipe.teacher:
            raise RecipeError(
                f"the cached teacher {str(cache)!r} is a {arch}, not a {recipe.teacher}; pass another "
                "--teacher_cache_dir, or delete that folder"
            )
        return
    if any(cache.iterdir()):
        raise RecipeError(
            f"--teacher_cache_dir {str(cache)!r} is not empty and holds no trained teacher (no model.safetensors), "
            f"so stage 1 could not store the teacher it trains there. Pass a new or empty folder, or the folder "
            f"of an earlier stage 1 run for {recipe.teacher}"
        )
    check_writable(cache, "--teacher_cache_dir")


# ---- data -----------------------------------------------------------------------------------------------------------
@dataclass
class RecipeData:
    """The data of one run, however it is decoded.

    Attributes:
        train, eval: datasets the Trainer can load (a `DeviceImageDataset`, a `datasets.Dataset` with a transform,
            or a stream split by node for training).
        collator: the Trainer's `data_collator` for both.
        num_classes: the label set's size; class_names its names when the dataset has them.
        input_size: `(C, H, W)` of the student's input.
        path: how images are decoded, for the log: `"fast"` (uint8 on the device) or `"transforms"`.
        data_config: the timm data config the inputs follow (`input_size`, `mean`, `std`, ...).
        description: what the card says about the dataset.
    """

    train: Any
    eval: Any
    collator: Callable
    num_classes: int
    class_names: list[str] | None
    input_size: tuple[int, int, int]
    path: str
    data_config: dict
    description: str


def load_splits(recipe: RecipeArguments, args):
    """`(train, eval)`: raw `datasets` splits, the training one a stream with `--streaming`."""
    splits = load_image_dataset(
        recipe.dataset_name, recipe.dataset_path, config=recipe.dataset_config, streaming=recipe.streaming
    )
    if recipe.train_split not in splits:
        raise RecipeError(f"the dataset has no split {recipe.train_split!r}; it has {sorted(splits)}")
    train = splits[recipe.train_split]
    eval_split = recipe.eval_split or next((s for s in EVAL_SPLITS if s in splits), None)
    if recipe.eval_split is not None and eval_split not in splits:
        raise RecipeError(f"the dataset has no split {eval_split!r}; it has {sorted(splits)}")
    if eval_split is None:
        if recipe.validation_split_percentage is None or recipe.streaming:
            fix = (
                "give --eval_split one of them; a stream cannot hold out a percentage of its training split"
                if recipe.streaming
                else f"pass --validation_split_percentage 10 to hold out 10 % of {recipe.train_split!r}, or "
                "--eval_split NAME"
            )
            raise RecipeError(f"the dataset has no evaluation split (it has {sorted(splits)}): {fix}")
        held = train.train_test_split(test_size=recipe.validation_split_percentage / 100, seed=args.seed)
        train, evaluation = held["train"], held["test"]
        eval_split = f"{recipe.validation_split_percentage:g} % of {recipe.train_split} held out"
    else:
        evaluation = splits[eval_split]
    recipe.eval_split = eval_split
    if recipe.streaming:
        import datasets

        n = recipe.max_eval_samples or 2000
        # Evaluation needs a fixed set on every rank: the first n examples, held in memory.
        evaluation = datasets.Dataset.from_list(list(evaluation.take(n)), features=evaluation.features)
        if recipe.max_train_samples is not None:
            train = train.take(recipe.max_train_samples)
    else:
        if recipe.max_train_samples is not None:
            train = train.select(range(min(recipe.max_train_samples, len(train))))
        if recipe.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    return train, evaluation


def load_raw(recipe: RecipeArguments, args) -> tuple:
    """The data loading of a run: `(train, eval, image column, label column, number of classes, class names)`,
    before any decoding."""
    train, evaluation = load_splits(recipe, args)
    try:
        image_column, label_column = find_columns(train.features, recipe.image_column, recipe.label_column)
    except ValueError as err:
        raise RecipeError(str(err)) from err
    # String labels become class labels; outliers, empty classes and negative labels are named before any training.
    train, evaluation, num_classes, names = prepare_labels(
        train, evaluation, label_column, num_labels=recipe.num_labels, log=lambda text: log(args, text, "data")
    )
    return train, evaluation, image_column, label_column, num_classes, names


def dataset_fingerprint(recipe, raw) -> str:
    """A digest of what the run trains and evaluates on: the `datasets` fingerprints of both splits (after any
    selection or hold-out), the columns and the class names. A stream has no fingerprint: its source stands in."""
    train, evaluation, image_column, label_column, num_classes, names = raw
    source = getattr(train, "_fingerprint", None)
    if source is None:
        source = [recipe.dataset_name, recipe.dataset_path, recipe.dataset_config, recipe.train_split]
        source += [recipe.max_train_samples, str(train.features)]
    parts = [source, getattr(evaluation, "_fingerprint", None), image_column, label_column, num_classes, names]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def choose_path(recipe, train, evaluation, image_column: str, data_config: dict) -> tuple[str, str]:
    """`("fast" | "transforms", why)`."""
    if recipe.streaming:
        return "transforms", "streaming"
    if recipe.loader == "transforms":
        return "transforms", "--loader transforms"
    sizes = image_sizes(train, image_column) | image_sizes(evaluation, image_column)
    (w, h) = next(iter(sizes))
    channels = data_config["input_size"][0]
    nbytes = (len(train) + len(evaluation)) * channels * h * w
    wanted = None if recipe.image_size is None else tuple(data_config["input_size"][1:])
    problems = []
    if len(sizes) > 1:
        lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        problems.append(f"images come in {len(sizes)} sizes, from {lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}")
    elif wanted is not None and wanted != (h, w):
        problems.append(f"--image_size {wanted[0]}x{wanted[1]} differs from the images' {h}x{w}")
    if recipe.loader == "fast":
        if problems:
            raise RecipeError(f"--loader fast needs images of one size, trained at that size: {problems[0]}")
        return "fast", "--loader fast"
    if len(sizes) == 1 and max(h, w) > FAST_PATH_MAX_SIDE:
        problems.append(f"{h}x{w} images are larger than the fast path's {FAST_PATH_MAX_SIDE} px")
    if nbytes > recipe.fast_path_max_bytes:
        problems.append(f"{nbytes / 2**30:.1f} GiB decoded exceeds --fast_path_max_bytes")
    if problems:
        return "transforms", "; ".join(problems)
    return "fast", f"all {len(train) + len(evaluation)} images are {h}x{w} ({nbytes / 2**20:.1f} MiB as uint8)"


def load_data(recipe: RecipeArguments, args, student: nn.Module, raw, tag: str) -> tuple[RecipeData, Any]:
    """The run's data on the path `choose_path` picks, with the inputs `student` expects, and `args` set for that
    path. `raw` is what `load_raw` returned."""
    train, evaluation, image_column, label_column, num_classes, names = raw
    processor = None
    if recipe.image_processor:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(recipe.image_processor)
    data_config = data_config_for(student, image_size=recipe.image_size, processor=processor)
    channels = data_config["input_size"][0]
    path, why = choose_path(recipe, train, evaluation, image_column, data_config)
    description = recipe.dataset_name or f"local copy at {recipe.dataset_path}"
    if recipe.dataset_name and recipe.dataset_path:
        description = f"local copy of {recipe.dataset_name} at {recipe.dataset_path}"

    if path == "fast":
        out = []
        for split, ds in (("train", train), ("eval", evaluation)):
            tensors, _ = to_uint8_tensors(ds, image_column, label_column, channels=channels, desc=f"decoding {split}")
            on_gpu = args.device.type == "cuda" and recipe.data_on_device
            out.append(
                DeviceImageDataset.from_dataset(tensors, device=args.device if on_gpu else None, pin_memory=True)
            )
        input_size = tuple(out[0].images.shape[1:])
        data_config = {**data_config, "input_size": input_size}
        # A batch is one gather: worker processes would only add copies (and cannot share CUDA tensors).
        changes = dict(device_augment=True, image_mean=list(data_config["mean"]), image_std=list(data_config["std"]))
        changes.update(dataloader_num_workers=0)
        if on_gpu:
            changes.update(dataloader_pin_memory=False)  # the data already lives on the GPU: nothing to pin
        args = dataclasses.replace(args, **changes)
        where = f"uint8 tensors on {out[0].device}, augmented there (crop with 4-pixel padding, flip)"
        collator = DeviceImageDataset.collate
        train, evaluation = out
    else:
        train_tf, eval_tf = image_transforms(data_config, train_augment=recipe.train_augment)
        mode = "RGB" if channels == 3 else "L"
        train_fn = ImageClassificationTransform(train_tf, image_column, label_column, mode)
        eval_fn = ImageClassificationTransform(eval_tf, image_column, label_column, mode)
        # Left undecoded so that the transform decodes each image itself: an unreadable one is named by its file.
        train, evaluation = undecoded(train, image_column), undecoded(evaluation, image_column)
        evaluation = evaluation.select_columns([image_column, label_column]).with_transform(eval_fn)
        if recipe.streaming:
            columns = list(train.features)
            train = train.shuffle(seed=args.seed, buffer_size=recipe.shuffle_buffer_size)
            train = train.map(train_fn, batched=True, remove_columns=columns)
            train = split_stream_by_node(train, rank=args.process_index, world_size=args.world_size)
        else:
            train = train.select_columns([image_column, label_column]).with_transform(train_fn)
        input_size = tuple(data_config["input_size"])
        size = f"{input_size[1]}x{input_size[2]}"
        where = (
            f"decoded on the fly in {args.dataloader_num_workers} DataLoader worker(s), timm transforms at {size}"
            + (f", stream split across {args.world_size} rank(s)" if recipe.streaming else "")
        )
        collator = collate_tensor_batch
    log(args, f"data path: {path} ({where}): {why}", tag)
    data = RecipeData(
        train=train,
        eval=evaluation,
        collator=collator,
        num_classes=num_classes,
        class_names=names,
        input_size=input_size,
        path=path,
        data_config=data_config,
        description=description,
    )
    return data, args


def validate_with_data(recipe, data: RecipeData) -> None:
    """The checks that need the class count or the image size, before stage 1 trains a teacher."""
    if recipe.teacher_cache is not None and data.path != "fast":
        raise RecipeError(
            f"--teacher_cache replays stored views, which needs the fast data path; these images take the "
            f"{data.path} path. Distil online, or resize the images to one size (--loader fast)"
        )
    if recipe.method == "search" and trains_teacher(recipe):
        # The budget must be reachable by the teacher stage 1 would train; checked on untrained weights of that shape.
        gated = add_gates(timm.create_model(recipe.teacher, num_classes=data.num_classes))
        plan = gate_plan(gated).measure(gated, tuple(data.input_size))
        try:
            check_budget(plan, recipe.target_flops_ratio)
        except ValueError as err:
            raise RecipeError(f"--target_flops_ratio: {err}") from err


# ---- the run record -------------------------------------------------------------------------------------------------
#: The settings that define a run, per method: a resumed run must match them all.
_DEFINING = ("seed", "learning_rate", "weight_decay", "optim", "optim_args", "adam_l2", "lr_scheduler_type")
_DEFINING += ("lr_decay_at", "lr_decay_factor", "per_device_train_batch_size", "gradient_accumulation_steps")
_DEFINING += ("num_train_epochs", "max_steps", "image_size", "image_column", "label_column", "eval_split")
_DEFINING_BY_METHOD = {
    "kd": ("teacher", "student", "alpha", "temperature", "teacher_epochs", "teacher_max_steps", "teacher_cache")
    + ("teacher_cache_top_k",),
    "unix": ("teacher", "student", "alpha", "temperature", "teacher_epochs", "teacher_max_steps", "select_ratio")
    + ("uncertainty", "mixup"),
    "search": ("teacher", "alpha", "temperature", "teacher_epochs", "teacher_max_steps", "target_flops_ratio")
    + ("l1_weight", "search_epochs", "search_max_steps"),
    "ensemble": ("student", "num_students"),
}


def run_record(recipe, args, raw) -> dict:
    """What the run folder holds: the method, the dataset's fingerprint and every defining setting."""
    names = ("method", *_DEFINING, *_DEFINING_BY_METHOD[recipe.method])
    settings = {n: getattr(recipe, n) if hasattr(recipe, n) else getattr(args, n) for n in names}
    dataset = {"fingerprint": dataset_fingerprint(recipe, raw), "source": recipe.dataset_path or recipe.dataset_name}
    return {"settings": json.loads(json.dumps(settings, default=str)), "dataset": dataset}


def check_run_record(recipe, args, raw, tag: str) -> dict:
    """Compare this command with the run folder's record when it resumes (a difference is refused, naming both
    values), then record it: `<output_dir>/<method>/run.json`, with every command that ran there."""
    record = run_record(recipe, args, raw)
    path = Path(method_dir(recipe, args)) / RUN_RECORD
    commands = []
    if recipe.resume:
        if not path.is_file():
            others = sorted(p.parent.name for p in Path(args.output_dir).glob(f"*/{RUN_RECORD}"))
            if others:
                raise RecipeError(
                    f"--resume: {args.output_dir!r} holds a {' and a '.join(others)} run, not a {recipe.method} run; "
                    f"resume it with --method {others[-1]}, or drop --resume to start --method {recipe.method} "
                    "(each method keeps its checkpoints in its own folder)"
                )
        else:
            old = json.loads(path.read_text())
            diffs = [
                f"{name}: the run has {old['settings'].get(name)!r}, this command {value!r}"
                for name, value in record["settings"].items()
                if old["settings"].get(name) != value
            ]
            if old["dataset"]["fingerprint"] != record["dataset"]["fingerprint"]:
                diffs.append(
                    f"dataset: the run trained on {old['dataset']['source']!r} (fingerprint "
                    f"{old['dataset']['fingerprint']}), this command gives {record['dataset']['source']!r} "
                    f"(fingerprint {record['dataset']['fingerprint']})"
                )
            if diffs:
                raise RecipeError(
                    f"--resume: this command differs from the run in {str(path.parent)!r}: "
                    + "; ".join(diffs)
                    + ". Resume with the run's settings, or drop --resume (or pick another --output_dir) to start anew"
                )
            commands = old.get("commands", [])
    record["commands"] = [*commands, recipe.command]
    if args.process_index == 0:
        if not recipe.resume:
            # A new run replaces the record, so the earlier run's checkpoints describe nothing any more: a later
            # --resume must not continue them (and the Trainer's rotation would keep them over the new ones).
            stale = sorted(Path(method_dir(recipe, args)).glob(f"*/{PREFIX_CHECKPOINT_DIR}-*"))
            for folder in stale:
                shutil.rmtree(folder)
            if stale:
                log(args, f"starting anew: removed {len(stale)} checkpoint(s) of the earlier run: {stale[0]} ...", tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    return record


# ---- stages ---------------------------------------------------------------------------------------------------------
def with_step_decay(trainer_cls: type, milestones: list[float], factor: float) -> type:
    """`trainer_cls` whose learning rate is multiplied by `factor` at each fraction of the run in `milestones`."""

    class StepDecay(trainer_cls):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                steps = sorted(round(m * num_training_steps) for m in milestones)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: factor ** sum(step >= s for s in steps)
                )
            return self.lr_scheduler

    StepDecay.__name__ = StepDecay.__qualname__ = f"StepDecay{trainer_cls.__name__}"
    return StepDecay


def optimizer_cls_and_kwargs(recipe, args: DistillationArguments) -> tuple | None:
    """The Trainer's `optimizer_cls_and_kwargs` for a stage: the coupled Adam with `--adam_l2`, else `--optim`'s."""
    return adam_l2(args) if recipe.adam_l2 else None


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest `checkpoint-N` in `folder` that was written to the end. The Trainer writes `trainer_state.json`
    last, so a checkpoint without it was cut short (a kill, a full disk) and is skipped."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        prefix, _, step = name.partition("-")
        path = os.path.join(folder, name)
        if (
            prefix == PREFIX_CHECKPOINT_DIR
            and step.isdigit()
            and os.path.isfile(os.path.join(path, "trainer_state.json"))
        ):
            steps.append((int(step), path))
    return max(steps)[1] if steps else None


def run_stage(trainer_cls, recipe, args, data: RecipeData, *, step_decay: bool = True, tag: str, **kwargs):
    """Train one stage and return `(trainer, final eval metrics)`."""
    if step_decay and recipe.step_decay:
        trainer_cls = with_step_decay(trainer_cls, recipe.lr_decay_at, recipe.lr_decay_factor)
    # A stream split by node is loaded as this rank's part; any other dataset as the Trainer does.
    trainer_cls = type(trainer_cls.__name__, (NodeSplitLoaderMixin, trainer_cls), {})
    kwargs.setdefault("compute_metrics", TopKAccuracy())
    trainer = trainer_cls(
        args=args,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe, args),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        preprocess_logits_for_metrics=kwargs["compute_metrics"].rank,
        **kwargs,
    )
    checkpoint = last_complete_checkpoint(args.output_dir) if recipe.resume else None
    if checkpoint is not None:
        log(args, f"resuming from {checkpoint}", tag)
    trainer.train(resume_from_checkpoint=checkpoint)
    # The per-epoch evaluation usually ran at the last step already; evaluate again only if it did not.
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is None or last.get("step") != trainer.state.global_step:
        last = trainer.evaluate()
    return trainer, last


def full_model(trainer) -> nn.Module | None:
    """The trained model, whole. Under FSDP its shards are gathered (a collective: every rank must call this) and
    only the main process gets a model back, rebuilt from the architecture's arguments; otherwise `trainer.model`."""
    if not trainer.is_fsdp_enabled:
        return trainer.model
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    sharded = trainer.model
    arch = sharded.pretrained_cfg["architecture"]
    model = timm.create_model(arch, num_classes=sharded.num_classes, **getattr(sharded, "model_args", {}))
    model.load_state_dict(state)
    return model


def percent(metrics: dict, prefix: str = "eval_") -> dict:
    """`eval_top1: 0.7123` -> `top1: 71.23`."""
    return {k[len(prefix) :]: round(100 * v, 2) for k, v in metrics.items() if k.startswith(prefix) and "_top" in k}


def describe_inputs(model: nn.Module, data: RecipeData) -> nn.Module:
    """Write the input size and statistics the model is trained on into its timm `pretrained_cfg`, so the saved
    folder tells a loader (and a later run using it as a teacher) what it expects."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        model.pretrained_cfg = {
            **cfg,
            "input_size": tuple(data.input_size),
            "mean": tuple(data.data_config["mean"]),
            "std": tuple(data.data_config["std"]),
        }
    return model


def head_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    n = getattr(model, "num_classes", None) or getattr(config, "num_labels", None)
    return int(n) if n else None


# ---- models ---------------------------------------------------------------------------------------------------------
def build_student(recipe: RecipeArguments, args, num_classes: int | None) -> nn.Module:
    """The student named by `--student`: a timm architecture (built with `num_classes`, its initial weights from
    `--seed` alone) or a trained folder."""
    if os.path.isdir(recipe.student):
        return load_student(recipe.student)
    set_seed(args.seed)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(recipe.student, pretrained=recipe.pretrained_student, **kwargs)


def check_head(student: nn.Module, data: RecipeData, label_column: str | None) -> None:
    head = head_size(student)
    if head is not None and head < data.num_classes:
        raise RecipeError(
            f"the label column {label_column or ''!r} has {data.num_classes} classes but the student's head has "
            f"{head} outputs; use a student built for {data.num_classes} classes (a timm architecture name is built "
            "with the dataset's class count)"
        )


# ---- teacher --------------------------------------------------------------------------------------------------------
class TeacherView(nn.Module):
    """The teacher as `DistillationTrainer` feeds it: the student's batch re-normalised and resized to its own
    input. Used to evaluate a teacher on the student's evaluation set."""

    def __init__(self, teacher: nn.Module, student: nn.Module, image_size: list[int] | None):
        super().__init__()
        self.teacher, self.image_size = teacher, image_size
        self.renorm = input_normalization(student, teacher)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.renorm is not None:
            scale, shift = (t.to(pixel_values.device) for t in self.renorm)
            pixel_values = torch.addcmul(shift, pixel_values, scale)
        if self.image_size:
            pixel_values = resize_images(pixel_values, self.image_size)
        out = self.teacher(pixel_values)
        return getattr(out, "logits", out)


def get_teacher(recipe, args, data: RecipeData, student: nn.Module, tag: str):
    """The teacher, what the card says about it, and `args` with `teacher_image_size` set when the teacher's timm
    data config asks for another resolution than the student's. Stage 1 trains and caches an architecture without
    weights (at the data's resolution), and the teacher is evaluated on the student's evaluation set as it will be
    fed: re-normalised and resized to its own input."""
    num_classes = data.num_classes
    if not trains_teacher(recipe):
        teacher = load_teacher(recipe.teacher)
        info = {"teacher": recipe.teacher}
    else:
        cache = teacher_cache(recipe, args)
        if (cache / "model.safetensors").is_file():
            config = json.loads((cache / "config.json").read_text())
            if config.get("architecture") != recipe.teacher or config.get("num_classes") != num_classes:
                raise TeacherLoadError(
                    f"the cached teacher {str(cache)!r} is a {config.get('architecture')} with "
                    f"{config.get('num_classes')} classes, not a {recipe.teacher} with {num_classes}; delete it or "
                    "pass another --teacher_cache_dir"
                )
            log(args, f"stage 1: reusing the trained teacher cached at {cache}", tag)
            teacher = load_student(cache)
        else:
            teacher = train_teacher(recipe, args, data, cache, tag)
        info = {"teacher": f"{recipe.teacher} (trained by stage 1, cached at {cache})"}
    teacher_classes = head_size(teacher)
    if teacher_classes != num_classes:
        raise TeacherLoadError(
            f"the teacher {recipe.teacher!r} predicts {teacher_classes} classes but the label column has "
            f"{num_classes}; distil from a teacher trained on this label set"
        )
    try:
        check_label_names(
            teacher, data.class_names, teacher_name=f"the teacher {recipe.teacher!r}", log=lambda t: log(args, t, tag)
        )
    except LabelNamesError as err:
        raise TeacherLoadError(str(err)) from err
    cfg = teacher_inputs(teacher, recipe.teacher)
    if args.teacher_image_size is None and isinstance(cfg, dict) and cfg.get("input_size"):
        teacher_hw = list(cfg["input_size"][1:])
        if teacher_hw != list(data.input_size[1:]):
            args = dataclasses.replace(args, teacher_image_size=teacher_hw)
            log(
                args,
                f"the teacher expects {teacher_hw[0]}x{teacher_hw[1]} inputs, the student gets "
                f"{data.input_size[1]}x{data.input_size[2]}: each batch is resized for the teacher on the device",
                tag,
            )
    evaluator = ClassificationTrainer(
        # A copy: FSDP would shard the model it evaluates, and the teacher stays whole.
        model=TeacherView(copy.deepcopy(teacher), student, args.teacher_image_size),
        args=stage_args(recipe, args, "teacher_eval"),
        eval_dataset=data.eval,
        data_collator=data.collator,
        compute_metrics=(accuracy := TopKAccuracy()),
        preprocess_logits_for_metrics=accuracy.rank,
    )
    top = percent(evaluator.evaluate())
    info["teacher"] += f"; top-1 {top.get('top1')} %, top-5 {top.get('top5')} % on {recipe.eval_split}"
    log(args, f"teacher: {info['teacher']}", tag)
    return teacher, info, args


def teacher_inputs(teacher: nn.Module, name: str) -> dict | None:
    """The teacher's expected input (`input_size`, `mean`, `std`): its timm `pretrained_cfg`, or, for a transformers
    model, its image processor's, attached as a `pretrained_cfg` so that `DistillationTrainer` re-normalises the
    student's batch for it. None when neither is known."""
    cfg = getattr(teacher, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return cfg
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):  # no preprocessor_config.json there
        return None
    config = data_config_for(processor=processor)
    teacher.pretrained_cfg = {k: config[k] for k in ("input_size", "mean", "std")}
    return teacher.pretrained_cfg


def train_teacher(recipe, args, data: RecipeData, cache: Path, tag: str) -> nn.Module:
    log(args, f"stage 1: no trained weights for {recipe.teacher}; training it, then caching it at {cache}", tag)
    set_seed(args.seed)  # the initial weights depend on --seed alone, not on what ran before
    teacher = timm.create_model(recipe.teacher, num_classes=data.num_classes, in_chans=data.input_size[0])
    describe_inputs(teacher, data)
    changes = {}
    if recipe.teacher_epochs is not None:
        changes["num_train_epochs"] = recipe.teacher_epochs
    if recipe.teacher_max_steps is not None:
        changes["max_steps"] = recipe.teacher_max_steps
    trainer, metrics = run_stage(
        ClassificationTrainer,
        recipe,
        stage_args(recipe, args, "stage1_teacher", **changes),
        data,
        model=teacher,
        tag=tag,
    )
    teacher = full_model(trainer)
    if trainer.is_world_process_zero():
        card = card_base(recipe, data, method="alone", metrics=percent(metrics))
        cache_teacher(teacher, cache, card=card, name=f"the stage-1 teacher {recipe.teacher}")
    trainer.accelerator.wait_for_everyone()
    # Every rank continues from the cached copy: the same weights everywhere, whole even after FSDP training.
    return load_student(cache)


def cache_teacher(teacher: nn.Module, cache: Path, *, card: dict, name: str) -> None:
    """Save a trained teacher to `cache` whole or not at all: written beside it, then renamed. The temporary folder
    has one fixed name, so a folder left by a killed run is cleared and reused; if the rename fails, the trained
    teacher stays there and the error names it."""
    check_finite_weights(teacher, name=name)
    tmp = cache.with_name(f".{cache.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(teacher, tmp, card=card)
    try:
        os.replace(tmp, cache)
    except OSError as err:
        raise TeacherLoadError(
            f"the trained teacher could not be moved to {str(cache)!r} ({type(err).__name__}: {err}); it is kept, "
            f"complete, at {str(tmp)!r}: move it there yourself, or pass --teacher {tmp}"
        ) from err


# ---- methods --------------------------------------------------------------------------------------------------------
# Each returns `[(name, model, card fields, extra files)]`, one entry per student to publish. `teacher` is any module
# the `DistillationTrainer` takes as `teacher_model`.
def run_kd(recipe, args, data, teacher, student, callbacks=(), tag: str = "recipe") -> list:
    distill_args = stage_args(recipe, args, "distill")
    source, card = {"teacher_model": teacher}, {}
    if recipe.teacher_cache is not None:
        cache = teacher_outputs(recipe, args, distill_args, data, teacher, student, tag)
        source = {"teacher_cache": cache}
        accuracy = cache.info.get("teacher_accuracy")
        card["notes"] = (
            f"Distilled from a teacher cache of {cache.info['teacher']}: R = {cache.num_views} stored views per image, "
            f"{f'top-{cache.top_k}' if cache.top_k else 'all'} logits; the teacher's accuracy on every stored view: "
            f"{'not measured' if accuracy is None else f'{accuracy:.4f}'}."
        )
    trainer, metrics = run_stage(
        DistillationTrainer, recipe, distill_args, data, model=student, callbacks=list(callbacks), tag=tag, **source
    )
    return [("student", full_model(trainer), {"metrics": percent(metrics), **card}, [])]


def teacher_outputs(recipe, args, distill_args, data, teacher, student, tag: str) -> TeacherCache:
    """The teacher cache of `--teacher_cache R` views: built once (the only teacher pass), reused by a later run that
    matches it, refused when it was built for another teacher, data or R."""
    path = recipe.teacher_cache_path or os.path.join(args.output_dir, f"teacher-outputs-R{recipe.teacher_cache}")
    cache = TeacherCache.build_or_load(
        path,
        teacher,
        data.train,
        distill_args,
        num_views=recipe.teacher_cache,
        top_k=recipe.teacher_cache_top_k,
        student=student,
        data_collator=data.collator,
    )
    log(args, f"teacher cache at {path}: {cache!r}", tag)  # the repr gives the teacher's measured accuracy
    return cache


def run_unix(recipe, args, data, teacher, student, callbacks=(), tag: str = "recipe") -> list:
    unix = UncertaintyMixupCallback(
        select_ratio=recipe.select_ratio, uncertainty=recipe.uncertainty, mixup=recipe.mixup
    )
    [(name, student, card, files)] = run_kd(recipe, args, data, teacher, student, [unix, *callbacks], tag)
    card["notes"] = (
        f"UNIX select_ratio={recipe.select_ratio}, uncertainty={recipe.uncertainty}, mixup={recipe.mixup}; "
        + f"measured over training: {json.dumps(unix.totals)}"
    )
    return [(name, student, card, files)]


def run_search(recipe, args, data, teacher, student=None, callbacks=(), tag: str = "recipe") -> list:
    """Gates on a copy of the teacher, searched at the data's input size; the found student is then distilled like
    `kd`."""
    input_size = tuple(data.input_size)
    gated = add_gates(copy.deepcopy(teacher))
    changes = {"num_train_epochs": recipe.search_epochs, "alpha": 1.0}  # the paper's objective: KL only
    if recipe.search_max_steps is not None:
        changes["max_steps"] = recipe.search_max_steps
    search_args = stage_args(recipe, args, "search", **changes)
    search = GateSearchCallback(
        target_flops_ratio=recipe.target_flops_ratio,
        l1_weight=recipe.l1_weight,
        input_size=input_size,
        report_dir=search_args.output_dir,
    )
    log(args, f"search phase: gates on a copy of the teacher, budget {recipe.target_flops_ratio} of its FLOPs", tag)
    # The gates must be free to move for the whole search: no step decay here.
    run_stage(
        DistillationTrainer,
        recipe,
        search_args,
        data,
        step_decay=False,
        model=gated,
        teacher_model=teacher,
        callbacks=[search],
        tag=tag,
    )
    if args.process_index == 0 and not search.report_files:
        raise RuntimeError(
            f"the search phase ended without its report in {search_args.output_dir}; the student is not published "
            "without it"
        )
    found = describe_inputs(
        extract_student(gated, target_flops_ratio=recipe.target_flops_ratio, input_size=input_size), data
    )
    log(args, f"search phase done: found student with {count_flops(found, input_size):,} FLOPs", tag)
    [(name, found, card, _)] = run_kd(recipe, args, data, teacher, found, callbacks, tag)
    widths = (search.report or {}).get("widths")
    card.update(target_flops_ratio=recipe.target_flops_ratio, **({"widths": widths} if widths is not None else {}))
    return [(name, found, card, list(search.report_files))]


def run_ensemble(recipe, args, data, callbacks=(), tag: str = "recipe") -> list:
    set_seed(args.seed)
    ens = build_ensemble(
        recipe.student,
        num_students=recipe.num_students,
        num_classes=data.num_classes,
        in_chans=data.input_size[0],
    )
    heads = [f"student{j}" for j in range(recipe.num_students)] + ["ensemble"]
    if args.device_augment and args.image_mean is None:
        # The ensemble module has no pretrained_cfg of its own; the fast path normalises with the data's statistics.
        args = dataclasses.replace(
            args, image_mean=list(data.data_config["mean"]), image_std=list(data.data_config["std"])
        )
    # The online ensemble has its own loss settings (OnlineEnsembleArguments' defaults); the KD ones do not apply.
    shared = {f.name for f in dataclasses.fields(DataPathArguments)}
    values = {k: v for k, v in stage_args(recipe, args, "ensemble").to_dict().items() if k in shared}
    trainer, metrics = run_stage(
        OnlineEnsembleTrainer,
        recipe,
        OnlineEnsembleArguments(**{**values, "hub_token": args.hub_token}),
        data,
        model=ens,
        compute_metrics=TopKAccuracy(heads=heads),
        callbacks=list(callbacks),
        tag=tag,
    )
    ens = trainer.model
    ensemble = {k: v for k, v in percent(metrics).items() if k.startswith("ensemble_")}
    out = []
    for j in range(recipe.num_students):
        student_metrics = {k.split("_", 1)[1]: v for k, v in percent(metrics).items() if k.startswith(f"student{j}_")}
        card = {
            "metrics": student_metrics,
            "widths": {"stage_widths": ens.widths[j]},
            "notes": f"student {j} of {recipe.num_students} in an online ensemble of {recipe.student}; "
            f"the ensemble's own accuracy: {ensemble}",
        }
        out.append((f"student{j}", describe_inputs(ens.export_student(j), data), card, []))
    return out


# ---- outputs --------------------------------------------------------------------------------------------------------
def card_base(recipe, data: RecipeData, **fields) -> dict:
    """The card fields every saved model shares. The command is the run's commands (a resumed run lists each), with
    every token redacted."""
    commands = getattr(recipe, "commands", None) or [recipe.command]
    card = {"dataset": data.description, "command": "\n".join(commands)}
    if data.class_names:
        card["label_names"] = data.class_names
    card.update(fields)
    return card


class PublishError(RuntimeError):
    """A push failed after every student had been saved locally; the message names the folders."""


def publish(recipe, args, data: RecipeData, hub: dict, results, teacher_info: dict, tag: str) -> list[str]:
    """Save every student under output_dir (main process), then push them when asked; returns the folders.

    Every student is checked and saved before the first push, so a Hub that is down or refuses a push loses nothing.
    """
    for name, model, _, _ in results:
        check_finite_weights(model, name=name)  # before any folder is written: no half-published ensemble
    saved = []
    for name, model, card, files in results:
        card = card_base(recipe, data, method=recipe.method, **teacher_info, **card)
        folder = os.path.join(args.output_dir, name)
        save_student(model, folder, card=card, files=files)
        saved.append((name, model, card, files, folder))
        log(args, f"saved {name} to {folder}: {card.get('metrics')}", tag)
    folders = [folder for *_, folder in saved]
    if not hub["push"]:
        return folders
    one = len(saved) == 1
    targets = [(hub["repo_id"] if one else f"{hub['repo_id']}-{name}", folder) for name, *_, folder in saved]
    pushed = []
    for (name, model, card, files, _), (repo, _) in zip(saved, targets):
        try:
            url = push_student(model, repo, card=card, files=files, token=hub["token"], private=hub["private"])
        except Exception as err:
            left = [(r, f) for r, f in targets if r not in pushed]
            raise PublishError(
                f"pushing {name} to {repo!r} failed ({type(err).__name__}: {err}).\n"
                f"Every student was saved first: {', '.join(folders)}.\n"
                f"Pushed: {', '.join(pushed) or 'none'}. Push the rest later with: "
                + "; ".join(f"hf upload {r} {f}" for r, f in left)
            ) from err
        pushed.append(repo)
        log(args, f"pushed {name} to {url}", tag)
    return folders


# ---- the run --------------------------------------------------------------------------------------------------------
def main(preset: Preset, argv: list[str] | None = None, callbacks=()) -> list[str]:
    """Run the recipe; `callbacks` join the training callbacks of the final stage (for tests and custom logging).
    Returns the saved folders (none on other ranks than the main process)."""
    tag = preset.name
    recipe, args, hub = parse_args(preset, argv)
    validate(recipe, args, hub)
    raw = load_raw(recipe, args)
    recipe.commands = check_run_record(recipe, args, raw, tag)["commands"]
    num_classes = raw[4]
    if recipe.method == "search":
        # The searched student is cut from the teacher, so the inputs follow the teacher's data config.
        student = None
        set_seed(args.seed)
        inputs_of = None if trains_teacher(recipe) else load_teacher(recipe.teacher)
        inputs_of = inputs_of or timm.create_model(recipe.teacher, num_classes=num_classes)
    else:
        student = inputs_of = None if recipe.method == "ensemble" else build_student(recipe, args, num_classes)
        if recipe.method == "ensemble":
            inputs_of = timm.create_model(recipe.student, num_classes=num_classes)
    data, args = load_data(recipe, args, inputs_of, raw, tag)
    launch = f"{args.world_size} process(es), {args.distributed_state.distributed_type.name}, {args.device}"
    count = "a stream of" if recipe.streaming else f"{len(data.train)}"
    log(args, f"{count} training and {len(data.eval)} evaluation images, {data.num_classes} classes; {launch}", tag)
    validate_with_data(recipe, data)
    if student is not None:
        check_head(student, data, raw[3])
        describe_inputs(student, data)
    if recipe.method == "ensemble":
        teacher_info = {}
        results = run_ensemble(recipe, args, data, callbacks, tag)
    else:
        teacher, teacher_info, args = get_teacher(recipe, args, data, student or inputs_of, tag)
        if recipe.method == "search":
            results = run_search(recipe, args, data, teacher, callbacks=callbacks, tag=tag)
        else:
            run = run_kd if recipe.method == "kd" else run_unix
            results = run(recipe, args, data, teacher, student, callbacks, tag)
    if args.process_index != 0:
        return []
    return publish(recipe, args, data, hub, results, teacher_info, tag)


def run_cli(main: Callable[[], Any], dataset_hint: str) -> int:
    """Run `main`, turning the errors a user can fix into one clear message and a non-zero exit code."""
    try:
        main()
    except (RecipeError, LabelError, ImageDecodeError, TeacherCacheError, TeacherCheckError) as err:
        print(f"error: {err}\nNothing was trained.", file=sys.stderr)
        return 2
    except DatasetLoadError as err:
        print(f"error: {err}\n{dataset_hint}", file=sys.stderr)
        return 2
    except TeacherLoadError as err:
        print(
            f"error: {err}\nPass --teacher a local folder, a reachable Hub id, or a timm architecture.", file=sys.stderr
        )
        return 2
    except (PublishError, HubUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0
