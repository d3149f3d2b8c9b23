"""Evidence for UNIX: does distillation with the teacher run on fewer samples reach plain KD's accuracy, and sooner?

    python recipes/evidence_unix.py            # full run: 5 paired seeds, 3 arms; 5 min on 2 idle cores
    python recipes/evidence_unix.py --quick    # smoke run of the same pipeline, well under a minute

Xu, Liu & Loy (2023, https://arxiv.org/abs/2012.09413) claim that UNIX (uncertainty-based sample selection plus
rank-dependent mixup, `hf_kdsearch.UncertaintyMixupCallback`) matches plain KD while the teacher runs on a share of
the samples only. This script checks it at select ratios 0.75 (the paper's) and 0.5, in the regime and with the
teacher of `recipes/mnist_quickstart.py` (its `splits`, `teacher_run`, `run_args` and arguments are imported, so the
data, the teacher and the schedule are exactly the quickstart's), under the protocol of `hf_kdsearch.evidence`:

1. data: 1,000 training digits shifted by up to 2 pixels (the same view for teacher and student), 1,000 validation
   digits, 2,000 held-out digits scored once;
2. teacher: `mnist_cnn` 16-16-32-32, AdamW, 8 epochs on the 7,000 digits outside validation and test;
3. student: `mnist_cnn` 4-4-8-8, 30 epochs, batch 64, SGD momentum 0.9, cosine decay, `DistillationTrainer`
   (`alpha * T^2 * KL + (1 - alpha) * CE`), in three arms:
   - `kd`: plain KD, the teacher runs on every sample (built exactly as the quickstart's `distilled` student);
   - `unix75`: `UncertaintyMixupCallback(select_ratio=0.75, uncertainty="entropy", mixup=True)`, the paper's setting;
   - `unix50`: the same at `select_ratio=0.5`.
   Ablation arms, run with `--arms kd select75 select50`: the same selection without mixup (`mixup=False`).
   Both UNIX arms use the callback's default scoring, `scoring="pass"` (the paper's: a no-grad pass of the student on
   the whole batch, in eval mode), so the cost estimate counts that pass. UNIX mixes the labels the way it mixes the
   images, so with alpha < 1 its cross-entropy term is `(1 - m) CE(y) + m CE(y_partner)`; alpha weighs KD against
   that term exactly as it weighs KD against plain CE in `kd`;
4. tuning, the same budget per arm: 9 validation runs (seed 100) over one grid for every arm, lr in {0.1, 0.2, 0.4}
   x alpha in {0.5, 0.9, 1.0}, T = 4 (`--lrs`, `--alphas`, `--temperature`). The grid holds the quickstart's
   distilled grid (lr {0.2, 0.4} x alpha {0.5, 0.9}), widened after probes on validation: to alpha = 1 (no CE term:
   the paper's setting, and unix75's best there) and to lr 0.1 (the UNIX arms' validation errors swung widely with
   lr, unix50's from 152 to 363 across the settings tried). The same grid for every arm leaves the method as the
   only difference;
5. final runs: 5 paired seeds (0-4) per arm at its chosen setting, scored once on the held-out digits. Seed s gives
   every arm the same initial student, batch order and shifted views: UNIX selects and mixes inside the trainer's
   loss, after the collate has served the full batch, so the collate's checksum (`ShiftCollate.digest`) must agree
   across the arms of a seed, and the run stops if it does not. The two UNIX arms of a seed also draw the same mixup
   coefficients and partners (the callback seeds its draws from the run's seed and step).

Measured per final run: held-out errors; training seconds (own timer, evaluation excluded) and seconds per epoch;
the samples the teacher actually ran on (a forward hook on the teacher, checked against the trainer's counter) and
the callback's FLOPs cost estimate `k/N + 1/(F_t/F_s + 2)` relative to plain KD; after every epoch, the validation
errors against cumulative training seconds (the time-to-accuracy curve; the held-out digits are scored once).
Every run has one torch thread; `--workers` runs go side by side (default `min(2, cores)`), and the final runs are
submitted seed by seed, arm after arm, so every arm trains under the same load. The errors do not depend on the
worker count; the seconds do, and are comparable between arms of one run only.

It prints a table (errors per seed, mean ± std, chosen setting, teacher samples %, estimated cost %, seconds per epoch
and their ratio to kd, time to reach kd's final validation errors), the paired difference of each UNIX arm against
kd with a 95% t-interval, sign test and wins, a verdict per arm, and writes `results.json`, `paired.png` (held-out
errors per seed) and `time_to_accuracy.png` (validation errors against training seconds) under `--output_dir`.

Measured (torch 2.14.1, transformers 5.25.0, idle 2-core machine, 303 s), held-out errors of 2,000 over seeds 0-4:
kd 148.8 ± 11.1; unix75 319.6 ± 76.0 (teacher on 75% of the samples, 0.97 of kd's seconds per epoch); unix50
365.8 ± 109.6 (50%, 0.76). UNIX lost on every seed. `--arms kd select75 select50` (no mixup): 217.2 ± 54.9 and
386.4 ± 42.4, also worse on every seed. docs/unix.md has the tables and the plots.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import timm
from mnist_common import ShiftCollate, held_out_errors
from mnist_quickstart import QuickstartArguments, _one_thread, executor, quiet, run_args, splits, teacher_run
from transformers import HfArgumentParser, TrainerCallback, set_seed

from hf_kdsearch import DistillationTrainer, UncertaintyMixupCallback, count_flops
from hf_kdsearch.evidence import mean_std, paired_summary, plot_paired, pyplot, save_figure, tune_arms, write_results

#: The callback's settings per arm; None is plain KD.
ARMS = {
    "kd": None,
    "unix75": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": True},
    "unix50": {"select_ratio": 0.5, "uncertainty": "entropy", "mixup": True},
    # Ablations (`--arms kd unix50 select50 ...`): the same selection without mixup.
    "select75": {"select_ratio": 0.75, "uncertainty": "entropy", "mixup": False},
    "select50": {"select_ratio": 0.5, "uncertainty": "entropy", "mixup": False},
}
DEFAULT_ARMS = ["kd", "unix75", "unix50"]


@dataclass
class UnixEvidenceArguments(QuickstartArguments):
    """The quickstart's arguments (regime, teacher, schedule, workers), with this run's output folder and grid."""

    output_dir: str = field(
        default="out/evidence_unix",
        metadata={"help": "Where results.json, paired.png and time_to_accuracy.png go."},
    )
    lrs: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4], metadata={"help": "Learning rates to tune."})
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.9, 1.0], metadata={"help": "KD weights to tune."})
    temperature: float = field(default=4.0, metadata={"help": "T of every run."})
    arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={"help": f"Arms to run, kd first; any of {', '.join(ARMS)} (select*: selection without mixup)."},
    )

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or self.arms[0] != "kd" or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"--arms must start with kd and name distinct arms of {list(ARMS)}; got {self.arms}")


class EpochClock(TrainerCallback):
    """Training seconds, without its own evaluations, and the validation errors after every epoch.

    The clock starts at `on_train_begin` and stops at each `on_epoch_end`; the evaluation (`held_out_errors` on
    `val`, eval mode, no gradients and no random draws, so the run trains exactly as without it) happens while it is
    stopped. `curve` holds three lists with one entry per epoch: the epoch, the cumulative training seconds and the
    validation errors.
    """

    def __init__(self, model, val=None):
        self.model, self.val = model, val
        self.epoch_seconds: list[float] = []
        self.curve: dict[str, list] = {"epoch": [], "seconds": [], "val_errors": []}

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_seconds.append(time.perf_counter() - self._since)
        if self.val is not None:
            training = self.model.training
            errors = held_out_errors(self.model, self.val)
            self.model.train(training)
            self.curve["epoch"].append(float(state.epoch))
            self.curve["seconds"].append(sum(self.epoch_seconds))
            self.curve["val_errors"].append(errors)
        self._since = time.perf_counter()


def tuning_grids(q: UnixEvidenceArguments) -> dict[str, list[dict]]:
    """One grid, lr x alpha at the fixed T, for every arm: the same tuning budget, the method the only difference."""
    grid = [{"learning_rate": lr, "temperature": q.temperature, "alpha": a} for lr in q.lrs for a in q.alphas]
    return {arm: grid[:2] if q.quick else grid for arm in q.arms}


def time_to_reach(seconds: list[float], errors: list[int], target: float) -> float | None:
    """The first cumulative training time at which the errors are at most `target`; None if they never are."""
    return next((s for s, e in zip(seconds, errors) if e <= target), None)


def unix_run(q, arm: str, seed: int, setting: dict, score_on: str, teacher: dict, flops_ratio: float) -> dict:
    """One student distilled in arm `arm` ("kd", "unix75", "unix50"), scored on `score_on` ("val" or "test").

    Built as the quickstart's distilled student (the same seeding, collate and Trainer settings); a final run
    (`score_on="test"`) also records the validation curve. The teacher's samples are counted by a forward hook."""
    train, val, test, _ = splits(q)
    set_seed(seed)
    student = timm.create_model("mnist_cnn", widths=q.student_widths)
    collate = ShiftCollate(seed, q.max_shift)
    args = run_args(f"{q.output_dir}/{arm}-{seed}", seed, q.epochs, q.batch_size, **setting)
    model = timm.create_model("mnist_cnn", widths=q.teacher_widths)
    model.load_state_dict(teacher["state"])
    ran_on = [0]  # every sample the teacher runs on, whoever calls it
    model.register_forward_hook(lambda module, inputs, out: ran_on.__setitem__(0, ran_on[0] + len(out)))
    # F_t/F_s is given, so the callback runs no FLOPs count through the hooked teacher.
    unix = None if ARMS[arm] is None else UncertaintyMixupCallback(**ARMS[arm], teacher_flops_ratio=flops_ratio)
    clock = EpochClock(student, val if score_on == "test" else None)
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
    train_s = sum(clock.epoch_seconds)
    return {
        "errors": held_out_errors(student, val if score_on == "val" else test),
        "digest": collate.digest,
        "params": sum(p.numel() for p in student.parameters()),
        "teacher_samples": ran_on[0],
        "samples_seen": trainer.samples_seen,
        "teacher_fraction": ran_on[0] / trainer.samples_seen,
        "teacher_forwards": unix.totals["teacher_forwards"] if unix else None,
        "cost_ratio": unix.totals["cost_ratio"] if unix else 1.0,
        "train_s": train_s,
        "s_per_epoch": train_s / len(clock.epoch_seconds),
        "epoch_seconds": clock.epoch_seconds,
        "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),  # the Trainer's, evaluation included
        "curve": clock.curve if clock.val is not None else None,
    }


