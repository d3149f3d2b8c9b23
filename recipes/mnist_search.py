"""Student search against a uniformly thinned teacher of the same FLOPs, on 10,000 real MNIST digits.

    OMP_NUM_THREADS=1 python recipes/mnist_search.py                  # 3 seeds, about 2.5 CPU-minutes on 1 thread
    OMP_NUM_THREADS=1 python recipes/mnist_search.py --seeds 0 1 2 3 4 --search_weights trained

Gu & Tresp (2020, https://arxiv.org/abs/2001.11612) claim that a student found as a subgraph of the teacher by L1 gate
search generalises better than a hand-designed student of the same FLOPs. This recipe checks it on the bundled digits:

1. teacher: MLP 784-512-512-10, dropout 0.3, AdamW lr 1e-3, 10 epochs; trained once (seed 0) and shared by all seeds;
2. per seed, search: `add_gates(copy.deepcopy(teacher))`, then `GateSearchCallback(target_flops_ratio=0.25)` under a
   `DistillationTrainer` (T = 4, alpha = 0.9, SGD momentum 0.9); with `--search_weights frozen` (default) only the
   gates train, so the teacher's weights cannot rescale to undo a shrinking gate and a gate's size measures how much
   its unit matters; `extract_student(gated, target_flops_ratio=0.25)` gives the searched student;
3. the baseline: the teacher thinned uniformly, both hidden layers to the largest width `h` whose FLOPs are at or under
   the same budget;
4. both students are distilled the same way (10 epochs, batch 64, SGD momentum 0.9, lr 0.05 with linear decay,
   T = 4, alpha = 0.9), in two settings (`--runs`):
   - `inherited`: each starts from the teacher's weights; the searched one as extracted (gates folded in), the
     uniform one keeping, in each layer, the `h` units with the largest incoming-weight norm (magnitude pruning);
   - `scratch`: each starts from a random initialisation (the same seed), so only the architecture differs.

It prints held-out errors (2,000 digits), FLOPs and parameters per seed with mean ± std, writes results.json, and saves
the first seed's distilled searched student with `save_student` (model card with its accuracy, the widths plot and the
search report).
Measured with `--seeds 0 1 2 3 4` (2 shared CPU cores, 1 thread, torch 2.14, transformers 5.23, timm 1.0.31; 3.8
CPU-minutes), held-out errors, mean ± std over 5 seeds; teacher 77 errors; found widths 135-422, uniform 172-172:

    inherited weights: searched 86.0 ± 2.2, uniform 83.2 ± 2.9
    from scratch:      searched 83.2 ± 3.1, uniform 83.4 ± 4.2

No advantage for the searched student on this MLP; docs/search.md has the full table and the joint-search variant.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
from mnist_common import held_out_errors, mnist_args, train_teacher, write_results
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import (
    DistillationTrainer,
    GateSearchCallback,
    add_gates,
    count_flops,
    extract_student,
    load_mnist10k,
    save_student,
)
from hf_kdsearch.data import collate_tensor_batch
from hf_kdsearch.gates import GateSelection, build_student, gate_parameter_names, gate_plan

INPUT = (1, 28, 28)


@dataclass
class SearchRecipeArguments:
    output_dir: str = field(default="out/mnist_search", metadata={"help": "Where results and the student go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Search and student seeds."})
    runs: list[str] = field(default_factory=lambda: ["inherited", "scratch"], metadata={"help": "inherited, scratch"})
    target_flops_ratio: float = field(default=0.25, metadata={"help": "FLOPs budget, fraction of the teacher's."})
    teacher_hidden: list[int] = field(default_factory=lambda: [512, 512], metadata={"help": "Teacher MLP widths."})
    teacher_epochs: float = field(default=10, metadata={"help": "Teacher epochs (AdamW, lr 1e-3)."})
    search_epochs: float = field(default=3, metadata={"help": "Search epochs."})
    search_weights: str = field(default="frozen", metadata={"help": "frozen: only gates train; trained: all."})
    search_lr: float = field(default=0.05, metadata={"help": "SGD lr of the search."})
    l1_weight: float = field(default=5.0, metadata={"help": "Initial lambda of the gate penalty."})
    l1_growth: float = field(default=1.02, metadata={"help": "Per-step lambda growth while over budget."})
    student_epochs: float = field(default=10, metadata={"help": "Distillation epochs of both students."})
    lr: float = field(default=0.05, metadata={"help": "Student SGD learning rate."})
    temperature: float = field(default=4.0, metadata={"help": "KD temperature T."})
    alpha: float = field(default=0.9, metadata={"help": "KD weight; CE gets 1 - alpha."})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def uniform_width(teacher_flops: int, budget: float, depth: int) -> int:
    """Largest h such that MLP 784-h-...-h-10 fits the FLOPs budget."""
    h = 1
    while count_flops(timm.create_model("mnist_mlp", hidden_dims=[h + 1] * depth), INPUT) <= budget * teacher_flops:
        h += 1
    return h


def magnitude_thinned(teacher: torch.nn.Module, h: int) -> torch.nn.Module:
    """The teacher with every hidden layer cut to its `h` units of largest incoming-weight norm, weights inherited."""
    probe = add_gates(copy.deepcopy(teacher))  # gates at 1: folding them changes nothing
    plan = gate_plan(probe)
    kept = {}
    for name, group in plan.groups.items():
        norms = probe.get_submodule(group.producers[0]).weight.detach().norm(dim=1)
        kept[name] = norms.topk(h).indices.sort().values
    return build_student(probe, GateSelection(kept, {}, float("nan")))


def search(teacher, q: SearchRecipeArguments, seed: int, kd: dict, common: dict):
    """Gate the teacher's copy, search under the budget, extract. Returns the callback and the extracted student."""
    set_seed(seed)
    gated = add_gates(copy.deepcopy(teacher))
    gates = gate_parameter_names(gated)
    for name, p in gated.named_parameters():
        p.requires_grad_(q.search_weights == "trained" or name in gates)
    cb = GateSearchCallback(
        target_flops_ratio=q.target_flops_ratio, l1_weight=q.l1_weight, l1_growth=q.l1_growth, input_size=INPUT
    )
    sargs = mnist_args(
        f"{q.output_dir}/search-{seed}", seed, q.search_epochs, learning_rate=q.search_lr, disable_tqdm=True, **kd
    )
    DistillationTrainer(model=gated, teacher_model=teacher, args=sargs, callbacks=[cb], **common).train()
    return cb, extract_student(gated, target_flops_ratio=q.target_flops_ratio, input_size=INPUT)


