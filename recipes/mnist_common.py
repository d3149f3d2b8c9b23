"""What the MNIST recipes share.

- The quickstart's regime, used by `mnist_quickstart.py` and the `evidence_*.py` recipes: its arguments
  (`QuickstartArguments`), its splits, its conv teacher (`teacher_run`), the Trainer settings of every student run
  (`run_args`), the one-thread process pool the runs go to (`executor`, `one_thread`), the shifted-view collate
  (`ShiftCollate`) and the held-out error count.
- The MLP set-up of `mnist_search.py` and `mnist_unix.py`: one teacher, an MLP 784-512-512-10 with dropout 0.3,
  AdamW at lr 1e-3, 10 epochs, seed 0 (the teacher of the optimiser measurement in docs/methods.md), and the Trainer
  settings of their runs (`mnist_args`).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import timm
import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from hf_kdsearch import ClassificationTrainer, DistillationArguments, evidence
from hf_kdsearch.data import TensorImageDataset, collate_tensor_batch
from hf_kdsearch.evidence import protocol_split


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
    """`hf_kdsearch.evidence.write_results` to `<output_dir>/results.json` (versions, machine, redacted command)."""
    return evidence.write_results(f"{output_dir}/results.json", summary)


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


# ---- the quickstart's regime ---------------------------------------------------------------------------------


@dataclass
class QuickstartArguments:
    """The quickstart's regime (data, teacher, student, schedule, workers); the evidence recipes extend it."""

    output_dir: str = field(default="out/quickstart", metadata={"help": "Where results.json and paired.png go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Paired student seeds."})
    tune_seed: int = field(default=100, metadata={"help": "Seed of the tuning runs (not one of --seeds)."})
    n_train: int = field(default=1000, metadata={"help": "Training digits."})
    n_val: int = field(default=1000, metadata={"help": "Validation digits (tuning only)."})
    teacher_widths: list[int] = field(default_factory=lambda: [16, 16, 32, 32], metadata={"help": "Teacher convs."})
    student_widths: list[int] = field(default_factory=lambda: [4, 4, 8, 8], metadata={"help": "Student convs."})
    teacher_epochs: float = field(default=8, metadata={"help": "Teacher epochs (over its 7,000 digits)."})
    epochs: float = field(default=30, metadata={"help": "Student epochs, both arms, tuning and final runs."})
    eval_every: int = field(default=3, metadata={"help": "Epochs between the validation points of a run's curve."})
    batch_size: int = field(default=64, metadata={"help": "Batch size of every run."})
    max_shift: int = field(default=2, metadata={"help": "Random shift of training digits, in pixels (0: none)."})
    workers: int = field(
        default=0,
        metadata={
            "help": "Training runs at once, each in its own process with one torch thread; 0: min(2, cores this "
            "process may run on). The printed errors do not depend on it."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Smoke run: 200 + 200 digits, 2 seeds, 2 settings per arm, 1 epoch (teacher too)."},
    )


def run_args(out: str, seed: int, epochs: float, batch_size: int, **settings) -> DistillationArguments:
    """Trainer settings of every student run: SGD with momentum 0.9, cosine decay, no checkpoints, quiet."""
    base = dict(
        output_dir=out,
        seed=seed,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    return DistillationArguments(**{**base, **settings})


def quiet(trainer) -> None:
    """Train without the Trainer's end-of-run metrics print (the table below is the output)."""
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def splits(q: QuickstartArguments):
    """train, validation, held-out test, and the teacher's data (every digit outside validation and test)."""
    train, val, test, rest = protocol_split(q.n_train, q.n_val, with_rest=True)
    teacher_data = TensorImageDataset(torch.cat([train.images, rest.images]), torch.cat([train.labels, rest.labels]))
    return train, val, test, teacher_data


def teacher_run(q: QuickstartArguments) -> dict:
    """The teacher, trained with the students' augmentation; its weights and its validation and test errors."""
    _, val, test, teacher_data = splits(q)
    set_seed(0)
    teacher = timm.create_model("mnist_cnn", widths=q.teacher_widths)
    t_args = run_args(f"{q.output_dir}/teacher", 0, q.teacher_epochs, q.batch_size, learning_rate=3e-3)
    t_args.optim, t_args.optim_args, t_args.weight_decay = "adamw_torch", None, 5e-4
    quiet(
        ClassificationTrainer(
            model=teacher, args=t_args, train_dataset=teacher_data, data_collator=ShiftCollate(0, q.max_shift)
        )
    )
    return {
        "state": teacher.state_dict(),
        "val": held_out_errors(teacher, val),
        "test": held_out_errors(teacher, test),
        "params": sum(p.numel() for p in teacher.parameters()),
    }


def one_thread() -> None:
    """One torch thread in this process: every run's numbers then do not depend on the core count."""
    torch.set_num_threads(1)


class _Inline:
    """`submit` that runs at once: the executor of `--workers 1` (and of in-process tests)."""

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def executor(workers: int):
    """`workers` processes (spawned, one torch thread each) to `submit` runs to; `_Inline` for one."""
    # spawn, not fork: a forked child of a process that has run torch's OpenMP threads can hang.
    if workers <= 1:
        return _Inline()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread)


class EpochClock(TrainerCallback):
    """Training cost and validation errors over a run: the curve that convergence and equal-cost readings use.

    The clocks (wall-clock `time.perf_counter` and this process's CPU time `time.process_time`, which with one torch
    thread is the run's own CPU time, whatever else loads the machine) start at `on_train_begin` and stop at each
    `on_epoch_end`; the evaluation (`held_out_errors` on `val`, eval mode, no gradients and no random draws, so the
    run trains exactly as without it) happens while they are stopped, every `eval_every` epochs and after the last.
    `curve` holds one entry per evaluation in each of its lists: the epoch, the cumulative training seconds (wall and
    CPU), the cumulative samples the teacher ran on (`teacher_samples()`, if given) and the validation errors.
    `epoch_seconds` and `epoch_cpu_seconds` hold every epoch's own times.
    """

    def __init__(self, model, val=None, *, eval_every: int = 1, teacher_samples=None):
        self.model, self.val, self.eval_every, self.teacher_samples = model, val, max(1, eval_every), teacher_samples
        self.epoch_seconds: list[float] = []
        self.epoch_cpu_seconds: list[float] = []
        self.curve: dict[str, list] = {
            "epoch": [],
            "seconds": [],
            "cpu_seconds": [],
            "teacher_samples": [],
            "val_errors": [],
        }

    def on_train_begin(self, args, state, control, **kwargs):
        self._since, self._cpu_since = time.perf_counter(), time.process_time()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_seconds.append(time.perf_counter() - self._since)
        self.epoch_cpu_seconds.append(time.process_time() - self._cpu_since)
        epoch = len(self.epoch_seconds)
        last = epoch >= (args.num_train_epochs or 0) or state.global_step >= state.max_steps
        if self.val is not None and (epoch % self.eval_every == 0 or last):
            training = self.model.training
            errors = held_out_errors(self.model, self.val)
            self.model.train(training)
            self.curve["epoch"].append(float(state.epoch))
            self.curve["seconds"].append(sum(self.epoch_seconds))
            self.curve["cpu_seconds"].append(sum(self.epoch_cpu_seconds))
            self.curve["teacher_samples"].append(self.teacher_samples() if self.teacher_samples else None)
            self.curve["val_errors"].append(errors)
        self._since, self._cpu_since = time.perf_counter(), time.process_time()
