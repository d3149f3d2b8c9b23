"""UNIX: uncertainty-aware selection and mixup, so the teacher runs on fewer samples.

Xu, Liu & Loy, "Computation-Efficient Knowledge Distillation via Uncertainty-Aware Mixup", Pattern Recognition 2023,
https://arxiv.org/abs/2012.09413. Per batch of N samples:

1. the student scores every sample, without gradients (`uncertainty_scores`);
2. samples are ranked most uncertain first, and sample of rank r gets the mixup weight
   `m[r] = lambda * sigmoid(w * (r/N - (2b - 1)/(2N)))` with one `lambda ~ Beta(1, 1)` per batch (`rank_mixup_mask`);
3. the k = round(select_ratio * N) most uncertain samples are kept (`select_uncertain`), each mixed with a random
   partner, `(1 - m) x + m x_partner`, and its label mixed the same way (`apply_selection`);
4. only those k samples go through the teacher, and the student trains on them (`UncertaintyMixupCallback`).

The functions are pure tensor code; the callback plugs them into `DistillationTrainer` through the
`DistillationCallback` protocol and keeps the books on how much teacher work was saved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .batch import batch_size, sample_index
from .flops import count_flops
from .trainer import DistillationCallback, DistillationMixin

__all__ = [
    "UNCERTAINTY_MEASURES",
    "Selection",
    "UncertaintyMixupCallback",
    "apply_selection",
    "num_selected",
    "rank_mixup_mask",
    "select_uncertain",
    "uncertainty_scores",
    "unix_cost_ratio",
]

logger = logging.get_logger(__name__)

#: Larger score = more uncertain, for every measure.
UNCERTAINTY_MEASURES = ("entropy", "least_confidence", "margin", "random")
#: How the callback gets the student's scores: a no-grad pass per batch, or its own training forward of earlier epochs.
SCORING_MODES = ("pass", "free")


# ---- pure functions ------------------------------------------------------------------------------------------------
def uncertainty_scores(
    logits: torch.Tensor, measure: str = "entropy", *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample uncertainty of a classifier's `(N, C)` logits, at temperature 1; larger means more uncertain.

    - `"entropy"`: `-sum_c p_c log p_c` (the UNIX default).
    - `"least_confidence"`: `1 - max_c p_c`.
    - `"margin"`: `-(p_(1) - p_(2))`, minus the gap between the two largest probabilities.
    - `"random"`: uniform noise in [0, 1), the control that selects without looking at the student.

    Computed in float32 whatever the logits' dtype. See UNIX (https://arxiv.org/abs/2012.09413), section 3.2.
    """
    if measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if measure == "random":
        return torch.rand(logits.shape[0], device=logits.device, generator=generator)
    probs = F.softmax(logits.float(), dim=-1)
    if measure == "entropy":
        # entr(0) = 0, where p * log p would give 0 * -inf = nan for a fully saturated softmax.
        return torch.special.entr(probs).sum(-1)
    if measure == "least_confidence":
        return 1.0 - probs.amax(-1)
    if logits.shape[-1] < 2:
        raise ValueError(f"the margin measure needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 1] - top2[:, 0]


def rank_mixup_mask(
    num_samples: int,
    lam: float,
    *,
    boundary: float = 0.5,
    slope: float = 10.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """UNIX's rank-dependent mixup weights, `m[r] = lam * sigmoid(slope * (r/N - (2b - 1)/(2N)))` for r = 0..N-1.

    Rank 0 is the most uncertain sample: it stays almost clean, while confident samples (large r) are mixed with weight
    up to `lam`. The paper's `b = 32, w = 10` at `N = 64` is `boundary = b / N = 0.5, slope = 10`. For other N we keep
    both in units of the relative rank r/N: `b = boundary * N`, so the sigmoid's midpoint stays at the same share of
    the batch (half a rank before rank b), and `slope` needs no rescaling because the rank already enters as r/N.

    Args:
        num_samples: the batch size N.
        lam: the batch's mixup coefficient, in [0, 1] (UNIX draws it from Beta(1, 1)).
        boundary: `b / N`, in [0, 1]: where along the ranking mixing takes over.
        slope: `w >= 0`: how sharply it takes over (0 gives the flat mask `lam / 2`).
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}")
    _check_mask_shape(boundary, slope)
    ranks = torch.arange(num_samples, device=device, dtype=torch.float32)
    b = boundary * num_samples
    centre = (2 * b - 1) / (2 * num_samples)
    return lam * torch.sigmoid(slope * (ranks / num_samples - centre))


def num_selected(batch_size: int, select_ratio: float) -> int:
    """k = round(select_ratio * N), at least 1: how many samples of a batch the teacher sees."""
    return max(1, round(select_ratio * batch_size))


def unix_cost_ratio(teacher_fraction: float, flops_ratio: float | None, scored_fraction: float = 1.0) -> float:
    """UNIX's computation relative to plain KD, `k/N + s/(F_t/F_s + 2)`, counting a backward pass as one forward.

    Plain KD spends `F_t + 2 F_s` per sample (teacher forward, student forward and backward). UNIX spends `F_s` per
    sample on scoring, and `F_t + 2 F_s` on the kept share `teacher_fraction = k/N`. With `flops_ratio=None` no
    scoring pass is counted (the `"random"` measure runs none), so the ratio is `k/N`.

    Args:
        teacher_fraction: the share of samples the teacher (and the student's training step) ran on.
        flops_ratio: forward FLOPs of the teacher over those of the student, `F_t / F_s`.
        scored_fraction: `s`, the share of samples scored by a no-grad pass (1 with a pass per batch; with free
            scoring only the first epoch's).
    """
    if flops_ratio is None:
        return float(teacher_fraction)
    if not flops_ratio > 0:
        raise ValueError(f"flops_ratio = F_t / F_s must be > 0, got {flops_ratio!r}")
    return float(teacher_fraction) + float(scored_fraction) / (flops_ratio + 2.0)


@dataclass(frozen=True)
class Selection:
    """Which samples of a batch of `batch_size` are kept, and how each is mixed.

    Attributes:
        batch_size: N, the size of the batch the selection was made from.
        index: `(k,)` batch positions of the kept samples, in ascending batch order.
        rank: `(k,)` their uncertainty rank, 0 = most uncertain.
        partner: `(k,)` batch positions of their mixup partners, or None without mixup.
        weight: `(k,)` float32 mixup weight `m` of each kept sample, or None without mixup.
    """

    batch_size: int
    index: torch.Tensor
    rank: torch.Tensor
    partner: torch.Tensor | None = None
    weight: torch.Tensor | None = None


def select_uncertain(
    scores: torch.Tensor,
    num_keep: int,
    *,
    lam: float | None = None,
    partner: torch.Tensor | None = None,
    boundary: float = 0.5,
    slope: float = 10.0,
) -> Selection:
    """Keep the `num_keep` most uncertain samples and give each its rank-dependent mixup weight.

    Ties keep batch order (a stable sort). The kept samples are returned in batch order, not rank order: the loss is a
    mean over samples, so order does not matter to it, and with `num_keep = N` and no mixup the batch comes back
    unchanged, bit for bit, so the run is plain KD even with dropout.

    Args:
        scores: `(N,)` uncertainty, larger = more uncertain (see `uncertainty_scores`).
        num_keep: k, in [1, N].
        lam: the batch's mixup coefficient; None for no mixup.
        partner: `(N,)` batch positions: sample i is mixed with sample `partner[i]` (a random permutation in UNIX).
            Required with `lam`.
        boundary, slope: shape of the mask, see `rank_mixup_mask`.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got {tuple(scores.shape)}")
    n = scores.shape[0]
    if not 1 <= num_keep <= n:
        raise ValueError(f"num_keep must lie in [1, {n}] for a batch of {n}, got {num_keep}")
    order = torch.argsort(scores, descending=True, stable=True)  # order[r] = batch position of rank r
    index, rank = order[:num_keep].sort()  # back to batch order; rank[i] = position of index[i] in `order`
    if lam is None:
        return Selection(n, index, rank)
    if partner is None or partner.shape != (n,):
        got = None if partner is None else tuple(partner.shape)
        raise ValueError(f"mixup (lam={lam}) needs partner, a ({n},) tensor of batch positions; got {got}")
    weight = rank_mixup_mask(n, lam, boundary=boundary, slope=slope, device=scores.device)[rank]
    return Selection(n, index, rank, partner[index], weight)


def apply_selection(batch: Mapping[str, Any], selection: Selection, *, mix_key: str = "pixel_values") -> dict:
    """The batch of kept samples: every per-sample tensor indexed by `selection.index`, and with mixup
    `batch[mix_key]` replaced by `(1 - m) x + m x_partner`.

    With mixup and `labels` in the batch, it adds `mix_labels` (the partners' labels) and `mix_weights` (`m`), which
    `DistillationTrainer` turns into `(1 - m) CE(labels) + m CE(mix_labels)`. Values that are not per-sample tensors
    (no leading dimension of size N) pass through unchanged.
    """
    n = selection.batch_size
    out = {
        key: value[selection.index]
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n
        else value
        for key, value in batch.items()
    }
    if selection.weight is None:
        return out
    if "mix_labels" in batch or "mix_weights" in batch:
        raise ValueError("the batch is already mixed (it has 'mix_labels'/'mix_weights'); UNIX cannot mix it again")
    x = batch.get(mix_key)
    if not isinstance(x, torch.Tensor) or x.shape[:1] != (n,):
        raise KeyError(f"mixup needs the inputs as a ({n}, ...) tensor under {mix_key!r}; got keys {sorted(batch)}")
    if not x.is_floating_point():
        raise TypeError(f"mixup needs floating-point {mix_key!r}, got dtype {x.dtype}; convert the images first")
    m = selection.weight.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    out[mix_key] = torch.lerp(out[mix_key], x[selection.partner], m)
    if "labels" in batch:
        out["mix_labels"] = batch["labels"][selection.partner]
        out["mix_weights"] = selection.weight
    return out


def _check_mask_shape(boundary: float, slope: float) -> None:
    if not (isinstance(boundary, int | float) and 0.0 <= boundary <= 1.0):
        raise ValueError(f"mix_boundary (b / N) must lie in [0, 1], got {boundary!r}")
    if not (isinstance(slope, int | float) and math.isfinite(slope) and slope >= 0):
        raise ValueError(f"mix_slope (w) must be a finite number >= 0, got {slope!r}")


@contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a no-grad pass, then every submodule back to its own mode.

    Eval mode keeps batch-norm statistics still (the reference scores in train mode, so they move twice per step) and
    turns dropout off, so scores are deterministic. Restoring per module, rather than `model.train()`, keeps any
    submodule a user froze in eval mode frozen.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    # The DDP wrapper broadcasts buffers and prepares gradient hooks on every forward; the local module scores the
    # rank's own shard with no collectives. Accelerate's autocast patch sits on the inner module, so it is kept.
    # FSDP and DeepSpeed models stay wrapped: their inner modules hold only a shard of the weights.
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


# ---- callback ------------------------------------------------------------------------------------------------------
class UncertaintyMixupCallback(DistillationCallback, ExportableState):
    """UNIX for `DistillationTrainer`: the teacher runs only on the `select_ratio` most uncertain samples of each batch.

    Xu, Liu & Loy 2023, https://arxiv.org/abs/2012.09413. At every training micro-batch of N samples (per device):

    1. the student scores the batch: with `scoring="pass"` (the paper's way) in eval mode under `no_grad` (batch-norm
       statistics are not updated); with `scoring="free"` from its own training forward of an earlier epoch (below);
    2. with `mixup=True`, one `lambda ~ Beta(mixup_alpha, mixup_alpha)` is drawn and sample of uncertainty rank r is
       mixed with a random partner by `m[r] = lambda * sigmoid(w (r/N - (2b - 1)/(2N)))`, `b = mix_boundary * N`,
       `w = mix_slope`; the labels are mixed the same way for the cross-entropy term;
    3. the k = round(select_ratio * N) most uncertain samples become the batch: student and teacher run on those k.

    Example:
    ```python
    from hf_kdsearch import DistillationArguments, DistillationTrainer, UncertaintyMixupCallback

    cb = UncertaintyMixupCallback(select_ratio=0.75, uncertainty="entropy", mixup=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=ds)
    trainer.train()
    print(cb.totals)  # samples seen, teacher samples and forwards, teacher_fraction, cost_ratio
    ```

    **Free scoring** (`scoring="free"`). The student's training forward already gives logits for the k kept samples;
    their uncertainty is stored per sample index (the trainer then passes `sample_index` in every batch), and a later
    epoch ranks each sample by its stored score instead of running the no-grad pass. The first epoch scores with the
    pass (every sample gets a clean score); from the second epoch on there is no scoring pass at all. A stored score is
    the one of the sample's last training forward: of the mixed input, in train mode (dropout, batch statistics), and
    possibly epochs old for a sample that was not kept since. Under DDP the ranks merge their tables at each epoch end
    (one all-reduce of 2N numbers), so every rank ranks every sample by the latest score.

    Logged at every log step (cumulative over the run, across resumes): `teacher_fraction` (teacher samples / samples
    seen, as counted by the trainer), `cost_ratio` (`unix_cost_ratio`: computation relative to plain KD, with FLOPs
    from `count_flops`), and `teacher_samples_total`, `samples_seen_total`, `teacher_forwards_total` summed over ranks;
    `uncertainty`, the batch-mean score, is averaged over the log window. At the end of training the same totals are
    logged and kept in `self.totals`.

    Under DDP each rank scores and selects from its own shard; under gradient accumulation each micro-batch is a batch.

    **Resume is exact.** The random draws of micro-batch j of optimizer step t come from a generator seeded with
    `(seed, process index, t, j)`, so a run resumed from a checkpoint draws what the uninterrupted run drew. The totals
    (and, with free scoring, the score table) are part of the checkpoint (`ExportableState`, in `trainer_state.json`;
    under DDP, rank 0's counts, which equal every rank's when the ranks' batches are of equal size, and rank 0's score
    table, which lacks the other ranks' scores since the last epoch end: a DDP resume with free scoring in the middle
    of an epoch is therefore not bit-exact).

    Args:
        select_ratio: share of each batch the teacher sees, in (0, 1]. The paper uses 0.75 (k = 48 of 64).
        uncertainty: `"entropy"` (default), `"least_confidence"`, `"margin"` or `"random"`. `"random"` runs no scoring
            pass, so its cost has no scoring term.
        mixup: mix samples by rank. With `select_ratio=1.0, mixup=False` training is plain KD (plus a scoring pass).
        mix_boundary: `b / N`; 0.5 is the paper's b = 32 at N = 64.
        mix_slope: `w`, the sharpness of the mask; the paper's 10.
        mixup_alpha: lambda ~ Beta(mixup_alpha, mixup_alpha); the paper's 1 is uniform.
        teacher_flops_ratio: `F_t / F_s` for the cost estimate. Default: measured once with `count_flops` on the
            first batch's `mix_key` input.
        mix_key: the batch key of the inputs to mix (and measure FLOPs on).
        seed: seed of the callback's own random draws (lambda, partners, random scores), combined with the process
            index so ranks draw differently. Default: `args.seed`.
        scoring: `"pass"` (a no-grad scoring pass per batch, the paper's) or `"free"` (see above).
    """

    #: UNIX mixes images and re-draws partners, so stored teacher outputs would not match them (teacher_cache.py).
    works_with_teacher_cache = False

    def __init__(
        self,
        select_ratio: float = 0.75,
        uncertainty: str = "entropy",
        mixup: bool = True,
        *,
        mix_boundary: float = 0.5,
        mix_slope: float = 10.0,
        mixup_alpha: float = 1.0,
        teacher_flops_ratio: float | None = None,
        mix_key: str = "pixel_values",
        seed: int | None = None,
        scoring: str = "pass",
    ):
        if not (isinstance(select_ratio, int | float) and 0.0 < select_ratio <= 1.0):
            raise ValueError(f"select_ratio must lie in (0, 1], got {select_ratio!r}")
        if uncertainty not in UNCERTAINTY_MEASURES:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_MEASURES}, got {uncertainty!r}")
        _check_mask_shape(mix_boundary, mix_slope)
        if not (isinstance(mixup_alpha, int | float) and mixup_alpha > 0):
            raise ValueError(f"mixup_alpha must be > 0, got {mixup_alpha!r}")
        if teacher_flops_ratio is not None and not teacher_flops_ratio > 0:
            raise ValueError(f"teacher_flops_ratio (F_t / F_s) must be > 0, got {teacher_flops_ratio!r}")
        if scoring not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {SCORING_MODES}, got {scoring!r}")
        if scoring == "free" and uncertainty == "random":
            raise ValueError("scoring='free' stores the student's scores; uncertainty='random' has none to store")
        self.select_ratio = float(select_ratio)
        self.uncertainty = uncertainty
        self.mixup = bool(mixup)
        self.mix_boundary = float(mix_boundary)
        self.mix_slope = float(mix_slope)
        self.mixup_alpha = float(mixup_alpha)
        self.teacher_flops_ratio = teacher_flops_ratio
        self.mix_key = mix_key
        self.seed = seed
        self.scoring = scoring
        #: Free scoring looks samples up by index, so the trainer must put `sample_index` in the batches.
        self.needs_sample_index = scoring == "free"
        #: Totals of the last `train()`, summed over ranks; None until it ends.
        self.totals: dict[str, float] | None = None
        self._trainer: DistillationMixin | None = None
        self._torch_rng: torch.Generator | None = None
        self._scores: torch.Tensor | None = None  # free scoring: (N,) latest score per sample, NaN = none yet
        self._updated: torch.Tensor | None = None  # (N,) scored on this rank since the last merge
        self._restored_scores: list[float] | None = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._started = False
        self._base_seen = self._base_teacher = 0
        self._offset = (0, 0, 0, 0)  # counts restored from a checkpoint: seen, teacher, forwards, scored
        self.teacher_forwards = 0
        self.scored_samples = 0
        self._micro = 0

    # ---- state (ExportableState): stored in trainer_state.json at each checkpoint ----------------------------------
    def state(self) -> dict:
        seen, teacher, forwards, scored = self._local_counts() if self._started else self._offset
        attributes: dict[str, Any] = {
            "samples_seen": seen,
            "teacher_samples": teacher,
            "teacher_forwards": forwards,
            "scored_samples": scored,
        }
        if self.scoring == "free":
            # No collective here: the Trainer calls state() on the saving process only. Under DDP this is rank 0's
            # table, merged at the last epoch end plus rank 0's own scores since.
            scores = self._scores.tolist() if self._scores is not None else self._restored_scores
            attributes["scores"] = scores
        return {
            "args": {
                "select_ratio": self.select_ratio,
                "uncertainty": self.uncertainty,
                "mixup": self.mixup,
                "mix_boundary": self.mix_boundary,
                "mix_slope": self.mix_slope,
                "mixup_alpha": self.mixup_alpha,
                "mix_key": self.mix_key,
                "seed": self.seed,
                "scoring": self.scoring,
            },
            "attributes": attributes,
        }

    def _restore(self, state) -> None:
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):  # several callbacks of this class: the one built with the same arguments
            mine = self.state()["args"]
            stored = next((s for s in stored if s.get("args") == mine), stored[0] if stored else None)
        attributes = (stored or {}).get("attributes", {})
        if "samples_seen" in attributes:
            self._offset = tuple(
                int(attributes.get(k, 0))
                for k in ("samples_seen", "teacher_samples", "teacher_forwards", "scored_samples")
            )
        self._restored_scores = attributes.get("scores")

    # ---- the distillation step ------------------------------------------------------------------------------------
    def on_distill_batch(self, trainer: DistillationMixin, model: nn.Module, inputs: dict) -> dict:
        if not self._started:
            self._start(trainer, model, inputs)
        x = inputs.get(self.mix_key)
        n = x.shape[0] if isinstance(x, torch.Tensor) else batch_size(inputs)
        if n == 0:
            raise ValueError(f"cannot find a per-sample tensor in the batch (keys: {sorted(inputs)})")
        device = x.device if isinstance(x, torch.Tensor) else trainer.accelerator.device
        rng, numpy_rng = self._rng(device, trainer.state.global_step)

        if self.uncertainty == "random":
            scores = torch.rand(n, device=device, generator=rng)
        elif self.scoring == "free" and int(trainer.state.epoch or 0) > 0:
            scores = self._score_table(device)[sample_index(inputs, "scoring='free'")]
            trainer.record_metric("uncertainty", scores.mean(), "train")
        else:
            scorer = _unwrap_ddp(model)
            with torch.no_grad(), _scoring_mode(scorer):
                logits = trainer.student_logits(scorer, inputs)
            scores = uncertainty_scores(logits, self.uncertainty)
            trainer.record_metric("uncertainty", scores.mean(), "train")
            self.scored_samples += n
            if self.scoring == "free":
                self._store_scores(sample_index(inputs, "scoring='free'"), scores)

        lam = partner = None
        if self.mixup:
            lam = float(numpy_rng.beta(self.mixup_alpha, self.mixup_alpha))
            partner = torch.randperm(n, device=device, generator=rng)
        selection = select_uncertain(
            scores,
            num_selected(n, self.select_ratio),
            lam=lam,
            partner=partner,
            boundary=self.mix_boundary,
            slope=self.mix_slope,
        )
        return apply_selection(inputs, selection, mix_key=self.mix_key)

    def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
        if teacher_logits is not None:
            self.teacher_forwards += 1
        if self.scoring == "free" and model.training:
            # The training forward's scores, for free: what the next epoch ranks these samples by.
            self._store_scores(
                sample_index(inputs, "scoring='free'"), uncertainty_scores(student_logits.detach(), self.uncertainty)
            )
        return None

    def _start(self, trainer: DistillationMixin, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        if not isinstance(trainer, DistillationMixin):
            raise TypeError(
                f"UncertaintyMixupCallback works through DistillationMixin's hooks; got a {type(trainer).__name__}"
            )
        if getattr(trainer, "teacher_cache", None) is not None:
            raise ValueError(
                "UNIX mixes images, so a teacher cache's stored outputs cannot match them: pass teacher_model= instead "
                "of teacher_cache= to run UNIX"
            )
        self._trainer = trainer
        # The trainer's counters run over its whole life; totals are for this train() call.
        self._base_seen, self._base_teacher = trainer.samples_seen, trainer.teacher_samples
        self._started = True
        x = inputs.get(self.mix_key)
        if self.teacher_flops_ratio is None and self.uncertainty != "random":
            if not isinstance(x, torch.Tensor):
                logger.warning(
                    f"UncertaintyMixupCallback: no {self.mix_key!r} tensor in the batch to count FLOPs on, so "
                    "cost_ratio is not logged; pass teacher_flops_ratio=F_t/F_s to log it."
                )
            else:
                student = _unwrap_ddp(model)
                with _scoring_mode(student):
                    f_s = count_flops(student, tuple(x.shape[1:]))
                f_t = count_flops(trainer.teacher_model, tuple(x.shape[1:]))
                if f_s <= 0 or f_t <= 0:
                    raise ValueError(
                        f"count_flops measured teacher {f_t} and student {f_s} FLOPs; pass teacher_flops_ratio= instead"
                    )
                self.teacher_flops_ratio = f_t / f_s

    def _rng(self, device: torch.device, step: int) -> tuple[torch.Generator, np.random.Generator]:
        """The generators of this micro-batch: seeded from (seed, rank, optimizer step, micro-batch), so a resumed run
        draws exactly what the uninterrupted one drew, with no generator state to checkpoint."""
        args = self._trainer.args
        seed = args.seed if self.seed is None else self.seed
        sequence = np.random.SeedSequence([seed, args.process_index, step, self._micro])
        self._micro += 1
        if self._torch_rng is None or self._torch_rng.device != torch.device(device):
            self._torch_rng = torch.Generator(device=device)
        self._torch_rng.manual_seed(int(sequence.generate_state(1, np.uint64)[0]) >> 1)
        return self._torch_rng, np.random.default_rng(sequence)

    # ---- free scoring: the score table -----------------------------------------------------------------------------
    def _score_table(self, device: torch.device) -> torch.Tensor:
        if self._scores is None:
            size = len(self._trainer.train_dataset)
            self._scores = torch.full((size,), float("nan"), device=device)
            if self._restored_scores is not None:
                self._scores.copy_(torch.tensor(self._restored_scores, dtype=torch.float32))
            self._updated = torch.zeros(size, dtype=torch.bool, device=device)
        return self._scores

    def _store_scores(self, index: torch.Tensor, scores: torch.Tensor) -> None:
        table = self._score_table(scores.device)
        table[index] = scores.float()
        self._updated[index] = True

    def _merged_scores(self) -> torch.Tensor:
        """The table with every rank's updates since the last merge (their mean where ranks overlap)."""
        trainer = self._trainer
        if trainer.accelerator.num_processes > 1:
            update = torch.stack([torch.where(self._updated, self._scores, 0.0), self._updated.float()])
            update = trainer.accelerator.reduce(update, reduction="sum")
            merged = torch.where(update[1] > 0, update[0] / update[1].clamp_min(1), self._scores)
            self._scores.copy_(merged)
        self._updated.zero_()
        return self._scores

    # ---- accounting -----------------------------------------------------------------------------------------------
    def _local_counts(self) -> tuple[int, int, int, int]:
        trainer = self._trainer
        seen, teacher, forwards, scored = self._offset
        return (
            seen + trainer.samples_seen - self._base_seen,
            teacher + trainer.teacher_samples - self._base_teacher,
            forwards + self.teacher_forwards,
            scored + self.scored_samples,
        )

    def _cost_ratio(self, teacher_fraction: float, scored_fraction: float = 1.0) -> float | None:
        if self.uncertainty == "random":
            return unix_cost_ratio(teacher_fraction, None)
        if self.teacher_flops_ratio is None:
            return None
        return unix_cost_ratio(teacher_fraction, self.teacher_flops_ratio, scored_fraction)

    def _record_totals(self) -> None:
        trainer = self._trainer
        seen, teacher, forwards, scored = self._local_counts()
        if seen == 0:
            return
        # The trainer averages a metric over ranks; recording P * count makes that mean the sum over ranks.
        world = trainer.accelerator.num_processes
        trainer.record_metric("samples_seen_total", float(seen * world), "train")
        trainer.record_metric("teacher_samples_total", float(teacher * world), "train")
        trainer.record_metric("teacher_forwards_total", float(forwards * world), "train")
        trainer.record_metric("teacher_fraction", teacher / seen, "train")
        cost = self._cost_ratio(teacher / seen, scored / seen)
        if cost is not None:
            trainer.record_metric("cost_ratio", cost, "train")

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset_counts()
        self.totals = None
        self._scores = self._updated = None
        self._restored_scores = None
        if state.global_step > 0:
            # Resuming: the Trainer has loaded trainer_state.json, whose stateful_callbacks hold our totals.
            self._restore(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._micro = 0
        # Recorded only when a log follows (DefaultFlowCallback decided it before us), so a cumulative value is never
        # averaged with older ones; the last step's record reaches the Trainer's final log.
        if self._started and (control.should_log or control.should_training_stop):
            self._record_totals()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._scores is not None:
            self._merged_scores()  # every rank ranks next epoch's samples by the latest scores of all ranks
        if self._started and control.should_log:
            self._record_totals()

    def on_train_end(self, args, state, control, **kwargs):
        if not self._started:
            logger.warning(
                "UncertaintyMixupCallback was never called during training: it acts through DistillationTrainer "
                "(or DistillationMixin), so it needs one of those as the trainer."
            )
            return
        trainer = self._trainer
        counts = torch.tensor(self._local_counts(), dtype=torch.float64, device=trainer.accelerator.device)
        if trainer.accelerator.num_processes > 1:
            counts = trainer.accelerator.reduce(counts, reduction="sum")
        seen, teacher, forwards, scored = (int(round(v)) for v in counts.tolist())
        fraction = teacher / seen if seen else float("nan")
        self.totals = {
            "samples_seen": seen,
            "teacher_samples": teacher,
            "teacher_forwards": forwards,
            "scored_samples": scored,
            "teacher_fraction": fraction,
            "cost_ratio": self._cost_ratio(fraction, scored / seen if seen else 1.0),
            "teacher_flops_ratio": self.teacher_flops_ratio,
        }
        if trainer.is_world_process_zero():
            cost = self.totals["cost_ratio"]
            logger.info(
                f"UNIX: the teacher ran on {teacher:,} of {seen:,} samples ({fraction:.2%}) in {forwards:,} forwards; "
                + (f"estimated cost {cost:.2%} of plain KD" if cost is not None else "cost not estimated")
            )