def distil(teacher, student, q: SearchRecipeArguments, name: str, seed: int, kd: dict, common: dict, held_out) -> dict:
    """Distil `student` from the teacher; its row of the results."""
    student.train()
    args = mnist_args(
        f"{q.output_dir}/{name}-{seed}", seed, q.student_epochs, learning_rate=q.lr, disable_tqdm=True, **kd
    )
    DistillationTrainer(model=student, teacher_model=teacher, args=args, **common).train()
    return {
        "seed": seed,
        "widths": student.model_args["hidden_dims"],
        "errors": held_out_errors(student, held_out),
        "flops": count_flops(student, INPUT),
        "params": n_params(student),
    }


def save_searched(student, cb, q: SearchRecipeArguments, row: dict, n_held: int, argv) -> None:
    accuracy = round(100 * (1 - row["errors"] / n_held), 2)
    folder = save_student(
        student.eval(),
        f"{q.output_dir}/searched-student-{row['seed']}",
        card=cb.card(
            teacher="mnist_mlp " + "-".join(map(str, [784, *q.teacher_hidden, 10])),
            dataset="bundled MNIST-10k (8,000 train / 2,000 held out)",
            metrics={"accuracy": accuracy, "held_out_errors": row["errors"]},
            command="OMP_NUM_THREADS=1 python recipes/mnist_search.py " + " ".join(argv or []),
            notes=f"Searched, extracted, then distilled ({row['run']} weights), seed {row['seed']}.",
        ),
        files=cb.report_files,
    )
    print(f"  saved the distilled searched student to {folder}")


