"""`DistillationMixin` and `DistillationTrainer`: knowledge distillation inside the Hugging Face `Trainer`.

Swap `Trainer` for `DistillationTrainer` and pass `teacher_model=`; or put `DistillationMixin` in front of your own
`Trainer` subclass. The loss is `alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels)`.

Extension protocol
------------------
A callback takes part in the distillation step by subclassing `DistillationCallback` and overriding either hook.
The mixin calls them, in callback order, inside `compute_loss` and only while the model is training:

- `on_distill_batch(trainer, model, inputs) -> dict | None`: return a replacement batch. Student and teacher both see
  it, so this decides what the teacher is asked (UNIX selection keeps k of N samples). Besides the model inputs and
  `labels`, a replacement batch may carry `mix_labels` and `mix_weights` (per sample `m`): the CE term then becomes
  `(1 - m) CE(labels) + m CE(mix_labels)`.
- `on_distill_loss(trainer, model, inputs, student_logits, teacher_logits) -> dict[str, Tensor] | None`: return
  named scalar loss terms. They are added to the loss inside autograd, so mixed precision, gradient accumulation,
  clipping and DDP treat them like the KD term, and each is logged under its name like `loss_kd`.

Both hooks run per micro-batch on every rank, on that rank's shard. A callback records other numbers with
`trainer.record_metric(name, value)`; the trainer averages them over micro-batches, steps and ranks, and flushes them
in `log()`, so they reach `log_history` and every `report_to` integration.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode

from .fastpath import SampleIndexDataset, setup_fast_path
from .losses import kd_loss, mixed_cross_entropy
from .teacher import freeze_teacher, input_normalization, load_teacher, prepare_teacher

__all__ = [
    "LossMetricsMixin",
    "DistillationCallback",
    "DistillationMixin",
    "DistillationTrainer",
    "ClassificationTrainer",
    "logits_of",
    "forward_model",
]

#: Batch keys that steer the loss and are never passed to a model. `sample_index` and `view_index` say which stored
#: teacher outputs (and augmentation) belong to a sample when training from a teacher cache.
LOSS_KEYS = ("labels", "mix_labels", "mix_weights", "sample_index", "view_index")


class DistillationCallback(TrainerCallback):
    """A `TrainerCallback` that can also change the batch and add loss terms; see the module docstring."""

    #: Set True when the callback reads `inputs["sample_index"]`: the trainer then wraps its training set in
    #: `SampleIndexDataset`, so every batch carries its samples' positions in the dataset.
    needs_sample_index: bool = False

    def on_distill_batch(self, trainer: DistillationMixin, model: nn.Module, inputs: dict) -> dict | None:
        return None

    def on_distill_loss(
        self,
        trainer: DistillationMixin,
        model: nn.Module,
        inputs: dict,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
    ) -> dict[str, torch.Tensor] | None:
        return None


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, a mapping or ModelOutput with `logits`, or a tuple, logits first."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(outputs).__name__}: return a tensor, a dict or "
        "ModelOutput with 'logits', or a tuple whose first element is the logits"
    )


def _takes_keywords(model: nn.Module) -> bool:
    """Whether `model.forward` takes named inputs (`pixel_values=`), as transformers models do, or one positional
    tensor, as timm models do."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == p.VAR_KEYWORD or p.name == "pixel_values" for p in params)


def forward_model(model: nn.Module, inputs: Mapping[str, Any], *, keywords: bool | None = None) -> Any:
    """Call `model` on a batch dict, leaving out labels so transformers models don't compute a loss of their own."""
    if keywords is None:
        keywords = _takes_keywords(model)
    if keywords:
        return model(**{k: v for k, v in inputs.items() if k not in LOSS_KEYS})
    if "pixel_values" not in inputs:
        raise KeyError(
            f"{type(getattr(model, 'module', model)).__name__}.forward takes one positional tensor, so the batch must "
            f"carry it as 'pixel_values'; got keys {sorted(inputs)}"
        )
    return model(inputs["pixel_values"])


