"""Online ensemble compression: students of several widths trained together, taught by their own ensemble.

Walawalkar, Shen & Savvides, "Online Ensemble Model Compression using Knowledge Distillation", ECCV 2020,
https://arxiv.org/abs/2011.07449.

`build_ensemble(arch, num_students=S)` builds S students of one CIFAR architecture (`models/cifar.py`). Student j has
`int(C * (S - j) / S)` channels in every stage of width C and the full depth. All students share the stem (conv + BN;
a conv for WRNs), kept at full width; the option-B projection shortcut of each narrower student's first block takes
the stem's channels to the student's width. Student 0 is the full model, the "pseudo teacher". One training run with
`OnlineEnsembleTrainer` yields all S students, and `export_student(j)` turns each into a standalone timm model.

The shared stem lives in student 0, and students 1..S-1 have their copy removed. Student j's parameter names are
then exactly those of the exported model (minus the stem), so export is a state-dict copy with strict key checking.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.trainer_utils import has_length

from .batch import batch_size
from .checks import check_finite_weights
from .config import OnlineEnsembleArguments
from .hub import save_student
from .losses import feature_mse, kd_loss, mixed_cross_entropy
from .metrics import TopKAccuracy
from .models.cifar import ARCHITECTURES, CifarResNet, CifarWideResNet
from .trainer import LossMetricsMixin

__all__ = [
    "OnlineEnsemble",
    "OnlineEnsembleArguments",
    "OnlineEnsembleTrainer",
    "build_ensemble",
    "student_widths",
    "ensemble_loss_terms",
    "ensemble_accuracy",
    "adam_l2",
]

logger = logging.getLogger(__name__)

# The modules that make up each family's stem; students 1..S-1 drop theirs and use student 0's.
_STEM_MODULES = {CifarResNet: ("conv1", "bn1"), CifarWideResNet: ("conv1",)}
# Shape arguments the width rule decides; passing them through would build students of another shape.
_RULE_ARGS = ("block_widths", "removed_blocks", "layers")


def student_widths(stage_widths: Sequence[int], num_students: int) -> list[list[int]]:
    """Per-stage widths of each student: student j gets `int(C * (S - j) / S)` channels for a stage of width C.

    Example: `student_widths([16, 32, 64], 5)` gives `[[16, 32, 64], [12, 25, 51], [9, 19, 38], [6, 12, 25],
    [3, 6, 12]]`, the ResNet-110 students of the paper's Table 1.
    """
    if not isinstance(num_students, int) or num_students < 2:
        raise ValueError(f"an ensemble needs num_students >= 2 students, got num_students={num_students!r}")
    # Integer floor division: int(C * (S - j) / S) without a float round trip.
    widths = [[int(c) * (num_students - j) // num_students for c in stage_widths] for j in range(num_students)]
    if min(widths[-1]) < 1:
        raise ValueError(
            f"stage widths {list(stage_widths)} are too narrow for {num_students} students: the smallest would get "
            f"{widths[-1]} channels. Use fewer students or wider stages."
        )
    return widths


def _adapter(in_chs: int, out_chs: int, bias: bool) -> nn.Conv2d:
    """A 1x1 conv from a narrow student's stage width to student 0's, initialised as in the authors' released code:
    xavier-normal weights, zero bias."""
    conv = nn.Conv2d(in_chs, out_chs, 1, bias=bias)
    nn.init.xavier_normal_(conv.weight)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _run_stages(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a CIFAR model's stages on the stem's output; return the head's input and each stage's output."""
    stage_outputs = []
    for stage in model.stages:
        x = stage(x)
        stage_outputs.append(x)
    if isinstance(model, CifarWideResNet):
        # Pre-activation network: its final BN + ReLU sit between the last stage and the pooling.
        x = torch.relu(model.bn_final(x))
    return x, stage_outputs