def print_table(rows: list[dict], q: SearchRecipeArguments, t_flops: int, n_held: int) -> None:
    print(
        f"{'run':<10} {'student':<9} {'seed':>5}  {'widths':<9} {'errors':>12} {'accuracy %':>14} {'FLOPs':>9} "
        f"{'ratio':>6} {'params':>8}"
    )
    sd = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0
    for run in q.runs:
        for kind in ("searched", "uniform"):
            rs = [r for r in rows if r["run"] == run and r["student"] == kind]
            for r in rs:
                print(
                    f"{run:<10} {kind:<9} {r['seed']:>5}  {'-'.join(map(str, r['widths'])):<9} {r['errors']:>12} "
                    f"{100 * (1 - r['errors'] / n_held):>14.2f} {r['flops']:>9,} {r['flops'] / t_flops:>6.3f} "
                    f"{r['params']:>8,}"
                )
            errs = np.array([r["errors"] for r in rs], dtype=float)
            acc = 100 * (1 - errs / n_held)
            flops, params = np.mean([r["flops"] for r in rs]), np.mean([r["params"] for r in rs])
            print(
                f"{run:<10} {kind:<9} {'mean':>5}  {'':<9} {f'{errs.mean():.1f} ± {sd(errs):.1f}':>12} "
                f"{f'{acc.mean():.2f} ± {sd(acc):.2f}':>14} {flops:>9,.0f} {flops / t_flops:>6.3f} {params:>8,.0f}"
            )
        pairs = zip(*([r for r in rows if r["run"] == run and r["student"] == k] for k in ("searched", "uniform")))
        wins = sum(s["errors"] < u["errors"] for s, u in pairs)
        print(f"{run}: the searched student made fewer errors than the uniform one in {wins} of {len(q.seeds)} seeds")


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(SearchRecipeArguments).parse_args_into_dataclasses(argv)
    if q.search_weights not in ("frozen", "trained"):
        raise ValueError(f"--search_weights must be frozen or trained, got {q.search_weights!r}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train, held_out = load_mnist10k()
    common = {"train_dataset": train, "data_collator": collate_tensor_batch}
    kd = {"temperature": q.temperature, "alpha": q.alpha, "optim": "sgd", "optim_args": "momentum=0.9"}
    started = time.time()

    teacher = train_teacher(f"{q.output_dir}/teacher", train, q.teacher_hidden, q.teacher_epochs, disable_tqdm=True)
    t_flops, t_params, t_err = count_flops(teacher, INPUT), n_params(teacher), held_out_errors(teacher, held_out)
    h = uniform_width(t_flops, q.target_flops_ratio, len(q.teacher_hidden))
    print(f"teacher {q.teacher_hidden}: {t_err} held-out errors, {t_flops:,} FLOPs; uniform width at budget: {h}")

    rows, searches = [], []
    for i, seed in enumerate(q.seeds):
        print(f"[seed {seed}, {i + 1}/{len(q.seeds)}] search at {q.target_flops_ratio:.0%} of the teacher's FLOPs")
        cb, searched = search(teacher, q, seed, kd, common)
        widths = searched.model_args["hidden_dims"]
        before = held_out_errors(searched, held_out)
        print(f"  found {widths} (uniform {[h] * len(widths)}); extracted student: {before} errors before distilling")
        searches.append({"seed": seed, "widths": widths, "errors_before_distillation": before, **cb.report["search"]})
        for run in q.runs:
            for kind in ("searched", "uniform"):
                set_seed(seed)
                if run == "inherited":
                    student = copy.deepcopy(searched) if kind == "searched" else magnitude_thinned(teacher, h)
                else:
                    dims = widths if kind == "searched" else [h] * len(widths)
                    student = timm.create_model("mnist_mlp", hidden_dims=dims)
                row = {"seed": seed, "run": run, "student": kind}
                row.update(distil(teacher, student, q, f"{run}-{kind}", seed, kd, common, held_out))
                rows.append(row)
                print(f"  {run:<9} {kind:<8} {row['widths']}: {row['errors']} errors")
                if i == 0 and run == q.runs[0] and kind == "searched":
                    save_searched(student, cb, q, row, len(held_out), argv)

    minutes = (time.time() - started) / 60
    print(
        f"\nHeld-out errors on 2,000 real MNIST digits; teacher {t_err} errors, {t_flops:,} FLOPs, {t_params:,} "
        f"params; budget {q.target_flops_ratio:.0%}; {minutes:.1f} min"
    )
    print_table(rows, q, t_flops, len(held_out))
    summary = {
        "teacher": {"errors": t_err, "flops": t_flops, "params": t_params, "hidden_dims": q.teacher_hidden},
        "uniform_width": h,
        "searches": searches,
        "rows": rows,
        "args": vars(q),
        "minutes": minutes,
    }
    return write_results(q.output_dir, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
