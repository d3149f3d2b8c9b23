"""Width candidates of a student search, scored by short validation runs: uniform thinning is always in the race.

A search proposes width sets; none is trusted blindly. `width_candidates` returns, all within the FLOPs budget:

- `uniform`: every width group thinned by one factor (the largest that fits), its channels chosen by the scores;
- `found`: the units with the best scores (e.g. `unit_importance`: loss change per FLOP) until the budget is full;
- `box`: the same fill, but each width group kept between `box[0]` and `box[1]` times its uniform width.

Identical width sets are listed once. `score_candidates` trains and scores each one with a user-supplied short run
(on a validation split, started the way the final run will start), uniform first, timed and bounded by `max_runs`;
`pick_candidate` keeps the lowest score, ties going to the earlier candidate, so the student chosen is never worse
than uniform thinning on validation. A kept layer under half its uniform width is named in `narrow_layers` and
warned about: that is where searched students have lost to uniform ones.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .flops import input_size_of
from .gates import DEPTH, WIDTH, GatePlan, GateSelection, build_student, gate_plan, select_units, unwrap_model
from .gates.extract import _hard_fractions

__all__ = ["WidthCandidate", "uniform_counts", "width_candidates", "score_candidates", "pick_candidate"]

#: The order candidates are listed and scored in; on equal validation scores the earlier one is kept.
ORDER = ("uniform", "found", "box")


@dataclass
class WidthCandidate:
    """One width set: its selection of units, per-layer widths, FLOPs and (once scored) validation score."""

    name: str
    selection: GateSelection
    widths: list[dict]
    flops: float
    flops_ratio: float
    narrow_layers: list[str] = field(default_factory=list)
    also: list[str] = field(default_factory=list)
    val_score: float | None = None
    seconds: float | None = None

    @property
    def width_list(self) -> list[int]:
        """The kept channels of each width group, in plan order."""
        return [r["student"] for r in self.widths if r["kind"] == WIDTH]

    def student(self, gated: nn.Module) -> nn.Module:
        """The standalone student of this width set, cut out of `gated` (gates folded into the weights)."""
        return build_student(gated, self.selection)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "also": self.also,
            "widths": self.width_list,
            "removed_blocks": [r["layer"] for r in self.widths if r["kind"] == DEPTH and not r["student"]],
            "flops": int(self.flops),
            "flops_ratio": self.flops_ratio,
            "narrow_layers": self.narrow_layers,
            "val_score": self.val_score,
            "seconds": self.seconds,
        }


def _counts_flops(plan: GatePlan, counts: Mapping[str, int]) -> float:
    alive = {n: True for n, g in plan.groups.items() if g.kind == DEPTH}
    return float(plan.flops_of(_hard_fractions(plan, counts, alive)))


def uniform_counts(plan: GatePlan, target_flops_ratio: float) -> dict[str, int]:
    """Channels per width group when every group keeps `max(1, round(f * size))` with one factor `f`, the largest
    (in steps of 1/1000) whose student fits `target_flops_ratio` of the teacher's FLOPs; every branch is kept."""
    plan._check_measured()
    budget = target_flops_ratio * plan.total_flops * (1 + 1e-9)
    widths = {n: g.size for n, g in plan.groups.items() if g.kind == WIDTH}

    def counts(k: int) -> dict[str, int]:
        return {n: max(1, round(k / 1000 * s)) for n, s in widths.items()}

    if _counts_flops(plan, counts(1)) > budget:
        raise ValueError(
            f"no uniformly thinned student fits target_flops_ratio={target_flops_ratio:g} with every branch kept"
        )
    lo, hi = 1, 1000  # FLOPs grow with k: bisect for the largest k that fits
    if _counts_flops(plan, counts(hi)) <= budget:
        return counts(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _counts_flops(plan, counts(mid)) <= budget else (lo, mid)
    return counts(lo)


def width_candidates(
    gated: nn.Module,
    target_flops_ratio: float,
    scores: Mapping[str, torch.Tensor] | None = None,
    *,
    box: Sequence[float] = (0.75, 1.5),
    input_size: Sequence[int] | None = None,
    warn: bool = True,
) -> list[WidthCandidate]:
    """The candidates `uniform`, `found` and `box` (see the module docstring) of a searched gated model.

    `scores` rank the units (one tensor per gate group; default `|g|`); `box` bounds each width group of `box` between
    `box[0]` and `box[1]` times its uniform width. With `warn`, a `UserWarning` names every layer of `found` kept
    below half its uniform width.
    """
    if not (len(box) == 2 and 0 < box[0] <= 1 <= box[1]):
        raise ValueError(f"box must be (low, high) with 0 < low <= 1 <= high, got {tuple(box)}")
    inner, plan = unwrap_model(gated), gate_plan(gated)
    plan.measure(inner, input_size_of(inner, input_size, hint="input_size=(C, H, W) to count FLOPs"))
    uniform = uniform_counts(plan, target_flops_ratio)
    low = {n: max(1, math.ceil(box[0] * u - 1e-9)) for n, u in uniform.items()}
    high = {n: min(plan.groups[n].size, max(1, math.floor(box[1] * u + 1e-9))) for n, u in uniform.items()}
    kw = dict(input_size=plan.input_size, scores=scores)
    selections = {
        "uniform": select_units(inner, counts=uniform, **kw),
        "found": select_units(inner, target_flops_ratio=target_flops_ratio, **kw),
        "box": select_units(inner, target_flops_ratio=target_flops_ratio, min_counts=low, max_counts=high, **kw),
    }
    out: list[WidthCandidate] = []
    for name in ORDER:
        sel = selections[name]
        rows = sel.widths(plan)
        same = next((c for c in out if c.widths == rows), None)
        if same is not None:
            same.also.append(name)
            continue
        narrow = [
            r["layer"]
            for r, (n, g) in zip(rows, plan.groups.items())
            if g.kind == WIDTH and r["student"] > 0 and r["student"] < 0.5 * uniform[n]
        ]
        out.append(WidthCandidate(name, sel, rows, sel.flops, sel.flops / plan.total_flops, narrow))
    found = next(c for c in out if c.name == "found" or "found" in c.also)
    if warn and found.narrow_layers:
        warnings.warn(
            f"the searched student keeps {', '.join(found.narrow_layers)} below half its uniformly thinned width "
            f"(found {found.width_list}, uniform {list(uniform.values())}); such students have trained worse than "
            "uniform ones: score the candidates on validation before trusting it",
            UserWarning,
            stacklevel=2,
        )
    return out


def score_candidates(
    candidates: Sequence[WidthCandidate],
    score_fn: Callable[[WidthCandidate], float],
    *,
    max_runs: int | None = None,
    log: Callable[[str], None] | None = print,
) -> list[WidthCandidate]:
    """Score candidates in order (uniform first) with `score_fn(candidate) -> validation score` (lower is better, e.g.
    errors after a short run from scratch or from the teacher's weights), at most `max_runs` of them; each one's
    `val_score` and `seconds` are set, and the cost is printed with `log`. Returns the candidates."""
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"max_runs must be >= 1 (uniform is always scored), got {max_runs}")
    total = 0.0
    for i, c in enumerate(candidates):
        if max_runs is not None and i >= max_runs:
            if log:
                log(f"candidate {c.name} {c.width_list}: not scored (max_runs={max_runs})")
            continue
        start = time.perf_counter()
        c.val_score = float(score_fn(c))
        c.seconds = time.perf_counter() - start
        total += c.seconds
        if log:
            log(f"candidate {c.name} {c.width_list} ({c.flops_ratio:.1%} FLOPs): validation {c.val_score:g} "
                f"({c.seconds:.1f} s)")  # fmt: skip
    if log:
        n = sum(c.val_score is not None for c in candidates)
        log(f"candidate runs: {n} of {len(candidates)}, {total:.1f} s in all")
    return list(candidates)


def pick_candidate(candidates: Sequence[WidthCandidate]) -> WidthCandidate:
    """The scored candidate with the lowest `val_score`; on a tie the earlier one (uniform comes first)."""
    scored = [c for c in candidates if c.val_score is not None]
    if not scored:
        raise ValueError("no candidate has a validation score; run score_candidates first")
    return min(scored, key=lambda c: c.val_score)
