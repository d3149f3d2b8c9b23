"""The gate plan: where a model's gates are, what each one thins, and a FLOPs model of the gated layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..batch import unwrap
from ..flops import count_flops

WIDTH, DEPTH = "width", "depth"
GATE_ATTR = {WIDTH: "channel_gate", DEPTH: "depth_gate"}


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
    """The module that holds the gates: the one inside DDP / DataParallel / torch.compile wrappers and inside
    transformers' `TimmWrapperForImageClassification` (what `AutoModelForImageClassification` returns for a timm
    folder), whose `timm_model` computes the logits it returns."""
    return unwrap(model, timm_wrapper=True)


def gate_plan(model: nn.Module) -> GatePlan:
    """The `GatePlan` of a model returned by `add_gates`."""
    plan = getattr(unwrap_model(model), "gate_plan", None)
    if not isinstance(plan, GatePlan):
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no gates; call add_gates(model) first")
    return plan
