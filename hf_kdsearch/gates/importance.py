"""Scale-free unit importance: the first-order loss change of removing each unit, per FLOP it saves.

A gate's magnitude says little across layers. With BatchNorm on batch statistics, multiplying all gates of a layer
that feeds another conv + BN by `s > 0` leaves the logits unchanged, so the loss is flat along that direction and an
L1 penalty slides such a layer's gates towards 0 at a rate set by its cost, not its worth. The first-order estimate of
the loss increase when unit `j` is removed, `|g_j * dL/dg_j|` (Molchanov et al. 2019, "Importance Estimation for
Neural Network Pruning"), does not move under that rescaling: `L(s g) = L(g)` gives `dL/dg(s g) = dL/dg(g) / s`.
Divided by the unit's FLOPs share it weighs the loss against the FLOPs saved, so units of different layers compare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .families import gate_parameters
from .plan import gate_plan, unwrap_model


def unit_importance(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    per_flop: bool = True,
) -> dict[str, torch.Tensor]:
    """Per gate group, each unit's importance: the mean over `batches` of `|g_j * dL_b/dg_j|`, divided by the unit's
    FLOPs share (`GatePlan.unit_costs()`) when `per_flop` (then the plan must be measured).

    `loss_fn(model, batch)` returns the loss whose change is estimated (e.g. the distillation loss). The model runs in
    its current mode; in training mode BatchNorm uses batch statistics, and its running statistics are restored
    afterwards, so the model leaves exactly as it came. Only the gates get gradients (`torch.autograd.grad`): no
    `.grad` of any parameter is touched. Returns float64 tensors on the CPU, keyed like `gate_parameters(model)`.
    """
    inner, plan = unwrap_model(model), gate_plan(model)
    gates = gate_parameters(inner)
    names, params = list(gates), list(gates.values())
    norms = [m for m in inner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    totals = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    n = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, p, g in zip(totals, params, grads):
                if g is not None:
                    t += (p.detach() * g).abs().double().cpu()
            n += 1
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
    if n == 0:
        raise ValueError("unit_importance needs at least one batch")
    out = {name: t / n for name, t in zip(names, totals)}
    if per_flop:
        costs = plan.unit_costs()
        out = {name: out[name] / float(c) for name, c in zip(plan.groups, costs)}
    return out
