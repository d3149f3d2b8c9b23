"""Architecture gates for student search, the FLOPs-weighted L1 penalty, and physical extraction of the student.

Gu & Tresp (2020), "Search for Better Students to Learn Distilled Knowledge", https://arxiv.org/abs/2001.11612:
the student is a subgraph of the teacher, chosen by putting gates on the teacher's units and pushing them to zero
with an L1 penalty under the distillation loss. Our specification is section 2 of METHODS.md.

Gates
-----
`add_gates(model)` gives the model two kinds of multiplicative gates, `nn.Parameter`s initialised to exactly 1 (so
the gated model's logits equal the teacher's bit for bit):

- `channel_gate` (width): one per output channel of a convolution or linear layer, applied right after the layer's
  batch norm (or after the linear layer itself), before the non-linearity. Applied there, a zero gate silences the
  channel completely, and the gate folds exactly into the BN's (or linear layer's) scale and shift on extraction.
- `depth_gate` (depth): one scalar per residual branch, applied to the branch's last output before the residual sum,
  so a zero gate leaves only the shortcut and the whole branch can be removed.

Channels tied together by a residual sum (the residual stream of a ResNet stage, and the stem that feeds it) stay
ungated. A shared gate would have to scale every addend of the sum and every block of the stage at once; in the
supported families the gated layers already carry nearly all FLOPs (98% of cifar_resnet20, 99% of cifar_wrn_40_2, 92%
of resnet18 at 224 px), so the budget can be met without it, and the residual stream keeps the teacher's features
aligned.

The gates live on the module they scale (`stages.0.1.bn1.channel_gate`) and act through a forward hook, so every
weight keeps its state-dict key, and the optimizer, checkpoints and DDP see the gates like any other parameter.

Supported: the CIFAR ResNet and WRN families (`models/cifar.py`), the MNIST MLP and SmallCNN (`models/mnist.py`),
and timm ResNets of plain `BasicBlock` or `Bottleneck` blocks (`resnet18`, `resnet50`, ...). Anything else raises
an error that names the module.

Penalty
-------
`lambda * sum_j c_j |g_j|`, where `c_j` is unit j's share of the teacher's FLOPs, normalised so that `sum_j c_j = 1`:
a channel's share is the FLOPs it carries in the layer that produces it and in the layers that read it; a branch's
share is the FLOPs of the whole branch. At initialisation the sum is exactly 1.

Extraction
----------
`extract_student` keeps units by `|g|`, either above a threshold or largest first until a FLOPs budget is met, folds
the kept gates into the weights, slices the weights, and builds a fresh model of the same family whose widths and
removed blocks are constructor arguments (`model.model_args`), so it saves and reloads without gates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .flops import count_flops
from .models.cifar import CifarResNet, CifarWideResNet
from .models.mnist import MLP, SmallCNN
from .models.sliced_resnet import ShortcutBlock, resnet_block_widths
from .teacher import FROZEN_FLAG

__all__ = [
    "GateGroup",
    "GatedLayer",
    "GatePlan",
    "GateSelection",
    "add_gates",
    "gate_parameters",
    "flops_weighted_l1",
    "soft_keep_fractions",
    "select_units",
    "check_budget",
    "build_student",
    "extract_student",
    "gate_plan",
]

WIDTH, DEPTH = "width", "depth"
GATE_ATTR = {WIDTH: "channel_gate", DEPTH: "depth_gate"}


# ---- the plan: where the gates are and what they cost ----------------------------------------------------------------
@dataclass
class GateGroup:
    """One gate parameter: `size` channel gates (width) or one branch gate (depth).

    Args:
        name: the gate parameter's name in the model, e.g. `stages.0.1.bn1.channel_gate`; it keys the plan.
        kind: `"width"` or `"depth"`.
        module: the module whose output the gate scales (a BatchNorm, Linear or the branch's last layer).
        size: number of units (channels; 1 for a depth gate).
        label: the layer name used in reports: the conv/linear that produces the channels, or the block.
        slot: where the kept count goes in the student's `model_args` (e.g. `("block_widths", 0, 1)`), or, for a
            depth gate, the block's key in `removed_blocks` (e.g. `"0.1"`).
        producers: modules whose output channels are these channels (sliced along dim 0).
        consumers: modules that read these channels (sliced along dim 1).
        block: name of the depth group whose branch contains these channels, if any.
    """

    name: str
    kind: str
    module: str
    size: int
    label: str
    slot: tuple | str
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    block: str | None = None


@dataclass
class GatedLayer:
    """A convolution or linear layer whose FLOPs depend on gates: `flops * (n_in/N_in) * (n_out/N_out) * alive`."""

    name: str
    in_group: str | None
    out_group: str | None
    block: str | None
    flops: float = 0.0


@dataclass
class GatePlan:
    """Everything `add_gates` decided about a model: its gate groups, the layers they thin, and a FLOPs model.

    The FLOPs model is exact for convolutions and linear layers, the operations `count_flops` counts: a layer's FLOPs
    are bilinear in its kept input and output channels. `measure()` fills it for one input size.
    """

    family: str
    groups: dict[str, GateGroup]
    layers: list[GatedLayer]
    input_size: tuple[int, ...] | None = None
    total_flops: float = 0.0
    fixed_flops: float = 0.0
    _index: dict = field(default_factory=dict, repr=False)

    def measure(self, model: nn.Module, input_size: Sequence[int]) -> GatePlan:
        """Measure every gated layer's FLOPs at full width for one sample of `input_size` (cached per size)."""
        input_size = tuple(int(s) for s in input_size)
        if self.input_size == input_size:
            return self
        model = unwrap_model(model)
        names = {layer.name for layer in self.layers}
        measured: dict[str, float] = {}

        def hook(module, args, output, name):
            per_sample = output.numel() / output.shape[0]
            if isinstance(module, nn.Conv2d):
                k = module.in_channels // module.groups * math.prod(module.kernel_size)
            else:
                k = module.in_features
            measured[name] = 2.0 * per_sample * k

        handles = [
            m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
            for n, m in model.named_modules()
            if n in names
        ]
        try:
            total = count_flops(model, input_size)
        finally:
            for h in handles:
                h.remove()
        for layer in self.layers:
            layer.flops = measured.get(layer.name, 0.0)
        self.input_size, self.total_flops = input_size, float(total)
        self.fixed_flops = self.total_flops - sum(layer.flops for layer in self.layers)
        return self

    def _check_measured(self) -> None:
        if self.input_size is None:
            raise RuntimeError("the gate plan has no FLOPs yet: call plan.measure(model, input_size) first")

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    def layer_index(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """`(flops, in_idx, out_idx, block_idx)` of the gated layers on `device`, cached; index `len(groups)` means
        "ungated"."""
        self._check_measured()
        device = torch.device(device)
        key = (self.input_size, str(device))
        if key not in self._index:
            pos = {n: i for i, n in enumerate(self.groups)}
            none = len(self.groups)
            flops = torch.tensor([layer.flops for layer in self.layers], dtype=torch.float64)
            idx = [
                torch.tensor([pos[getattr(layer, a)] if getattr(layer, a) else none for layer in self.layers])
                for a in ("in_group", "out_group", "block")
            ]
            self._index[key] = tuple(t.to(device) for t in (flops, *idx))
        return self._index[key]

    def flops_of(self, fractions: torch.Tensor) -> torch.Tensor:
        """FLOPs of the model when group `G` keeps the fraction `fractions[G]` of its units (1 for a live branch, 0 for
        a removed one): `fixed + sum_l flops_l * frac[in_l] * frac[out_l] * frac[block_l]`. Differentiable."""
        flops, i_in, i_out, i_blk = self.layer_index(fractions.device)
        frac = torch.cat([fractions, fractions.new_ones(1)])
        return self.fixed_flops + (flops.to(fractions.dtype) * frac[i_in] * frac[i_out] * frac[i_blk]).sum()

    def unit_costs(self) -> torch.Tensor:
        """`c_G`, the FLOPs share of one unit of each group, normalised so that `sum_G c_G * size_G = 1`.

        A channel's share is what it carries at full width in the layers that produce or read it; a branch's share is
        the FLOPs of the whole branch.
        """
        self._check_measured()
        cost = {n: 0.0 for n in self.groups}
        for layer in self.layers:
            for g in (layer.in_group, layer.out_group):
                if g:
                    cost[g] += layer.flops / self.groups[g].size
            if layer.block:
                cost[layer.block] += layer.flops
        total = sum(cost[n] * self.groups[n].size for n in self.groups)
        if total <= 0:
            raise RuntimeError("the gated layers carry no FLOPs; was the plan measured on an empty input?")
        return torch.tensor([cost[n] / total for n in self.groups], dtype=torch.float64)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def gate_plan(model: nn.Module) -> GatePlan:
    """The `GatePlan` of a model returned by `add_gates`."""
    plan = getattr(unwrap_model(model), "gate_plan", None)
    if not isinstance(plan, GatePlan):
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no gates; call add_gates(model) first")
    return plan


# ---- the model families ----------------------------------------------------------------------------------------------
def _width(module, label, slot, producers, consumers, block=None, size=0) -> GateGroup:
    return GateGroup(f"{module}.{GATE_ATTR[WIDTH]}", WIDTH, module, size, label, slot, producers, consumers, block)


def _depth(module: str, label: str, key: str) -> GateGroup:
    return GateGroup(f"{module}.{GATE_ATTR[DEPTH]}", DEPTH, module, 1, label, key)


def _require_bn(model: nn.Module, name: str) -> None:
    m = model.get_submodule(name)
    if type(m) is not nn.BatchNorm2d or not m.affine:
        raise ValueError(
            f"{name} is a {type(m).__name__}; gates fold into an affine nn.BatchNorm2d and cannot be placed after it"
        )


def _plan_cifar(model: CifarResNet | CifarWideResNet, depth: bool) -> tuple[list[GateGroup], list[GatedLayer]]:
    wide = isinstance(model, CifarWideResNet)
    groups, layers = [], []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            if not block.has_branch:
                continue
            b = f"stages.{i}.{j}"
            # In the post-activation ResNet block conv1's BN is bn1 and the branch ends in bn2; in the
            # pre-activation WRN block conv1's BN is bn2 and the branch ends in conv2.
            mid_bn, last = (f"{b}.bn2", f"{b}.conv2") if wide else (f"{b}.bn1", f"{b}.bn2")
            _require_bn(model, mid_bn)
            d = _depth(last, b, f"{i}.{j}") if depth else None
            blk = d.name if d else None
            w = _width(
                mid_bn,
                f"{b}.conv1",
                ("block_widths", i, j),
                (f"{b}.conv1", mid_bn),
                (f"{b}.conv2",),
                blk,
                block.conv1.out_channels,
            )
            groups += [w] + ([d] if d else [])
            layers += [GatedLayer(f"{b}.conv1", None, w.name, blk), GatedLayer(f"{b}.conv2", w.name, None, blk)]
    return groups, layers


def _plan_mlp(model: MLP, depth: bool) -> tuple[list[GateGroup], list[GatedLayer]]:
    linears = [(n, m) for n, m in model.features.named_children() if isinstance(m, nn.Linear)]
    groups, layers, prev = [], [], None
    for k, (idx, lin) in enumerate(linears):
        name = f"features.{idx}"
        consumer = f"features.{linears[k + 1][0]}" if k + 1 < len(linears) else "fc"
        g = _width(name, name, ("hidden_dims", k), (name,), (consumer,), size=lin.out_features)
        groups.append(g)
        layers.append(GatedLayer(name, prev, g.name, None))
        prev = g.name
    layers.append(GatedLayer("fc", prev, None, None))
    return groups, layers


def _plan_cnn(model: SmallCNN, depth: bool) -> tuple[list[GateGroup], list[GatedLayer]]:
    children = list(model.features.named_children())
    convs = [(n, m) for n, m in children if isinstance(m, nn.Conv2d)]
    groups, layers, prev = [], [], None
    for k, (idx, conv) in enumerate(convs):
        conv_name, bn_name = f"features.{idx}", f"features.{int(idx) + 1}"
        _require_bn(model, bn_name)
        consumer = f"features.{convs[k + 1][0]}" if k + 1 < len(convs) else "fc"
        g = _width(bn_name, conv_name, ("widths", k), (conv_name, bn_name), (consumer,), size=conv.out_channels)
        groups.append(g)
        layers.append(GatedLayer(conv_name, prev, g.name, None))
        prev = g.name
    layers.append(GatedLayer("fc", prev, None, None))
    return groups, layers


def _check_timm_block(name: str, block: nn.Module) -> None:
    if not isinstance(block, BasicBlock | Bottleneck):
        raise ValueError(f"{name} is a {type(block).__name__}; gates support timm BasicBlock and Bottleneck blocks")
    if block.se is not None:
        raise ValueError(
            f"{name}.se ({type(block.se).__name__}) rescales the branch's channels and cannot be gated or sliced; "
            "gates support timm ResNets without attention layers (resnet18/34/50/101/152)"
        )
    if not isinstance(block.aa, nn.Identity):
        raise ValueError(f"{name}.aa ({type(block.aa).__name__}): anti-aliased ResNets are not supported")
    inner = [block.conv2] if isinstance(block, BasicBlock) else [block.conv2, block.conv3]
    for i, conv in enumerate(inner):
        if conv.groups != 1:
            raise ValueError(
                f"{name}.conv{i + 2} is a grouped convolution (groups={conv.groups}); ResNeXt-style blocks are not "
                "supported"
            )


def _plan_timm_resnet(model: ResNet, depth: bool) -> tuple[list[GateGroup], list[GatedLayer]]:
    groups, layers = [], []
    for i in range(4):
        for j, block in enumerate(getattr(model, f"layer{i + 1}")):
            b = f"layer{i + 1}.{j}"
            if isinstance(block, ShortcutBlock):
                continue
            _check_timm_block(b, block)
            n_inner = 1 if isinstance(block, BasicBlock) else 2
            last = f"{b}.bn{n_inner + 1}"
            d = _depth(last, b, f"{i}.{j}") if depth else None
            blk = d.name if d else None
            prev = None
            for t in range(n_inner):
                conv, bn, nxt = f"{b}.conv{t + 1}", f"{b}.bn{t + 1}", f"{b}.conv{t + 2}"
                _require_bn(model, bn)
                size = model.get_submodule(conv).out_channels
                w = _width(bn, conv, ("block_widths", i, j, t), (conv, bn), (nxt,), blk, size)
                groups.append(w)
                layers.append(GatedLayer(conv, prev, w.name, blk))
                prev = w.name
            layers.append(GatedLayer(f"{b}.conv{n_inner + 1}", prev, None, blk))
            if d:
                groups.append(d)
    return groups, layers


_FAMILIES = (
    (CifarResNet, "cifar_resnet", _plan_cifar),
    (CifarWideResNet, "cifar_wrn", _plan_cifar),
    (MLP, "mlp", _plan_mlp),
    (SmallCNN, "cnn", _plan_cnn),
    (ResNet, "timm_resnet", _plan_timm_resnet),
)


def _family(model: nn.Module) -> tuple[str, callable]:
    for cls, family, planner in _FAMILIES:
        if isinstance(model, cls):
            return family, planner
    supported = ", ".join(c.__module__.split(".")[0] + "." + c.__name__ for c, _, _ in _FAMILIES)
    raise TypeError(
        f"add_gates does not know where to put gates in a {type(model).__name__} (the root module); "
        f"supported families: {supported}"
    )


# ---- gates in the forward pass ---------------------------------------------------------------------------------------
def _apply_channel_gate(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    gate = module.channel_gate.to(output.dtype)
    if isinstance(module, nn.Linear):
        return output * gate
    return output * gate.view(1, -1, *([1] * (output.ndim - 2)))


def _apply_depth_gate(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output * module.depth_gate.to(output.dtype)


_HOOKS = {WIDTH: _apply_channel_gate, DEPTH: _apply_depth_gate}


def add_gates(model: nn.Module, *, depth: bool = True) -> nn.Module:
    """Give `model` width gates on every prunable channel and, with `depth=True`, a gate on every residual branch.

    Gates are `nn.Parameter`s initialised to 1, named `<module>.channel_gate` and `<module>.depth_gate`, so the
    optimizer, checkpoints and DDP treat them like weights and the logits equal the ungated model's exactly. The model
    is changed in place and returned; gate the student copy, not the teacher:
    `gated = add_gates(copy.deepcopy(teacher))`. The plan (`model.gate_plan`) records where the gates are. A copy of
    a teacher that a `DistillationTrainer` has already frozen (weights set not to require grad) is thawed first, so
    the gated copy trains like a fresh model.

    Method: Gu & Tresp 2020, https://arxiv.org/abs/2001.11612; see the module docstring for where gates go and why
    residual-stream channels stay ungated.

    Args:
        model: a CIFAR ResNet/WRN, MNIST MLP/SmallCNN, or timm ResNet (BasicBlock/Bottleneck).
        depth: also gate each residual branch, so that whole blocks can be removed.

    Raises:
        TypeError: for a model family with no gate placement; ValueError naming the module for an unsupported layer.
    """
    inner = unwrap_model(model)
    if getattr(inner, "gate_plan", None) is not None:
        raise ValueError(f"{type(inner).__name__} already has gates (model.gate_plan is set); gate a fresh copy")
    if getattr(inner, FROZEN_FLAG, False):
        # A deep copy of a teacher that a DistillationTrainer froze inherits its frozen weights; as a student they
        # must train again.
        delattr(inner, FROZEN_FLAG)
        inner.requires_grad_(True)
        inner.train()
    family, planner = _family(inner)
    groups, layers = planner(inner, depth)
    if not groups:
        raise ValueError(f"{type(inner).__name__} has no prunable units (every residual branch is already removed)")
    param = next(inner.parameters())
    for g in groups:
        module = inner.get_submodule(g.module)
        attr = GATE_ATTR[g.kind]
        module.register_parameter(attr, nn.Parameter(torch.ones(g.size, device=param.device, dtype=torch.float32)))
        module.register_forward_hook(_HOOKS[g.kind])
    inner.gate_plan = GatePlan(family, {g.name: g for g in groups}, layers)
    return model


def gate_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The gate parameters of a gated model, by name, in plan order (e.g. for their own learning rate)."""
    plan, inner = gate_plan(model), unwrap_model(model)
    return {n: inner.get_parameter(n) for n in plan.groups}


# ---- the maths -------------------------------------------------------------------------------------------------------
def flops_weighted_l1(gates: Sequence[torch.Tensor], unit_costs: torch.Tensor) -> torch.Tensor:
    """`sum_G c_G * sum_j |g_Gj|`: the FLOPs-weighted L1 norm of the gates, where every unit of group `G` costs `c_G`.

    With `unit_costs` from `GatePlan.unit_costs()` (summing to 1 over units) it equals 1 at initialisation.
    """
    if len(gates) != unit_costs.numel():
        raise ValueError(f"{len(gates)} gate tensors but {unit_costs.numel()} unit costs")
    norms = torch.stack([g.float().abs().sum() for g in gates])
    return (norms * unit_costs.to(norms.device, norms.dtype)).sum()


def soft_keep_fractions(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per group, the expected fraction of units kept: the mean of `min(|g|, 1)`, a unit counting in proportion to its
    gate (1 at initialisation, 0 for a zero gate). For 0/1 gates it is the exact kept fraction."""
    return torch.stack([g.detach().float().abs().clamp(max=1).mean() for g in gates])


# ---- choosing the units ----------------------------------------------------------------------------------------------
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
) -> GateSelection:
    """Choose the surviving units of a gated model; `extract_student` builds the model from the result.

    - `threshold`: keep units with `|g| > threshold`; a branch whose depth gate is at or below it is removed.
    - `target_flops_ratio`: go through all units, largest `|g|` first, and keep each one whose addition keeps the
      FLOPs at or under `target_flops_ratio` times the teacher's. The result is within one unit's worth of the budget.

    Either way a live branch or a plain layer keeps at least its largest-gate channel.
    """
    if (target_flops_ratio is None) == (threshold is None):
        raise ValueError(
            f"give exactly one of target_flops_ratio and threshold, got target_flops_ratio={target_flops_ratio!r}, "
            f"threshold={threshold!r}"
        )
    inner, plan = unwrap_model(model), gate_plan(model)
    gates = _gate_values(inner, plan)
    mags = {n: g.abs() for n, g in gates.items()}
    if target_flops_ratio is not None:
        if not (isinstance(target_flops_ratio, int | float) and 0 < target_flops_ratio <= 1):
            raise ValueError(f"target_flops_ratio must lie in (0, 1], got {target_flops_ratio!r}")
        plan.measure(inner, _input_size(inner, input_size))
        counts, alive = _fill_budget(plan, mags, target_flops_ratio * plan.total_flops)
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
        plan.measure(inner, _input_size(inner, input_size))
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
    plan: GatePlan, mags: Mapping[str, torch.Tensor], budget: float
) -> tuple[dict[str, int], dict[str, bool]]:
    counts = {n: 0 for n, g in plan.groups.items() if g.kind == WIDTH}
    alive = {n: False for n, g in plan.groups.items() if g.kind == DEPTH}
    check_budget(plan, budget / plan.total_flops)
    units = [(float(v), k, n, i) for k, (n, m) in enumerate(mags.items()) for i, v in enumerate(m.tolist())]
    units.sort(key=lambda u: (-u[0], u[1], u[3]))
    # Within a group all units cost the same and costs only grow as units are added, so a unit that does not fit
    # means none of its group's later (smaller-gate) units fit either: skip the group from then on.
    full = set()
    for _, _, name, _ in units:
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
    return counts, alive


def _input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(int(s) for s in input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return tuple(cfg["input_size"])
    raise ValueError(
        f"{type(model).__name__} has no pretrained_cfg['input_size']; pass input_size=(C, H, W) to count FLOPs"
    )


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
        input_size: `(C, H, W)` of one sample for counting FLOPs; default `model.pretrained_cfg["input_size"]`.

    Returns:
        The student, on the gated model's device and dtype and in its train/eval mode, with `pretrained_cfg` and
        `model_args` set so that `timm.create_model(student.pretrained_cfg["architecture"], **student.model_args)`
        rebuilds its shape and `hub.save_student` can export it.
    """
    inner = unwrap_model(model)
    sel = select_units(inner, target_flops_ratio=target_flops_ratio, threshold=threshold, input_size=input_size)
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
