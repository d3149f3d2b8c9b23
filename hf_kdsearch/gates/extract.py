"""Extraction: choose the surviving units of a gated model, fold the gates into the weights, slice, and rebuild."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ..flops import input_size_of
from ..models.sliced_resnet import resnet_block_widths
from .families import gate_parameters
from .plan import DEPTH, WIDTH, GatePlan, gate_plan, unwrap_model


@dataclass
class GateSelection:
    """The units that survive: kept channel indices per width group, removed branches, and the resulting FLOPs."""

    kept: dict[str, torch.Tensor]
    removed: dict[str, bool]
    flops: float
    teacher_flops: float | None = None

    def widths(self, plan: GatePlan) -> list[dict]:
        """One row per gate group: label, kind, teacher width and found width (0 for a removed unit)."""
        rows = []
        for name, g in plan.groups.items():
            if g.kind == DEPTH:
                rows.append({"layer": g.label, "kind": DEPTH, "teacher": 1, "student": int(not self.removed[name])})
            else:
                dead = g.block is not None and self.removed[g.block]
                n = 0 if dead else int(self.kept[name].numel())
                rows.append({"layer": g.label, "kind": WIDTH, "teacher": g.size, "student": n})
        return rows


def _gate_values(model: nn.Module, plan: GatePlan) -> dict[str, torch.Tensor]:
    params = gate_parameters(model)
    return {n: params[n].detach().float().cpu() for n in plan.groups}


def _hard_fractions(plan: GatePlan, counts: Mapping[str, int], alive: Mapping[str, bool]) -> torch.Tensor:
    fr = []
    for name, g in plan.groups.items():
        if g.kind == DEPTH:
            fr.append(1.0 if alive[name] else 0.0)
        else:
            live = g.block is None or alive[g.block]
            # A live branch keeps at least one channel: removing its last channel would leave the branch's bias-like
            # output (e.g. bn2 of zeros) that a removed branch does not have.
            fr.append(max(counts[name], 1) / g.size if live else 0.0)
    return torch.tensor(fr, dtype=torch.float64)


def select_units(
    model: nn.Module,
    *,
    target_flops_ratio: float | None = None,
    threshold: float | None = None,
    input_size: Sequence[int] | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    min_counts: Mapping[str, int] | None = None,
    max_counts: Mapping[str, int] | None = None,
    counts: Mapping[str, int] | None = None,
) -> GateSelection:
    """Choose the surviving units of a gated model; `extract_student` builds the model from the result.

    - `threshold`: keep units with `|g| > threshold`; a branch whose depth gate is at or below it is removed.
    - `target_flops_ratio`: go through all units, highest score first, and keep each one whose addition keeps the
      FLOPs at or under `target_flops_ratio` times the teacher's. The result is within one unit's worth of the budget.
      The score is `|g|` unless `scores` (one tensor per gate group, e.g. `unit_importance`) is given;
      `min_counts` / `max_counts` bound the channels kept per width group (the bounds' lower end must fit).
    - `counts`: keep exactly this many channels per width group (every branch alive), the highest-scoring ones.

    Either way a live branch or a plain layer keeps at least its highest-scoring channel.
    """
    if sum(x is not None for x in (target_flops_ratio, threshold, counts)) != 1:
        raise ValueError(
            f"give exactly one of target_flops_ratio, threshold and counts, got target_flops_ratio="
            f"{target_flops_ratio!r}, threshold={threshold!r}, counts={counts!r}"
        )
    inner, plan = unwrap_model(model), gate_plan(model)
    gates = _gate_values(inner, plan)
    if scores is not None:
        if set(scores) != set(plan.groups):
            raise ValueError(f"scores must have one tensor per gate group {list(plan.groups)}, got {list(scores)}")
        mags = {n: torch.as_tensor(scores[n]).detach().double().cpu().reshape(-1) for n in plan.groups}
    else:
        mags = {n: g.abs() for n, g in gates.items()}
    if counts is not None:
        alive = {n: True for n, g in plan.groups.items() if g.kind == DEPTH}
        counts = {n: int(counts[n]) for n, g in plan.groups.items() if g.kind == WIDTH}
    elif target_flops_ratio is not None:
        if not (isinstance(target_flops_ratio, int | float) and 0 < target_flops_ratio <= 1):
            raise ValueError(f"target_flops_ratio must lie in (0, 1], got {target_flops_ratio!r}")
        plan.measure(inner, input_size_of(inner, input_size, hint="input_size=(C, H, W) to count FLOPs"))
        counts, alive = _fill_budget(plan, mags, target_flops_ratio * plan.total_flops, min_counts, max_counts)
    else:
        if not (isinstance(threshold, int | float) and threshold >= 0):
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        counts = {n: int((m > threshold).sum()) for n, m in mags.items() if plan.groups[n].kind == WIDTH}
        alive = {n: bool(m[0] > threshold) for n, m in mags.items() if plan.groups[n].kind == DEPTH}
    kept, removed = {}, {n: not a for n, a in alive.items()}
    for name, g in plan.groups.items():
        if g.kind == WIDTH:
            k = max(counts[name], 1)
            # Largest gates first, ties by index; then back to index order so the slice keeps the layer's order.
            order = sorted(range(g.size), key=lambda i: (-float(mags[name][i]), i))
            kept[name] = torch.tensor(sorted(order[:k]), dtype=torch.long)
    has_default_size = bool((getattr(inner, "pretrained_cfg", None) or {}).get("input_size"))
    if input_size is not None or (plan.input_size is None and has_default_size):
        plan.measure(inner, input_size_of(inner, input_size, hint="input_size=(C, H, W) to count FLOPs"))
    flops = float("nan")
    if plan.input_size is not None:
        flops = float(plan.flops_of(_hard_fractions(plan, {n: v.numel() for n, v in kept.items()}, alive)))
    return GateSelection(kept, removed, flops, plan.total_flops or None)


def check_budget(plan: GatePlan, target_flops_ratio: float) -> None:
    """Raise if no student of these gates fits the budget: every branch removed and one channel per plain layer."""
    plan._check_measured()
    counts = {n: 0 for n, g in plan.groups.items() if g.kind == WIDTH}
    alive = {n: False for n, g in plan.groups.items() if g.kind == DEPTH}
    floor = float(plan.flops_of(_hard_fractions(plan, counts, alive)))
    if floor > target_flops_ratio * plan.total_flops * (1 + 1e-9):
        raise ValueError(
            f"target_flops_ratio={target_flops_ratio:g} is below the smallest student these gates can give "
            f"({floor:,.0f} of {plan.total_flops:,.0f} FLOPs, ratio {floor / plan.total_flops:.4f}); raise it"
        )


def _fill_budget(
    plan: GatePlan,
    mags: Mapping[str, torch.Tensor],
    budget: float,
    min_counts: Mapping[str, int] | None = None,
    max_counts: Mapping[str, int] | None = None,
) -> tuple[dict[str, int], dict[str, bool]]:
    check_budget(plan, budget / plan.total_flops)
    lo = {n: min(max(int((min_counts or {}).get(n, 0)), 0), g.size) for n, g in plan.groups.items() if g.kind == WIDTH}
    hi = {n: max(int((max_counts or {}).get(n, g.size)), 1) for n, g in plan.groups.items() if g.kind == WIDTH}
    counts = dict(lo)
    alive = {n: any(lo.get(n2, 0) for n2, g2 in plan.groups.items() if g2.block == n) for n, g in plan.groups.items()
             if g.kind == DEPTH}  # fmt: skip
    if float(plan.flops_of(_hard_fractions(plan, counts, alive))) > budget * (1 + 1e-9):
        raise ValueError(f"min_counts {dict(lo)} do not fit the budget of {budget:,.0f} FLOPs")
    units = [(float(v), k, n, i) for k, (n, m) in enumerate(mags.items()) for i, v in enumerate(m.tolist())]
    units.sort(key=lambda u: (-u[0], u[1], u[3]))
    # The units a group starts with (min_counts) are its highest-scoring ones: skip them in the walk below.
    seen = dict.fromkeys(lo, 0)
    # Within a group all units cost the same and costs only grow as units are added, so a unit that does not fit
    # means none of its group's later (lower-score) units fit either: skip the group from then on.
    full = {n for n in hi if counts[n] >= hi[n]}
    for _, _, name, _ in units:
        if name in seen:
            seen[name] += 1
            if seen[name] <= lo[name]:
                continue
        if name in full:
            continue
        is_depth = plan.groups[name].kind == DEPTH
        if is_depth:
            alive[name] = True
        else:
            counts[name] += 1
        if float(plan.flops_of(_hard_fractions(plan, counts, alive))) > budget * (1 + 1e-9):
            if is_depth:
                alive[name] = False
            else:
                counts[name] -= 1
            full.add(name)
        elif not is_depth and counts[name] >= hi[name]:
            full.add(name)
    return counts, alive


# ---- building the student --------------------------------------------------------------------------------------------
def _set_slot(args: dict, slot: tuple, value) -> None:
    target = args[slot[0]]
    for key in slot[1:-1]:
        target = target[key]
    target[slot[-1]] = value


def _drop_rate(model: nn.Module) -> float | None:
    if isinstance(getattr(model, "drop_rate", None), int | float):
        return float(model.drop_rate)
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return float(drops[0]) if drops else None


# Any entrypoint of the family rebuilds the shape: model_args carry every width.
_DEFAULT_ARCH = {
    "cifar_resnet": "cifar_resnet20",
    "cifar_wrn": "cifar_wrn_16_2",
    "mlp": "mnist_mlp",
    "cnn": "mnist_cnn",
}


def _student_spec(model: nn.Module, plan: GatePlan, sel: GateSelection) -> tuple[str, dict]:
    """The timm architecture name and constructor arguments of the student."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if plan.family == "timm_resnet":
        if getattr(model, "model_args", None) and "base" in model.model_args:
            args = copy.deepcopy(model.model_args)
        elif cfg.get("architecture"):
            args = {"base": cfg["architecture"], "block_widths": resnet_block_widths(model), "removed_blocks": []}
        else:
            raise ValueError(
                "the timm ResNet has no pretrained_cfg['architecture']; create it with timm.create_model(name, ...) "
                "so its student can be rebuilt by name"
            )
        args["in_chans"] = int(model.in_chans)
        arch = "kdsearch_resnet"
    else:
        args = copy.deepcopy(model.model_args)
        arch = cfg.get("architecture") or _DEFAULT_ARCH[plan.family]
    removed = set(args.get("removed_blocks") or ())
    for name, g in plan.groups.items():
        if g.kind == DEPTH and sel.removed[name]:
            removed.add(g.slot)
            if plan.family == "timm_resnet":
                i, j = map(int, g.slot.split("."))
                args["block_widths"][i][j] = []
        elif g.kind == WIDTH and not (g.block and sel.removed[g.block]):
            _set_slot(args, g.slot, int(sel.kept[name].numel()))
    if "removed_blocks" in args:
        args["removed_blocks"] = sorted(removed)
    return arch, args


def _slicing(plan: GatePlan, model: nn.Module) -> tuple[dict, dict]:
    """State-dict keys to scale by a gate (`folds`) and to slice by a group's kept channels (`slices`)."""
    folds: dict[str, list[tuple[str, bool]]] = {}
    slices: dict[str, list[tuple[int, str]]] = {}
    for name, g in plan.groups.items():
        m = model.get_submodule(g.module)
        for p in ("weight", "bias"):
            if getattr(m, p, None) is not None:
                folds.setdefault(f"{g.module}.{p}", []).append((name, g.kind == WIDTH))
        for prod in g.producers:
            pm = model.get_submodule(prod)
            keys = ["weight", "bias"] + (["running_mean", "running_var"] if isinstance(pm, nn.BatchNorm2d) else [])
            for k in keys:
                if getattr(pm, k, None) is not None:
                    slices.setdefault(f"{prod}.{k}", []).append((0, name))
        for cons in g.consumers:
            slices.setdefault(f"{cons}.weight", []).append((1, name))
    return folds, slices


def extract_student(
    model: nn.Module,
    *,
    target_flops_ratio: float | None = None,
    threshold: float | None = None,
    input_size: Sequence[int] | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Build the standalone, ungated student that a gated model's gates select.

    Units are chosen by `select_units` (exactly one of `target_flops_ratio` and `threshold`). The surviving gates are
    folded into the weights (a channel gate into its BN's or linear layer's scale and shift, a branch gate into the
    branch's last layer), the weights are sliced, and a fresh model of the same family is built with the found widths
    and removed blocks as constructor arguments (`student.model_args`), then loaded with the sliced weights.

    With `threshold=0.0` and the dropped gates exactly zero, the student's logits equal the gated model's up to float
    rounding. With `target_flops_ratio`, `count_flops(student)` is at or under the budget, within one unit's worth.

    Args:
        model: a model returned by `add_gates` (possibly trained), or its DDP / compiled wrapper.
        target_flops_ratio: FLOPs budget as a fraction of the ungated model's FLOPs.
        threshold: keep units with `|g| > threshold`.
        scores: rank units by these (one tensor per gate group, e.g. `unit_importance(...)`) instead of `|g|`.
        input_size: `(C, H, W)` of one sample for counting FLOPs; default `model.pretrained_cfg["input_size"]`.

    Returns:
        The student, on the gated model's device and dtype and in its train/eval mode, with `pretrained_cfg` and
        `model_args` set so that `timm.create_model(student.pretrained_cfg["architecture"], **student.model_args)`
        rebuilds its shape and `hub.save_student` can export it.
    """
    inner = unwrap_model(model)
    sel = select_units(
        inner, target_flops_ratio=target_flops_ratio, threshold=threshold, input_size=input_size, scores=scores
    )
    return build_student(inner, sel)


def build_student(model: nn.Module, sel: GateSelection) -> nn.Module:
    """Fold, slice and rebuild: the student of a gated `model` for a given `GateSelection`."""
    inner, plan = unwrap_model(model), gate_plan(model)
    arch, args = _student_spec(inner, plan, sel)
    kwargs = {"num_classes": inner.num_classes, **args}
    if _drop_rate(inner) is not None:
        kwargs["drop_rate"] = _drop_rate(inner)
    student = timm.create_model(arch, pretrained=False, **kwargs)
    cfg = dict(getattr(inner, "pretrained_cfg", None) or student.pretrained_cfg)
    cfg.update(architecture=arch, num_classes=inner.num_classes)
    student.pretrained_cfg = student.default_cfg = cfg

    gates = gate_parameters(inner)
    gate_names = set(gates)
    folds, slices = _slicing(plan, inner)
    source = {k: v for k, v in inner.state_dict().items() if k not in gate_names}
    state = {}
    for key, target in student.state_dict().items():
        if key not in source:
            raise RuntimeError(f"internal error: the student's {key} has no counterpart in the gated model")
        t = source[key].detach()
        for gname, per_channel in folds.get(key, ()):
            g = gates[gname].detach().to(t.device)
            scale = g.view(-1, *([1] * (t.ndim - 1))) if per_channel else g.reshape(())
            t = (t.float() * scale).to(t.dtype)
        for dim, gname in slices.get(key, ()):
            if gname in sel.kept and not (plan.groups[gname].block and sel.removed[plan.groups[gname].block]):
                t = t.index_select(dim, sel.kept[gname].to(t.device))
        if t.shape != target.shape:
            raise RuntimeError(f"internal error: {key} sliced to {tuple(t.shape)}, student has {tuple(target.shape)}")
        state[key] = t.clone()
    student.load_state_dict(state)
    param = next(inner.parameters())
    student.to(device=param.device, dtype=param.dtype).train(inner.training)
    return student
