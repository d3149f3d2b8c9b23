"""`GateSearchCallback`: the search phase of Gu & Tresp's student search, with its penalty schedule, report and plot.

Gu & Tresp (2020), "Search for Better Students to Learn Distilled Knowledge", https://arxiv.org/abs/2001.11612;
docs/methods.md states our specification. The gates and the extraction live in the `gates` package.

```python
gated = add_gates(copy.deepcopy(teacher))
cb = GateSearchCallback(target_flops_ratio=0.25, l1_weight=1.0, input_size=(3, 32, 32))
DistillationTrainer(model=gated, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=ds).train()
student = extract_student(gated, target_flops_ratio=0.25, input_size=(3, 32, 32))
save_student(student, "out/student", card=cb.card(teacher="cifar_resnet56"), files=cb.report_files)
```
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .flops import count_flops
from .gates import (
    DEPTH,
    GatePlan,
    build_student,
    check_budget,
    flops_weighted_l1,
    gate_parameters,
    gate_plan,
    select_units,
    soft_keep_fractions,
    unwrap_model,
)
from .trainer import DistillationCallback

__all__ = ["GateSearchCallback", "search_report", "plot_widths"]

#: The GateSearchCallback each model's Trainer was built with, so that a copy restored from a checkpoint can find it.
_PASSED_IN: weakref.WeakKeyDictionary[nn.Module, GateSearchCallback] = weakref.WeakKeyDictionary()

#: `penalty` choices: the paper's FLOPs-weighted L1, or the expected FLOPs of the student the gates describe.
PENALTIES = ("l1", "expected_flops")

REPORT_JSON = "search_report.json"
REPORT_PNG = "search_widths.png"
METHOD = "student search with L1 architecture gates (Gu & Tresp 2020, https://arxiv.org/abs/2001.11612)"


class GateSearchCallback(DistillationCallback, ExportableState):
    """Adds the FLOPs-weighted L1 gate penalty to the distillation loss and steers its weight towards a FLOPs budget.

    Method (Gu & Tresp 2020, https://arxiv.org/abs/2001.11612): minimise
    `KD loss + lambda * sum_j c_j |g_j|` over weights and gates, where `c_j` is unit j's share of the teacher's FLOPs
    (`sum_j c_j = 1`, see `gates.py`). The term is returned from `on_distill_loss` as `gate_l1`, so it is part of the
    loss inside autograd and stays correct under mixed precision, gradient accumulation, clipping and DDP.

    Logged every logging step (averaged over micro-batches and ranks) beside `loss_kd`:
    - `gate_l1`: the penalty term, `lambda * sum_j c_j |g_j|` (with `penalty="expected_flops"`,
      `lambda * flops_ratio`);
    - `flops_ratio`: the expected FLOPs of the student the current gates describe, relative to the teacher. Every
      unit counts with weight `min(|g|, 1)`: a layer's FLOPs scale with the expected fraction of its input and output
      channels kept and with its branch's `min(|g_depth|, 1)`. It is 1 at the start, and for 0/1 gates it is the
      exact FLOPs ratio of the extracted student;
    - `gate_lambda`: the `lambda` in force.

    Schedule of `lambda`, by optimizer step (`global_step`, counted from 1; `max_steps` is the run's length):
    1. warm-up: during the first `warmup_steps = ceil(warmup_ratio * max_steps)` steps, step `s` uses
       `lambda * s / warmup_steps`, so the gates do not take a large first step before the KD gradient has settled;
    2. budget: after every step from `warmup_steps` on, `lambda` is multiplied by `l1_growth` if `flops_ratio` is
       above `target_flops_ratio` and divided by it if not, within `[l1_weight / 1000, max_l1_weight]`. The penalty
       thus rises until the expected FLOPs reach the budget, then holds them there: gates that the KD loss needs can
       grow back while the others stay near zero.
    The update is computed on the device, with no host sync. `lambda` is the callback's state: it is saved in
    `trainer_state.json` at every checkpoint and restored on `resume_from_checkpoint` (the gates are parameters,
    so they come back with the model). With `restore_callback_states_from_checkpoint=True` the Trainer swaps the
    callback for a copy rebuilt from the checkpoint; the copy shares its state with the object you passed in, so
    `report`, `report_files` and `current_l1_weight` are read from your object either way.

    At the start of training the main process checks that `report_dir` is writable, so that a bad folder fails
    before the search rather than after it. At the end of training, on the main process, the callback extracts the
    student at the budget and writes a JSON summary (`search_report.json`: FLOPs, parameters and per-layer widths of
    teacher and student) and a bar chart of the per-layer widths (`search_widths.png`) to `report_dir` (default:
    `args.output_dir`), each written beside its name and renamed into place. `self.report` holds the summary,
    `self.report_files` the two paths, and `self.card()` the fields for `hub.save_student(card=...)`.

    Args:
        target_flops_ratio: the FLOPs budget as a fraction of the teacher's, in (0, 1].
        l1_weight: the initial `lambda`.
        input_size: `(C, H, W)` of one sample for counting FLOPs; default the model's `pretrained_cfg["input_size"]`.
        warmup_ratio: fraction of the run's steps over which `lambda` ramps up from 0.
        l1_growth: factor by which `lambda` moves after each step, up while the expected FLOPs exceed the budget and
            down while they do not (>= 1; 1 keeps `lambda` fixed).
        max_l1_weight: cap on `lambda`; default `1000 * l1_weight`.
        report_dir: where the report goes; default `args.output_dir`.
        write_report: write the report at the end of training.
        penalty: `"l1"` (the paper's `sum_j c_j |g_j|`, linear in each gate) or `"expected_flops"`: `flops_ratio`
            itself, `FLOPs(min(|g|, 1)) / FLOPs(teacher)`, which counts each FLOP once and whose pull on a channel
            shrinks as the layers around it thin (a MorphNet-like regulariser, Gordon et al. 2018). Both equal 1 at
            initialisation, so `l1_weight` has the same scale for either.
    """

    def __init__(
        self,
        target_flops_ratio: float,
        l1_weight: float = 1.0,
        input_size: Sequence[int] | None = None,
        warmup_ratio: float = 0.1,
        l1_growth: float = 1.01,
        max_l1_weight: float | None = None,
        report_dir: str | None = None,
        write_report: bool = True,
        penalty: str = "l1",
    ):
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(map(repr, PENALTIES))}, got {penalty!r}")
        if not (isinstance(target_flops_ratio, int | float) and 0 < target_flops_ratio <= 1):
            raise ValueError(f"target_flops_ratio must lie in (0, 1], got {target_flops_ratio!r}")
        if not (isinstance(l1_weight, int | float) and l1_weight >= 0 and math.isfinite(l1_weight)):
            raise ValueError(f"l1_weight must be a finite number >= 0, got {l1_weight!r}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio!r}")
        if not l1_growth >= 1:
            raise ValueError(f"l1_growth must be >= 1 (1 keeps lambda fixed), got {l1_growth!r}")
        if max_l1_weight is not None and max_l1_weight < l1_weight:
            raise ValueError(f"max_l1_weight={max_l1_weight!r} is below l1_weight={l1_weight!r}")
        self.target_flops_ratio = float(target_flops_ratio)
        self.l1_weight = float(l1_weight)
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.warmup_ratio = float(warmup_ratio)
        self.l1_growth = float(l1_growth)
        self.max_l1_weight = float(max_l1_weight) if max_l1_weight is not None else 1000.0 * self.l1_weight
        self.min_l1_weight = self.l1_weight / 1000.0
        self.report_dir = report_dir
        self.write_report = write_report
        self.penalty = penalty
        self._lambda: torch.Tensor | float = self.l1_weight
        self._ready = False
        self.warmup_steps = 0
        self.report: dict | None = None
        self.report_files: list[str] = []

    # ---- state (ExportableState): stored in trainer_state.json at each checkpoint ------------------------------------
    @property
    def current_l1_weight(self) -> float:
        """The `lambda` the schedule has reached (before the warm-up factor)."""
        return float(self._lambda)

    @current_l1_weight.setter
    def current_l1_weight(self, value: float) -> None:
        if isinstance(self._lambda, torch.Tensor):
            self._lambda.fill_(float(value))
        else:
            self._lambda = float(value)

    def state(self) -> dict:
        return {
            "args": {
                "target_flops_ratio": self.target_flops_ratio,
                "l1_weight": self.l1_weight,
                "input_size": list(self.input_size) if self.input_size else None,
                "warmup_ratio": self.warmup_ratio,
                "l1_growth": self.l1_growth,
                "max_l1_weight": self.max_l1_weight,
                "report_dir": self.report_dir,
                "write_report": self.write_report,
                "penalty": self.penalty,
            },
            "attributes": {"current_l1_weight": self.current_l1_weight},
        }

    def _restore(self, state: TrainerState) -> None:
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            # Several callbacks of this class: take the one built with the same arguments.
            mine = self.state()["args"]
            stored = next((s for s in stored if s.get("args") == mine), stored[0] if stored else None)
        if stored and "current_l1_weight" in stored.get("attributes", {}):
            self.current_l1_weight = stored["attributes"]["current_l1_weight"]

    # ---- set-up ------------------------------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The object the user passed in; a copy the Trainer rebuilds from a checkpoint never receives this event.
        _PASSED_IN[unwrap_model(kwargs["model"])] = self

    def _share_state_with_passed_in(self, model: nn.Module) -> None:
        """With `restore_callback_states_from_checkpoint=True`, the Trainer replaces the callback the user holds by
        a new one rebuilt from the checkpoint. The two then share one state, so the user's object sees the restored
        `lambda`, the schedule and, after training, `report` and `report_files`."""
        passed = _PASSED_IN.get(model)
        if passed is not None and passed is not self and type(passed) is type(self):
            passed.__dict__ = self.__dict__

    def _check_report_dir(self, args: TrainingArguments) -> None:
        """Fail before the search, not after it, when the report cannot be written."""
        out = Path(self.report_dir or args.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as err:
            raise PermissionError(
                f"GateSearchCallback cannot write its report to {str(out)!r} ({type(err).__name__}: {err}); pass a "
                "writable report_dir (or output_dir), or write_report=False"
            ) from err

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = unwrap_model(kwargs["model"])
        if self.write_report and state.is_world_process_zero:
            self._check_report_dir(args)
        plan = gate_plan(model)
        self.input_size = self.input_size or _default_input_size(model)
        plan.measure(model, self.input_size)
        check_budget(plan, self.target_flops_ratio)  # fail now, not after the search
        gates = gate_parameters(model)
        device = next(iter(gates.values())).device
        self._gates = list(gates.values())
        self._costs = plan.unit_costs().to(device, torch.float32)
        self._plan = plan
        if state.global_step > 0:
            # Resuming: the Trainer has loaded trainer_state.json, whose stateful_callbacks hold our lambda. (With
            # args.restore_callback_states_from_checkpoint the Trainer also rebuilt us from it; this is idempotent.)
            self._restore(state)
        self._lambda = torch.tensor(self.current_l1_weight, device=device, dtype=torch.float32)
        self.warmup_steps = math.ceil(self.warmup_ratio * state.max_steps)
        self._ready = True
        self._share_state_with_passed_in(model)

    def _warmup_factor(self, step: int) -> float:
        # `step` optimizer steps are done, so this is step `step + 1`.
        return 1.0 if step + 1 >= self.warmup_steps else (step + 1) / self.warmup_steps

    def expected_flops_ratio(self, differentiable: bool = False) -> torch.Tensor:
        """`flops_ratio` for the current gates (a 0-d tensor on the gates' device); see the class docstring. With
        `differentiable`, a term of the graph (the `"expected_flops"` penalty)."""
        fractions = soft_keep_fractions(self._gates, differentiable=differentiable)
        return self._plan.flops_of(fractions) / self._plan.total_flops

    # ---- the loss term -----------------------------------------------------------------------------------------------
    def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
        if not self._ready:
            raise RuntimeError("GateSearchCallback.on_train_begin has not run; pass the callback to the Trainer")
        lam = self._lambda * self._warmup_factor(trainer.state.global_step)
        on_flops = self.penalty == "expected_flops"
        ratio = self.expected_flops_ratio(differentiable=on_flops)
        trainer.record_metric("flops_ratio", ratio)
        trainer.record_metric("gate_lambda", lam)
        return {"gate_l1": lam * (ratio if on_flops else flops_weighted_l1(self._gates, self._costs))}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not kwargs["model"].training:
            raise RuntimeError(
                "the gated model was in eval mode during a training step, so the gate penalty was never applied; "
                "is its train() overridden?"
            )
        if self._ready and state.global_step >= self.warmup_steps and self.l1_growth > 1:
            over = self.expected_flops_ratio() > self.target_flops_ratio
            factor = torch.where(over, self.l1_growth, 1.0 / self.l1_growth)
            self._lambda = torch.clamp(self._lambda * factor, min=self.min_l1_weight, max=self.max_l1_weight)

    # ---- report ------------------------------------------------------------------------------------------------------
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not (self.write_report and state.is_world_process_zero):
            return
        model = unwrap_model(kwargs["model"])
        out = Path(self.report_dir or args.output_dir)
        self.report = search_report(model, target_flops_ratio=self.target_flops_ratio, input_size=self.input_size)
        self.report["search"] = {
            "global_step": state.global_step,
            "final_l1_weight": self.current_l1_weight,
            "expected_flops_ratio": float(self.expected_flops_ratio()),
            "schedule": {
                "l1_weight": self.l1_weight,
                "warmup_steps": self.warmup_steps,
                "l1_growth": self.l1_growth,
                "max_l1_weight": self.max_l1_weight,
            },
        }
        out.mkdir(parents=True, exist_ok=True)
        # Each file is written beside its final name and renamed: a kill leaves the previous file or the new one.
        tmp_json, tmp_png = out / f".{REPORT_JSON}.tmp", out / f".tmp.{REPORT_PNG}"
        tmp_json.write_text(json.dumps(self.report, indent=2) + "\n")
        plot_widths(self.report, tmp_png)
        os.replace(tmp_json, out / REPORT_JSON)
        os.replace(tmp_png, out / REPORT_PNG)
        self.report_files = [str(out / REPORT_JSON), str(out / REPORT_PNG)]

    def card(self, **extra) -> dict:
        """Fields for `hub.save_student(card=...)` from the report: method, FLOPs, parameters, widths, budget.

        Keyword arguments (teacher, dataset, metrics, command, notes, ...) are added as they are. The FLOPs and
        parameters are those of the student extracted at the budget, which `extract_student` reproduces.
        """
        if self.report is None:
            raise RuntimeError("no search report yet: it is written at the end of training (write_report=True)")
        return {**report_card(self.report), **extra}


def _default_input_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not cfg.get("input_size"):
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg['input_size']; pass GateSearchCallback(input_size=(C, H, W))"
        )
    return tuple(cfg["input_size"])


def _params(model: nn.Module, skip: set[int] = frozenset()) -> int:
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def search_report(
    gated: nn.Module,
    *,
    target_flops_ratio: float,
    input_size: Sequence[int] | None = None,
    student: nn.Module | None = None,
) -> dict:
    """A JSON-able summary of a search: FLOPs, parameters and per-layer widths of the teacher and of the student
    extracted at `target_flops_ratio` (extracted here unless `student` is given)."""
    gated = unwrap_model(gated)
    plan: GatePlan = gate_plan(gated)
    sel = select_units(gated, target_flops_ratio=target_flops_ratio, input_size=input_size)
    if student is None:
        student = build_student(gated, sel)
    gates = gate_parameters(gated)
    teacher_params = _params(gated, {id(p) for p in gates.values()})
    student_flops = count_flops(student, plan.input_size)
    student_params = _params(student)
    widths = sel.widths(plan)
    for row, name in zip(widths, plan.groups):
        g = gates[name].detach().abs().float()
        row["mean_abs_gate"] = round(float(g.mean()), 6)
    cfg = getattr(gated, "pretrained_cfg", None) or {}
    return {
        "method": METHOD,
        "target_flops_ratio": target_flops_ratio,
        "input_size": list(plan.input_size),
        "teacher": {"architecture": cfg.get("architecture"), "flops": int(plan.total_flops), "params": teacher_params},
        "student": {
            "architecture": student.pretrained_cfg.get("architecture"),
            "model_args": getattr(student, "model_args", None),
            "flops": student_flops,
            "params": student_params,
        },
        "flops_ratio": student_flops / plan.total_flops,
        "params_ratio": student_params / teacher_params,
        "widths": widths,
        "removed_blocks": [plan.groups[n].label for n, r in sel.removed.items() if r],
    }


def report_card(report: dict) -> dict:
    """The `hub.save_student` card fields that a search report provides."""
    widths = {
        (f"{r['layer']} (branch)" if r["kind"] == DEPTH else r["layer"]): [r["teacher"], r["student"]]
        for r in report["widths"]
    }
    return {
        "method": "search",
        "flops": report["student"]["flops"],
        "params": report["student"]["params"],
        "widths": widths,
        "target_flops_ratio": report["target_flops_ratio"],
    }


def plot_widths(report: dict, path: str | os.PathLike) -> Path:
    """Bar chart of per-layer widths, teacher against found, from a `search_report`; removed branches are marked."""
    from matplotlib.figure import Figure

    rows = [r for r in report["widths"] if r["kind"] != DEPTH]
    removed = set(report.get("removed_blocks") or ())
    labels = [r["layer"] for r in rows]
    x = list(range(len(rows)))
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    ax.bar([i - 0.2 for i in x], [r["teacher"] for r in rows], 0.4, label="teacher", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], [r["student"] for r in rows], 0.4, label="found", color="#d9534f")
    for i, label in enumerate(labels):
        if any(label.startswith(b + ".") for b in removed):
            ax.annotate("removed", (i + 0.2, 0), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    t, s = report["teacher"], report["student"]
    ax.set_title(
        f"{t['architecture'] or 'teacher'} -> found student: FLOPs {s['flops'] / t['flops']:.1%} "
        f"(budget {report['target_flops_ratio']:.0%}), params {s['params'] / t['params']:.1%}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
