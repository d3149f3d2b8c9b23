"""The teacher: loading, freezing, placement under Accelerate, and input re-normalisation.

The teacher is frozen structurally (STYLE.md, habit 4): it lives outside the trained model, its parameters do not
require grad, its `train()` is locked to eval mode, it runs under `no_grad`, Accelerate places and autocasts it without
a DDP wrapper, and it never enters a checkpoint because the Trainer only saves `trainer.model`.
"""

from __future__ import annotations

import copy
import json
import os
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
    import timm
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from transformers import AutoModelForImageClassification

    import hf_kdsearch  # noqa: F401  (registers our architectures)

    from .hub import _network_errors

    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        cfg_file = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(cfg_file):
            raise TeacherLoadError(f"teacher folder {name_or_path!r} has no config.json")
        with open(cfg_file) as f:
            if _is_timm_config(json.load(f)):
                return timm.create_model(f"local-dir:{os.path.abspath(name_or_path)}", pretrained=True, **kwargs)
        return AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise TeacherLoadError(f"no teacher folder at {name_or_path!r} (it is not a Hub id either)")
    if "/" not in name_or_path and ":" not in name_or_path and timm.is_model(name_or_path):
        cfg = timm.models.get_pretrained_cfg(name_or_path)
        if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
            raise TeacherLoadError(
                f"timm has no pretrained weights for {name_or_path!r}; train a teacher first and pass its folder "
                f"(e.g. one written by `hf_kdsearch.save_student`), or pass a model object as teacher_model"
            )
    try:
        if name_or_path.startswith(("hf-hub:", "timm/")):
            name = name_or_path if name_or_path.startswith("hf-hub:") else f"hf-hub:{name_or_path}"
            return timm.create_model(name, pretrained=True, **kwargs)
        if "/" not in name_or_path and timm.is_model(name_or_path):
            return timm.create_model(name_or_path, pretrained=True, **kwargs)
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(name_or_path, "config.json")) as f:
            config = json.load(f)
        if _is_timm_config(config):
            return timm.create_model(f"hf-hub:{name_or_path}", pretrained=True, **kwargs)
        return AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
    # transformers reports a missing or unreachable repo as OSError; the Hub clients use their own types.
    except (*_network_errors(), RepositoryNotFoundError, RevisionNotFoundError, HFValidationError, OSError) as err:
        offline_env = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if constants.is_offline_mode() or offline_env:
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
        elif isinstance(err, (RepositoryNotFoundError, HFValidationError)):
            reason = f"the Hub at HF_ENDPOINT={constants.ENDPOINT} has no such repo (or it is private or gated)"
        else:
            reason = f"the Hub at HF_ENDPOINT={constants.ENDPOINT} could not be reached or could not serve it"
        raise TeacherLoadError(
            f"could not load the teacher {name_or_path!r}: {reason}. Pass a local folder (save one with "
            f"`hf_kdsearch.save_student` or `model.save_pretrained`) or a model object as teacher_model. "
            f"Underlying error: {type(err).__name__}: {err}"
        ) from err


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
