"""Evidence for UNIX: with the teacher run on fewer samples, does distillation reach plain KD's accuracy at less cost?

    python recipes/evidence_unix.py            # the full run (see docs/unix.md for its time and load)
    python recipes/evidence_unix.py --quick    # smoke run of the same pipeline, well under a minute

Xu, Liu & Loy (2023, https://arxiv.org/abs/2012.09413) claim that UNIX (uncertainty-based sample selection plus
rank-dependent mixup, `hf_kdsearch.UncertaintyMixupCallback`) reaches plain KD's accuracy at about 79% of its
computation. The claim is about cost, so this script compares the arms at equal measured cost as well as at the end
of equal schedules, in the quickstart's regime and with its teacher (`mnist_common`: its splits, teacher, Trainer
settings and arguments), under the protocol of `hf_kdsearch.evidence`:

1. data: 1,000 training digits shifted by up to 2 pixels (the same view for teacher and student), 1,000 validation
   digits, 2,000 held-out digits scored once per final run;
2. teacher: `mnist_cnn` 16-16-32-32, AdamW, 8 epochs on the 7,000 digits outside validation and test;
3. students: `mnist_cnn` 4-4-8-8 (and 8-8-16-16 for the `*_big` arms), batch 64, SGD momentum 0.9, cosine decay,
   `DistillationTrainer` (`alpha * T^2 * KL + (1 - alpha) * CE`), T = 4. Arms (`ARMS`):
   - `kd`: plain KD, the teacher runs on every sample;
   - `unix75` / `unix50`: `UncertaintyMixupCallback(select_ratio=0.75 / 0.5, uncertainty="entropy", mixup=True)`
     with the paper's scoring pass (a no-grad pass of the student over the whole batch);
   - `random75`: the control: a random 75% of each batch, no uncertainty, no mixup, no scoring pass;
   - `unix75free`: `unix75` with `scoring="free"` (the scoring pass only in the first epoch);
   - `kd_big` / `unix75_big`: KD and UNIX 0.75 with the larger student (paired with each other);
   - `select75` / `select50`: selection without mixup (ablations).
   UNIX mixes the labels the way it mixes the images, so with alpha < 1 its cross-entropy term is
   `(1 - m) CE(y) + m CE(y_partner)`;
4. training length and tuning, the same budget for every arm: every setting of the grid (`--lrs` x `--alphas`) is run
   on validation (seed `--tune_seed`) at every length of `--epoch_ladder`. The length is chosen by
   `hf_kdsearch.evidence.choose_epochs`: the shortest length at which doubling it no longer lowers any arm's best
   validation errors by more than max(2 errors, 5%); if no length of the ladder passes, the longest is used and the
   arms that were still improving are named. Each arm then takes its best setting at that length;
5. final runs: paired seeds per arm (`--seeds`; `--seed_limits arm:n` runs an arm on the first n only), scored once on
   the held-out digits, arm after arm in `--arms` order (a run cut short keeps complete arms in `runs.jsonl`, where
   every run is written as it finishes). Seed s gives every arm of a student size the same initial student, batch
   order and shifted views (UNIX selects and mixes inside the trainer's loss, after the collate has served the full
   batch; the collate's checksum must agree across the arms of a seed, or the run stops). With `--tune_seed` one of
   `--seeds` (e.g. 0), the tuning run of the chosen setting and length is that seed's final run: its held-out errors
   are taken at its end but kept sealed until the choice is made, and one run per arm is saved. With a one-setting
   grid that choice is only the length.

Measured per run, every `--eval_every` epochs: validation errors against the epoch, the cumulative teacher samples
(a forward hook on the teacher, checked against the trainer's counter at the end), the cumulative training CPU
seconds of the run's own process (one torch thread; other jobs on the machine do not inflate it) and the wall-clock
seconds (which they do). From these curves, per seed against the arm's baseline (`kd` or `kd_big`):
- errors at equal cost: the baseline's validation errors after as many teacher samples (and as many CPU seconds) as
  the arm spent in its whole run, against the arm's final validation errors. The baseline is read mid-schedule there,
  before its learning rate has decayed, which favours the arm;
- cost to the same accuracy: the teacher samples and CPU seconds each needs to first reach the worse of the two final
  validation errors.
Held-out errors are only ever measured at the end of a run; the equal-cost readings are on validation digits.

It prints the tables and verdicts, and writes `results.json`, `paired.png` (held-out errors per seed),
`curves.png` (validation errors per epoch, the final runs), `cpu_to_accuracy.png` and `forwards_to_accuracy.png`
(validation errors against CPU seconds and against teacher samples) under `--output_dir`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import timm
from mnist_common import (
    EpochClock,
    QuickstartArguments,
    ShiftCollate,
    equal_cost_summary,
    executor,
    final_runs,
    fmt_ci,
    held_out_errors,
    one_thread,
    plot_cost_curves,
    print_equal_cost,
    quiet,
    run_args,
    splits,
    teacher_for,
    tune_lengths,
    verdict,
)
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import DistillationTrainer, UncertaintyMixupCallback, count_flops
from hf_kdsearch.evidence import (
    LENGTH_RULE,
    mean_std,
    paired_summary,
    plot_paired,
    strict_json,
    write_results,
)

#: Per arm: the callback's settings (None: plain KD) and the student ("small": --student_widths, "big": --big_widths).
ARMS = {
    "kd": {"callback": None, "student": "small"},
    "unix75": {"callback": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": True}, "student": "small"},
    "unix50": {"callback": {"select_ratio": 0.5, "uncertainty": "entropy", "mixup": True}, "student": "small"},
    "random75": {"callback": {"select_ratio": 0.75, "uncertainty": "random", "mixup": False}, "student": "small"},
    "unix75free": {
        "callback": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": True, "scoring": "free"},
        "student": "small",
    },
    "select75": {"callback": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": False}, "student": "small"},
    "select50": {"callback": {"select_ratio": 0.5, "uncertainty": "entropy", "mixup": False}, "student": "small"},
    "kd_big": {"callback": None, "student": "big"},
    "unix75_big": {"callback": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": True}, "student": "big"},
}
#: The baseline of each student size: every other arm is compared with it, seed by seed.
BASELINES = {"small": "kd", "big": "kd_big"}
DEFAULT_ARMS = ["kd", "unix75", "unix50", "random75", "unix75free", "kd_big", "unix75_big"]


@dataclass
class UnixEvidenceArguments(QuickstartArguments):
    """The quickstart's arguments (regime, teacher, workers), with this run's arms, grid, lengths and output folder."""

    output_dir: str = field(default="out/evidence_unix", metadata={"help": "Where results.json and the plots go."})
    epochs: float = field(default=0, metadata={"help": "Not used here: the lengths come from --epoch_ladder."})
    epoch_ladder: list[float] = field(
        default_factory=lambda: [120, 240],
        metadata={
            "help": "Schedule lengths tried on validation; the rule picks the one every arm trains for (at 60 -> "
            "120 epochs the UNIX arms were still improving: docs/unix.md)."
        },
    )
    eval_every: int = field(default=4, metadata={"help": "Epochs between validation points of a curve."})
    lrs: list[float] = field(default_factory=lambda: [0.2], metadata={"help": "Learning rates to tune."})
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "KD weights to tune."})
    temperature: float = field(default=4.0, metadata={"help": "T of every run."})
    big_widths: list[int] = field(default_factory=lambda: [8, 8, 16, 16], metadata={"help": "The *_big student."})
    arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={"help": f"Arms to run, with the baseline of each student size; any of {', '.join(ARMS)}."},
    )
    teacher_state: str = field(
        default="",
        metadata={
            "help": "A teacher.pt written by an earlier run of this recipe with the same data and teacher "
            "arguments: used instead of training the teacher again (its errors are checked on validation)."
        },
    )
    seed_limits: list[str] = field(
        default_factory=list,
        metadata={"help": "arm:n runs that arm on the first n of --seeds only (e.g. kd_big:3 unix75_big:3)."},
    )

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        sizes = {ARMS[a]["student"] for a in self.arms if a in ARMS}
        missing = [BASELINES[s] for s in sorted(sizes) if BASELINES[s] not in self.arms]
        if unknown or missing or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(
                f"--arms must name distinct arms of {list(ARMS)}, with the baseline of each student size "
                f"({BASELINES}); got {self.arms}"
            )
        if self.epochs:
            raise ValueError("evidence_unix.py chooses its length by a rule: give --epoch_ladder, not --epochs")
        if not self.epoch_ladder or sorted(self.epoch_ladder) != self.epoch_ladder or min(self.epoch_ladder) <= 0:
            raise ValueError(f"--epoch_ladder must be positive lengths in rising order; got {self.epoch_ladder}")
        self.limits = {}
        for item in self.seed_limits:
            arm, _, n = item.partition(":")
            if arm not in self.arms or not n.isdigit() or int(n) < 1:
                raise ValueError(f"--seed_limits takes arm:n with an arm of --arms and n >= 1; got {item!r}")
            self.limits[arm] = int(n)
        for arm, n in self.limits.items():
            base = BASELINES[ARMS[arm]["student"]]
            if self.limits.get(base, len(self.seeds)) < n:
                raise ValueError(f"{arm} runs {n} seeds but its baseline {base} fewer: pairs need both")

    def arm_seeds(self, arm: str) -> list[int]:
        return self.seeds[: self.limits.get(arm, len(self.seeds))]


def tuning_grid(q: UnixEvidenceArguments) -> list[dict]:
    """One grid, lr x alpha at the fixed T, for every arm and length: the same budget, the method the only change."""
    return [{"learning_rate": lr, "temperature": q.temperature, "alpha": a} for lr in q.lrs for a in q.alphas]


def widths(q: UnixEvidenceArguments, arm: str) -> list[int]:
    return q.big_widths if ARMS[arm]["student"] == "big" else q.student_widths


def unix_run(q, arm: str, seed: int, setting: dict, epochs: float, score_on: str, teacher: dict, flops: dict) -> dict:
    """One student distilled in arm `arm` for `epochs` epochs, scored on `score_on` ("val" or "test"; "val+test": a
    tuning run that may also be a final run, scored on validation, its held-out errors kept sealed under `held_out`).

    Every run records its validation curve (errors, CPU and wall seconds, teacher samples; `EpochClock`). The
    teacher's samples are counted by a forward hook. A run whose training loss is not finite has `val` NaN (it
    diverged; the tuning never picks it)."""
    train, val, test, _ = splits(q)
    set_seed(seed)
    student = timm.create_model("mnist_cnn", widths=widths(q, arm))
    collate = ShiftCollate(seed, q.max_shift)
    args = run_args(f"{q.output_dir}/{arm}-{seed}", seed, epochs, q.batch_size, **setting)
    model = timm.create_model("mnist_cnn", widths=q.teacher_widths)
    model.load_state_dict(teacher["state"])
    ran_on = [0]  # every sample the teacher runs on, whoever calls it
    model.register_forward_hook(lambda module, inputs, out: ran_on.__setitem__(0, ran_on[0] + len(out)))
    spec = ARMS[arm]["callback"]
    ratio = flops["teacher"] / flops[ARMS[arm]["student"]]
    # F_t/F_s is given, so the callback runs no FLOPs count through the hooked teacher.
    unix = None if spec is None else UncertaintyMixupCallback(**spec, teacher_flops_ratio=ratio)
    clock = EpochClock(student, val, eval_every=q.eval_every, teacher_samples=lambda: ran_on[0])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=model,
        args=args,
        train_dataset=train,
        data_collator=collate,
        callbacks=[clock] if unix is None else [unix, clock],
    )
    quiet(trainer)
    if ran_on[0] != trainer.teacher_samples:
        raise RuntimeError(
            f"{arm} seed {seed}: the hook counted {ran_on[0]} teacher samples, the trainer {trainer.teacher_samples}"
        )
    loss = trainer.state.log_history[-1].get("train_loss", math.nan)
    errors = held_out_errors(student, test if score_on == "test" else val)
    sealed = {"held_out": held_out_errors(student, test)} if score_on == "val+test" else {}
    return {
        **sealed,
        "val": float(errors) if math.isfinite(loss) else math.nan,
        "errors": errors,
        "train_loss": loss,
        "digest": collate.digest,
        "params": sum(p.numel() for p in student.parameters()),
        "teacher_samples": ran_on[0],
        "samples_seen": trainer.samples_seen,
        "teacher_fraction": ran_on[0] / trainer.samples_seen,
        "cost_ratio": unix.totals["cost_ratio"] if unix else 1.0,
        "train_s": sum(clock.epoch_seconds),
        "cpu_s": sum(clock.epoch_cpu_seconds),
        "cpu_s_per_epoch": sum(clock.epoch_cpu_seconds) / len(clock.epoch_cpu_seconds),
        "curve": clock.curve,
    }


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(UnixEvidenceArguments).parse_args_into_dataclasses(argv)
    started, cpu_started = time.time(), time.process_time()
    load_at_start = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    workers = q.workers or min(2, cores)
    one_thread()  # every run uses one thread, so its numbers do not depend on the machine's core count
    if q.quick:
        q.seeds, q.teacher_epochs, q.n_train, q.n_val, q.epoch_ladder, q.eval_every = (
            q.seeds[:2],
            1,
            200,
            200,
            [1, 2],
            1,
        )
    grid = tuning_grid(q)
    train, val, test, teacher_data = splits(q)
    flops = {
        "teacher": count_flops(timm.create_model("mnist_cnn", widths=q.teacher_widths), (1, 28, 28)),
        "small": count_flops(timm.create_model("mnist_cnn", widths=q.student_widths), (1, 28, 28)),
        "big": count_flops(timm.create_model("mnist_cnn", widths=q.big_widths), (1, 28, 28)),
    }
    print(
        f"{len(train)} training, {len(val)} validation, {len(test)} held-out digits; {workers} run(s) at a time, "
        f"1 thread each ({cores} cores, load {load_at_start[0]:.1f}); F_t/F_s = {flops['teacher'] / flops['small']:.2f}"
        f" (small), {flops['teacher'] / flops['big']:.2f} (big)",
        flush=True,
    )

    def done(what: str, result: dict) -> dict:
        print(
            f"  {what}: {result['errors']} errors, {result['cpu_s']:.0f} CPU s, {result['train_s']:.0f} s "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
        return result

    os.makedirs(q.output_dir, exist_ok=True)
    progress = open(f"{q.output_dir}/runs.jsonl", "w")  # every finished run, at once: a cut-off run keeps its data

    def keep(kind: str, arm: str, seed: int, extra: dict, result: dict) -> dict:
        row = {"kind": kind, "arm": arm, "seed": seed, **extra, **{k: v for k, v in result.items() if k != "state"}}
        progress.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        progress.flush()
        return result

    with executor(workers) as pool:
        teacher = teacher_for(q, pool)
        print(
            f"teacher {q.teacher_widths} on {len(teacher_data)} digits: {teacher['val']} validation errors "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )

        # Tuning: every setting at every length, for every arm; the length rule; each arm's best setting there.
        def submit(arm, seed, setting, length, score_on):
            return pool.submit(unix_run, q, arm, seed, setting, length, score_on, teacher, flops)

        final_seeds = {arm: q.arm_seeds(arm) for arm in q.arms}
        tuning = tune_lengths(q, q.arms, grid, final_seeds, submit, done, keep)
        tuned, length_rule, epochs, chosen = (tuning[k] for k in ("tuned", "length_rule", "epochs", "chosen"))

        # Arm after arm, in --arms order: a run cut short keeps complete, paired arms (its runs.jsonl).
        runs = final_runs(q, tuning, grid, final_seeds, submit, done, keep)
    progress.close()
    seconds = time.time() - started
    load_at_end = os.getloadavg()
    for arm in q.arms:
        base = BASELINES[ARMS[arm]["student"]]
        for seed, r, b in zip(q.arm_seeds(arm), runs[arm], runs[base]):
            if r["digest"] != b["digest"]:
                raise RuntimeError(f"seed {seed}: {arm} and {base} saw different batches; the comparison is not paired")
    test_errors = {arm: [r["errors"] for r in rs] for arm, rs in runs.items()}

    # ---- summary -----------------------------------------------------------------------------------------------
    per_arm, paired, at_cost, verdicts = {}, {}, {}, {}
    for arm, rows in runs.items():
        mean, std = mean_std(test_errors[arm])
        per_arm[arm] = {
            "seeds": q.arm_seeds(arm),
            "mean": mean,
            "std": std,
            "teacher_fraction": float(np.mean([r["teacher_fraction"] for r in rows])),
            "cost_ratio": float(np.mean([r["cost_ratio"] for r in rows])),
            "teacher_samples": float(np.mean([r["teacher_samples"] for r in rows])),
            "cpu_s": float(np.mean([r["cpu_s"] for r in rows])),
            "cpu_s_per_epoch": float(np.mean([r["cpu_s_per_epoch"] for r in rows])),
            "train_s": float(np.mean([r["train_s"] for r in rows])),
            "final_val_errors_mean": float(np.mean([r["curve"]["val_errors"][-1] for r in rows])),
        }
        base = BASELINES[ARMS[arm]["student"]]
        if arm == base:
            continue
        n = len(rows)
        paired[arm] = paired_summary(test_errors[base][:n], test_errors[arm])
        at_cost[arm] = {
            "baseline": base,
            **equal_cost_summary(runs[base][:n], rows),
            "cpu_s_ratio": per_arm[arm]["cpu_s"] / per_arm[base]["cpu_s"],
            "teacher_samples_ratio": per_arm[arm]["teacher_samples"] / per_arm[base]["teacher_samples"],
        }
        share = (
            f"teacher on {per_arm[arm]['teacher_fraction']:.0%} of the samples, "
            f"{at_cost[arm]['cpu_s_ratio']:.2f}x its CPU s"
        )
        verdicts[arm] = verdict(f"{arm} vs {base}, held-out errors after equal epochs", paired[arm], share)

    def fmt(setting: dict) -> str:
        return ", ".join(f"{ {'learning_rate': 'lr', 'temperature': 'T'}.get(k, k) }={v:g}" for k, v in setting.items())

    print(
        f"\nHeld-out errors on {len(test)} real MNIST digits after {epochs:g} epochs (students trained on {len(train)} "
        f"digits, the teacher on {len(teacher_data)}: {teacher['test']} errors)"
    )
    print(
        "{:<11} {:<22} {:<26} {:>13} {:>8} {:>6} {:>9} {:>6}".format(
            "arm", "chosen on validation", "errors per seed", "mean ± std", "teacher", "est.", "CPU s/ep", "CPU s"
        )
    )
    for arm in q.arms:
        a = per_arm[arm]
        mean_pm = f"{a['mean']:.1f} ± {a['std']:.1f}"
        print(
            f"{arm:<11} {fmt(chosen[arm]):<22} {str(test_errors[arm]):<26} {mean_pm:>13} "
            f"{a['teacher_fraction']:>8.1%} {a['cost_ratio']:>6.1%} {a['cpu_s_per_epoch']:>9.2f} {a['cpu_s']:>6.0f}"
        )
    print("\nPaired against the baseline (negative: fewer errors than the baseline):")
    for arm, stats in paired.items():
        c = at_cost[arm]
        print(f"{arm} - {c['baseline']}, held-out, equal epochs: {fmt_ci(stats)}")
        print_equal_cost(c)
    for v in verdicts.values():
        print(f"verdict: {v}")
    print(
        f"wall-clock {seconds:.0f} s, {workers} run(s) at a time, load {load_at_start[0]:.1f} at the start and "
        f"{load_at_end[0]:.1f} at the end (the seconds are not part of the reproducible numbers; the CPU seconds "
        "are each run's own)"
    )

    summary = {
        "arguments": {**asdict(q), "limits": q.limits},
        "threads": 1,
        "workers": workers,
        "cores": cores,
        "load_average_at_start": list(load_at_start),
        "load_average_at_end": list(load_at_end),
        "splits": {
            "train": len(train),
            "validation": len(val),
            "test": len(test),
            "teacher": len(teacher_data),
            "split_seed": 0,
        },
        "teacher": {
            "widths": q.teacher_widths,
            "params": teacher["params"],
            "val_errors": teacher["val"],
            "test_errors": teacher["test"],
        },
        "students": {
            size: {
                "widths": w,
                "params": next((r[0]["params"] for a, r in runs.items() if ARMS[a]["student"] == size), None),
            }
            for size, w in (("small", q.student_widths), ("big", q.big_widths))
        },
        "flops": flops,
        "arms": {arm: ARMS[arm] for arm in q.arms},
        "grid": grid,
        "length_rule": {**length_rule, "epochs_used": epochs, "stated": LENGTH_RULE},
        "tuning": {str(length): t for length, t in tuned.items()},
        "chosen": chosen,
        "epochs": epochs,
        "test_errors": test_errors,
        "runs": runs,
        "per_arm": per_arm,
        "paired": paired,
        "equal_cost": at_cost,
        "verdicts": verdicts,
        "wall_clock_s": seconds,
        "cpu_s_main_process": time.process_time() - cpu_started,
    }
    os.makedirs(q.output_dir, exist_ok=True)
    plot_paired(
        f"{q.output_dir}/paired.png",
        q.seeds,
        {arm: test_errors[arm] for arm in q.arms if len(test_errors[arm]) == len(q.seeds)},
        title=f"held-out errors after {epochs:g} epochs, {len(train)} training digits",
    )
    head = f"{len(train)} training digits, final runs, {epochs:g} epochs; 1 thread per run"
    plot_cost_curves(
        q.output_dir,
        runs,
        head,
        cpu_label="training CPU seconds of the run's process (evaluation excluded)",
        forwards_label="samples the teacher ran on (forward hook)",
    )
    return write_results(
        f"{q.output_dir}/results.json",
        summary,
        command=["python", *sys.argv] if argv is None else ["python", "recipes/evidence_unix.py", *argv],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