class OnlineEnsemble(nn.Module):
    """S students of one CIFAR architecture with a shared full-width stem, plus the 1x1 adapters of the feature loss.

    Walawalkar et al. 2020 (https://arxiv.org/abs/2011.07449). Build it with `build_ensemble`.

    `forward(pixel_values)` returns a dict with `logits` (the plain mean of the students' logits, the ensemble's
    prediction) and `student_logits` (a tuple, one `(N, num_classes)` tensor per student, widest first). With
    `output_features=True` it also returns `student_features` (each student's 3 stage outputs) and
    `adapted_features` (students 1..S-1's stage outputs mapped by their adapters to student 0's widths), which
    `OnlineEnsembleTrainer` uses for the feature loss. The adapters run inside `forward`, so DDP sees them used.

    Attributes:
        arch: the timm name of the architecture.
        widths: per-student stage widths, `widths[j]` for student j.
        students: `nn.ModuleList` of the students; student 0 owns the shared stem.
        adapters: `nn.ModuleList` with one `nn.ModuleList` of per-stage 1x1 convs for each student 1..S-1, with a
            bias (unless `adapter_bias=False`) and xavier-normal weights, as in the authors' released code. They serve
            training only: exported students do not contain them.
    """

    def __init__(
        self,
        arch: str,
        num_students: int = 5,
        num_classes: int = 100,
        in_chans: int = 3,
        adapter_bias: bool = True,
        **model_kwargs: Any,
    ):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; the ensemble supports {sorted(ARCHITECTURES)}")
        rejected = sorted(k for k in model_kwargs if k in _RULE_ARGS)
        if rejected:
            raise ValueError(
                f"{rejected} would override the students' shapes, which the width rule decides; only stage_widths "
                "(the full width C) and stem_width may be set"
            )
        cls, _, _, default_widths = ARCHITECTURES[arch]
        full_widths = [int(w) for w in model_kwargs.pop("stage_widths", default_widths)]
        self.arch = arch
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.widths = student_widths(full_widths, num_students)
        # Kept to rebuild identical students in export_student (drop_rate, stem_width, pretrained_cfg_overlay, ...).
        self.model_kwargs = dict(model_kwargs)
        self.students = nn.ModuleList([self._create_student(w) for w in self.widths])
        self.stem_names = _STEM_MODULES[cls]
        for student in self.students[1:]:
            for name in self.stem_names:
                delattr(student, name)
        self.adapters = nn.ModuleList(
            [
                nn.ModuleList([_adapter(w, w0, adapter_bias) for w, w0 in zip(widths, self.widths[0])])
                for widths in self.widths[1:]
            ]
        )

    @property
    def num_students(self) -> int:
        return len(self.students)

    def _create_student(self, widths: Sequence[int]) -> nn.Module:
        return timm.create_model(
            self.arch,
            stage_widths=list(widths),
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            **self.model_kwargs,
        )

    def forward(self, pixel_values: torch.Tensor, output_features: bool = False) -> dict[str, Any]:
        stem = self.students[0].forward_stem(pixel_values)
        student_logits, student_features = [], []
        for student in self.students:
            pre_head, stage_outputs = _run_stages(student, stem)
            student_logits.append(student.forward_head(pre_head))
            student_features.append(stage_outputs)
        out = {"logits": torch.stack(student_logits).mean(0), "student_logits": tuple(student_logits)}
        if output_features:
            out["student_features"] = student_features
            out["adapted_features"] = [
                [adapter(f) for adapter, f in zip(adapters, feats)]
                for adapters, feats in zip(self.adapters, student_features[1:])
            ]
        return out

    def student_model_args(self, j: int) -> dict:
        """The `timm.create_model` keyword arguments that build student j standalone."""
        self._check_index(j)
        return {
            "stage_widths": list(self.widths[j]),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            **self.model_kwargs,
        }

    def _check_index(self, j: int) -> None:
        if not isinstance(j, int) or not 0 <= j < self.num_students:
            raise IndexError(f"student index must be an int in [0, {self.num_students - 1}], got {j!r}")

    def export_student(self, j: int) -> nn.Module:
        """Student j as a standalone timm model, in eval mode, whose logits equal `forward(x)["student_logits"][j]`.

        It is built by `timm.create_model(arch, stage_widths=..., num_classes=..., in_chans=...)`, so it carries
        `pretrained_cfg` and `model_args` like any other model of the family, and the shared stem and student j's
        weights (BN running statistics included) are copied in. The adapters are not part of it.
        """
        self._check_index(j)
        model = timm.create_model(self.arch, **self.student_model_args(j))
        stem_state = {k: v for k, v in self.students[0].state_dict().items() if k.split(".", 1)[0] in self.stem_names}
        # strict=True: a key or shape mismatch would mean the exported model is not student j.
        model.load_state_dict({**stem_state, **self.students[j].state_dict()}, strict=True)
        param = next(self.parameters())
        return model.to(device=param.device, dtype=param.dtype).eval()

    def save_students(
        self,
        save_directory: str | os.PathLike,
        *,
        card: Mapping[str, Any] | None = None,
        accuracies: Sequence[float] | None = None,
    ) -> list[Path]:
        """Export every student and save each with `save_student` to `save_directory/student{j}`.

        Each folder loads on its own with `timm.create_model("local-dir:<folder>", pretrained=True)` or
        `AutoModelForImageClassification`. Student j's model card gets `card`'s entries, `method="ensemble"`, its
        stage widths, its size relative to student 0 and, if given, `accuracies[j]`. To publish one student, use
        `push_student(ens.export_student(j), repo_id, card=...)`; save them all here first, so a failed push loses
        nothing.

        Every student is exported and checked (finite weights, input size) before the first folder is written, so a
        student that cannot be saved stops the call before it writes anything.
        """
        if accuracies is not None and len(accuracies) != self.num_students:
            raise ValueError(f"accuracies has {len(accuracies)} entries for {self.num_students} students")
        students = [self.export_student(j) for j in range(self.num_students)]
        for j, student in enumerate(students):
            check_finite_weights(student, name=f"student{j}")
        input_size = tuple(students[0].pretrained_cfg.get("input_size", ()))
        if input_size[:1] != (self.in_chans,):
            # The saved config tells loaders (and the FLOPs count) what input to feed; a CIFAR default of 3 channels
            # on a 1-channel model would make every consumer fail later, far from the cause.
            raise ValueError(
                f"the students take {self.in_chans} input channels but their pretrained_cfg says input_size="
                f"{input_size}; build the ensemble with pretrained_cfg_overlay=dict(input_size=({self.in_chans}, H, "
                "W), mean=..., std=...) describing your data"
            )
        counts = [sum(p.numel() for p in s.parameters()) for s in students]
        paths = []
        for j, student in enumerate(students):
            entry = {
                "method": "ensemble",
                "widths": {"stage_widths": self.widths[j], "student0_stage_widths": self.widths[0]},
                "params": counts[j],
                "notes": (
                    f"Student {j} of {self.num_students} trained together in an online ensemble of {self.arch} "
                    f"with a shared stem; {100 * counts[j] / counts[0]:.2f}% of student 0's parameters."
                ),
                **dict(card or {}),
            }
            if accuracies is not None:
                entry["accuracy"] = float(accuracies[j])
            paths.append(save_student(student, Path(save_directory) / f"student{j}", card=entry))
        return paths


