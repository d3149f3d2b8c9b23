"""Where the gates go in each supported model family, the forward hooks that apply them, and `add_gates`."""

from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..batch import FROZEN_FLAG
from ..models.cifar import CifarResNet, CifarWideResNet
from ..models.mnist import MLP, SmallCNN
from ..models.sliced_resnet import ShortcutBlock
from .plan import DEPTH, GATE_ATTR, WIDTH, GatedLayer, GateGroup, GatePlan, gate_plan, unwrap_model


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

    Method: Gu & Tresp 2020, https://arxiv.org/abs/2001.11612; the docstring of `hf_kdsearch.gates` says where gates
    go and why residual-stream channels stay ungated.

    Args:
        model: a CIFAR ResNet/WRN, MNIST MLP/SmallCNN, or timm ResNet (BasicBlock/Bottleneck); or one of these inside
            transformers' `TimmWrapperForImageClassification` (`AutoModelForImageClassification` of a timm folder),
            whose inner `timm_model` gets the gates.
        depth: also gate each residual branch, so that whole blocks can be removed.

    Raises:
        TypeError: for a model family with no gate placement; ValueError naming the module for an unsupported layer.
    """
    inner = unwrap_model(model)
    if getattr(inner, "gate_plan", None) is not None:
        raise ValueError(f"{type(inner).__name__} already has gates (model.gate_plan is set); gate a fresh copy")
    for frozen in {id(m): m for m in (model, inner) if getattr(m, FROZEN_FLAG, False)}.values():
        # A deep copy of a teacher that a DistillationTrainer froze inherits its frozen weights; as a student they
        # must train again.
        delattr(frozen, FROZEN_FLAG)
        frozen.requires_grad_(True)
        frozen.train()
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


def gate_parameter_names(model: nn.Module) -> set[str]:
    """The names, as `model.named_parameters()` gives them, of exactly the architecture gates that `add_gates` put in
    `model` (or in the model inside its wrapper); empty for an ungated model.

    The trainers keep these out of weight decay: a gate already carries its own L1 penalty. Matching by object rather
    than by name keeps a layer that merely has "gate" in its name (an MLP's `gate_proj`) under weight decay.
    """
    if getattr(unwrap_model(model), "gate_plan", None) is None:
        return set()
    gates = {id(p) for p in gate_parameters(model).values()}
    return {name for name, p in model.named_parameters() if id(p) in gates}
