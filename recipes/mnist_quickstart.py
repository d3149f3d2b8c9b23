"""Offline quickstart: distil an MLP teacher into a small MLP student on 10,000 real MNIST digits.

    make quickstart                      # = python recipes/mnist_quickstart.py (sets up .venv first)
    python recipes/mnist_quickstart.py --seeds 0 1 2 --lr 0.02 --max_grad_norm 0

It trains, on the CPU and with progress bars:
1. a teacher, an MLP 784-512-512-10 with dropout 0.3 (AdamW, as in METHODS.md's measurement);
2. the student, an MLP 784-64-10, alone (cross-entropy) for each seed;
3. the same student distilled from the teacher (T = 4, alpha = 0.9) for each seed, with the same optimiser
   (SGD, momentum 0.9, lr 0.05, linear decay, batch 64, gradient clipping at 1.0) and the same initialisation as
   its "alone" twin.
Then it prints held-out errors (2,000 digits) and parameter counts. Measured results are in the README.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
from mnist_common import held_out_errors, mnist_args, train_teacher, write_results
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import ClassificationTrainer, DistillationTrainer, load_mnist10k
from hf_kdsearch.data import collate_tensor_batch


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="out/quickstart", metadata={"help": "Where the teacher and results go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Student seeds."})
    teacher_hidden: list[int] = field(default_factory=lambda: [512, 512], metadata={"help": "Teacher MLP widths."})
    student_hidden: list[int] = field(default_factory=lambda: [64], metadata={"help": "Student MLP widths."})
    teacher_epochs: float = field(default=10, metadata={"help": "Teacher training epochs."})
    student_epochs: float = field(default=10, metadata={"help": "Student training epochs (alone and distilled)."})
    temperature: float = field(default=4.0, metadata={"help": "KD temperature T."})
    alpha: float = field(default=0.9, metadata={"help": "KD weight; CE gets 1 - alpha."})
    lr: float = field(default=0.05, metadata={"help": "Student SGD learning rate, the same for both students."})
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "Gradient clipping for both students (the Trainer's default, 1.0; 0 = none). The README's sweep "
            "over lr and clipping found this the best setting for both the distilled and the lone student."
        },
    )


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    train, held_out = load_mnist10k()
    common = {"train_dataset": train, "data_collator": collate_tensor_batch}
    sgd = {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": q.lr}
    started = time.time()

    print(f"[1/3] teacher {q.teacher_hidden}")
    teacher = train_teacher(f"{q.output_dir}/teacher", train, q.teacher_hidden, q.teacher_epochs)
    results = {"teacher": [held_out_errors(teacher, held_out)], "alone": [], "distilled": []}

    for i, seed in enumerate(q.seeds):
        for mode in ("alone", "distilled"):
            set_seed(seed)  # the same initial student for both modes
            student = timm.create_model("mnist_mlp", hidden_dims=q.student_hidden)
            step = 2 if mode == "alone" else 3
            print(f"[{step}/3] student {q.student_hidden} {mode}, seed {seed} ({i + 1}/{len(q.seeds)})")
            args = mnist_args(
                f"{q.output_dir}/{mode}-{seed}",
                seed,
                q.student_epochs,
                temperature=q.temperature,
                alpha=q.alpha,
                max_grad_norm=q.max_grad_norm,
                **sgd,
            )
            if mode == "alone":
                trainer = ClassificationTrainer(model=student, args=args, **common)
            else:
                trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, **common)
            trainer.train()
            results[mode].append(held_out_errors(student, held_out))

    params = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    minutes = (time.time() - started) / 60
    rows = [
        ("teacher " + "-".join(map(str, [784, *q.teacher_hidden, 10])), params["teacher"], results["teacher"]),
        ("student alone " + "-".join(map(str, [784, *q.student_hidden, 10])), params["student"], results["alone"]),
        (f"student distilled (T={q.temperature:g}, alpha={q.alpha:g})", params["student"], results["distilled"]),
    ]
    print(f"\nHeld-out errors on 2,000 real MNIST digits (seeds {q.seeds}; teacher seed 0), {minutes:.1f} min")
    print(f"{'model':<42} {'params':>9}  {'errors per seed':<22} {'mean':>7}")
    for name, n, errs in rows:
        print(f"{name:<42} {n:>9,}  {str(errs):<22} {np.mean(errs):>7.1f}")
    wins = sum(d < a for d, a in zip(results["distilled"], results["alone"]))
    print(f"distillation beat training alone in {wins} of {len(q.seeds)} seeds")
    summary = {
        "results": results,
        "params": params,
        "seeds": q.seeds,
        "minutes": minutes,
    }
    return write_results(q.output_dir, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
