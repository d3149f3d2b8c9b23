"""`GateSearchCallback`: the search phase of Gu & Tresp's student search, with its penalty schedule, report and plot.

Gu & Tresp (2020), "Search for Better Students to Learn Distilled Knowledge", https://arxiv.org/abs/2001.11612;
docs/methods.md states our specification. The gates and the extraction live in the `gates` package.

```python
gated = add_gates(copy.deepcopy(teacher))
cb = GateSearchCallback(target_flops_ratio=0.25, l1_weight=1.0, input_size=(3, 32, 32))
DistillationTrainer(model=gated, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=ds).train()
best = cb.choose(lambda c: short_validation_run(c.student(gated)), max_runs=3)   # uniform, found, box
student = best.student(gated)
save_student(student, "out/student", card=cb.card(teacher="cifar_resnet56"), files=cb.report_files)
```
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import weakref
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .candidates import WidthCandidate, pick_candidate, score_candidates, width_candidates
from .flops import count_flops, input_size_of
from .gates import (
    DEPTH,
    WIDTH,
    GatePlan,
    build_student,
    check_budget,
    flops_weighted_l1,
    gate_parameters,
    gate_plan,
    select_units,
    soft_keep_fractions,
    unit_importance,
    unwrap_model,
)
from .losses import kd_loss
from .trainer import DistillationCallback

__all__ = ["GateSearchCallback", "search_report", "plot_widths"]

#: The GateSearchCallback each model's Trainer was built with, so that a copy restored from a checkpoint can find it.
_PASSED_IN: weakref.WeakKeyDictionary[nn.Module, GateSearchCallback] = weakref.WeakKeyDictionary()

#: `penalty` choices: the paper's FLOPs-weighted L1, or the expected FLOPs of the student the gates describe.
PENALTIES = ("l1", "expected_flops")
#: `gate_projection` choices, applied after every optimizer step (see the class docstring).
PROJECTIONS = ("max", "clamp", "none")

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
    - `flops_ratio`: the FLOPs of the student the gates select now, relative to the teacher: the units with
      `|g| > keep_threshold` (a live branch or plain layer keeps at least one channel), exactly the FLOPs of
      `extract_student(model, threshold=keep_threshold)`. It is 1 at the start;
    - `gate_lambda`: the `lambda` in force.

    Gate projection (`gate_projection`, after every optimizer step, on the device): `"max"` (default) clamps every
    gate to [0, 1] and divides each width group by its largest gate, so every layer keeps a gate at exactly 1 and no
    layer can die, and a layer's magnitudes cannot slide together along a direction the loss does not see (with
    BatchNorm on batch statistics, scaling a layer's gates changes nothing downstream when a conv + BN follows);
    `"clamp"` only clamps to [0, 1] (depth gates are always only clamped, so a branch can go); `"none"` leaves the
    gates as the optimizer made them (the paper's plain L1).

    Schedule of `lambda`, by optimizer step (`global_step`, counted from 1; `max_steps` is the run's length):
    1. warm-up: during the first `warmup_steps = ceil(warmup_ratio * max_steps)` steps, step `s` uses
       `lambda * s / warmup_steps`, so the gates do not take a large first step before the KD gradient has settled;
    2. budget: after every step from `warmup_steps` on, `lambda` is multiplied by `l1_growth` if `flops_ratio` (the
       selected student's FLOPs) is above `target_flops_ratio` and divided by it if not, within
       `[l1_weight / 1000, max_l1_weight]`. The penalty thus rises until the selected student fits the budget, then
       holds it there: gates that the KD loss needs can grow back while the others stay near zero.
    The update is computed on the device, with no host sync. `lambda` is the callback's state: it is saved in
    `trainer_state.json` at every checkpoint and restored on `resume_from_checkpoint` (the gates are parameters,
    so they come back with the model). With `restore_callback_states_from_checkpoint=True` the Trainer swaps the
    callback for a copy rebuilt from the checkpoint; the copy shares its state with the object you passed in, so
    `report`, `report_files` and `current_l1_weight` are read from your object either way.

    At the end of training (on every process; only the main one writes files) the callback ranks the units by
    `unit_importance` (the scale-free first-order loss change per FLOP, `|g * dL/dg| / c_j`, over
    `importance_batches` training batches with BatchNorm on batch statistics; `self.scores`) and lists the width
    candidates (`self.candidates`: `uniform`, `found`, `box`; see `hf_kdsearch.candidates`).
    `self.choose(score_fn, max_runs)` scores them with short validation runs and keeps the best, so uniform thinning
    is always in the race; it rewrites the report with the scores.

    At the start of training the main process checks that `report_dir` is writable, so that a bad folder fails
    before the search rather than after it. At the end of training it writes a JSON summary (`search_report.json`:
    FLOPs, parameters and per-layer widths of teacher and found student, and every candidate) and a bar chart of the
    per-layer widths of every candidate (`search_widths.png`) to `report_dir` (default: `args.output_dir`), each
    written beside its name and renamed into place. `self.report` holds the summary, `self.report_files` the two
    paths, and `self.card()` the fields for `hub.save_student(card=...)`.

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
        gate_projection: `"max"`, `"clamp"` or `"none"` (see above).
        keep_threshold: a unit with `|g|` above it counts as kept in `flops_ratio`, the controller's reading.
        importance_batches: training batches `unit_importance` averages over at the end (0: rank by `|g|`).
        box: per-layer bounds of the `box` candidate, as multiples of the uniform width.
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
        gate_projection: str = "max",
        keep_threshold: float = 0.05,
        importance_batches: int = 8,
        box: Sequence[float] = (0.75, 1.5),
    ):
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(map(repr, PENALTIES))}, got {penalty!r}")
        if gate_projection not in PROJECTIONS:
            raise ValueError(
                f"gate_projection must be one of {', '.join(map(repr, PROJECTIONS))}, got {gate_projection!r}"
            )
        if not 0 <= keep_threshold < 1:
            raise ValueError(f"keep_threshold must lie in [0, 1), got {keep_threshold!r}")
        if importance_batches < 0:
            raise ValueError(f"importance_batches must be >= 0, got {importance_batches!r}")
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
        self.gate_projection = gate_projection
        self.keep_threshold = float(keep_threshold)
        self.importance_batches = int(importance_batches)
        self.box = tuple(float(b) for b in box)
        self.scores: dict[str, torch.Tensor] | None = None
        self.candidates: list[WidthCandidate] = []
        self._trainer = None
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
                "gate_projection": self.gate_projection,
                "keep_threshold": self.keep_threshold,
                "importance_batches": self.importance_batches,
                "box": list(self.box),
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
        self.input_size = self.input_size or input_size_of(model, hint="GateSearchCallback(input_size=(C, H, W))")
        plan.measure(model, self.input_size)
        check_budget(plan, self.target_flops_ratio)  # fail now, not after the search
        gates = gate_parameters(model)
        device = next(iter(gates.values())).device
        self._gates = list(gates.values())
        self._costs = plan.unit_costs().to(device, torch.float32)
        self._plan = plan
        self._is_width = [g.kind == WIDTH for g in plan.groups.values()]
        self._width_mask = torch.tensor(self._is_width, device=device)  # once: read every step, no copy per step
        self._sizes = torch.tensor([g.size for g in plan.groups.values()], device=device, dtype=torch.float32)
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

    def selected_flops_ratio(self) -> torch.Tensor:
        """`flops_ratio`: the FLOPs of the student the gates select now (units with `|g| > keep_threshold`, at least
        one channel per live width group), relative to the teacher; a 0-d tensor on the gates' device, no host sync."""
        kept = torch.stack([(g.detach().abs() > self.keep_threshold).sum().float() for g in self._gates])
        fractions = torch.where(self._width_mask, kept.clamp(min=1) / self._sizes, kept)
        return self._plan.flops_of(fractions) / self._plan.total_flops

    def project_gates(self) -> None:
        """Apply `gate_projection` to the gates in place (see the class docstring)."""
        if self.gate_projection == "none":
            return
        with torch.no_grad():
            for g, width in zip(self._gates, self._is_width):
                if not (width and self.gate_projection == "max"):
                    g.clamp_(0.0, 1.0)
                    continue
                best = g.argmax()  # before the clamp: the unit kept when the whole group is pushed to 0
                g.clamp_(0.0, 1.0)
                # A group pushed to 0 all at once keeps its best unit: every layer keeps a gate at exactly 1.
                top = g.max()
                only_best = torch.zeros_like(g).index_fill_(0, best.reshape(1), 1.0)
                g.copy_(torch.where(top > 0, g / top.clamp(min=1e-12), only_best))

    # ---- the loss term -----------------------------------------------------------------------------------------------
    def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
        if not self._ready:
            raise RuntimeError("GateSearchCallback.on_train_begin has not run; pass the callback to the Trainer")
        self._trainer = weakref.ref(trainer)
        lam = self._lambda * self._warmup_factor(trainer.state.global_step)
        on_flops = self.penalty == "expected_flops"
        trainer.record_metric("flops_ratio", self.selected_flops_ratio())
        trainer.record_metric("gate_lambda", lam)
        if on_flops:
            return {"gate_l1": lam * self.expected_flops_ratio(differentiable=True)}
        skip = [w and self.gate_projection == "max" for w in self._is_width]
        return {"gate_l1": lam * flops_weighted_l1(self._gates, self._costs, skip)}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not kwargs["model"].training:
            raise RuntimeError(
                "the gated model was in eval mode during a training step, so the gate penalty was never applied; "
                "is its train() overridden?"
            )
        if self._ready:
            self.project_gates()
        if self._ready and state.global_step >= self.warmup_steps and self.l1_growth > 1:
            over = self.selected_flops_ratio() > self.target_flops_ratio
            factor = torch.where(over, self.l1_growth, 1.0 / self.l1_growth)
            self._lambda = torch.clamp(self._lambda * factor, min=self.min_l1_weight, max=self.max_l1_weight)

    # ---- report ------------------------------------------------------------------------------------------------------
    def _importance(self, model: nn.Module, dataloader) -> dict[str, torch.Tensor] | None:
        """`unit_importance` of the searched gates on `importance_batches` training batches, under the loss the
        search distilled with (the KD term, or cross-entropy without a teacher)."""
        trainer = self._trainer() if self._trainer is not None else None
        if not self.importance_batches or trainer is None or dataloader is None:
            return None
        inner = unwrap_model(model)

        def loss_fn(_, batch):
            inputs = trainer._prepare_inputs(batch)
            logits = inner(inputs["pixel_values"])
            logits = getattr(logits, "logits", logits)
            teacher = trainer.teacher_logits(inputs) if trainer.args.alpha > 0 else None
            if teacher is None:
                return F.cross_entropy(logits, inputs["labels"])
            return kd_loss(logits, teacher_logits=teacher, temperature=trainer.args.temperature)

        was_training = inner.training
        inner.train()  # BatchNorm on batch statistics, as during the search
        try:
            return unit_importance(inner, loss_fn, islice(dataloader, self.importance_batches))
        finally:
            inner.train(was_training)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Every rank ranks the units (iterating a prepared dataloader can be a collective); the main process writes.
        model = unwrap_model(kwargs["model"])
        self.scores = self._importance(model, kwargs.get("train_dataloader"))
        self.candidates = width_candidates(
            model, self.target_flops_ratio, self.scores, box=self.box, input_size=self.input_size
        )
        self.report = search_report(
            model,
            target_flops_ratio=self.target_flops_ratio,
            input_size=self.input_size,
            scores=self.scores,
            candidates=self.candidates,
        )
        self.report["search"] = {
            "global_step": state.global_step,
            "final_l1_weight": self.current_l1_weight,
            "selected_flops_ratio": float(self.selected_flops_ratio()),
            "keep_threshold": self.keep_threshold,
            "gate_projection": self.gate_projection,
            "ranking": "unit_importance" if self.scores is not None else "|g|",
            "schedule": {
                "l1_weight": self.l1_weight,
                "warmup_steps": self.warmup_steps,
                "l1_growth": self.l1_growth,
                "max_l1_weight": self.max_l1_weight,
            },
        }
        if self.write_report and state.is_world_process_zero:
            self._write_report(Path(self.report_dir or args.output_dir))

    def _write_report(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        # Each file is written beside its final name and renamed: a kill leaves the previous file or the new one.
        tmp_json, tmp_png = out / f".{REPORT_JSON}.tmp", out / f".tmp.{REPORT_PNG}"
        tmp_json.write_text(json.dumps(self.report, indent=2) + "\n")
        plot_widths(self.report, tmp_png)
        os.replace(tmp_json, out / REPORT_JSON)
        os.replace(tmp_png, out / REPORT_PNG)
        self.report_files = [str(out / REPORT_JSON), str(out / REPORT_PNG)]
        self._report_out = out

    def choose(
        self,
        score_fn: Callable[[WidthCandidate], float],
        max_runs: int | None = None,
        log: Callable[[str], None] | None = print,
    ) -> WidthCandidate:
        """Score the candidates with `score_fn(candidate) -> validation score` (lower is better: a short run of
        `candidate.student(gated)` or of its widths from scratch, started as the final run will start), uniform first
        and at most `max_runs` of them, keep the best (ties to uniform), rewrite the report, and return it."""
        if not self.candidates:
            raise RuntimeError("no candidates yet: they are listed at the end of the search (on the main process)")
        score_candidates(self.candidates, score_fn, max_runs=max_runs, log=log)
        chosen = pick_candidate(self.candidates)
        self.report["candidates"] = [c.to_dict() for c in self.candidates]
        self.report["chosen"] = chosen.name
        if self.write_report and getattr(self, "_report_out", None) is not None:
            self._write_report(self._report_out)
        return chosen

    def card(self, **extra) -> dict:
        """Fields for `hub.save_student(card=...)` from the report: method, FLOPs, parameters, widths, budget.

        Keyword arguments (teacher, dataset, metrics, command, notes, ...) are added as they are. The FLOPs and
        parameters are those of the student extracted at the budget, which `extract_student` reproduces.
        """
        if self.report is None:
            raise RuntimeError("no search report yet: it is written at the end of training (write_report=True)")
        return {**report_card(self.report), **extra}


def _params(model: nn.Module, skip: set[int] = frozenset()) -> int:
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def search_report(
    gated: nn.Module,
    *,
    target_flops_ratio: float,
    input_size: Sequence[int] | None = None,
    student: nn.Module | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    candidates: Sequence[WidthCandidate] | None = None,
) -> dict:
    """A JSON-able summary of a search: FLOPs, parameters and per-layer widths of the teacher and of the student
    extracted at `target_flops_ratio` with the units ranked by `scores` (default `|g|`; extracted here unless
    `student` is given), and every width candidate (`hf_kdsearch.candidates`) with its FLOPs, widths and validation
    score."""
    gated = unwrap_model(gated)
    plan: GatePlan = gate_plan(gated)
    sel = select_units(gated, target_flops_ratio=target_flops_ratio, input_size=input_size, scores=scores)
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
        "layers": [g.label for g in plan.groups.values() if g.kind == WIDTH],
        "candidates": [c.to_dict() for c in candidates or ()],
        "chosen": pick_candidate(candidates).name if any(c.val_score is not None for c in candidates or ()) else None,
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
    """Bar chart of per-layer widths from a `search_report`: the teacher's and, per candidate, its widths with its
    FLOPs and validation score in the legend (or the found student's alone when there are no candidates); removed
    branches are marked."""
    from matplotlib.figure import Figure

    rows = [r for r in report["widths"] if r["kind"] != DEPTH]
    removed = set(report.get("removed_blocks") or ())
    labels = [r["layer"] for r in rows]
    t = report["teacher"]
    series = [("teacher", [r["teacher"] for r in rows])]
    if report.get("candidates"):
        for c in report["candidates"]:
            name = "=".join([c["name"], *c.get("also", [])])
            score = "not scored" if c.get("val_score") is None else f"val {c['val_score']:g}"
            mark = " (chosen)" if report.get("chosen") == c["name"] else ""
            series.append((f"{name}{mark}: {c['flops_ratio']:.1%} FLOPs, {score}", c["widths"]))
    else:
        series.append(("found", [r["student"] for r in rows]))
    x = list(range(len(rows)))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.25 * len(rows) * len(series) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    for k, (name, ws) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in x]
        ax.bar(xs, ws, width, label=name, color="#9aa5b1" if k == 0 else f"C{k - 1}")
    for i, label in enumerate(labels):
        if any(label.startswith(b + ".") for b in removed):
            ax.annotate("removed", (i + 0.2, 0), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=60 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center", fontsize=7)
    ax.set_ylabel("channels")
    s = report["student"]
    ax.set_title(
        f"{t['architecture'] or 'teacher'}: found student FLOPs {s['flops'] / t['flops']:.1%} "
        f"(budget {report['target_flops_ratio']:.0%}), params {s['params'] / t['params']:.1%}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
