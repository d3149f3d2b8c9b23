"""Checks on a model before it is trained with or leaves training: no Trainer, no files.

`check_label_names` compares the class names a teacher was saved with to the dataset's, before distillation;
`check_finite_weights` reads every tensor of a model before it is saved or published.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "LabelNamesError",
    "NonFiniteWeightsError",
    "check_finite_weights",
    "check_label_names",
    "model_label_names",
]

logger = logging.getLogger(__name__)


class LabelNamesError(ValueError):
    """A teacher's saved class names are the dataset's in another order: its outputs would be read as other classes."""


#: transformers fills `id2label` with these placeholders when a config names no classes.
_PLACEHOLDER = re.compile(r"^LABEL_\d+$")


def model_label_names(model: nn.Module) -> list[str] | None:
    """The class names a model was saved with, one per output; None when it has none.

    Reads timm's `pretrained_cfg["label_names"]` (timm loads a `config.json`'s `label_names` there), or transformers'
    `config.id2label` (its `LABEL_0`, `LABEL_1`, ... placeholders count as no names). Wrappers (`.module`,
    `._orig_mod`, `.timm_model`) are looked through.
    """
    for m in (model, *(getattr(model, a, None) for a in ("module", "_orig_mod", "timm_model"))):
        if not isinstance(m, nn.Module):
            continue
        cfg = getattr(m, "pretrained_cfg", None)
        names = cfg.get("label_names") if isinstance(cfg, dict) else None
        if names:
            return [str(n) for n in names]
        id2label = getattr(getattr(m, "config", None), "id2label", None)
        if id2label:
            names = [str(id2label[k]) for k in sorted(id2label, key=int)]
            if not all(_PLACEHOLDER.match(n) for n in names):
                return names
    return None


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).lower()


def check_label_names(
    teacher: nn.Module | Sequence[str] | None,
    dataset_names: Sequence[str] | None,
    *,
    teacher_name: str = "the teacher",
    log=None,
) -> list[str] | None:
    """Compare a teacher's saved class names with the dataset's `ClassLabel` names, output by output.

    Names are compared ignoring case, `_` versus space and repeated spaces. The same names in another order mean the
    teacher's output `i` is another class than the dataset's label `i`, and distilling would teach wrong classes:
    that is refused. Names that differ as sets (another spelling, another label set of the same size) are warned
    about, naming the first differences; so is a count that differs. Nothing is checked when either side has no names.

    Args:
        teacher: the teacher model (its names are read by `model_label_names`), or its names.
        dataset_names: the dataset's class names (`data.class_names`), or None.
        teacher_name: how messages name the teacher.
        log: called with a warning's text (default: this module's logger's `warning`).

    Returns:
        The teacher's names, or None when it has none.

    Raises:
        LabelNamesError: the same class names in another order; the message lists the first mismatched outputs.
    """
    if isinstance(teacher, (str, bytes)):
        raise TypeError(f"check_label_names takes the teacher model or its list of names, not the string {teacher!r}")
    names = teacher if teacher is None or isinstance(teacher, Sequence) else model_label_names(teacher)
    if not names or not dataset_names:
        return list(names) if names else None
    names, dataset_names = [str(n) for n in names], [str(n) for n in dataset_names]
    ours, theirs = [_norm(n) for n in names], [_norm(n) for n in dataset_names]
    if ours == theirs:
        return names
    diffs = [
        f"{i}: teacher {t!r}, dataset {d!r}"
        for i, (t, d, a, b) in enumerate(zip(names, dataset_names, ours, theirs))
        if a != b
    ]
    first = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    if sorted(ours) == sorted(theirs):
        raise LabelNamesError(
            f"{teacher_name} was saved with the dataset's class names in another order, so its output i is not the "
            f"dataset's label i (first mismatches, output: {first}); distil from a teacher trained with this order, "
            "or cast the dataset's label column to the teacher's order (datasets.ClassLabel(names=...))"
        )
    if len(names) != len(dataset_names):
        first = f"{len(names)} names for the teacher, {len(dataset_names)} in the dataset"
    (log or logger.warning)(
        f"{teacher_name}'s saved class names differ from the dataset's ({first}); check that it was trained on "
        "this label set"
    )
    return names


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