def plot_time_to_accuracy(path: str, runs: dict[str, list[dict]], *, title: str = "") -> None:
    """Validation errors against cumulative training seconds: a thin line per seed, a thick one for the seeds' mean."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (arm, rows) in enumerate(runs.items()):
        colour = f"C{i}"
        for r in rows:
            ax.plot(r["curve"]["seconds"], r["curve"]["val_errors"], color=colour, lw=0.7, alpha=0.35)
        seconds = np.mean([r["curve"]["seconds"] for r in rows], axis=0)
        errors = np.mean([r["curve"]["val_errors"] for r in rows], axis=0)
        ax.plot(seconds, errors, "o-", color=colour, lw=2, ms=2.5, label=f"{arm} (mean of {len(rows)} seeds)")
    if "kd" in runs:
        target = np.mean([r["curve"]["val_errors"][-1] for r in runs["kd"]])
        ax.axhline(target, color="0.4", ls="--", lw=0.8, label=f"kd's final validation errors ({target:.0f})")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="both", labelsize=8)
    ax.set_xlabel("training seconds (1 thread, evaluation excluded)")
    ax.set_ylabel("validation errors")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(UnixEvidenceArguments).parse_args_into_dataclasses(argv)
    started, cpu_started = time.time(), time.process_time()
    load_at_start = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    workers = q.workers or min(2, cores)
    _one_thread()  # every run uses one thread, so its numbers do not depend on the machine's core count
    if q.quick:
        q.seeds, q.epochs, q.teacher_epochs, q.n_train, q.n_val = q.seeds[:2], 1, 1, 200, 200
    grids = tuning_grids(q)
    train, val, test, teacher_data = splits(q)
    flops = {
        "teacher": count_flops(timm.create_model("mnist_cnn", widths=q.teacher_widths), (1, 28, 28)),
        "student": count_flops(timm.create_model("mnist_cnn", widths=q.student_widths), (1, 28, 28)),
    }
    flops_ratio = flops["teacher"] / flops["student"]
    print(
        f"{len(train)} training, {len(val)} validation, {len(test)} held-out digits; {workers} run(s) at a time, "
        f"1 thread each ({cores} cores, load {load_at_start[0]:.1f}); F_t/F_s = {flops_ratio:.2f}",
        flush=True,
    )

    def done(what: str, result: dict) -> dict:
        print(
            f"  {what}: {result['errors']} errors, {result['s_per_epoch']:.2f} s/epoch ({time.time() - started:.0f} s)",
            flush=True,
        )
        return result

    with executor(workers) as pool:
        teacher = pool.submit(teacher_run, q).result()
        print(
            f"teacher {q.teacher_widths} on {len(teacher_data)} digits: {teacher['val']} validation errors "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
        tune = {
            arm: [pool.submit(unix_run, q, arm, q.tune_seed, s, "val", teacher, flops_ratio) for s in grids[arm]]
            for arm in q.arms
        }
        tune_rows: dict[str, list[dict]] = {arm: [] for arm in q.arms}

        def tuned_errors(arm: str, setting: dict) -> int:
            row = done(f"tune {arm:<6} {setting}", tune[arm][grids[arm].index(setting)].result())
            tune_rows[arm].append(row)
            return row["errors"]

        tuned = tune_arms(grids, tuned_errors)

        # Seed by seed, arm after arm: every arm's runs share the workers with the same mix of other runs.
        finals = {
            (seed, arm): pool.submit(unix_run, q, arm, seed, tuned[arm]["best"], "test", teacher, flops_ratio)
            for seed in q.seeds
            for arm in q.arms
        }
        runs = {arm: [done(f"seed {seed} {arm}", finals[seed, arm].result()) for seed in q.seeds] for arm in q.arms}
    for i, seed in enumerate(q.seeds):
        digests = {arm: runs[arm][i]["digest"] for arm in q.arms}
        if len(set(digests.values())) != 1:
            raise RuntimeError(f"seed {seed}: the arms saw different batches ({digests}); the comparison is not paired")
    test_errors = {arm: [r["errors"] for r in rs] for arm, rs in runs.items()}
    seconds = time.time() - started

    # ---- summary -----------------------------------------------------------------------------------------------
    kd_s_per_epoch = float(np.mean([r["s_per_epoch"] for r in runs["kd"]]))
    per_arm = {}
    for arm, rows in runs.items():
        mean, std = mean_std(test_errors[arm])
        # Time to accuracy: when the arm's validation errors first reach kd's final validation errors, same seed.
        reach = [
            time_to_reach(r["curve"]["seconds"], r["curve"]["val_errors"], kd["curve"]["val_errors"][-1])
            for r, kd in zip(rows, runs["kd"])
        ]
        per_arm[arm] = {
            "mean": mean,
            "std": std,
            "teacher_fraction": float(np.mean([r["teacher_fraction"] for r in rows])),
            "cost_ratio": float(np.mean([r["cost_ratio"] for r in rows])),
            "s_per_epoch": float(np.mean([r["s_per_epoch"] for r in rows])),
            "s_per_epoch_vs_kd": float(np.mean([r["s_per_epoch"] for r in rows])) / kd_s_per_epoch,
            "final_val_errors_mean": float(np.mean([r["curve"]["val_errors"][-1] for r in rows])),
            "seconds_to_kd_final_val": reach,
        }
    paired = {arm: paired_summary(test_errors["kd"], test_errors[arm]) for arm in q.arms if arm != "kd"}
    verdicts = {}
    for arm, stats in paired.items():
        lo, hi = stats["ci"]
        a = per_arm[arm]
        share = f"teacher on {a['teacher_fraction']:.0%} of the samples, estimated cost {a['cost_ratio']:.0%} of kd"
        if hi < 0:
            verdicts[arm] = f"{arm} beat kd (the interval excludes zero), {share}"
        elif lo > 0:
            verdicts[arm] = f"{arm} LOST to kd (the interval excludes zero), {share}"
        else:
            verdicts[arm] = (
                f"{arm} no clear difference from kd (the interval includes zero; at worst {hi:+.1f}), {share}"
            )

    def fmt(setting: dict) -> str:
        return ", ".join(f"{ {'learning_rate': 'lr', 'temperature': 'T'}.get(k, k) }={v:g}" for k, v in setting.items())

    print(
        f"\nHeld-out errors on {len(test)} real MNIST digits (students {'-'.join(map(str, q.student_widths))} trained "
        f"on {len(train)}, the teacher on {len(teacher_data)}: {teacher['test']} errors; seeds {q.seeds})"
    )
    head = ("arm", "chosen on validation", "errors per seed", "mean ± std", "teacher", "cost", "s/epoch", "vs kd")
    print("{:<8} {:<24} {:<26} {:>12} {:>8} {:>6} {:>8} {:>6}  time to kd's final val errors".format(*head))
    for arm in q.arms:
        a = per_arm[arm]
        reach = [s for s in a["seconds_to_kd_final_val"] if s is not None]
        mean_pm = f"{a['mean']:.1f} ± {a['std']:.1f}"
        when = f"{len(reach)}/{len(q.seeds)} seeds" + (f", median {np.median(reach):.1f} s" if reach else "")
        print(
            f"{arm:<8} {fmt(tuned[arm]['best']):<24} {str(test_errors[arm]):<26} "
            f"{mean_pm:>12} {a['teacher_fraction']:>8.1%} {a['cost_ratio']:>6.1%} "
            f"{a['s_per_epoch']:>8.2f} {a['s_per_epoch_vs_kd']:>6.2f}  {when}"
        )
    for arm, stats in paired.items():
        lo, hi = stats["ci"]
        print(
            f"{arm} - kd: {stats['diff']:+.1f} errors, 95% CI [{lo:+.1f}, {hi:+.1f}]; {arm} won {stats['wins']} of "
            f"{stats['n']} seeds ({stats['ties']} ties), sign test p = {stats['p_sign']:.3f}"
        )
    for verdict in verdicts.values():
        print(f"verdict: {verdict}")
    print(f"wall-clock {seconds:.0f} s, {workers} run(s) at a time (not part of the reproducible numbers)")

    summary = {
        "arguments": asdict(q),
        "threads": 1,
        "workers": workers,
        "cores": cores,
        "load_average_at_start": list(load_at_start),
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
        "student": {"widths": q.student_widths, "params": runs["kd"][0]["params"]},
        "flops": {**flops, "ratio": flops_ratio},
        "arms": {arm: {"callback": ARMS[arm], "scoring": None if ARMS[arm] is None else "pass"} for arm in q.arms},
        "grids": grids,
        "tuning": tuned,
        "tuning_runs": tune_rows,
        "seeds": q.seeds,
        "test_errors": test_errors,
        "runs": runs,
        "per_arm": per_arm,
        "paired": paired,
        "verdicts": verdicts,
        "wall_clock_s": seconds,
        "cpu_s_main_process": time.process_time() - cpu_started,
    }
    os.makedirs(q.output_dir, exist_ok=True)
    plot_paired(
        f"{q.output_dir}/paired.png",
        q.seeds,
        test_errors,
        title=f"student {'-'.join(map(str, q.student_widths))}, {len(train)} digits\n"
        + "; ".join(
            f"{arm} - kd = {s['diff']:+.1f} [{s['ci'][0]:+.1f}, {s['ci'][1]:+.1f}]" for arm, s in paired.items()
        ),
    )
    plot_time_to_accuracy(
        f"{q.output_dir}/time_to_accuracy.png",
        runs,
        title=f"student {'-'.join(map(str, q.student_widths))} on {len(train)} digits, {len(val)} validation digits; "
        f"{workers} run(s) at a time, 1 thread each",
    )
    return write_results(
        f"{q.output_dir}/results.json",
        summary,
        command=["python", *sys.argv] if argv is None else ["python", "recipes/evidence_unix.py", *argv],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
