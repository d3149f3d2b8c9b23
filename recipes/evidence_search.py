"""Evidence for student search on a conv net: searched vs uniformly thinned vs a shallower hand-picked student.

    python recipes/evidence_search.py            # full run: 5 paired seeds; 12 min (1,385 CPU-s) on 2 idle cores
    python recipes/evidence_search.py --quick    # smoke run of the same pipeline, well under a minute

Gu & Tresp (2020, https://arxiv.org/abs/2001.11612) claim that a student found as a subgraph of the teacher by L1 gate
search beats a hand-designed student of the same FLOPs. This script checks it on the bundled digits, from scratch
(the claim is about the architecture), under the comparison protocol of `hf_kdsearch.evidence`:

1. data: 2,000 training and 1,000 validation digits (seeded shuffle), 2,000 held-out digits scored once; every
   training digit shifted by up to 2 pixels, the same view for teacher and student;
2. teacher: `mnist_cnn` 16-16-32-32 on the 7,000 digits outside validation and test (AdamW);
3. three students at `--target_flops_ratio` (25%) of the teacher's FLOPs:
   - `searched`: `add_gates(teacher copy)`, gates trained alone (teacher weights frozen) with `GateSearchCallback`
     under a `DistillationTrainer`, then `extract_student`; only its widths are kept;
   - `uniform`: the teacher with every layer thinned by one factor, its FLOPs within 2% of the searched student's;
   - `shallow`: two convs instead of four (pool after each), widths scaled to the same FLOPs (within 2%);
4. every student is distilled from scratch with the same schedule (SGD momentum 0.9, cosine, T = 4, alpha = 0.9);
   each arm picks its learning rate on validation from the same grid (equal budget), then trains with the paired
   seeds (seed s: the same batch order and views in every arm) and is scored on the held-out digits.

It prints per-arm errors (mean ± std), each arm's paired difference against `searched` with a 95% t-interval and wins
out of N, and writes `results.json` and `paired.png` under `--output_dir`.

Measured (torch 2.14.1, transformers 5.24, 2 threads, held-out errors of 2,000 over seeds 0-4): searched 1-3-18-32
102.2 ± 8.6; uniform 8-8-15-16 75.2 ± 6.4 (better than searched on 5 of 5 seeds); shallow 17-34 137.8 ± 5.6 (worse on
5 of 5). The search starved the early layers; see docs/evidence.md.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import timm
import torch
from mnist_common import ShiftCollate, held_out_errors
from mnist_quickstart import quiet, run_args
from transformers import set_seed

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationTrainer,
    GateSearchCallback,
    TensorImageDataset,
    add_gates,
    count_flops,
    extract_student,
)
from hf_kdsearch.evidence import paired_summary, plot_paired, protocol_split, tune_arms, write_results

INPUT = (1, 28, 28)
ARMS = ("searched", "uniform", "shallow")


@dataclass
class SearchEvidenceArguments:
    output_dir: str = field(default="out/evidence_search", metadata={"help": "Where results.json and the plot go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Paired student seeds."})
    tune_seed: int = field(default=100, metadata={"help": "Seed of the search and of the tuning runs."})
    n_train: int = field(default=2000, metadata={"help": "Student training digits."})
    n_val: int = field(default=1000, metadata={"help": "Validation digits."})
    teacher_widths: list[int] = field(default_factory=lambda: [16, 16, 32, 32], metadata={"help": "Teacher convs."})
    teacher_epochs: float = field(default=8, metadata={"help": "Teacher epochs over its 7,000 digits."})
    target_flops_ratio: float = field(default=0.25, metadata={"help": "FLOPs budget, fraction of the teacher's."})
    search_epochs: float = field(default=3, metadata={"help": "Gate search epochs."})
    epochs: float = field(default=20, metadata={"help": "Distillation epochs of every student."})
    lrs: list[float] = field(default_factory=lambda: [0.05, 0.2], metadata={"help": "Learning-rate grid per arm."})
    threads: int = field(default=0, metadata={"help": "torch threads; 0: min(2, cores this process may run on)."})
    quick: bool = field(
        default=False, metadata={"help": "Smoke run: 300 + 300 digits, 2 seeds, 1 epoch (teacher and search too)."}
    )


def cnn(widths, pool_every: int = 2) -> torch.nn.Module:
    return timm.create_model("mnist_cnn", widths=[max(1, int(w)) for w in widths], pool_every=pool_every)


def match_flops(widths: list[int], pool_every: int, target: int, tol: float = 0.02) -> tuple[list[int], float]:
    """`widths` scaled by one factor in (0, 2] (steps of 0.005), then the last width nudged, to come closest to
    `target` FLOPs; also the FLOPs ratio reached."""

    def flops(ws: list[int]) -> int:
        return count_flops(cnn(ws, pool_every), INPUT)

    def scaled(f: float) -> list[int]:
        return [max(1, round(w * f)) for w in widths]

    out = scaled(min(range(1, 401), key=lambda i: abs(flops(scaled(i / 200)) - target)) / 200)
    last = min(range(max(1, out[-1] - 8), out[-1] + 9), key=lambda w: abs(flops([*out[:-1], w]) - target))
    out = [*out[:-1], last]
    ratio = flops(out) / target
    if abs(ratio - 1) > tol:
        print(f"  note: the closest match to {widths} has {ratio:.3f} x the target FLOPs (outside ±{tol:.0%})")
    return out, ratio


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    (q,) = HfArgumentParser(SearchEvidenceArguments).parse_args_into_dataclasses(argv)
    started = time.time()
    threads = q.threads or min(2, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    if q.quick:
        q.seeds, q.n_train, q.n_val, q.epochs, q.teacher_epochs, q.search_epochs = q.seeds[:2], 300, 300, 1, 1, 1
        q.lrs = q.lrs[:1]
    train, val, test, rest = protocol_split(q.n_train, q.n_val, with_rest=True)
    teacher_data = TensorImageDataset(torch.cat([train.images, rest.images]), torch.cat([train.labels, rest.labels]))

    set_seed(0)
    teacher = cnn(q.teacher_widths)
    t_args = run_args(f"{q.output_dir}/teacher", 0, q.teacher_epochs, 64, learning_rate=3e-3)
    t_args.optim, t_args.optim_args, t_args.weight_decay = "adamw_torch", None, 5e-4
    quiet(ClassificationTrainer(model=teacher, args=t_args, train_dataset=teacher_data, data_collator=ShiftCollate(0)))
    teacher.eval()
    t_flops = count_flops(teacher, INPUT)
    print(f"teacher {q.teacher_widths}: {held_out_errors(teacher, val)} validation errors, {t_flops:,} FLOPs")

    # The search: only the gates train, so a gate's size says how much its channel matters to the frozen teacher.
    set_seed(q.tune_seed)
    gated = add_gates(copy.deepcopy(teacher))
    for name, p in gated.named_parameters():
        p.requires_grad_("gate" in name)
    cb = GateSearchCallback(target_flops_ratio=q.target_flops_ratio, l1_weight=5.0, l1_growth=1.02, input_size=INPUT)
    s_args = run_args(f"{q.output_dir}/search", q.tune_seed, q.search_epochs, 64, learning_rate=0.05)
    quiet(
        DistillationTrainer(
            model=gated,
            teacher_model=teacher,
            args=s_args,
            train_dataset=train,
            data_collator=ShiftCollate(q.tune_seed),
            callbacks=[cb],
        )
    )
    found = extract_student(gated, target_flops_ratio=q.target_flops_ratio, input_size=INPUT).model_args["widths"]
    target = count_flops(cnn(found), INPUT)
    uniform, u_ratio = match_flops(q.teacher_widths, 2, target)
    shallow, s_ratio = match_flops(q.teacher_widths[1::2], 1, target)
    shapes = {"searched": (list(found), 2), "uniform": (uniform, 2), "shallow": (shallow, 1)}
    flops = {arm: count_flops(cnn(*shapes[arm]), INPUT) for arm in ARMS}
    for arm in ARMS:
        print(f"  {arm:<8} widths {shapes[arm][0]} pool_every {shapes[arm][1]}: {flops[arm] / t_flops:.1%} of FLOPs")

    def distil(arm: str, seed: int, setting: dict) -> torch.nn.Module:
        set_seed(seed)
        student = cnn(*shapes[arm])
        args = run_args(f"{q.output_dir}/{arm}-{seed}", seed, q.epochs, 64, temperature=4.0, alpha=0.9, **setting)
        quiet(
            DistillationTrainer(
                model=student, teacher_model=teacher, args=args, train_dataset=train, data_collator=ShiftCollate(seed)
            )
        )
        return student

    grid = [{"learning_rate": lr} for lr in q.lrs]
    tuned = tune_arms({arm: grid for arm in ARMS}, lambda arm, s: held_out_errors(distil(arm, q.tune_seed, s), val))
    errors = {arm: [] for arm in ARMS}
    for seed in q.seeds:
        for arm in ARMS:
            errors[arm].append(held_out_errors(distil(arm, seed, tuned[arm]["best"]), test))
        print(f"  seed {seed}: " + ", ".join(f"{arm} {errors[arm][-1]}" for arm in ARMS))

    print(f"\nHeld-out errors on {len(test)} digits at {q.target_flops_ratio:.0%} of the teacher's FLOPs, from scratch")
    versus = {}
    for arm in ARMS:
        s = paired_summary(errors["searched"], errors[arm])
        print(
            f"{arm:<9} {str(shapes[arm][0]):<18} {flops[arm] / t_flops:>6.1%}  "
            f"lr={tuned[arm]['best']['learning_rate']:g}"
            f"  {str(errors[arm]):<28} {s['method_mean']:.1f} ± {s['method_std']:.1f}"
        )
        if arm != "searched":
            versus[arm] = s
            lo, hi = s["ci"]
            print(
                f"  {arm} - searched: {s['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]; searched better in {s['losses']} of "
                f"{s['n']}, worse in {s['wins']}"
            )
    summary = {
        "arguments": asdict(q),
        "threads": threads,
        "teacher": {"widths": q.teacher_widths, "flops": t_flops, "test_errors": held_out_errors(teacher, test)},
        "search": cb.report.get("search", {}),
        "students": {
            arm: {"widths": shapes[arm][0], "pool_every": shapes[arm][1], "flops": flops[arm]} for arm in ARMS
        },
        "flops_match": {"uniform": u_ratio, "shallow": s_ratio},
        "tuning": tuned,
        "seeds": q.seeds,
        "test_errors": errors,
        "versus_searched": versus,
        "wall_clock_s": time.time() - started,
    }
    plot_paired(f"{q.output_dir}/paired.png", q.seeds, errors, title="students at equal FLOPs, distilled from scratch")
    cmd = ["python", "recipes/evidence_search.py", *(sys.argv[1:] if argv is None else argv)]
    return write_results(f"{q.output_dir}/results.json", summary, command=cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
