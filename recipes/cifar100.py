"""CIFAR-100 distillation with hf_kdsearch: KD, UNIX, student search and online ensembles, from one command.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/cifar100.py \\
        --method kd --teacher cifar_resnet56 --student cifar_resnet20 --output_dir runs/kd_r56_r20

Methods (docs/methods.md):
- `kd`: Hinton et al. 2015, alpha 0.9, T 4 (RepDistiller's CIFAR-100 convention).
- `unix`: Xu, Liu & Loy 2023; the teacher sees the 75 % most uncertain samples, mixed by rank; alpha 1, T 4.
- `search`: Gu & Tresp 2020; gates on a copy of the teacher find a student under `--target_flops_ratio` of its FLOPs
  (search phase, KL only), then that student is distilled like `kd`.
- `ensemble`: Walawalkar et al. 2020; `--num_students` students of `--student`'s architecture train together from
  scratch, taught by their own ensemble; no teacher. Every student is saved.

Defaults follow the papers' recipes: 240 epochs, batch 64, SGD momentum 0.9, weight decay 5e-4, lr 0.05 x0.1 at
epochs 150/180/210 (KD, UNIX, search); the ensemble follows its authors' released CIFAR-100 configs: Adam
(`torch.optim.Adam`, whose weight decay is an L2 term in the gradient, not AdamW's decoupled decay: `--adam_l2`),
lr 1e-3, weight decay 1e-5, batch 128, lr x0.1 at 57 % and 86 % of 350 epochs (epochs 200 and 300).
Every `DistillationArguments` / `TrainingArguments` flag works (`--bf16`, `--torch_compile`, `--alpha`, ...), and
`--lr_scheduler_type` replaces the step decay when given.

Data: `--dataset_name` (default `uoft-cs/cifar100`: columns `img`, `fine_label`, `coarse_label`) or a local copy with
`--dataset_path` (parquet files, a `save_to_disk` folder, or an image folder). Images are decoded once into uint8
tensors, kept on the GPU, and augmented there (random crop with 4-pixel padding, flip), through the library's fast
path (`hf_kdsearch.fastpath`, `--device_augment`).

Teacher: `--teacher` is a local folder, a Hub id (`user/repo`, `hf-hub:...`), or a timm architecture name. An
architecture has no trained weights, so the recipe trains it first (stage 1, same schedule, `--teacher_epochs`) and
caches it as `<output_dir>/teacher-<name>` (or `--teacher_cache_dir`); the next run with that cache reuses it.

Outputs: `<output_dir>/student` (`student0..S-1` for the ensemble), loadable by
`timm.create_model("local-dir:...", pretrained=True)` and `AutoModelForImageClassification.from_pretrained`, with a
model card. `--push_to_hub --hub_model_id user/name` pushes it (ensemble: `user/name-student{j}`) once every student
is saved locally; a failed push names the saved folders.

Reliability (docs/reliability.md): every setting that can be checked is checked before any training; `--seed` fixes
every model's initial weights, so two identical runs give identical students; each stage saves a checkpoint every
epoch, and a run killed at any point continues with `--resume` to the same final student; a diverging student stops
with an error naming the step and the term, and a student with NaN weights is never saved.

Evidence: none on CIFAR-100 yet. This recipe was written and tested in a session without a GPU and without internet
access; the tests run every method for 2 steps on a small random dataset with the CIFAR-100 schema
(`tests/test_recipe.py`). No accuracy is claimed here until a run on the real data is recorded with its command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The helpers this recipe shares, unchanged, with image_classification.py.
from recipe_common import (  # noqa: E402
    ENSEMBLE_DEFAULTS,
    is_architecture,
    optimizer_cls_and_kwargs,
    percent,
    stage_args,
    with_step_decay,
)

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationArguments,
    DistillationTrainer,
    GateSearchCallback,
    OnlineEnsembleTrainer,
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
from hf_kdsearch.checks import check_finite_weights
from hf_kdsearch.data import DatasetLoadError, load_image_dataset, to_uint8_tensors
from hf_kdsearch.fastpath import DeviceImageDataset
from hf_kdsearch.gates import check_budget, gate_plan
from hf_kdsearch.hub import HubUnavailableError
from hf_kdsearch.metrics import TopKAccuracy

METHODS = ("kd", "unix", "search", "ensemble")


@dataclass
class RecipeArguments:
    """What the recipe adds to `DistillationArguments`."""

    method: str = field(default="kd", metadata={"help": f"One of {METHODS}.", "choices": METHODS})
    teacher: str = field(
        default="cifar_resnet56",
        metadata={
            "help": "Teacher: a local folder, a Hub id (user/repo, hf-hub:...), or a timm architecture, which is "
            "trained first (stage 1) and cached. Unused by --method ensemble."
        },
    )
    student: str | None = field(
        default=None,
        metadata={
            "help": "Student architecture (timm name). Default: cifar_resnet20; cifar_resnet110 for the ensemble's "
            "architecture. Unused by --method search, which finds its student."
        },
    )
    dataset_name: str = field(default="uoft-cs/cifar100", metadata={"help": "Hub dataset id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if several."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A local copy instead: parquet file(s), a save_to_disk folder, or an image folder."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Default: the first Image column (img)."})
    label_column: str | None = field(
        default=None, metadata={"help": "Default: the first ClassLabel column (fine_label for CIFAR-100)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on every epoch."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation samples."})
    data_on_device: bool = field(
        default=True,
        metadata={"help": "Keep the uint8 dataset on the GPU (else in pinned host memory). Ignored without CUDA."},
    )
    lr_decay_at: list[float] = field(
        default_factory=lambda: [150 / 240, 180 / 240, 210 / 240],
        metadata={
            "help": "Step decay points, as fractions of each stage's optimizer steps (150/180/210 of 240 epochs by "
            "default; 0.57 0.86 for the ensemble, i.e. 200/300 of 350). Ignored when --lr_scheduler_type is given."
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
    teacher_max_steps: int | None = field(default=None, metadata={"help": "Stage-1 steps. Default: --max_steps."})
    select_ratio: float = field(default=0.75, metadata={"help": "unix: share of each batch the teacher sees."})
    uncertainty: str = field(default="entropy", metadata={"help": "unix: entropy, least_confidence, margin, random."})
    mixup: bool = field(default=True, metadata={"help": "unix: mix confident samples by rank."})
    target_flops_ratio: float = field(default=0.25, metadata={"help": "search: FLOPs budget relative to the teacher."})
    l1_weight: float = field(default=1.0, metadata={"help": "search: initial weight of the gate L1 penalty."})
    search_epochs: float = field(
        default=30,
        metadata={"help": "search: epochs of the search phase (our choice; the paper's is not available to us)."},
    )
    search_max_steps: int | None = field(default=None, metadata={"help": "search: steps. Default: --max_steps."})
    num_students: int = field(default=5, metadata={"help": "ensemble: number of students S."})
    resume: bool = field(default=False, metadata={"help": "Resume each stage from its last checkpoint, if any."})


#: Paper recipes (docs/methods.md): RepDistiller / UNIX for kd, unix, search; Walawalkar et al. for the ensemble.
COMMON_DEFAULTS = dict(
    per_device_train_batch_size=64,
    per_device_eval_batch_size=500,
    learning_rate=0.05,
    weight_decay=5e-4,
    optim="sgd",
    optim_args="momentum=0.9",
    num_train_epochs=240,
    warmup_steps=0,
    # The papers do not clip. The Trainer's default (1.0) would clip most KD steps (T^2-scaled gradients) and few
    # CE steps: a hidden learning-rate cut for the distilled student only (README, "A note on gradient clipping").
    max_grad_norm=0.0,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    logging_steps=100,
    report_to="none",
    remove_unused_columns=False,
    device_augment=True,
    channels_last=True,
    # Both read a loss value on the host every step; the teacher is our own trained model.
    logging_nan_inf_filter=False,
    check_teacher_finite=False,
    # Every parameter takes part in every forward; searching for unused ones costs a graph traversal per step.
    ddp_find_unused_parameters=False,
)
METHOD_DEFAULTS = {
    "kd": dict(alpha=0.9, temperature=4.0),
    "unix": dict(alpha=1.0, temperature=4.0),
    "search": dict(alpha=0.9, temperature=4.0),
    "ensemble": dict(ENSEMBLE_DEFAULTS, num_train_epochs=350),  # the authors' 350 epochs
}


def parse_args(argv: list[str] | None) -> tuple[RecipeArguments, DistillationArguments, dict]:
    """Parse the command line with the method's paper defaults; returns the hub request separately."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="kd", choices=METHODS)
    method = pre.parse_known_args(argv)[0].method

    parser = HfArgumentParser((RecipeArguments, DistillationArguments))
    cuda = torch.cuda.is_available()
    parser.set_defaults(
        **{
            **COMMON_DEFAULTS,
            "bf16": cuda and torch.cuda.is_bf16_supported(),
            "lr_scheduler_type": "constant",  # the step decay replaces it unless --lr_scheduler_type is given
            **METHOD_DEFAULTS[method],
        }
    )

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if not given("--output_dir"):
        argv += ["--output_dir", f"runs/cifar100_{method}"]
    recipe, args = parser.parse_args_into_dataclasses(argv)
    recipe.step_decay = not given("--lr_scheduler_type")  # an explicit Trainer schedule replaces the step decay
    if given("--optim") and not given("--adam_l2"):
        recipe.adam_l2 = False  # an explicit Trainer optimizer replaces the method's default Adam
    if recipe.student is None:
        recipe.student = "cifar_resnet110" if method == "ensemble" else "cifar_resnet20"
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name")
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and method in ("search", "ensemble"):
        parser.error(
            f"--method {method} needs the whole model on every rank (gate extraction, student export); "
            "launch it with DDP (recipes/accelerate_configs/multi_gpu.yaml) instead of FSDP"
        )
    hub = {
        "push": args.push_to_hub,
        "repo_id": args.hub_model_id,
        "token": args.hub_token,
        "private": args.hub_private_repo,
    }
    # The Trainer would push checkpoints in its own format; the recipe pushes the final student itself.
    args = dataclasses.replace(args, push_to_hub=False)
    if cuda and recipe.data_on_device:
        # The data already lives on the GPU: nothing to pin, and worker processes cannot share CUDA tensors.
        args = dataclasses.replace(args, dataloader_pin_memory=False, dataloader_num_workers=0)
    return recipe, args, hub