def build_ensemble(
    arch: str,
    num_students: int = 5,
    num_classes: int = 100,
    in_chans: int = 3,
    adapter_bias: bool = True,
    **model_kwargs: Any,
) -> OnlineEnsemble:
    """Build an online ensemble of `num_students` students of the CIFAR architecture `arch` (Walawalkar et al. 2020,
    https://arxiv.org/abs/2011.07449).

    Student j has `int(C * (S - j) / S)` channels in every stage of width C and the same depth; the stem is shared at
    full width. For `cifar_resnet110` with 5 students and 10 classes the students have 100 / 62.79 / 35.26 / 15.15 /
    3.64 % of the parameters of the full model, each count including the shared stem (the paper's Table 1).

    Args:
        arch: a registered CIFAR architecture, e.g. `"cifar_resnet110"` or `"cifar_wrn_16_2"`.
        num_students: S >= 2.
        num_classes: classifier size of every student.
        in_chans: input channels (1 for MNIST digits; the models pool globally, so 28x28 inputs work).
        adapter_bias: give the feature loss's 1x1 adapters a bias (the authors' code does). `False` builds the
            bias-free adapters of hf_kdsearch 0.1, e.g. to load one of its checkpoints.
        **model_kwargs: passed to `timm.create_model` for every student, e.g. `drop_rate`,
            `pretrained_cfg_overlay`, or `stage_widths` to set the full width C.

    Example:
    ```python
    ens = build_ensemble("cifar_resnet110", num_students=5, num_classes=100)
    out = ens(pixel_values=x)          # out["logits"]: ensemble mean, out["student_logits"]: one tensor per student
    student = ens.export_student(4)    # the smallest student, a standalone timm model
    ```
    """
    return OnlineEnsemble(
        arch,
        num_students=num_students,
        num_classes=num_classes,
        in_chans=in_chans,
        adapter_bias=adapter_bias,
        **model_kwargs,
    )


