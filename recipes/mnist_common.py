"""What the MNIST recipes share: the Trainer settings of their CPU runs, their teacher, and the held-out error count.

The quickstart and the evidence runs (`mnist_search.py`, `mnist_unix.py`) compare students against one teacher,
trained the same way in each: an MLP 784-512-512-10 with dropout 0.3, AdamW at lr 1e-3, 10 epochs, seed 0 (the
teacher of the optimiser measurement in docs/methods.md).
"""

from __future__ import annotations

import json
import os

import timm
import torch
from transformers import set_seed

import hf_kdsearch
from hf_kdsearch import ClassificationTrainer, DistillationArguments
from hf_kdsearch.data import TensorImageDataset, collate_tensor_batch


def mnist_args(out: str, seed: int, epochs: float, **overrides) -> DistillationArguments:
    """Trainer settings of a CPU run on the bundled digits: batch 64, linear decay, no weight decay, nothing saved."""
    settings = dict(
        output_dir=out,
        seed=seed,
        num_train_epochs=epochs,
        per_device_train_batch_size=64,
        per_device_eval_batch_size=500,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    return DistillationArguments(**{**settings, **overrides})


def train_teacher(
    out: str,
    train: TensorImageDataset,
    hidden: list[int] | tuple[int, ...] = (512, 512),
    epochs: float = 10,
    **overrides,
) -> torch.nn.Module:
    """The shared teacher, trained with cross-entropy and returned in eval mode."""
    set_seed(0)
    teacher = timm.create_model("mnist_mlp", hidden_dims=list(hidden), drop_rate=0.3)
    args = mnist_args(out, 0, epochs, optim="adamw_torch", learning_rate=1e-3, **overrides)
    ClassificationTrainer(model=teacher, args=args, train_dataset=train, data_collator=collate_tensor_batch).train()
    return teacher.eval()


def held_out_errors(model: torch.nn.Module, dataset: TensorImageDataset) -> int:
    """Misclassified held-out digits, with the model in eval mode."""
    model.eval()
    with torch.no_grad():
        return int((model(dataset.images).argmax(-1) != dataset.labels).sum())


def write_results(output_dir: str, summary: dict) -> dict:
    """Add the library versions to `summary`, write it to `<output_dir>/results.json`, and return it."""
    summary = {**summary, "versions": {"hf_kdsearch": hf_kdsearch.__version__, "torch": torch.__version__}}
    os.makedirs(output_dir, exist_ok=True)
    with open(f"{output_dir}/results.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


class ShiftCollate:
    """Collate that shifts each training digit by up to `max_shift` pixels, from its own seeded generator.

    The trainer feeds one batch to student and teacher alike, so both see the same shifted view (consistent
    augmentation). Two runs built with the same seed and fed the same batch order see the same views; `digest`
    (a running checksum of the labels and shifts seen) lets a caller check that two paired runs did.
    """

    def __init__(self, seed: int, max_shift: int = 2, background: float | None = None):
        self.max_shift = max_shift
        self.generator = torch.Generator().manual_seed(seed)
        # The value of a black pixel after the MNIST standardisation.
        self.background = background if background is not None else -0.1307 / 0.3081
        self.digest = 0

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = collate_tensor_batch(batch)
        if self.max_shift <= 0:
            return out
        x, s = out["pixel_values"], self.max_shift
        n, _, h, w = x.shape
        shifts = torch.randint(0, 2 * s + 1, (n, 2), generator=self.generator)
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.background)
        out["pixel_values"] = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())]
        )
        self.digest = (self.digest * 1_000_003 + int((out["labels"] * 7 + shifts.sum(1)).sum())) % (1 << 61)
        return out
