"""The teacher: loading, freezing, placement under Accelerate, and input re-normalisation.

The teacher is frozen structurally (STYLE.md, habit 4): it lives outside the trained model, its parameters do not
require grad, its `train()` is locked to eval mode, it runs under `no_grad`, Accelerate places and autocasts it without
a DDP wrapper, and it never enters a checkpoint because the Trainer only saves `trainer.model`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["TeacherLoadError", "load_teacher", "freeze_teacher", "prepare_teacher", "input_normalization"]


class TeacherLoadError(RuntimeError):
    """The teacher named by a string could not be loaded."""


def _is_timm_config(config: dict) -> bool:
    return "architecture" in config and "model_type" not in config


def load_teacher(name_or_path: str, **kwargs: Any) -> nn.Module:
    """Load a teacher from a local folder, a Hub id, or a timm name.

    - A local folder written by timm (`config.json` with `architecture`) or by `save_student` loads with
      `timm.create_model("local-dir:...")`; any other folder with `AutoModelForImageClassification`.
    - `hf-hub:<repo>` and `timm/<name>` load with timm.
    - A bare timm name (`resnet18.a1_in1k`) loads timm's pretrained weights; a name without any (every `cifar_*` and
      `mnist_*` architecture) is an error, since a randomly initialised teacher would teach noise.
    - Another Hub id is inspected: a timm repo loads with timm, a transformers repo with the Auto class.

    Offline, or when the Hub cannot be reached or has no such repo, a `TeacherLoadError` says so and suggests a
    local path. Other errors (a wrong keyword argument, mismatched weights) propagate unchanged.
    """
    from .loading import HubUnavailableError, ModelLoadError, ModelNotFoundError, load_model

    try:
        return load_model(name_or_path, role="teacher", **kwargs)
    except (ModelNotFoundError, ModelLoadError, HubUnavailableError) as err:
        raise TeacherLoadError(str(err)) from err


#: Set on a teacher by `freeze_teacher`; `add_gates` reads it to thaw a deep copy meant as a student.
FROZEN_FLAG = "_hf_kdsearch_frozen_teacher"


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put `teacher` in eval mode and stop gradients into its parameters. Returns the same object.

    Eval mode is also enforced at every use (`DistillationMixin.teacher_logits`), rather than by overriding the
    teacher's `train()`: an override would follow the object into `copy.deepcopy`, and a student copied from a used
    teacher would silently never train.
    """
    teacher.requires_grad_(False)
    teacher.eval()
    setattr(teacher, FROZEN_FLAG, True)
    return teacher


def prepare_teacher(
    teacher: nn.Module,
    accelerator,
    *,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    deepspeed_plugin=None,
) -> nn.Module:
    """Place and cast the teacher the way Accelerate does the student, but without wrapping it for training.

    - Plain, DDP and FSDP runs: `accelerator.prepare_model(teacher, evaluation_mode=True)` moves it to the device and,
      under bf16/fp16, runs its forward in autocast with fp32 outputs. Every rank holds a full copy: the teacher is not
      sharded under FSDP (moving it by hand, since Accelerate leaves placement to FSDP there).
    - DeepSpeed ZeRO-3: the teacher is initialised as an inference engine with the same ZeRO stage, so its weights are
      partitioned like the student's (the approach TRL takes). Untested here: no DeepSpeed on CPU.
    """
    if dtype is not None:
        teacher = teacher.to(dtype)
    if deepspeed_plugin is not None:
        teacher = _prepare_deepspeed_teacher(teacher, accelerator, deepspeed_plugin)
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        if accelerator.distributed_type.name == "FSDP":
            teacher = teacher.to(accelerator.device)
        # evaluation-mode preparation must not enrol the teacher among the models the Trainer checkpoints or prepares.
        if teacher in accelerator._models:
            accelerator._models.remove(teacher)
    if compile:
        teacher.forward = torch.compile(teacher.forward)
    return freeze_teacher(teacher)


def _prepare_deepspeed_teacher(teacher: nn.Module, accelerator, plugin) -> nn.Module:
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.module.eval()
    return engine


def _pretrained_cfg(model: nn.Module) -> dict | None:
    model = getattr(model, "module", model)
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg else None


def input_normalization(student: nn.Module, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scale and shift that turn the student's normalised input into the teacher's, or None when they agree.

    Both timm models carry `pretrained_cfg["mean"/"std"]`. With `x_s = (x - m_s) / s_s` the teacher wants
    `x_t = (x - m_t) / s_t = x_s * (s_s / s_t) + (m_s - m_t) / s_t`, one fused multiply-add per channel.
    """
    s_cfg, t_cfg = _pretrained_cfg(student), _pretrained_cfg(teacher)
    if s_cfg is None or t_cfg is None:
        return None
    s_mean, s_std = torch.tensor(s_cfg["mean"]), torch.tensor(s_cfg["std"])
    t_mean, t_std = torch.tensor(t_cfg["mean"]), torch.tensor(t_cfg["std"])
    if s_mean.shape != t_mean.shape or (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)):
        return None
    scale = (s_std / t_std).view(1, -1, 1, 1)
    shift = ((s_mean - t_mean) / t_std).view(1, -1, 1, 1)
    return scale, shift