# ---- data -----------------------------------------------------------------------------------------------------------
def load_data(recipe: RecipeArguments, args: DistillationArguments):
    """Train and eval splits as uint8 tensor datasets on this process's device, plus the class names."""
    splits = load_image_dataset(recipe.dataset_name, recipe.dataset_path, config=recipe.dataset_config)
    for split in (recipe.train_split, recipe.eval_split):
        if split not in splits:
            raise DatasetLoadError(f"the dataset has no split {split!r}; it has {sorted(splits)}")
    out = []
    for split, limit in ((recipe.train_split, recipe.max_train_samples), (recipe.eval_split, recipe.max_eval_samples)):
        ds = splits[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        tensors, names = to_uint8_tensors(ds, recipe.image_column, recipe.label_column, desc=f"decoding {split}")
        on_gpu = args.device.type == "cuda" and recipe.data_on_device
        out.append(DeviceImageDataset.from_dataset(tensors, device=args.device if on_gpu else None, pin_memory=True))
    train, test = out
    num_classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    return train, test, names, num_classes


# ---- training -------------------------------------------------------------------------------------------------------
def run_stage(trainer_cls, recipe, args, data, *, step_decay: bool = True, **kwargs):
    """Train one stage and return `(trainer, final eval metrics)`."""
    train, test, _, _ = data
    if step_decay and recipe.step_decay:
        trainer_cls = with_step_decay(trainer_cls, recipe.lr_decay_at, recipe.lr_decay_factor)
    kwargs.setdefault("compute_metrics", TopKAccuracy())
    trainer = trainer_cls(
        args=args,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe, args),
        train_dataset=train,
        eval_dataset=test,
        data_collator=DeviceImageDataset.collate,
        preprocess_logits_for_metrics=kwargs["compute_metrics"].rank,
        **kwargs,
    )
    checkpoint = last_complete_checkpoint(args.output_dir) if recipe.resume else None
    if checkpoint is not None:
        log(args, f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    # The per-epoch evaluation usually ran at the last step already; evaluate again only if it did not.
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is None or last.get("step") != trainer.state.global_step:
        last = trainer.evaluate()
    return trainer, last


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest `checkpoint-N` in `folder` that was written to the end. The Trainer writes `trainer_state.json`
    last, so a checkpoint without it was cut short by a kill and is skipped."""
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


def full_model(trainer) -> torch.nn.Module | None:
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


def get_teacher(recipe, args, data) -> tuple[torch.nn.Module, dict]:
    """The teacher and what the card says about it; stage 1 trains and caches an architecture without weights."""
    num_classes = data[3]
    if not is_architecture(recipe.teacher):
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
            log(args, f"stage 1: reusing the trained teacher cached at {cache}")
            teacher = load_student(cache)
        else:
            teacher = train_teacher(recipe, args, data, cache)
        info = {"teacher": f"{recipe.teacher} (trained by stage 1, cached at {cache})"}
    config = getattr(teacher, "config", None)
    teacher_classes = getattr(teacher, "num_classes", None) or getattr(config, "num_labels", None)
    if teacher_classes != num_classes:
        raise TeacherLoadError(
            f"the teacher {recipe.teacher!r} predicts {teacher_classes} classes but the data has {num_classes}"
        )
    evaluator = ClassificationTrainer(
        model=copy.deepcopy(teacher),  # FSDP would shard the model it evaluates; the teacher stays whole
        args=stage_args(args, "teacher_eval"),
        eval_dataset=data[1],
        data_collator=DeviceImageDataset.collate,
        compute_metrics=(accuracy := TopKAccuracy()),
        preprocess_logits_for_metrics=accuracy.rank,
    )
    top = percent(evaluator.evaluate())
    info["teacher"] += f"; top-1 {top.get('top1')} %, top-5 {top.get('top5')} % on {recipe.eval_split}"
    log(args, f"teacher: {info['teacher']}")
    return teacher, info


def train_teacher(recipe, args, data, cache: Path) -> torch.nn.Module:
    num_classes = data[3]
    log(args, f"stage 1: no trained weights for {recipe.teacher}; training it, then caching it at {cache}")
    set_seed(args.seed)  # the initial weights depend on --seed alone, not on what ran before
    teacher = timm.create_model(recipe.teacher, num_classes=num_classes)
    changes = {}
    if recipe.teacher_epochs is not None:
        changes["num_train_epochs"] = recipe.teacher_epochs
    if recipe.teacher_max_steps is not None:
        changes["max_steps"] = recipe.teacher_max_steps
    trainer, metrics = run_stage(
        ClassificationTrainer, recipe, stage_args(args, "stage1_teacher", **changes), data, model=teacher
    )
    teacher = full_model(trainer)
    if trainer.is_world_process_zero():
        card = card_base(recipe, args, data, method="alone", metrics=percent(metrics))
        cache_teacher(teacher, cache, card=card, name=f"the stage-1 teacher {recipe.teacher}")
    trainer.accelerator.wait_for_everyone()
    # Every rank continues from the cached copy: the same weights everywhere, whole even after FSDP training.
    return load_student(cache)


def cache_teacher(teacher: torch.nn.Module, cache: Path, *, card: dict, name: str) -> None:
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


def run_kd(recipe, args, data, teacher, callbacks=(), student=None) -> list:
    if student is None:
        set_seed(args.seed)
        student = timm.create_model(recipe.student, num_classes=data[3])
    trainer, metrics = run_stage(
        DistillationTrainer,
        recipe,
        stage_args(args, "distill"),
        data,
        model=student,
        teacher_model=teacher,
        callbacks=list(callbacks),
    )
    return [("student", full_model(trainer), {"metrics": percent(metrics)}, [])]


def run_unix(recipe, args, data, teacher) -> list:
    unix = UncertaintyMixupCallback(
        select_ratio=recipe.select_ratio, uncertainty=recipe.uncertainty, mixup=recipe.mixup
    )
    [(name, student, card, files)] = run_kd(recipe, args, data, teacher, callbacks=[unix])
    card["notes"] = (
        f"UNIX select_ratio={recipe.select_ratio}, uncertainty={recipe.uncertainty}, mixup={recipe.mixup}; "
        + f"measured over training: {json.dumps(unix.totals)}"
    )
    return [(name, student, card, files)]


def run_search(recipe, args, data, teacher) -> list:
    input_size = tuple(data[0].images.shape[1:])
    gated = add_gates(copy.deepcopy(teacher))
    changes = {"num_train_epochs": recipe.search_epochs, "alpha": 1.0}  # the paper's objective: KL only
    if recipe.search_max_steps is not None:
        changes["max_steps"] = recipe.search_max_steps
    search_args = stage_args(args, "search", **changes)
    search = GateSearchCallback(
        target_flops_ratio=recipe.target_flops_ratio,
        l1_weight=recipe.l1_weight,
        input_size=input_size,
        report_dir=search_args.output_dir,
    )
    log(args, f"search phase: gates on a copy of the teacher, budget {recipe.target_flops_ratio} of its FLOPs")
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
    )
    if args.process_index == 0 and not search.report_files:
        raise RuntimeError(
            f"the search phase ended without its report in {search_args.output_dir}; the student is not published "
            "without it"
        )
    student = extract_student(gated, target_flops_ratio=recipe.target_flops_ratio, input_size=input_size)
    log(args, f"search phase done: found student with {count_flops(student, input_size):,} FLOPs")
    [(name, student, card, _)] = run_kd(recipe, args, data, teacher, student=student)
    widths = (search.report or {}).get("widths")
    card.update(target_flops_ratio=recipe.target_flops_ratio, **({"widths": widths} if widths is not None else {}))
    return [(name, student, card, list(search.report_files))]


def run_ensemble(recipe, args, data) -> list:
    set_seed(args.seed)
    ens = build_ensemble(recipe.student, num_students=recipe.num_students, num_classes=data[3])
    heads = [f"student{j}" for j in range(recipe.num_students)] + ["ensemble"]
    if args.image_mean is None:
        # The ensemble module has no pretrained_cfg of its own; its students share the architecture's statistics.
        cfg = ens.students[0].pretrained_cfg
        args = dataclasses.replace(args, image_mean=list(cfg["mean"]), image_std=list(cfg["std"]))
    trainer, metrics = run_stage(
        OnlineEnsembleTrainer,
        recipe,
        stage_args(args, "ensemble"),
        data,
        model=ens,
        compute_metrics=TopKAccuracy(heads=heads),
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
        out.append((f"student{j}", ens.export_student(j), card, []))
    return out


# ---- outputs --------------------------------------------------------------------------------------------------------
def card_base(recipe, args, data, **fields) -> dict:
    # accelerate launch and torchrun set LOCAL_RANK; the script's own arguments are exact either way.
    launcher = "accelerate launch" if "LOCAL_RANK" in os.environ else "python"
    card = {
        "dataset": f"local copy of {recipe.dataset_name} at {recipe.dataset_path}"
        if recipe.dataset_path
        else recipe.dataset_name,
        "command": f"{launcher} {shlex.join(sys.argv)}",
    }
    if data[2]:
        card["label_names"] = data[2]
    card.update(fields)
    return card


class PublishError(RuntimeError):
    """A push failed after every student had been saved locally; the message names the folders."""


def publish(recipe, args, data, hub, results, teacher_info) -> list[str]:
    """Save every student under output_dir (main process), then push them when asked; returns the folders.

    Every student is checked and saved before the first push, so a Hub that is down or refuses a push loses nothing.
    """
    for name, model, _, _ in results:
        check_finite_weights(model, name=name)  # before any folder is written: no half-published ensemble
    saved = []
    for name, model, card, files in results:
        card = card_base(recipe, args, data, method=recipe.method, **teacher_info, **card)
        folder = os.path.join(args.output_dir, name)
        save_student(model, folder, card=card, files=files)
        saved.append((name, model, card, files, folder))
        log(args, f"saved {name} to {folder}: {card.get('metrics')}")
    folders = [folder for *_, folder in saved]
    if not hub["push"]:
        return folders
    targets = hub_targets(hub, saved)
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
        log(args, f"pushed {name} to {url}")
    return folders


def hub_targets(hub: dict, saved: list) -> list[tuple[str, str]]:
    """(repo id, local folder) of each saved student."""
    one = len(saved) == 1
    return [(hub["repo_id"] if one else f"{hub['repo_id']}-{name}", folder) for name, *_, folder in saved]


def log(args, message: str) -> None:
    if args.process_index == 0:
        print(f"[cifar100] {message}", flush=True)


# ---- checks before any training ---------------------------------------------------------------------------------
class RecipeConfigError(ValueError):
    """A setting that would fail later in the run; raised before any data is decoded or any stage trains."""


def check_writable(folder: str | Path, what: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise RecipeConfigError(f"{what} {str(folder)!r} is not writable ({type(err).__name__}: {err})") from err


def teacher_cache(recipe, args) -> Path:
    return Path(recipe.teacher_cache_dir or os.path.join(args.output_dir, f"teacher-{recipe.teacher}"))


def validate(recipe, args, hub) -> None:
    """Every check that needs neither data nor training, so that a typo never costs a trained stage."""

    def fail(message: str):
        raise RecipeConfigError(message)

    check_writable(args.output_dir, "--output_dir")
    if not all(0 < m <= 1 for m in recipe.lr_decay_at):
        fail(f"--lr_decay_at takes fractions of the run in (0, 1], got {recipe.lr_decay_at}")
    if not recipe.lr_decay_factor > 0:
        fail(f"--lr_decay_factor must be > 0, got {recipe.lr_decay_factor}")
    for flag in ("teacher_epochs", "teacher_max_steps", "search_max_steps"):
        value = getattr(recipe, flag)
        if value is not None and not value > 0:
            fail(f"--{flag} must be > 0, got {value}")
    if recipe.method != "search" and not timm.is_model(recipe.student):
        fail(f"--student {recipe.student!r} is not a timm architecture")
    try:
        if recipe.method == "unix":
            UncertaintyMixupCallback(select_ratio=recipe.select_ratio, uncertainty=recipe.uncertainty)
        if recipe.method == "search":
            GateSearchCallback(target_flops_ratio=recipe.target_flops_ratio, l1_weight=recipe.l1_weight)
            check_writable(os.path.join(args.output_dir, "search"), "the search report's folder")
            if not recipe.search_epochs > 0:
                fail(f"--search_epochs must be > 0, got {recipe.search_epochs}")
        if recipe.method == "ensemble" and recipe.num_students < 1:
            fail(f"--num_students must be >= 1, got {recipe.num_students}")
    except ValueError as err:
        raise RecipeConfigError(f"--method {recipe.method}: {err}") from err
    if hub["push"]:
        repo = hub["repo_id"]
        if repo.count("/") != 1 or not all(repo.split("/")):
            fail(f"--hub_model_id must look like user/name, got {repo!r}")
    if recipe.method != "ensemble" and is_architecture(recipe.teacher):
        check_teacher_cache(recipe, args)


def check_teacher_cache(recipe, args) -> None:
    """The stage-1 cache is reused when it holds this teacher, written when it is new or empty; anything else is
    refused now, before stage 1 trains a teacher that could not be stored."""
    cache = teacher_cache(recipe, args)
    if not cache.exists():
        check_writable(cache.parent, "the folder of --teacher_cache_dir")
        return
    if not cache.is_dir():
        raise RecipeConfigError(f"--teacher_cache_dir {str(cache)!r} is a file, not a folder")
    if (cache / "model.safetensors").is_file():
        try:
            arch = json.loads((cache / "config.json").read_text()).get("architecture")
        except (OSError, ValueError) as err:
            raise RecipeConfigError(f"the cached teacher at {str(cache)!r} has no readable config.json: {err}") from err
        if arch != recipe.teacher:
            raise RecipeConfigError(
                f"the cached teacher {str(cache)!r} is a {arch}, not a {recipe.teacher}; pass another "
                "--teacher_cache_dir, or delete that folder"
            )
        return
    if any(cache.iterdir()):
        raise RecipeConfigError(
            f"--teacher_cache_dir {str(cache)!r} is not empty and holds no trained teacher (no model.safetensors), "
            f"so stage 1 could not store the teacher it trains there. Pass a new or empty folder, or the folder "
            f"of an earlier stage 1 run for {recipe.teacher}"
        )
    check_writable(cache, "--teacher_cache_dir")


def validate_with_data(recipe, args, data) -> None:
    """The checks that need the class count or the image size, before stage 1 trains a teacher."""
    if recipe.method == "search" and is_architecture(recipe.teacher):
        # The budget must be reachable by the teacher stage 1 would train; checked on untrained weights of that shape.
        gated = add_gates(timm.create_model(recipe.teacher, num_classes=data[3]))
        plan = gate_plan(gated).measure(gated, tuple(data[0].images.shape[1:]))
        try:
            check_budget(plan, recipe.target_flops_ratio)
        except ValueError as err:
            raise RecipeConfigError(f"--target_flops_ratio: {err}") from err


def main(argv: list[str] | None = None) -> list[str]:
    recipe, args, hub = parse_args(argv)
    validate(recipe, args, hub)
    data = load_data(recipe, args)
    launch = f"{args.world_size} process(es), {args.distributed_state.distributed_type.name}, {args.device}"
    log(args, f"{len(data[0])} training and {len(data[1])} evaluation images, {data[3]} classes; {launch}")
    validate_with_data(recipe, args, data)
    if recipe.method == "ensemble":
        teacher_info = {}
        results = run_ensemble(recipe, args, data)
    else:
        teacher, teacher_info = get_teacher(recipe, args, data)
        results = {"kd": run_kd, "unix": run_unix, "search": run_search}[recipe.method](recipe, args, data, teacher)
    if args.process_index != 0:
        return []
    return publish(recipe, args, data, hub, results, teacher_info)


def cli() -> int:
    """Run `main`, turning the errors a user can fix into one clear message and a non-zero exit code."""
    try:
        main()
    except DatasetLoadError as err:
        print(
            f"error: {err}\nWithout the Hub, give a local copy with --dataset_path: parquet files (e.g. the Hub repo's "
            "cifar100/*.parquet), a folder written by `datasets.load_dataset(...).save_to_disk(DIR)`, or an image "
            "folder (train/<class>/*.png, test/<class>/*.png).",
            file=sys.stderr,
        )
        return 2
    except TeacherLoadError as err:
        print(
            f"error: {err}\nPass --teacher a local folder, a reachable Hub id, or a timm architecture.", file=sys.stderr
        )
        return 2
    except RecipeConfigError as err:
        print(f"error: {err}\nNothing was trained.", file=sys.stderr)
        return 2
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except HubUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
