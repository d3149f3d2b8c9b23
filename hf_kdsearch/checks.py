"""Checks on a model before it leaves training: one pass over its tensors, no Trainer, no files."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NonFiniteWeightsError", "check_finite_weights"]


class NonFiniteWeightsError(FloatingPointError, ValueError):
    """A model holds NaN or infinite weights, so it must not be saved or published as a result."""


def check_finite_weights(model: nn.Module, *, name: str = "the model", override: str | None = None) -> None:
    """Raise `NonFiniteWeightsError` if a parameter or floating-point buffer of `model` holds NaN or inf.

    The message names the tensors (at most five) and how many values are bad in each. It costs one read of every
    tensor and one host sync; call it before saving or pushing, not per step.

    Args:
        model: any `nn.Module`.
        name: how the message refers to the model ("student1", "the cached teacher", ...).
        override: how the caller lets such a model through anyway, for the message (default: `torch.save`).
    """
    tensors = [(n, t) for n, t in model.state_dict(keep_vars=False).items() if torch.is_floating_point(t)]
    if not tensors:
        return
    counts = torch.stack([(~torch.isfinite(t.detach())).sum() for _, t in tensors]).tolist()
    bad = [(n, c, t.numel()) for (n, t), c in zip(tensors, counts) if c]
    if not bad:
        return
    listed = ", ".join(f"{n} ({c} of {size})" for n, c, size in bad[:5])
    more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    raise NonFiniteWeightsError(
        f"{name} has NaN or infinite weights in {listed}{more}; it is not saved, since it would only predict garbage. "
        "Training diverged: lower the learning rate, clip gradients (max_grad_norm) or use bf16 rather than fp16. "
        f"To save it anyway for debugging, {override or 'use torch.save(model.state_dict(), path)'}."
    )
