"""The FLOPs-weighted L1 penalty on the gates, and the soft kept fractions it is budgeted with: pure tensor maths."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flops_weighted_l1(
    gates: Sequence[torch.Tensor], unit_costs: torch.Tensor, skip_largest: Sequence[bool] | None = None
) -> torch.Tensor:
    """`sum_G c_G * sum_j |g_Gj|`: the FLOPs-weighted L1 norm of the gates, where every unit of group `G` costs `c_G`.

    With `unit_costs` from `GatePlan.unit_costs()` (summing to 1 over units) it equals 1 at initialisation. Groups
    flagged in `skip_largest` leave out their largest gate (one unit, its gradient 0): under the `"max"` gate projection
    that gate is held at 1, so the penalty pulls each layer's other gates down relative to it, and never the layer's
    scale, which the loss may not see.
    """
    if len(gates) != unit_costs.numel():
        raise ValueError(f"{len(gates)} gate tensors but {unit_costs.numel()} unit costs")
    skip = skip_largest or [False] * len(gates)
    # max over dim 0 sends the gradient to one index even when gates tie (a full max would share it among ties).
    norms = torch.stack(
        [a.sum() - (a.max(dim=0).values if s else 0) for a, s in ((g.float().abs(), s) for g, s in zip(gates, skip))]
    )
    return (norms * unit_costs.to(norms.device, norms.dtype)).sum()


def soft_keep_fractions(gates: Sequence[torch.Tensor], *, differentiable: bool = False) -> torch.Tensor:
    """Per group, the expected fraction of units kept: the mean of `min(|g|, 1)`, a unit counting in proportion to its
    gate (1 at initialisation, 0 for a zero gate). For 0/1 gates it is the exact kept fraction.

    Detached from the graph unless `differentiable` (then a penalty built on it trains the gates). A gate at exactly 1,
    where every gate starts, gets the gradient of `|g|` (`clamp` would give it none, and the gates would never move).
    """
    fractions = []
    for g in gates:
        a = (g if differentiable else g.detach()).float().abs()
        fractions.append(torch.where(a <= 1, a, torch.ones_like(a)).mean())
    return torch.stack(fractions)
