"""`DistillationMixin` and `DistillationTrainer`: knowledge distillation inside the Hugging Face `Trainer`.

Swap `Trainer` for `DistillationTrainer` and `TrainingArguments` for `DistillationArguments` (whose
`teacher_model_name_or_path` names the teacher), or pass `teacher_model=`; or put `DistillationMixin` in front of your
own `Trainer` subclass. The loss is `alpha * T^2 * KL(teacher || student) + (1 - alpha) * task_loss`, where the task
loss is the cross-entropy on labels, or the subclass's own `compute_loss` when it defines one.

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

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import ParallelMode

from .batch import (
    LOSS_KEYS,
    SampleIndexDataset,
    batch_size,
    forward_model,
    logits_of,
    num_classes,
    takes_keywords,
    unwrap,
)
from .config import DataPathArguments, DistillationArguments, upcast_arguments
from .fastpath import setup_fast_path
from .gates import gate_parameter_names
from .losses import kd_loss, mixed_cross_entropy
from .teacher import DistillationRun, Teacher, TeacherAccuracyCheck, TeacherSource, image_stats
from .versions import version

#: The "Distillation" section of the model card, rendered from `distillation_card()`.
SECTION_TEMPLATE = Path(__file__).parent / "templates" / "distillation_section.md"

__all__ = [
    "LossMetricsMixin",
    "DistillationCallback",
    "DistillationMixin",
    "DistillationTrainer",
    "ClassificationTrainer",
    "logits_of",
    "forward_model",
]


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


class _LossTerms:
    """Running sums behind `LossMetricsMixin.record_loss_terms`: per optimizer step in training, per sample in eval."""

    def __init__(self):
        self.step: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.eval: dict[str, torch.Tensor] = {}
        self.eval_samples = 0

    def add_micro_batch(self, terms: Mapping[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
        """Add one micro-batch of a step of `steps`; returns the step's means once its last micro-batch is in."""
        for name, value in terms.items():
            value = value.detach().float() / steps
            self.step[name] = self.step[name] + value if name in self.step else value
        self.micro_batches += 1
        if self.micro_batches < steps:
            return {}
        done, self.step, self.micro_batches = self.step, {}, 0
        return done

    def add_eval_batch(self, terms: Mapping[str, torch.Tensor], samples: int) -> None:
        for name, value in terms.items():
            value = value.detach().float() * samples
            self.eval[name] = self.eval[name] + value if name in self.eval else value
        self.eval_samples += samples

    def eval_means(self) -> dict[str, torch.Tensor]:
        n, sums = self.eval_samples, self.eval
        self.eval, self.eval_samples = {}, 0
        return {name: value / n for name, value in sums.items()} if n else {}


