"""Offline quickstart: does distillation beat training alone? A fair comparison on real MNIST digits, on the CPU.

    make quickstart                               # = python recipes/mnist_quickstart.py (sets up .venv first)
    python recipes/mnist_quickstart.py --quick    # a smoke run of the same pipeline, in seconds

Designed for at most 5 minutes on 2 idle CPU cores. Every training run uses one torch thread, so the printed errors do
not depend on the core count or on `--workers` (default: `min(2, cores it may run on)`; runs go side by side, each in
its own process, which changes the wall-clock and nothing else). They do depend on the library versions, the torch
build and the CPU, which `results.json` records: other digits on another machine, the same verdict.

The regime is the one where distillation is known to help: few labelled digits, a patient schedule, the same
augmented view for teacher and student, and a small conv student the conv teacher can teach.
1. Data: 1,000 training digits and 1,000 validation digits drawn (seeded shuffle) from the bundled set's training part;
   its 2,000 held-out digits are scored once, at the end. Training digits are shifted by up to 2 pixels.
2. Teacher: `mnist_cnn` 16-16-32-32 (AdamW, 8 epochs) trained on the 7,000 digits outside validation and test: a
   teacher that has seen more data than the student's labelled 1,000.
3. Student: `mnist_cnn` 4-4-8-8, trained alone (`ClassificationTrainer`, cross-entropy) and distilled
   (`DistillationTrainer`, alpha * T^2 * KL + (1 - alpha) * CE), both with SGD, momentum 0.9, cosine decay.
4. Tuning (30 student epochs throughout): each arm gets the same budget, one run per setting of its grid on
   validation; the best setting per arm is kept. Then each arm trains with 5 paired seeds (seed s: the same
   initial student, the same batch order and the same shifted views in both arms) and is scored on the held-out
   digits.
5. Length: 30 epochs is what fits the 5 minutes, and it is not a converged schedule for either arm (docs/evidence.md
   has the measurement): both arms make fewer errors with longer schedules. The trade is absolute accuracy for time;
   the comparison stays fair (the same length and tuning budget for both arms). `--check_length` trains each arm's
   chosen setting for twice the epochs on validation and prints whether the length passes the protocol's rule
   (`hf_kdsearch.evidence.length_converged`).

It prints a table, the paired difference with a 95% t-interval, the sign test and wins out of N, and writes
`results.json` (with every final run's validation curve) and `paired.png` (one line per seed, alone against
distilled) under `--output_dir`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import timm
from mnist_common import (
    EpochClock,
    QuickstartArguments,
    ShiftCollate,
    executor,
    held_out_errors,
    one_thread,
    quiet,
    run_args,
    splits,
    teacher_run,
)
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import ClassificationTrainer, DistillationTrainer
from hf_kdsearch.evidence import LENGTH_RULE, length_converged, paired_summary, plot_paired, tune_arms, write_results

# One list per arm, of the same length: the tuning budget is one validation run per setting, equal for both arms.
GRIDS = {
    "alone": [{"learning_rate": lr} for lr in (0.1, 0.2, 0.4, 0.8)],
    "distilled": [{"learning_rate": lr, "temperature": 4.0, "alpha": a} for lr in (0.2, 0.4) for a in (0.5, 0.9)],
}


@dataclass
class QuickstartRunArguments(QuickstartArguments):
    check_length: bool = field(
        default=False,
        metadata={
            "help": "Also train each arm's chosen setting for twice the epochs on validation and say whether the "
            "length is converged (the rule of hf_kdsearch.evidence.length_converged); two more runs."
        },
    )


def student_run(
    q: QuickstartArguments,
    arm: str,
    seed: int,
    setting: dict,
    score_on: str,
    teacher: dict | None,
    epochs: float | None = None,
):
    """One student trained alone or distilled on the training digits for `epochs` (default `q.epochs`), scored on
    `score_on` ("val" or "test"), with its validation curve (every `q.eval_every` epochs; it leaves the run as it is).

    Seed `seed` fixes the initial weights, the batch order and the shifted views: the same in both arms."""
    train, val, test, _ = splits(q)
    set_seed(seed)
    student = timm.create_model("mnist_cnn", widths=q.student_widths)
    collate = ShiftCollate(seed, q.max_shift)
    args = run_args(f"{q.output_dir}/{arm}-{seed}", seed, epochs or q.epochs, q.batch_size, **setting)
    clock = EpochClock(student, val, eval_every=q.eval_every)
    common = dict(model=student, args=args, train_dataset=train, data_collator=collate, callbacks=[clock])
    if arm == "alone":
        quiet(ClassificationTrainer(**common))
    else:
        model = timm.create_model("mnist_cnn", widths=q.teacher_widths)
        model.load_state_dict(teacher["state"])
        quiet(DistillationTrainer(teacher_model=model, **common))
    errors = held_out_errors(student, val if score_on == "val" else test)
    curve = {"epoch": clock.curve["epoch"], "val_errors": clock.curve["val_errors"]}
    return {
        "errors": errors,
        "digest": collate.digest,
        "params": sum(p.numel() for p in student.parameters()),
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(QuickstartRunArguments).parse_args_into_dataclasses(argv)
    started, cpu_started = time.time(), time.process_time()
    cores = len(os.sched_getaffinity(0))
    workers = q.workers or min(2, cores)
    one_thread()  # every run uses one thread, so its numbers do not depend on the machine's core count
    grids = GRIDS
    if q.quick:
        q.seeds, q.epochs, q.teacher_epochs, q.n_train, q.n_val, q.eval_every = q.seeds[:2], 1, 1, 200, 200, 1
        grids = {arm: g[:2] for arm, g in GRIDS.items()}
    train, val, test, teacher_data = splits(q)
    print(
        f"{len(train)} training, {len(val)} validation, {len(test)} held-out digits; {workers} run(s) at a time, "
        f"1 thread each ({cores} cores)",
        flush=True,
    )

    def done(what: str, result: dict) -> dict:
        print(f"  {what}: {result['errors']} errors ({time.time() - started:.0f} s)", flush=True)
        return result

    with executor(workers) as pool:
        # The teacher and the alone arm's tuning need nothing from each other: they run side by side.
        teacher_future = pool.submit(teacher_run, q)
        tune = {"alone": [pool.submit(student_run, q, "alone", q.tune_seed, s, "val", None) for s in grids["alone"]]}
        teacher = teacher_future.result()
        print(
            f"teacher {q.teacher_widths} on {len(teacher_data)} digits: {teacher['val']} validation errors "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
        tune["distilled"] = [
            pool.submit(student_run, q, "distilled", q.tune_seed, s, "val", teacher) for s in grids["distilled"]
        ]

        # 2. Tuning on validation: the same number of runs per arm.
        def tuned_errors(arm: str, setting: dict) -> int:
            return done(f"tune {arm:<9} {setting}", tune[arm][grids[arm].index(setting)].result())["errors"]

        tuned = tune_arms(grids, tuned_errors)

        # 3. Paired seeds, each arm at its best setting, scored once on the held-out digits.
        finals = {
            arm: [pool.submit(student_run, q, arm, seed, tuned[arm]["best"], "test", teacher) for seed in q.seeds]
            for arm in ("alone", "distilled")
        }
        # 4. Optionally, the length check: each arm's chosen setting for twice the epochs, on validation.
        longer = {
            arm: pool.submit(student_run, q, arm, q.tune_seed, tuned[arm]["best"], "val", teacher, 2 * q.epochs)
            for arm in ("alone", "distilled")
            if q.check_length
        }
        runs = {
            arm: [done(f"seed {seed} {arm}", f.result()) for seed, f in zip(q.seeds, fs)] for arm, fs in finals.items()
        }
        length = {
            arm: length_converged(tuned[arm]["best_val"], done(f"{2 * q.epochs:g} epochs {arm}", f.result())["errors"])
            for arm, f in longer.items()
        }
    for seed, a, d in zip(q.seeds, runs["alone"], runs["distilled"]):
        if a["digest"] != d["digest"]:
            raise RuntimeError(f"seed {seed}: the two arms saw different batches; the comparison is not paired")
    test_errors = {arm: [r["errors"] for r in rs] for arm, rs in runs.items()}
    teacher_test = teacher["test"]

    stats = paired_summary(test_errors["alone"], test_errors["distilled"])
    n_params = {"teacher": teacher["params"], "student": runs["alone"][0]["params"]}
    seconds = time.time() - started

    def fmt(setting: dict) -> str:
        return ", ".join(f"{ {'learning_rate': 'lr', 'temperature': 'T'}.get(k, k) }={v:g}" for k, v in setting.items())

    print(
        f"\nHeld-out errors on {len(test)} real MNIST digits (students trained on {len(train)}, the teacher on "
        f"{len(teacher_data)}; seeds {q.seeds})"
    )
    print(f"{'model':<34} {'params':>7}  {'chosen on validation':<28} {'errors per seed':<26} {'mean ± std':>12}")
    print(
        f"{'teacher mnist_cnn ' + '-'.join(map(str, q.teacher_widths)):<34} {n_params['teacher']:>7,}  "
        f"{'(fixed: AdamW lr=0.003)':<28} {str([teacher_test]):<26} {teacher_test:>12.1f}"
    )
    for arm, mean, std in (
        ("alone", stats["baseline_mean"], stats["baseline_std"]),
        ("distilled", stats["method_mean"], stats["method_std"]),
    ):
        name = f"student {'-'.join(map(str, q.student_widths))} {arm}"
        print(
            f"{name:<34} {n_params['student']:>7,}  {fmt(tuned[arm]['best']):<28} "
            f"{str(test_errors[arm]):<26} {f'{mean:.1f} ± {std:.1f}':>12}"
        )
    lo, hi = stats["ci"] or (-math.inf, math.inf)  # one seed: no interval
    interval = f"95% CI [{lo:+.1f}, {hi:+.1f}]" if stats["ci"] else "no interval with one seed"
    print(
        f"distilled - alone: {stats['diff']:+.1f} errors, {interval}; "
        f"distillation won {stats['wins']} of {stats['n']} seeds ({stats['ties']} ties), "
        f"sign test p = {stats['p_sign']:.3f}"
    )
    if hi < 0:
        verdict = "distillation beat training alone (the interval excludes zero)"
    elif lo > 0:
        verdict = "distillation LOST to training alone (the interval excludes zero)"
    else:
        verdict = "no clear difference: the interval includes zero" if stats["ci"] else "one seed: no verdict"
    print(f"verdict: {verdict}")
    rule = (
        f"doubling it lowers validation errors by at most max({LENGTH_RULE['abs_tol']:g}, {LENGTH_RULE['rel_tol']:.0%})"
    )
    if length:
        states = [
            f"{arm} {'converged' if r['converged'] else 'NOT converged'} ({r['short']:g} -> {r['long']:g})"
            for arm, r in length.items()
        ]
        print(f"length: {q.epochs:g} epochs; converged when {rule}: " + "; ".join(states))
    else:
        print(f"length: {q.epochs:g} epochs, not checked (--check_length: converged when {rule})")
    print(f"wall-clock {seconds:.0f} s, {workers} run(s) at a time (not part of the reproducible numbers)")

    summary = {
        "arguments": asdict(q),
        "threads": 1,
        "workers": workers,
        "cores": cores,
        "splits": {
            "train": len(train),
            "validation": len(val),
            "test": len(test),
            "teacher": len(teacher_data),
            "split_seed": 0,
        },
        "teacher": {
            "widths": q.teacher_widths,
            "params": n_params["teacher"],
            "val_errors": teacher["val"],
            "test_errors": teacher_test,
        },
        "student": {"widths": q.student_widths, "params": n_params["student"]},
        "tuning": tuned,
        "seeds": q.seeds,
        "test_errors": test_errors,
        "validation_curves": {arm: [r["curve"] for r in rs] for arm, rs in runs.items()},
        "length_check": {"rule": LENGTH_RULE, "epochs": q.epochs, "long_epochs": 2 * q.epochs, **length}
        if length
        else None,
        "paired": stats,
        "verdict": verdict,
        "wall_clock_s": seconds,
        "cpu_s_main_process": time.process_time() - cpu_started,
    }
    os.makedirs(q.output_dir, exist_ok=True)
    plot_paired(
        f"{q.output_dir}/paired.png",
        q.seeds,
        test_errors,
        title=f"student {'-'.join(map(str, q.student_widths))}, {len(train)} digits\n"
        f"distilled - alone = {stats['diff']:+.1f} ({interval})",
    )
    return write_results(
        f"{q.output_dir}/results.json",
        summary,
        command=["python", *sys.argv] if argv is None else ["python", "recipes/mnist_quickstart.py", *argv],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
