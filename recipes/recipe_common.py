"""What the image recipes share: stages, the teacher (loaded, or trained and cached), the four methods, and outputs.

A recipe builds a `RecipeData` (its training and evaluation sets, their collator, the class names and the input
size the student sees) and a namespace of recipe settings (`method`, `teacher`, `student`, `select_ratio`, ...; see
`recipes/image_classification.py`), then calls `run_method` and `publish`. Nothing here knows how the images were
decoded: uint8 tensors on the device (the fast path) and transforms applied on the fly look the same to it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

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
from hf_kdsearch.data import DatasetLoadError, NodeSplitLoaderMixin, data_config_for
from hf_kdsearch.ensemble import adam_l2
from hf_kdsearch.fastpath import resize_images
from hf_kdsearch.hub import HubUnavailableError
from hf_kdsearch.metrics import TopKAccuracy
from hf_kdsearch.teacher import input_normalization

METHODS = ("kd", "unix", "search", "ensemble")


class RecipeError(ValueError):
    """A dataset or model the recipe cannot use as given; the message names the flag that fixes it."""


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


def log(args, message: str, tag: str = "recipe") -> None:
    if args.process_index == 0:
        print(f"[{tag}] {message}", flush=True)


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


#: The online ensemble's optimiser and schedule in its authors' released CIFAR-100 configs: `torch.optim.Adam` with L2
#: weight decay (`adam_l2`), lr 1e-3, weight decay 1e-5, batch 128, x0.1 at epochs 200 and 300 of 350. `adamw_torch`
#: is what `--adam_l2 false` falls back to. The recipes' `--method ensemble` defaults.
ENSEMBLE_DEFAULTS = dict(
    adam_l2=True,
    optim="adamw_torch",
    optim_args=None,
    learning_rate=1e-3,
    weight_decay=1e-5,
    per_device_train_batch_size=128,
    lr_decay_at=[200 / 350, 300 / 350],
)


def optimizer_cls_and_kwargs(recipe, args: DistillationArguments) -> tuple | None:
    """The Trainer's `optimizer_cls_and_kwargs` for a stage: the coupled Adam with `--adam_l2`, else `--optim`'s."""
    return adam_l2(args) if recipe.adam_l2 else None


def stage_args(args: DistillationArguments, name: str, **changes) -> DistillationArguments:
    return dataclasses.replace(args, output_dir=os.path.join(args.output_dir, name), **changes)


def run_stage(trainer_cls, recipe, args, data: RecipeData, *, step_decay: bool = True, **kwargs):
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
    checkpoint = get_last_checkpoint(args.output_dir) if recipe.resume and os.path.isdir(args.output_dir) else None
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


def is_architecture(name: str) -> bool:
    return not os.path.exists(name) and "/" not in name and ":" not in name and timm.is_model(name)


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


def get_teacher(recipe, args, data: RecipeData, student: nn.Module, tag: str = "recipe"):
    """The teacher, what the card says about it, and `args` with `teacher_image_size` set when the teacher's timm
    data config asks for another resolution than the student's. Stage 1 trains and caches an architecture without
    weights (at the data's resolution), and the teacher is evaluated on the student's evaluation set as it will be
    fed: re-normalised and resized to its own input."""
    num_classes = data.num_classes
    if not is_architecture(recipe.teacher) or _has_pretrained_weights(recipe.teacher):
        teacher = load_teacher(recipe.teacher)
        info = {"teacher": recipe.teacher}
    else:
        cache = Path(recipe.teacher_cache_dir or os.path.join(args.output_dir, f"teacher-{recipe.teacher}"))
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
        model=TeacherView(copy.deepcopy(teacher), student, args.teacher_image_size),
        args=stage_args(args, "teacher_eval"),
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


def _has_pretrained_weights(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict))


def train_teacher(recipe, args, data: RecipeData, cache: Path, tag: str = "recipe") -> nn.Module:
    log(args, f"stage 1: no trained weights for {recipe.teacher}; training it, then caching it at {cache}", tag)
    teacher = timm.create_model(recipe.teacher, num_classes=data.num_classes, in_chans=data.input_size[0])
    describe_inputs(teacher, data)
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
        # Written beside the cache and renamed, so an interrupted run never leaves a half-written teacher to reuse.
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        card = card_base(recipe, data, method="alone", metrics=percent(metrics))
        save_student(teacher, tmp, card=card)
        os.replace(tmp, cache)
    trainer.accelerator.wait_for_everyone()
    # Every rank continues from the cached copy: the same weights everywhere, whole even after FSDP training.
    return load_student(cache)


# ---- methods --------------------------------------------------------------------------------------------------------
def run_kd(recipe, args, data, teacher, student, callbacks=()) -> list:
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


def run_unix(recipe, args, data, teacher, student, callbacks=()) -> list:
    unix = UncertaintyMixupCallback(
        select_ratio=recipe.select_ratio, uncertainty=recipe.uncertainty, mixup=recipe.mixup
    )
    [(name, student, card, files)] = run_kd(recipe, args, data, teacher, student, callbacks=[unix, *callbacks])
    card["notes"] = (
        f"UNIX select_ratio={recipe.select_ratio}, uncertainty={recipe.uncertainty}, mixup={recipe.mixup}; "
        + f"measured over training: {json.dumps(unix.totals)}"
    )
    return [(name, student, card, files)]


def run_search(recipe, args, data, teacher, student=None, callbacks=(), tag: str = "recipe") -> list:
    """Gates on a copy of the teacher, searched at the teacher's input size; the found student is then distilled
    (at the student's input size, the data's) like `kd`."""
    input_size = tuple(data.input_size)
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
    )
    found = describe_inputs(
        extract_student(gated, target_flops_ratio=recipe.target_flops_ratio, input_size=input_size), data
    )
    log(args, f"search phase done: found student with {count_flops(found, input_size):,} FLOPs", tag)
    [(name, found, card, _)] = run_kd(recipe, args, data, teacher, found, callbacks=callbacks)
    widths = (search.report or {}).get("widths")
    card.update(target_flops_ratio=recipe.target_flops_ratio, **({"widths": widths} if widths is not None else {}))
    return [(name, found, card, list(search.report_files))]


def run_ensemble(recipe, args, data, callbacks=()) -> list:
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
    trainer, metrics = run_stage(
        OnlineEnsembleTrainer,
        recipe,
        stage_args(args, "ensemble"),
        data,
        model=ens,
        compute_metrics=TopKAccuracy(heads=heads),
        callbacks=list(callbacks),
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
    # accelerate launch and torchrun set LOCAL_RANK; the script's own arguments are exact either way.
    launcher = "accelerate launch" if "LOCAL_RANK" in os.environ else "python"
    card = {"dataset": data.description, "command": f"{launcher} {shlex.join(sys.argv)}"}
    if data.class_names:
        card["label_names"] = data.class_names
    card.update(fields)
    return card


def publish(recipe, args, data: RecipeData, hub: dict, results, teacher_info: dict, tag: str = "recipe") -> list[str]:
    """Save every student under output_dir (main process) and push it when asked; returns the folders."""
    folders = []
    for name, model, card, files in results:
        card = card_base(recipe, data, method=recipe.method, **teacher_info, **card)
        folder = os.path.join(args.output_dir, name)
        save_student(model, folder, card=card, files=files)
        folders.append(folder)
        log(args, f"saved {name} to {folder}: {card.get('metrics')}", tag)
        if hub["push"]:
            repo = hub["repo_id"] if len(results) == 1 else f"{hub['repo_id']}-{name}"
            url = push_student(model, repo, card=card, files=files, token=hub["token"], private=hub["private"])
            log(args, f"pushed {name} to {url}", tag)
    return folders


def run_cli(main: Callable[[], Any], dataset_hint: str) -> int:
    """Run `main`, turning the errors a user can fix into one clear message and a non-zero exit code."""
    try:
        main()
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DatasetLoadError as err:
        print(f"error: {err}\n{dataset_hint}", file=sys.stderr)
        return 2
    except TeacherLoadError as err:
        print(
            f"error: {err}\nPass --teacher a local folder, a reachable Hub id, or a timm architecture.", file=sys.stderr
        )
        return 2
    except HubUnavailableError as err:
        print(f"error: {err}\nThe student was saved under --output_dir; push it later.", file=sys.stderr)
        return 3
    return 0
