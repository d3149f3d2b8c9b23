"""UNIX against plain KD on 10,000 real MNIST digits: held-out errors and the teacher's measured work, per seed.

    OMP_NUM_THREADS=1 python recipes/mnist_unix.py                   # 5 seeds x 4 runs, about 3 CPU-minutes
    OMP_NUM_THREADS=1 python recipes/mnist_unix.py --seeds 0 1 2 --runs kd unix

Set-up (the optimiser measurement in docs/methods.md): a teacher MLP 784-512-512-10 with dropout 0.3 trained with
AdamW (seed 0, shared by every run); students MLP 784-64-10, 10 epochs, batch 64, SGD momentum 0.9, lr 0.05 with
linear decay, T = 4, alpha = 0.9. For each seed every run starts from the same student initialisation and sees the
same data order:

- `kd`: plain KD, the teacher runs on all 64 samples of a batch;
- `unix`: `UncertaintyMixupCallback(select_ratio=0.75, uncertainty="entropy", mixup=True)`, the paper's setting;
- `unix_nomix`: the same selection without mixup;
- `random`: 48 of 64 samples chosen at random, with the same rank mixup (the control for the uncertainty score);
- `unix_free`: `unix` with free scoring (`scoring="free"`): the scoring pass runs in the first epoch only, later epochs
  rank samples by the uncertainty of their own last training forward.

The teacher's work is measured by a forward hook on the teacher (samples it ran on during training), next to the
trainer's own counters; the cost ratio is `k/N + 1/(F_t/F_s + 2)` with FLOPs from `count_flops`.

Result (CPU, 1 thread on 2 cores shared with other jobs: 2.9 CPU-minutes, 9.7 min wall; torch 2.14.1,
transformers 5.23, hf_kdsearch 0.1.0; teacher 77 errors; F_t / F_s = 1,337,344 / 101,632 = 13.16), held-out errors
on 2,000 digits, seeds 0-4, mean +- std:

    kd           87.6 +- 1.7   teacher on 80,000 samples per run (100%), cost 100%
    unix         89.4 +- 4.7   teacher on 60,000 samples per run (75%),  cost 81.6%
    unix_nomix   92.4 +- 2.9   teacher on 60,000 samples per run (75%),  cost 81.6%
    random       91.0 +- 4.3   teacher on 60,000 samples per run (75%),  cost 75.0%

UNIX matched KD within seed noise (paired differences -4, 0, +10, -2, +5 errors) with a quarter fewer teacher
samples. Dropping mixup or the uncertainty score did worse on the mean, but by less than the spread between seeds.
Per-seed numbers are in docs/unix.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
from mnist_common import held_out_errors, mnist_args, train_teacher, write_results
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import (
    DistillationTrainer,
    UncertaintyMixupCallback,
    count_flops,
    load_mnist10k,
)
from hf_kdsearch.data import collate_tensor_batch

RUNS = {
    "kd": None,
    "unix": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": True},
    "unix_nomix": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": False},
    "random": {"select_ratio": 0.75, "uncertainty": "random", "mixup": True},
    "unix_free": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": True, "scoring": "free"},
}


@dataclass
class UnixArguments:
    output_dir: str = field(default="out/mnist_unix", metadata={"help": "Where results.json goes."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Student seeds."})
    runs: list[str] = field(
        default_factory=lambda: ["kd", "unix", "unix_nomix", "random"], metadata={"help": f"Any of {list(RUNS)}."}
    )
    teacher_epochs: float = field(default=10, metadata={"help": "Teacher training epochs (AdamW, lr 1e-3)."})
    student_epochs: float = field(default=10, metadata={"help": "Student training epochs."})


def new_student() -> torch.nn.Module:
    return timm.create_model("mnist_mlp", hidden_dims=[64])


def main(argv: list[str] | None = None) -> dict:
    (a,) = HfArgumentParser(UnixArguments).parse_args_into_dataclasses(argv)
    unknown = set(a.runs) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
    train, held_out = load_mnist10k()
    common = {"train_dataset": train, "data_collator": collate_tensor_batch}
    started = time.time()

    teacher = train_teacher(f"{a.output_dir}/teacher", train, epochs=a.teacher_epochs, disable_tqdm=True)
    teacher_errors = held_out_errors(teacher, held_out)
    print(f"teacher 784-512-512-10: {teacher_errors} held-out errors")

    # Measured once here rather than by each callback, so the hook below counts training forwards only.
    flops = {"teacher": count_flops(teacher, (1, 28, 28)), "student": count_flops(new_student(), (1, 28, 28))}
    flops_ratio = flops["teacher"] / flops["student"]

    # Every forward the teacher runs, whoever calls it, is counted here.
    seen_by_teacher = [0]
    teacher.register_forward_hook(lambda mod, args, out: seen_by_teacher.__setitem__(0, seen_by_teacher[0] + len(out)))

    results: dict[str, list[dict]] = {run: [] for run in a.runs}
    jobs = [(seed, run) for seed in a.seeds for run in a.runs]
    for seed, run in tqdm(jobs, desc="students", unit="run"):
        set_seed(seed)  # the same initial student for every run of a seed
        student = new_student()
        sgd = {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.05}
        args = mnist_args(
            f"{a.output_dir}/{run}-{seed}", seed, a.student_epochs, temperature=4.0, alpha=0.9, disable_tqdm=True, **sgd
        )
        cb = None if RUNS[run] is None else UncertaintyMixupCallback(**RUNS[run], teacher_flops_ratio=flops_ratio)
        callbacks = [] if cb is None else [cb]
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, callbacks=callbacks, **common)
        seen_by_teacher[0] = 0
        t0 = time.time()
        trainer.train()
        row = {
            "seed": seed,
            "errors": held_out_errors(student, held_out),
            "teacher_samples_hook": seen_by_teacher[0],
            "teacher_samples": trainer.teacher_samples,
            "samples_seen": trainer.samples_seen,
            "train_seconds": round(time.time() - t0, 2),
        }
        if cb is not None:
            row["cost_ratio"] = cb.totals["cost_ratio"]
            row["teacher_forwards"] = cb.totals["teacher_forwards"]
        else:
            row["cost_ratio"] = 1.0
        if row["teacher_samples_hook"] != row["teacher_samples"]:
            raise RuntimeError(f"teacher hook counted {row['teacher_samples_hook']}, trainer {row['teacher_samples']}")
        results[run].append(row)

    minutes = (time.time() - started) / 60
    print(
        f"\nHeld-out errors on 2,000 MNIST digits, seeds {a.seeds}; teacher {teacher_errors} errors; {minutes:.1f} min"
    )
    print(f"F_t / F_s = {flops['teacher']:,} / {flops['student']:,} = {flops_ratio:.2f}")
    header = ["run", "errors per seed", "mean", "std", "teacher samples", "share", "cost"]
    print("{:<11} {:<28} {:>6} {:>5}  {:>15}  {:>6}  {:>6}".format(*header))
    for run, rows in results.items():
        errs = [r["errors"] for r in rows]
        share = np.mean([r["teacher_samples_hook"] / r["samples_seen"] for r in rows])
        print(
            f"{run:<11} {str(errs):<28} {np.mean(errs):>6.1f} {np.std(errs, ddof=1) if len(errs) > 1 else 0:>5.1f}  "
            f"{rows[0]['teacher_samples_hook']:>15,}  {share:>6.1%}  {np.mean([r['cost_ratio'] for r in rows]):>6.1%}"
        )
    summary = {
        "teacher_errors": teacher_errors,
        "flops": flops,
        "results": results,
        "seeds": a.seeds,
        "minutes": minutes,
    }
    return write_results(a.output_dir, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