def _num_classes(model: nn.Module) -> int | None:
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LossMetricsMixin:
    """What every trainer here shares: a per-batch-mean loss made of named, logged components.

    - The loss is a per-batch mean, so the Trainer must divide it by the gradient-accumulation steps. Otherwise N-step
      accumulation gives N times the gradient on models whose forward takes `**kwargs` (HF vision models).
    - `record_metric` collects numbers during the step; `log()` flushes their means into the Trainer's log, so they
      reach `log_history` and every `report_to` integration (values added in a callback's `on_log` do not).
    - Batches are dicts with `pixel_values` and `labels`, also for timm models whose forward names neither.
    """

    # transformers >= 5.19 reads this flag ...
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # ... older versions decide from this one (we do no num_items_in_batch normalisation).
        self.model_accepts_loss_kwargs = False
        if self.args.label_names is None:
            # timm models' forward has no `labels` argument; without this the Trainer would drop labels at eval time.
            self.label_names = ["labels"]
        self._metrics: dict[str, dict[str, list]] = {"train": {}, "eval": {}}
        # GPU data path (fastpath.py): channels_last weights; uint8 batches augmented and normalised on the device.
        self.device_augment = setup_fast_path(self)

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.device_augment is not None:
            inputs = self.device_augment(inputs, train=self.model.training)
        return inputs

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Architecture gates carry their own L1 penalty; weight decay on top would shrink them towards 0 twice.
        return [n for n in super().get_decay_parameter_names(model) if "gate" not in n]

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # A timm forward(x) names no dataset column; keep the ones a distillation batch is made of.
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, "pixel_values", *LOSS_KEYS]))

    # ---- metrics ---------------------------------------------------------------------------------------------------
    def record_metric(self, name: str, value: torch.Tensor | float, mode: str | None = None) -> None:
        """Add a value to the metric `name`; `log()` reports its mean since the last log, averaged over ranks.

        Tensors are kept on the device until the log, so recording costs no host sync.
        """
        if mode is None:
            mode = "train" if self.model.training else "eval"
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        self._metrics[mode].setdefault(name, []).append(value)

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        store = self._metrics[mode]
        if not store:
            return {}
        names = sorted(store)
        device = self.accelerator.device
        # float64 keeps sample counts exact past 2^24 (MPS has no float64).
        dtype = torch.float32 if device.type == "mps" else torch.float64
        means = torch.stack(
            [torch.stack([torch.as_tensor(v, device=device, dtype=dtype) for v in store[n]]).mean() for n in names]
        )
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        store.clear()
        prefix = "eval_" if mode == "eval" else ""
        return {f"{prefix}{n}": round(v, 6) for n, v in zip(names, means.tolist())}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs.update(self._flush_metrics(mode))
        super().log(logs, *args, **kwargs)