def ensemble_loss_terms(
    student_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    student_features: Sequence[Sequence[torch.Tensor]],
    adapted_features: Sequence[Sequence[torch.Tensor]],
    *,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """The unweighted terms of the online-ensemble loss, as pure tensor maths.

    - `ce_student{j}`: cross-entropy of student j on `labels`.
    - `int`: `sum_{j>=1} sum_stages MSE(adapted_features[j-1][s], student_features[0][s])`, with the widest
      student's features detached, so it guides the narrow students without being pulled towards them.
    - `kd`: `sum_j T^2 KL(softmax(m / T) || softmax(z_j / T))`, with `m` the detached mean of all students' logits
      (the ensemble teacher) and every student, student 0 included, distilled from it.
    """
    if len(student_logits) < 2:
        raise ValueError(f"need the logits of at least 2 students, got {len(student_logits)}")
    if len(adapted_features) != len(student_logits) - 1:
        raise ValueError(
            f"need adapted features for students 1..{len(student_logits) - 1}, got {len(adapted_features)} lists"
        )
    terms = {f"ce_student{j}": mixed_cross_entropy(z, labels) for j, z in enumerate(student_logits)}
    pseudo_teacher = student_features[0]
    feature_terms = []
    for j, adapted in enumerate(adapted_features, start=1):
        if len(adapted) != len(pseudo_teacher):
            raise ValueError(f"student {j} has {len(adapted)} adapted stage outputs, student 0 {len(pseudo_teacher)}")
        feature_terms += [feature_mse(a, teacher_features=t) for a, t in zip(adapted, pseudo_teacher)]
    terms["int"] = torch.stack(feature_terms).sum()
    ensemble_teacher = torch.stack([z.detach().float() for z in student_logits]).mean(0)
    terms["kd"] = torch.stack(
        [kd_loss(z, teacher_logits=ensemble_teacher, temperature=temperature) for z in student_logits]
    ).sum()
    return terms


def ensemble_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for `OnlineEnsembleTrainer`: accuracy of each student and of the ensemble mean.

    The predictions are `(N, S + 1, num_classes)`: students 0..S-1, then the ensemble. Returns `acc_student{j}` and
    `acc_ensemble`, which `Trainer.evaluate()` reports as `eval_acc_student{j}` and `eval_acc_ensemble`.
    """
    predictions = np.asarray(eval_pred.predictions)
    labels = np.asarray(eval_pred.label_ids)
    if predictions.ndim != 3 or predictions.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected predictions of shape (N, students + 1, classes) for {labels.shape[0]} labels, got "
            f"{predictions.shape}"
        )
    heads = [f"student{j}" for j in range(predictions.shape[1] - 1)] + ["ensemble"]
    top1 = _top1_accuracy(tuple(heads))(EvalPrediction(predictions=predictions, label_ids=labels))
    return {f"acc_{name.removesuffix('_top1')}": float(value) for name, value in top1.items()}


@functools.lru_cache(maxsize=8)
def _top1_accuracy(heads: tuple[str, ...]) -> TopKAccuracy:
    return TopKAccuracy(top_k=(1,), heads=heads)


def adam_l2(args: TrainingArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer of the authors' released code, for the Trainer's `optimizer_cls_and_kwargs`: `torch.optim.Adam`.

    Its weight decay is an L2 term added to the gradient before Adam's scaling (coupled), as in
    `torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)`; the Trainer's `adamw_torch` decays the weights directly
    (decoupled), which with Adam is another regulariser. The Trainer still builds the parameter groups:
    `args.weight_decay` on the weights, none on biases and norm layers; `OnlineEnsembleTrainer` then moves the adapters
    to their own groups. The learning rate, betas and epsilon come from `args` (`learning_rate`, `adam_beta1`,
    `adam_beta2`, `adam_epsilon`); `args.optim` is not used.

    Example:
    ```python
    args = OnlineEnsembleArguments(output_dir="out", learning_rate=1e-3, weight_decay=1e-5)
    trainer = OnlineEnsembleTrainer(model=ens, args=args, train_dataset=train, optimizer_cls_and_kwargs=adam_l2(args))
    ```
    """
    return torch.optim.Adam, {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }


class OnlineEnsembleTrainer(LossMetricsMixin, Trainer):
    """Trains an `OnlineEnsemble` with the online ensemble distillation loss (Walawalkar et al. 2020,
    https://arxiv.org/abs/2011.07449):

        loss = ce_weight * sum_j CE(z_j, y) + feature_weight * L_int + kd_weight * L_KD

    with `L_int` and `L_KD` as in `ensemble_loss_terms`: 1x1 adapters map each narrow student's stage outputs to the
    widest student's (detached) ones, and every student is distilled at temperature T from the detached mean of all
    students' logits. No pretrained teacher is needed. The defaults are the paper's: 0.7, 0.15, 0.15 and T = 2.

    Settings come from `OnlineEnsembleArguments`; plain `TrainingArguments` are converted once (`upcast_arguments`),
    with the ensemble's defaults.

    As in the authors' code, the adapters train at `adapter_lr_scale` times the learning rate (their own optimizer
    parameter groups, so every scheduler keeps the ratio) and are not updated in the first `adapter_freeze_epochs`
    epochs' worth of optimizer steps (or `adapter_freeze_steps`), counted in steps so that the freeze ends on a stream:
    their gradients are dropped after each backward, before clipping, so the optimizer skips them entirely.

    Logged, in training and evaluation: `loss_ce`, `loss_int`, `loss_kd` (weighted, they sum to the loss) and
    `ce_student{j}` (unweighted). Evaluation also reports `eval_acc_student{j}` and `eval_acc_ensemble` through the
    default `compute_metrics` (`ensemble_accuracy`); a custom `compute_metrics` receives predictions of shape
    `(N, S + 1, num_classes)`, students first and the ensemble mean last.

    Example:
    ```python
    ens = build_ensemble("cifar_resnet110", num_students=5, num_classes=100)
    args = OnlineEnsembleArguments(output_dir="out", learning_rate=1e-3, weight_decay=1e-5)
    trainer = OnlineEnsembleTrainer(
        model=ens, args=args, train_dataset=train, eval_dataset=test, optimizer_cls_and_kwargs=adam_l2(args)
    )  # the authors' Adam with L2 weight decay
    trainer.train()
    trainer.evaluate()                 # eval_acc_student0..4, eval_acc_ensemble
    ens.export_student(4)              # the smallest student, standalone
    ```
    """

    args_class = OnlineEnsembleArguments

    def __init__(self, model: OnlineEnsemble | None = None, *args: Any, **kwargs: Any):
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = ensemble_accuracy
        super().__init__(model, *args, **kwargs)
        self._freeze_steps: int | None = None
        if not isinstance(self.model, OnlineEnsemble):
            raise TypeError(
                f"OnlineEnsembleTrainer trains an OnlineEnsemble (from build_ensemble), got {type(self.model).__name__}"
            )

    def _adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.model.adapters.parameters())

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the adapters moved to parameter groups at `adapter_lr_scale` times the lr."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        scale = self.args.adapter_lr_scale
        if not fresh or scale == 1.0:
            return optimizer
        adapters = {id(p) for p in self._adapter_parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in adapters]
            if not moved:
                continue
            # Before the first step no optimizer state exists, so parameters can change groups freely.
            group["params"] = [p for p in group["params"] if id(p) not in adapters]
            optimizer.add_param_group({**group, "params": moved, "lr": group["lr"] * scale})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def adapter_freeze_steps(self) -> int:
        """The optimizer steps before the adapters are first updated: `adapter_freeze_steps` when set, else
        `adapter_freeze_epochs` times an epoch's optimizer steps. A stream has no epoch length, so there an epoch
        counts as `max_steps / num_train_epochs` steps: the same share of the run as on a finite dataset."""
        if self._freeze_steps is None:
            args = self.args
            if args.adapter_freeze_steps is not None or args.adapter_freeze_epochs == 0:
                self._freeze_steps = int(args.adapter_freeze_steps or 0)
            elif has_length(self.train_dataset):
                per_epoch = math.ceil(len(self.get_train_dataloader()) / args.gradient_accumulation_steps)
                self._freeze_steps = round(args.adapter_freeze_epochs * per_epoch)
            else:
                per_epoch = self.state.max_steps / max(args.num_train_epochs, 1.0)
                self._freeze_steps = round(args.adapter_freeze_epochs * per_epoch)
                logger.warning(
                    "the training set is a stream without a length: the adapters are frozen for the first %d of %d "
                    "optimizer steps (adapter_freeze_epochs=%s of num_train_epochs=%s); set adapter_freeze_steps to "
                    "choose",
                    self._freeze_steps,
                    self.state.max_steps,
                    args.adapter_freeze_epochs,
                    args.num_train_epochs,
                )
        return self._freeze_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Counted in optimizer steps, which advance on a stream too (the Trainer's epoch there does not).
        if self.state.global_step < self.adapter_freeze_steps():
            # Dropped after the backward (and its DDP all-reduce) and before clipping: the optimizer skips a
            # parameter without a gradient, so the adapters stay exactly as they are, momentum and decay included.
            for p in self._adapter_parameters():
                p.grad = None
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"OnlineEnsembleTrainer needs 'labels' in the batch, got keys {sorted(inputs)}")
        outputs = model(pixel_values=inputs["pixel_values"], output_features=True)
        terms = ensemble_loss_terms(
            outputs["student_logits"],
            labels,
            outputs["student_features"],
            outputs["adapted_features"],
            temperature=self.args.temperature,
        )
        ce = [terms[f"ce_student{j}"] for j in range(len(outputs["student_logits"]))]
        losses = {
            "loss_ce": self.args.ce_weight * torch.stack(ce).sum(),
            "loss_int": self.args.feature_weight * terms["int"],
            "loss_kd": self.args.kd_weight * terms["kd"],
        }
        # ce_student{j} are unweighted diagnostics, not summands of the loss, but averaged the same way.
        self.record_loss_terms({**losses, **{f"ce_student{j}": v for j, v in enumerate(ce)}}, batch_size(inputs))
        loss = sum(losses.values())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss and `(N, S + 1, num_classes)` logits: each student's, then the ensemble mean (see `ensemble_accuracy`).

        Without labels in the batch (`trainer.predict` on unlabelled data) the loss is `None`.
        """
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            if labels is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach()
            else:
                loss, outputs = None, model(pixel_values=inputs["pixel_values"])
        if prediction_loss_only:
            return loss, None, None
        logits = torch.stack([*outputs["student_logits"], outputs["logits"]], dim=1)
        return loss, logits, labels