class LossMetricsMixin:
    """What every trainer here shares: a per-batch-mean loss made of named, logged components.

    - The loss is a per-batch mean, so the Trainer must divide it by the gradient-accumulation steps. Otherwise N-step
      accumulation gives N times the gradient on models whose forward takes `**kwargs` (HF vision models).
    - `record_metric` collects numbers during the step; `log()` flushes their means into the Trainer's log, so they
      reach `log_history` and every `report_to` integration (values added in a callback's `on_log` do not).
    - Batches are dicts with `pixel_values` and `labels`, also for timm models whose forward names neither.
    - Loss terms go through `record_loss_terms`, so that, logged, they add up to `loss` and `eval_loss`.
    """

    # transformers >= 5.19 reads this flag ...
    loss_is_scaled_for_ga = False
    #: The settings class this trainer reads; other `TrainingArguments` are converted to it once, at init.
    args_class: type[TrainingArguments] = DataPathArguments

    def __init__(self, *args, **kwargs):
        args, kwargs = self._upcast_args(args, kwargs)
        super().__init__(*args, **kwargs)
        # ... older versions decide from this one (we do no num_items_in_batch normalisation).
        self.model_accepts_loss_kwargs = False
        if self.args.label_names is None:
            # timm models' forward has no `labels` argument; without this the Trainer would drop labels at eval time.
            self.label_names = ["labels"]
        self._metrics: dict[str, dict[str, list]] = {"train": {}, "eval": {}}
        self._loss_terms = _LossTerms()
        # GPU data path (fastpath.py): channels_last weights; uint8 batches augmented and normalised on the device.
        self.device_augment = setup_fast_path(self)

    @classmethod
    def _upcast_args(cls, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The Trainer's positional and keyword arguments with `args` (its second) as `cls.args_class`."""
        if len(args) > 1:
            args = (args[0], upcast_arguments(args[1], cls.args_class), *args[2:])
        else:
            kwargs["args"] = upcast_arguments(kwargs.get("args"), cls.args_class)
        return args, kwargs

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.device_augment is not None:
            inputs = self.device_augment(inputs, train=self.model.training)
        return inputs

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Architecture gates carry their own L1 penalty; weight decay on top would shrink them towards 0 twice.
        gates = gate_parameter_names(model)
        return [n for n in super().get_decay_parameter_names(model) if n not in gates]

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

    def record_loss_terms(self, terms: Mapping[str, torch.Tensor], samples: int) -> None:
        """Record the named terms of one micro-batch's loss so that, logged, they add up to the Trainer's numbers.

        The Trainer's `loss` is the mean over optimizer steps of each step's mean over its micro-batches (the last step
        of an epoch may have fewer), and `eval_loss` the mean over samples. A plain mean over micro-batches drifts
        from both under gradient accumulation and at epoch ends; so a training term is recorded once per optimizer
        step, as that step's mean, and an evaluation term once per evaluation, as its mean over samples.
        """
        if self.model.training:
            steps = getattr(self, "current_gradient_accumulation_steps", 1)
            for name, value in self._loss_terms.add_micro_batch(terms, steps).items():
                self.record_metric(name, value, "train")
        else:
            self._loss_terms.add_eval_batch(terms, samples)

    def train(self, *args, **kwargs):
        self._loss_terms = _LossTerms()  # nothing left over from a run that stopped inside an accumulation step
        return super().train(*args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        for name, value in self._loss_terms.eval_means().items():
            self.record_metric(name, value, "eval")
        return output

    def _metric_means(self, mode: str) -> dict[str, float]:
        """Means of the recorded values since the last log, averaged over ranks (a collective: every rank calls it)."""
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
        return dict(zip(names, means.tolist()))

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        means = self._metric_means(mode)
        self._metrics[mode].clear()
        prefix = "eval_" if mode == "eval" else ""
        return {f"{prefix}{n}": round(v, 6) for n, v in means.items()}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        recorded = self._flush_metrics(mode)
        logs.update(recorded)
        if mode == "train":
            # The values are on the host already: checking them costs nothing, and no step pays a sync for it.
            # grad_norm is left out: under fp16 an infinite norm is the loss scaler's normal skipped step.
            checked = dict(recorded)
            if "loss" in logs:
                checked["loss"] = logs["loss"]
            self._raise_if_diverged(checked)
        super().log(logs, *args, **kwargs)

    # ---- divergence --------------------------------------------------------------------------------------------------
    def _raise_if_diverged(self, values: Mapping[str, float], when: str = "logged") -> None:
        """Stop training when a logged loss term or metric is NaN or infinite.

        `logging_nan_inf_filter` (on by default) replaces a non-finite step loss by the mean of the losses logged
        before it, so `loss` alone can read 0.0 on a diverged run; the recorded terms are never filtered.
        """
        bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
        if not bad:
            return
        terms = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise FloatingPointError(
            f"training diverged: non-finite {terms} {when} at global step {self.state.global_step} (means over the "
            "steps since the previous log). Training was stopped before this step's checkpoint, so the checkpoints "
            f"under {self.args.output_dir!r} hold earlier weights. Lower the learning rate, clip gradients "
            "(max_grad_norm), use bf16 rather than fp16, or check the inputs for NaN/inf."
        )

    def _save_checkpoint(self, model, trial) -> None:
        # Steps since the last log are checked here (one host sync per checkpoint), so a checkpoint between two logs
        # never stores a diverged student.
        pending = self._metric_means("train")
        tr_loss = getattr(self, "_tr_loss", None)  # the Trainer's running loss sum (transformers >= 5)
        if isinstance(tr_loss, torch.Tensor):
            pending["loss"] = float(self.accelerator.reduce(tr_loss.detach().clone(), reduction="mean"))
        self._raise_if_diverged(pending, when="before saving a checkpoint")
        super()._save_checkpoint(model, trial)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint taken at max_steps in the middle of an epoch, the Trainer (transformers 5.24) runs
        # the rest of that epoch until one more optimizer step is done. A finished run has nothing left to train.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    # ---- saving ------------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # A model that is not a PreTrainedModel (timm, plain modules) is saved as its raw state dict with safetensors,
        # which refuses strided tensors: channels_last conv weights, and views some compiled or extracted models hold.
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.args.should_save and not isinstance(unwrapped, PreTrainedModel):
            if state_dict is None:
                state_dict = self.model.state_dict()
            state_dict = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict=state_dict)


def _random_access(dataset: Any) -> bool:
    """Whether `dataset` can be indexed (a map-style dataset), unlike a stream (torch or `datasets` iterable)."""
    return not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(type(dataset), "__getitem__")


def _check_launch(training_args: Any, teacher_model: Any, teacher_cache: Any) -> None:
    """Errors a distillation run should meet before the Trainer builds anything: no teacher, or DataParallel."""
    if teacher_model is None and teacher_cache is None:
        raise ValueError(
            "DistillationTrainer needs a teacher: pass teacher_model= (an nn.Module, a local folder, a Hub id or a "
            "timm name) or set teacher_model_name_or_path in DistillationArguments (--teacher_model_name_or_path)"
        )
    if (
        training_args is not None
        and training_args.n_gpu > 1
        and training_args.parallel_mode == ParallelMode.NOT_DISTRIBUTED
    ):
        raise ValueError(
            f"{training_args.n_gpu} GPUs are visible but the run was not launched as distributed, so the Trainer "
            "would fall back to nn.DataParallel, which replicates the teacher and splits batches unevenly. Launch "
            "with `accelerate launch --multi_gpu ...` or `torchrun --nproc_per_node N ...`, or expose one GPU "
            "with CUDA_VISIBLE_DEVICES=0."
        )


class DistillationMixin(LossMetricsMixin):
    """Adds knowledge distillation to any `transformers.Trainer` subclass.

    Put it first among the bases: `class MyTrainer(DistillationMixin, MyExistingTrainer)`. It takes two more keywords:

    - `teacher_model`: an `nn.Module`, a local folder, a Hub id or a timm name; default:
      `args.teacher_model_name_or_path`;
    - `teacher_cache`: a `TeacherSource` that answers in the teacher's place: a `TeacherCache` (the teacher's stored
      outputs on replayed views), a prepared `Teacher` (`Teacher.from_args(model, args)`), or a subclass of your own.
      The trainer calls its `bind(run)` once here (it checks that the source fits the run and returns the batch
      transform), then `prepare(accelerator)` and `logits(batch)`.

    Its settings are `args`, a `DistillationArguments`; plain `TrainingArguments` are converted once, with the
    distillation defaults.

    The loss (Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531) is
    `alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * task_loss`, in float32 and averaged per sample.
    The task loss is the cross-entropy on `labels`; when the class the mixin is mixed into defines its own
    `compute_loss`, that loss is the task loss, and the student's logits are taken from its outputs (one student
    forward per step). `loss_kd` and `loss_ce` (the weighted task term) are logged; at evaluation `eval_loss` is the
    unweighted task loss, what the student trained alone would report. Callbacks extend the step through
    `DistillationCallback`.
    """

    args_class = DistillationArguments

    def __init__(
        self,
        *args,
        teacher_model: nn.Module | str | None = None,
        teacher_cache: Any = None,
        **kwargs,
    ):
        args, kwargs = self._upcast_args(args, kwargs)
        if teacher_model is not None and teacher_cache is not None:
            raise ValueError("pass teacher_model= or teacher_cache=, not both: a cache replaces the teacher's forward")
        if teacher_cache is not None and not isinstance(teacher_cache, TeacherSource):
            raise TypeError(
                f"teacher_cache= takes a TeacherSource (a TeacherCache, a Teacher, or a subclass of "
                f"hf_kdsearch.TeacherSource), got {type(teacher_cache).__name__}"
            )
        train_dataset = kwargs.get("train_dataset")
        if teacher_cache is not None and train_dataset is not None and not _random_access(train_dataset):
            raise ValueError(
                f"a teacher cache reads each sample's stored views by its index, so it needs a map-style train_dataset "
                f"with random access; a streamed {type(train_dataset).__name__} has none. When streaming, distil "
                "online (teacher_model=), or build the cache on a map-style copy of the data"
            )
        # Batches carry their dataset positions when a teacher cache or a callback (UNIX free scoring) reads them.
        callbacks = kwargs.get("callbacks") or []
        if kwargs.get("train_dataset") is not None and (
            teacher_cache is not None or any(getattr(cb, "needs_sample_index", False) for cb in callbacks)
        ):
            kwargs["train_dataset"] = SampleIndexDataset.wrap(kwargs["train_dataset"])
        training_args = kwargs["args"] if len(args) < 2 else args[1]
        if teacher_model is None and teacher_cache is None:
            teacher_model = training_args.teacher_model_name_or_path
        _check_launch(training_args, teacher_model, teacher_cache)
        super().__init__(*args, **kwargs)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "the student has no parameter that requires grad; is it a copy of a teacher frozen by an earlier "
                "DistillationTrainer? Call student.requires_grad_(True) first"
            )
        self.teacher: Teacher | None = self._make_teacher(teacher_model) if teacher_model is not None else None
        #: What the loss asks for teacher logits: the teacher itself, or a source standing in for it (a teacher cache).
        self.teacher_source: TeacherSource = teacher_cache if teacher_cache is not None else self.teacher
        self.teacher_cache = teacher_cache
        train = self.train_dataset
        run = DistillationRun(
            train_dataset=SampleIndexDataset.unwrap(train),
            num_classes=num_classes(self.model),
            student_stats=image_stats(self.model, mean=self.args.image_mean, std=self.args.image_std),
            augment=self.device_augment,
            callbacks=tuple(self.callback_handler.callbacks),
            seed=self.args.seed,
            epoch=lambda: self.state.epoch,
        )
        # The source checks that it fits the run; a teacher cache replays its stored views instead of drawing new ones.
        self.device_augment = self.teacher_source.bind(run)
        self._student_keywords: bool | None = None
        self._user_loss = _defines_compute_loss(type(self))
        reported = self.teacher_source.reported_accuracy
        self._accuracy_check = TeacherAccuracyCheck(reported=reported) if self.args.check_teacher_accuracy else None
        #: The teacher's top-1 accuracy on the first training step's batches (None until measured, or when unchecked).
        self.teacher_accuracy: float | None = None
        self.samples_seen = 0
        self.teacher_samples = 0

    def _make_teacher(self, teacher_model: nn.Module | str) -> Teacher:
        """The `Teacher` for `teacher_model`, with this run's teacher settings."""
        if teacher_model is self.model:
            raise ValueError("teacher_model is the student object itself; pass a separate (e.g. deep-copied) teacher")
        if isinstance(teacher_model, nn.Module):  # before freezing the teacher, which would freeze shared weights too
            student_params = {p.data_ptr() for p in self.model.parameters()}
            if any(p.data_ptr() in student_params for p in teacher_model.parameters()):
                raise ValueError(
                    "teacher_model shares parameters with the student; distil from a separate copy (copy.deepcopy)"
                )
        return Teacher.from_args(teacher_model, self.args)  # told about the student by `bind`

    # ---- teacher ---------------------------------------------------------------------------------------------------
    @property
    def teacher_model(self) -> nn.Module | None:
        """The teacher's module (as prepared by Accelerate once it has been used); None with only a `teacher_cache`."""
        return self.teacher.module if self.teacher is not None else None

    def teacher_logits(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Teacher logits for a batch: from the `TeacherSource` (the teacher or its cache), prepared on first use.

        Prepared on first use, not in `__init__`: the Trainer decides whether to prepare the student for `evaluate()`
        by checking that Accelerate holds no model yet, and a prepared teacher would break that. A teacher cache holds
        outputs for the training views only: None in evaluation.
        """
        if not self.model.training and not self.teacher_source.answers_evaluation:
            return None
        self.teacher_source.prepare(self.accelerator)
        try:
            return self.teacher_source.logits(inputs)
        except FloatingPointError as err:
            raise FloatingPointError(
                f"at global step {self.state.global_step}: {err} The step was stopped before the update, so the "
                "student and the checkpoints saved so far are intact. (check_teacher_finite=False removes this check "
                "and its one host sync per step.)"
            ) from None

    def student_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Student logits for a batch; callbacks use it to score samples (wrap it in `no_grad` yourself)."""
        if self._student_keywords is None:  # the call style is read from the signature once, not per micro-batch
            self._student_keywords = takes_keywords(model)
        return logits_of(forward_model(model, inputs, keywords=self._student_keywords))

    # ---- loss ------------------------------------------------------------------------------------------------------
    def _distill_callbacks(self) -> list[DistillationCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, DistillationCallback)]

    def _task_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], needed: bool, num_items_in_batch
    ) -> tuple[torch.Tensor | None, torch.Tensor, Any]:
        """One student forward: (task loss or None, student logits, outputs to return)."""
        if self._user_loss:
            if inputs.get("mix_labels") is not None:
                raise ValueError(
                    "this batch carries mixup labels (mix_labels, mix_weights), which a subclass's own compute_loss "
                    "does not know; with a callback that mixes samples, let the mixin compute the cross-entropy "
                    "(do not override compute_loss)"
                )
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            return loss, logits_of(outputs), outputs
        student_logits = self.student_logits(model, inputs)
        labels = inputs.get("labels")
        if labels is None:
            if needed:
                raise ValueError(
                    f"alpha={self.args.alpha} < 1 gives the cross-entropy on labels weight {1 - self.args.alpha:g}, "
                    f"but the batch has no 'labels' (keys: {sorted(inputs)}). Add labels or set alpha=1.0."
                )
            return None, student_logits, {"logits": student_logits}
        loss = mixed_cross_entropy(student_logits, labels, inputs.get("mix_labels"), inputs.get("mix_weights"))
        return loss, student_logits, {"logits": student_logits}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        hooks = self._distill_callbacks() if training else []
        samples = batch_size(inputs)
        for cb in hooks:
            replaced = cb.on_distill_batch(self, model, inputs)
            if replaced is not None:
                inputs = replaced

        teacher_logits = self.teacher_logits(inputs) if self.args.alpha > 0 else None
        alpha = (
            self.args.alpha if teacher_logits is not None else 0.0
        )  # no teacher outputs (a cache at evaluation): task only
        task_loss, student_logits, outputs = self._task_loss(
            model, inputs, needed=alpha < 1, num_items_in_batch=num_items_in_batch
        )
        if training and teacher_logits is not None and self._accuracy_check is not None:
            self._check_teacher_accuracy(teacher_logits, inputs)

        losses: dict[str, torch.Tensor] = {}
        if alpha > 0:
            losses["loss_kd"] = alpha * kd_loss(
                student_logits, teacher_logits=teacher_logits, temperature=self.args.temperature
            )
        if alpha < 1 and task_loss is not None:
            losses["loss_ce"] = (1 - alpha) * task_loss
        for cb in hooks:
            extra = cb.on_distill_loss(self, model, inputs, student_logits, teacher_logits)
            for name, term in (extra or {}).items():
                if name in losses:
                    raise ValueError(f"{type(cb).__name__} returned loss term {name!r}, which already exists")
                losses[name] = term

        loss = sum(losses.values())
        self.record_loss_terms(losses, samples)
        if training:
            self.samples_seen += samples
            self.teacher_samples += 0 if teacher_logits is None else teacher_logits.shape[0]
        elif task_loss is not None:
            # Evaluation reports the task loss, so eval_loss means what it means for a student trained alone (and
            # metric_for_best_model="eval_loss" compares like with like); the distillation terms are logged beside it.
            loss = task_loss
        return (loss, outputs) if return_outputs else loss

    def _check_teacher_accuracy(self, teacher_logits: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        """The teacher check: accumulate over the first optimizer step's micro-batches, decide at its last one."""
        check = self._accuracy_check
        if not check.applies_to(teacher_logits, inputs):
            self._accuracy_check = None
            return
        check.update(teacher_logits, inputs)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        if self._loss_terms.micro_batches + 1 < steps:
            return  # more micro-batches of the first step to come; the decision still precedes its optimizer step
        self._accuracy_check = None
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = lambda t: self.accelerator.reduce(t, reduction="sum")  # one collective, once per run
        self.teacher_accuracy = check.result(reduce)
        if self.teacher_accuracy is not None:
            self.record_metric("teacher_accuracy", self.teacher_accuracy, "train")

    # ---- model card ------------------------------------------------------------------------------------------------
    def distillation_card(self) -> dict[str, Any]:
        """What the model card says about the distillation: teacher, method, T, alpha, accuracies, library version."""
        callbacks = [type(cb).__name__ for cb in self._distill_callbacks()]
        student_accuracy = None
        for entry in reversed(self.state.log_history):
            hit = next((entry[k] for k in ("eval_accuracy", "eval_top1", "eval_acc") if k in entry), None)
            if hit is not None:
                student_accuracy = hit
                break
        source = self.teacher_source.describe()
        cache = source.get("teacher_cache")
        return {
            **source,
            "method": "knowledge distillation (Hinton et al. 2015)"
            + (f" from a teacher cache of {cache['num_views']} stored views per image" if cache else "")
            + (f" with {', '.join(callbacks)}" if callbacks else ""),
            "temperature": self.args.temperature,
            "alpha": self.args.alpha,
            "teacher_accuracy": self.teacher_accuracy,
            "student_accuracy": student_accuracy,
            "hf_kdsearch_version": version("hf_kdsearch"),
        }

    def create_model_card(self, *args, **kwargs) -> None:
        """The Trainer's model card, plus a "Distillation" section and `distillation` metadata (`distillation_card`)."""
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        kwargs["tags"] = [*tags, *(t for t in ("knowledge-distillation", "hf_kdsearch") if t not in tags)]
        path = os.path.join(self.args.output_dir, "README.md")
        from huggingface_hub import ModelCard, ModelCardData

        if hasattr(unwrap(self.model), "config"):
            super().create_model_card(*args, **kwargs)
        elif self.is_world_process_zero():
            # The Trainer's card reads `model.config`, which timm models and plain modules do not have.
            name = kwargs.get("model_name") or os.path.basename(os.path.abspath(self.args.output_dir))
            data = ModelCardData(tags=kwargs["tags"], library_name="hf_kdsearch")
            os.makedirs(self.args.output_dir, exist_ok=True)
            ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {name}\n").save(path)
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return

        info = self.distillation_card()
        card = ModelCard.load(path)
        card.data.distillation = {k: v for k, v in info.items() if v is not None}
        import jinja2  # as huggingface_hub's ModelCard.from_template does

        template = jinja2.Template(SECTION_TEMPLATE.read_text(), keep_trailing_newline=True)
        section = template.render(**info, measured=_fmt)
        card.text = card.text.rstrip() + "\n\n" + section
        card.save(path)


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _defines_compute_loss(cls: type) -> bool:
    """Whether a class below `DistillationMixin` in `cls`'s MRO overrides `Trainer.compute_loss` (the user's loss)."""
    mro = cls.__mro__
    for base in mro[mro.index(DistillationMixin) + 1 :]:
        if "compute_loss" in vars(base):
            return base is not Trainer
    return False


class DistillationTrainer(DistillationMixin, Trainer):
    """A `Trainer` that distils a teacher into `model`.

    Example:
    ```python
    from hf_kdsearch import DistillationArguments, DistillationTrainer

    args = DistillationArguments(output_dir="out", teacher_model_name_or_path="path/to/teacher", alpha=0.9)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train_ds)   # or teacher_model=teacher
    trainer.train()
    ```
    """


class ClassificationTrainer(LossMetricsMixin, Trainer):
    """A `Trainer` for classifiers that return logits (timm, transformers or plain modules), with cross-entropy.

    It trains teachers and the "student alone" baselines with exactly the batch handling, gradient-accumulation
    scaling and logging of `DistillationTrainer`, so the comparison between the two differs only in the loss.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"ClassificationTrainer needs 'labels' in the batch, got keys {sorted(inputs)}")
        logits = logits_of(forward_model(model, inputs))
        loss = mixed_cross_entropy(logits, labels, inputs.get("mix_labels"), inputs.get("mix_weights"))
        self.record_loss_terms({"loss_ce": loss}, batch_size(inputs))
        return (loss, {"logits": logits}) if return_outputs else loss
