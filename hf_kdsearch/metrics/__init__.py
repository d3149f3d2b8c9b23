"""`evaluate` metrics shipped with the package, so evaluation works offline.

`topk_accuracy.py` is an `evaluate` metric script; `evaluate.load(TOPK_ACCURACY_PATH)` loads it without the Hub.
`TopKAccuracy` plugs it into a `Trainer`: it ranks the logits on the device and hands the metric k class ids per
sample instead of C scores, so evaluation gathers and converts little.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch

__all__ = ["TOPK_ACCURACY_PATH", "TopKAccuracy", "load_topk_accuracy"]

TOPK_ACCURACY_PATH = str(resources.files("hf_kdsearch") / "metrics" / "topk_accuracy.py")


def load_topk_accuracy(**kwargs: Any):
    """`evaluate.load` of the bundled top-k accuracy metric; works with `HF_HUB_OFFLINE=1`.

    Keyword arguments go to `evaluate.load`; `keep_in_memory=True` is the default, so several ranks computing at once
    share no cache file.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(TOPK_ACCURACY_PATH, **kwargs)


class TopKAccuracy:
    """Top-k accuracy for `Trainer(compute_metrics=..., preprocess_logits_for_metrics=...)`.

    Example:
    ```python
    accuracy = TopKAccuracy(top_k=(1, 5))
    trainer = DistillationTrainer(..., compute_metrics=accuracy, preprocess_logits_for_metrics=accuracy.rank)
    trainer.evaluate()  # {"eval_top1": ..., "eval_top5": ...}
    ```

    Models with several heads, whose logits are `(N, H, C)` (an `OnlineEnsemble` evaluated by
    `OnlineEnsembleTrainer`: each student, then the ensemble), get `{head}_top{k}` per head.

    Args:
        top_k: the k values to report as `top{k}`; k larger than the number of classes is dropped.
        heads: names of the H heads of `(N, H, C)` logits; default `head0`, `head1`, ...
    """

    def __init__(self, top_k: Sequence[int] = (1, 5), heads: Sequence[str] | None = None):
        ks = tuple(int(k) for k in top_k)
        if not ks or min(ks) < 1:
            raise ValueError(f"top_k must be a non-empty sequence of integers >= 1, got {top_k!r}")
        self.top_k = ks
        self.heads = list(heads) if heads is not None else None
        self.metric = load_topk_accuracy()

    def rank(self, logits: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The `max(top_k)` best class ids per sample (and head), best first; runs on the device before the gather."""
        if isinstance(logits, tuple | list):
            logits = logits[0]
        return logits.topk(min(max(self.top_k), logits.shape[-1]), dim=-1).indices

    def __call__(self, eval_pred) -> dict[str, float]:
        ranked, labels = eval_pred.predictions, np.asarray(eval_pred.label_ids)
        if isinstance(ranked, tuple | list):
            ranked = ranked[0]
        ranked = np.asarray(ranked)
        if np.issubdtype(ranked.dtype, np.floating):  # scores: used without preprocess_logits_for_metrics=self.rank
            ranked = np.argsort(-ranked, axis=-1, kind="stable")[..., : max(self.top_k)]
        ks = tuple(k for k in self.top_k if k <= ranked.shape[-1])
        if ranked.ndim == 2:
            return self.metric.compute(predictions=ranked, references=labels, top_k=ks)
        if ranked.ndim != 3:
            raise ValueError(f"expected ranked ids of shape (N, k) or (N, heads, k), got {ranked.shape}")
        heads = self.heads or [f"head{i}" for i in range(ranked.shape[1])]
        if len(heads) != ranked.shape[1]:
            raise ValueError(f"{len(heads)} head names {heads} for logits with {ranked.shape[1]} heads")
        return {
            f"{head}_{name}": value
            for i, head in enumerate(heads)
            for name, value in self.metric.compute(predictions=ranked[:, i], references=labels, top_k=ks).items()
        }