class DistillationMixin(LossMetricsMixin):
    """Adds knowledge distillation to any `transformers.Trainer` subclass.

    Put it first among the bases: `class MyTrainer(DistillationMixin, MyExistingTrainer)`. It takes one more keyword,
    `teacher_model` (an `nn.Module`, a local folder, a Hub id or a timm name), and reads `temperature`, `alpha`,
    `teacher_dtype`, `teacher_compile` and `check_teacher_finite` from `args` (`DistillationArguments`; plain
    `TrainingArguments` get the defaults T=4, alpha=0.9).

    The loss (Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531) is
    `alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)`, in float32 and averaged per sample.
    `loss_kd` and `loss_ce` are logged. Callbacks extend the step through `DistillationCallback`.
    """

    def __init__(self, *args, teacher_model: nn.Module | str | None = None, teacher_cache: Any = None, **kwargs):
        if teacher_model is None and teacher_cache is None:
            raise ValueError(
                "DistillationTrainer needs teacher_model= (an nn.Module, a local folder or a Hub id) or teacher_cache= "
                "(a hf_kdsearch.TeacherCache)"
            )
        if teacher_model is not None and teacher_cache is not None:
            raise ValueError("pass teacher_model= or teacher_cache=, not both: a cache replaces the teacher's forward")
        # ---- teacher cache (hf_kdsearch/teacher_cache.py): batches carry their sample index ----
        callbacks = kwargs.get("callbacks") or []
        if kwargs.get("train_dataset") is not None and (
            teacher_cache is not None or any(getattr(cb, "needs_sample_index", False) for cb in callbacks)
        ):
            kwargs["train_dataset"] = SampleIndexDataset.wrap(kwargs["train_dataset"])
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if (
            training_args is not None
            and training_args.n_gpu > 1
            and (training_args.parallel_mode == ParallelMode.NOT_DISTRIBUTED)
        ):
            raise ValueError(
                f"{training_args.n_gpu} GPUs are visible but the run was not launched as distributed, so the Trainer "
                "would fall back to nn.DataParallel, which replicates the teacher and splits batches unevenly. Launch "
                "with `accelerate launch --multi_gpu ...` or `torchrun --nproc_per_node N ...`, or expose one GPU "
                "with CUDA_VISIBLE_DEVICES=0."
            )
        super().__init__(*args, **kwargs)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "the student has no parameter that requires grad; is it a copy of a teacher frozen by an earlier "
                "DistillationTrainer? Call student.requires_grad_(True) first"
            )
        self.samples_seen = 0
        self.teacher_samples = 0
        self._checked_classes = False
        # ---- teacher cache: stored logits instead of a teacher; training batches replay the stored views ----
        self.teacher_cache = None
        if teacher_cache is not None:
            self.teacher_cache = teacher_cache.for_trainer(self)  # checks dataset, classes and augmentation
            self.teacher_model, self._renorm = None, None
            self.device_augment = self.teacher_cache.replay_augment(self.device_augment, lambda: self.state.epoch)
            return
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(teacher_model)
        if teacher_model is self.model:
            raise ValueError("teacher_model is the student object itself; pass a separate (e.g. deep-copied) teacher")
        student_params = {p.data_ptr() for p in self.model.parameters()}
        if any(p.data_ptr() in student_params for p in teacher_model.parameters()):
            raise ValueError(
                "teacher_model shares parameters with the student; distil from a separate copy (copy.deepcopy)"
            )
        t_classes, s_classes = _num_classes(teacher_model), _num_classes(self.model)
        if t_classes is not None and s_classes is not None and t_classes != s_classes:
            raise ValueError(f"teacher predicts {t_classes} classes but the student {s_classes}; they must agree")
        self.teacher_model = freeze_teacher(teacher_model)
        if self._arg("channels_last", False):
            self.teacher_model.to(memory_format=torch.channels_last)
        self._teacher_prepared = False
        self._teacher_keywords = _takes_keywords(teacher_model)
        self._renorm = input_normalization(self.model, teacher_model)

    # ---- settings with defaults for plain TrainingArguments -------------------------------------------------------
    def _arg(self, name: str, default: Any) -> Any:
        return getattr(self.args, name, default)

    @property
    def temperature(self) -> float:
        return float(self._arg("temperature", 4.0))

    @property
    def alpha(self) -> float:
        return float(self._arg("alpha", 0.9))

    # ---- teacher ---------------------------------------------------------------------------------------------------
    def _prepared_teacher(self) -> nn.Module:
        # Prepared on first use, not in __init__: the Trainer decides whether to prepare the student for evaluate()
        # by checking that Accelerate holds no model yet, and a prepared teacher would break that.
        if not self._teacher_prepared:
            dtype = self._arg("teacher_dtype", None)
            plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
            self.teacher_model = prepare_teacher(
                self.teacher_model,
                self.accelerator,
                dtype=_DTYPES[dtype] if dtype else None,
                compile=self._arg("teacher_compile", False),
                deepspeed_plugin=plugin,
            )
            if self._renorm is not None:
                self._renorm = tuple(t.to(self.accelerator.device) for t in self._renorm)
            self._teacher_prepared = True
        return self.teacher_model

    def teacher_logits(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Teacher logits for a batch, under `no_grad`, with the input re-normalised for the teacher if needed.

        From a teacher cache: the stored logits of the batch's samples and views; None outside training (the cache
        holds no outputs for evaluation sets).
        """
        if self.teacher_cache is not None:
            return self.teacher_cache.logits(inputs) if self.model.training else None
        teacher = self._prepared_teacher()
        if teacher.training:  # BN statistics and dropout of the teacher must never move, whoever called train()
            teacher.eval()
        if self._renorm is not None and "pixel_values" in inputs:
            scale, shift = self._renorm
            inputs = {**inputs, "pixel_values": torch.addcmul(shift, inputs["pixel_values"], scale)}
        with torch.no_grad():
            return logits_of(forward_model(teacher, inputs, keywords=self._teacher_keywords))

    def student_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Student logits for a batch; callbacks use it to score samples (wrap it in `no_grad` yourself)."""
        return logits_of(forward_model(model, inputs))

    # ---- loss ------------------------------------------------------------------------------------------------------
    def _distill_callbacks(self) -> list[DistillationCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, DistillationCallback)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        hooks = self._distill_callbacks() if training else []
        batch_size = _batch_size(inputs)
        for cb in hooks:
            replaced = cb.on_distill_batch(self, model, inputs)
            if replaced is not None:
                inputs = replaced

        student_logits = self.student_logits(model, inputs)
        teacher_logits = self.teacher_logits(inputs) if self.alpha > 0 else None
        if teacher_logits is not None:
            self._check_teacher(student_logits, teacher_logits)

        losses: dict[str, torch.Tensor] = {}
        alpha = self.alpha if teacher_logits is not None else 0.0  # no stored logits (cache, evaluation): CE only
        if alpha > 0:
            losses["loss_kd"] = alpha * kd_loss(student_logits, teacher_logits, self.temperature)
        if alpha < 1:
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError(
                    f"alpha={self.alpha} < 1 gives the cross-entropy on labels weight {1 - self.alpha:g}, but the "
                    f"batch has no 'labels' (keys: {sorted(inputs)}). Add labels or set alpha=1.0."
                )
            losses["loss_ce"] = (1 - alpha) * mixed_cross_entropy(
                student_logits, labels, inputs.get("mix_labels"), inputs.get("mix_weights")
            )
        for cb in hooks:
            extra = cb.on_distill_loss(self, model, inputs, student_logits, teacher_logits)
            for name, term in (extra or {}).items():
                if name in losses:
                    raise ValueError(f"{type(cb).__name__} returned loss term {name!r}, which already exists")
                losses[name] = term

        loss = sum(losses.values())
        for name, term in losses.items():
            self.record_metric(name, term, "train" if training else "eval")
        if training:
            self.samples_seen += batch_size
            self.teacher_samples += 0 if teacher_logits is None else teacher_logits.shape[0]
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def _check_teacher(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        if not self._checked_classes:
            if student_logits.shape[-1] != teacher_logits.shape[-1]:
                raise ValueError(
                    f"teacher logits have {teacher_logits.shape[-1]} classes but the student's "
                    f"{student_logits.shape[-1]}; teacher and student must predict the same label set"
                )
            self._checked_classes = True
        if self._arg("check_teacher_finite", True) and not torch.isfinite(teacher_logits).all():
            raise FloatingPointError(
                f"the teacher returned non-finite logits (NaN or inf) at global step {self.state.global_step}; "
                "the step was stopped before the update, so the student and the checkpoints saved so far are intact. "
                "Check the teacher's weights and its input normalisation, or its precision (teacher_dtype)."
            )


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
    return 0


class DistillationTrainer(DistillationMixin, Trainer):
    """A `Trainer` that distils `teacher_model` into `model`.

    Example:
    ```python
    from hf_kdsearch import DistillationArguments, DistillationTrainer

    args = DistillationArguments(output_dir="out", temperature=4.0, alpha=0.9)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_ds)
    trainer.train()
    ```
    """


class ClassificationTrainer(LossMetricsMixin, Trainer):
    """A `Trainer` for image classifiers that return logits (timm, transformers or plain modules), with cross-entropy.

    It trains teachers and the "student alone" baselines with exactly the batch handling, gradient-accumulation
    scaling and logging of `DistillationTrainer`, so the comparison between the two differs only in the loss.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"ClassificationTrainer needs 'labels' in the batch, got keys {sorted(inputs)}")
        logits = logits_of(forward_model(model, inputs))
        loss = mixed_cross_entropy(logits, labels, inputs.get("mix_labels"), inputs.get("mix_weights"))
        self.record_metric("loss_ce", loss)
        return (loss, {"logits": logits}) if return_outputs else loss
