"""Distillation losses as pure functions of tensors. Nothing here knows about the Trainer.

Every function computes in float32 and in log space: a bf16 or fp16 softmax followed by a log is where other libraries
get their NaNs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "soft_target_cross_entropy", "mixed_cross_entropy", "feature_mse"]


def kd_loss(student_logits: torch.Tensor, *, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss, `T^2 * KL(softmax(t / T) || softmax(s / T))`.

    `teacher_logits` is keyword-only: the two tensors look alike, and swapping them would silently send the gradient
    into the (detached) teacher side, so the student would learn nothing.

    The KL is summed over classes and averaged over samples (any leading dimensions count as samples). The T^2 factor
    keeps the gradient scale of the soft targets independent of T (arXiv 1503.02531, section 2).

    Args:
        student_logits: `(..., C)` logits of the student.
        teacher_logits: `(..., C)` logits of the teacher; no gradient flows into them.
        temperature: softmax temperature T > 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape; teacher and student must predict the same classes"
        )
    num_classes = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, num_classes) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float().reshape(-1, num_classes) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def soft_target_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability vector per sample, `-sum_c p_c log q_c`, averaged over samples."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    return -(target_probs.float() * log_q).sum(-1).mean()


def mixed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mix_labels: torch.Tensor | None = None,
    mix_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy with mixup labels: `(1 - m) CE(y) + m CE(y_mix)` per sample, averaged over samples.

    With `mix_labels=None` this is plain cross-entropy. `mix_weights` is a per-sample `m` of shape `(N,)`.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if mix_labels is None:
        return ce.mean()
    if mix_weights is None:
        raise ValueError("mix_labels given without mix_weights")
    ce_mix = F.cross_entropy(logits.float(), mix_labels, reduction="none")
    m = mix_weights.float()
    return ((1 - m) * ce + m * ce_mix).mean()


def feature_mse(student_features: torch.Tensor, *, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between feature maps, with the target detached (`teacher_features` is keyword-only)."""
    return F.mse_loss(student_features.float(), teacher_features.detach().float())
