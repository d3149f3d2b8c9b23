"""What the MNIST recipes share.

- The quickstart's regime, used by `mnist_quickstart.py` and the `evidence_*.py` recipes: its arguments
  (`QuickstartArguments`), its splits, its conv teacher (`teacher_run`), the Trainer settings of every student run
  (`run_args`), the one-thread process pool the runs go to (`executor`, `one_thread`), the shifted-view collate
  (`ShiftCollate`) and the held-out error count.
- The evidence recipes' protocol: the teacher (`teacher_for`), the length rule and tuning over `--epoch_ladder`
  (`tune_lengths`), the final paired runs (`final_runs`), the validation curve of a run (`EpochClock`) and the
  equal-cost readings against a baseline (`equal_cost`, `equal_cost_summary`, `print_equal_cost`, `verdict`).
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
from hf_kdsearch.evidence import plot_curves, protocol_split


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


# ---- the evidence recipes' protocol: length rule, tuning, final runs, equal-cost readings ---------------------------


def teacher_for(q, pool) -> dict:
    """The teacher of the run: read from `q.teacher_state` (a teacher.pt of an earlier run with the same data and
    teacher arguments; its validation errors are checked), else trained by `teacher_run` in `pool` and saved to
    `<q.output_dir>/teacher.pt`."""
    _, val, _, _ = splits(q)
    if q.teacher_state:
        teacher = torch.load(q.teacher_state, weights_only=False)
        check = timm.create_model("mnist_cnn", widths=q.teacher_widths)
        check.load_state_dict(teacher["state"])
        if held_out_errors(check, val) != teacher["val"]:
            raise ValueError(f"{q.teacher_state} does not hold this run's teacher: its validation errors differ")
        return teacher
    teacher = pool.submit(teacher_run, q).result()
    torch.save(teacher, f"{q.output_dir}/teacher.pt")
    return teacher


def length_line(rule: dict, of: str = "candidate") -> str:
    """`length: L epochs (rule: ...)`, or the longest length with the `of`s (candidates, arms, students) that were
    still improving; `rule` is `choose_epochs`'s record with `epochs_used`, the length the runs used."""
    epochs, checks = rule["epochs_used"], rule["checks"]
    tol = f"max({rule['rule']['abs_tol']:g} errors, {rule['rule']['rel_tol']:.0%})"
    if rule["epochs"] is not None:
        nxt = next(c["long_epochs"] for c in checks if c["short_epochs"] == epochs)
        return (f"length: {epochs:g} epochs (rule: {nxt:g} epochs lowered no {of}'s validation errors by more "
                f"than {tol})")  # fmt: skip
    if not checks:
        return f"length: {epochs:g} epochs, the only length of the ladder (no rule applied)"
    last = checks[-1]["short_epochs"]
    improving = [f"{c['arm']} ({c['short']:g} -> {c['long']:g})" for c in checks
                 if c["short_epochs"] == last and not c["converged"]]  # fmt: skip
    return f"length: {epochs:g} epochs, the longest; still improving by more than {tol}: {', '.join(improving)}"


def tune_lengths(q, arms: list[str], grid: list[dict], final_seeds: dict, submit, done, keep) -> dict:
    """Every setting of `grid` at every length of `q.epoch_ladder`, for every arm, on validation (seed `q.tune_seed`);
    the length chosen by `choose_epochs`, and each arm's best setting at that length.

    `submit(arm, seed, setting, epochs, score_on)` starts one run and returns its future; `done(what, result)` prints
    a finished run and `keep(kind, arm, seed, extra, result)` writes it down. The runs go in longest first (they take
    longest). A tuning seed that is also one of an arm's `final_seeds` saves a run per arm: the tuning run of the
    chosen setting and length is that seed's final run, scored `"val+test"`, its held-out errors sealed (in
    `sealed[(length, arm, setting index)]`) until the choice is made. Returns `tuned` (per length, `tune_arms`'s
    record), `length_rule`, `epochs` (the length used), `chosen` (per arm) and `sealed`."""
    score = {arm: "val+test" if q.tune_seed in final_seeds[arm] else "val" for arm in arms}
    tune = {
        (length, arm, i): submit(arm, q.tune_seed, s, length, score[arm])
        for length in reversed(q.epoch_ladder)
        for arm in arms
        for i, s in enumerate(grid)
    }
    sealed, tuned = {}, {}
    for length in q.epoch_ladder:

        def trial(arm: str, setting: dict, length=length) -> dict:
            key = (length, arm, grid.index(setting))
            row = dict(done(f"tune {length:g} ep {arm:<10} {setting}", tune[key].result()))
            if "held_out" in row:
                sealed[key] = (row.pop("held_out"), dict(row))
            keep("tune", arm, q.tune_seed, {"epochs": length, "setting": setting}, row)
            return {k: row[k] for k in ("val", "curve", "cpu_s", "train_s", "teacher_samples", "train_loss")}

        tuned[length] = evidence.tune_arms({arm: grid for arm in arms}, trial)
    length_rule = evidence.choose_epochs(
        {length: {arm: t["best_val"] for arm, t in tuned[length].items()} for length in q.epoch_ladder}
    )
    epochs = length_rule["epochs"] if length_rule["epochs"] is not None else q.epoch_ladder[-1]
    chosen = {arm: tuned[epochs][arm]["best"] for arm in arms}
    vals = " / ".join(f"{length:g}" for length in q.epoch_ladder)
    shown = "; ".join(
        f"{arm} " + " / ".join(f"{tuned[length][arm]['best_val']:g}" for length in q.epoch_ladder) for arm in arms
    )
    print(f"{length_line({**length_rule, 'epochs_used': epochs}, of='arm')} (validation errors at {vals}: {shown})")
    return {"tuned": tuned, "length_rule": length_rule, "epochs": epochs, "chosen": chosen, "sealed": sealed}


def final_runs(q, tuning: dict, grid: list[dict], final_seeds: dict, submit, done, keep) -> dict:
    """The final runs at the chosen length and settings (`tune_lengths`'s record), arm after arm, each scored on the
    held-out digits and kept as soon as it is done (a run cut short keeps complete arms); the tuning seed's final run
    is its sealed tuning run where there is one. Returns the rows per arm, in seed order."""
    epochs, chosen, sealed = tuning["epochs"], tuning["chosen"], tuning["sealed"]
    finals = {}
    for arm, seeds in final_seeds.items():
        for seed in seeds:
            key = (epochs, arm, grid.index(chosen[arm]))
            if seed == q.tune_seed and key in sealed:  # this seed's final run is the chosen tuning run
                held_out, row = sealed[key]
                finals[arm, seed] = Future()
                finals[arm, seed].set_result({**row, "errors": held_out, "reused_tuning_run": True})
            else:
                finals[arm, seed] = submit(arm, seed, chosen[arm], epochs, "test")
    runs = {arm: [] for arm in final_seeds}
    for (arm, s), future in finals.items():  # in submission order, each kept as soon as it is done
        runs[arm].append(keep("final", arm, s, {"epochs": epochs}, done(f"seed {s} {arm}", future.result())))
    return runs


def equal_cost(base: dict, run: dict) -> dict:
    """One seed's equal-cost readings of `run` against its baseline `base` (both final runs, validation curves; the
    whole run's cost in `teacher_samples` and `cpu_s`, its curve's cost axes in `curve`)."""
    b, r = base["curve"], run["curve"]
    target = max(b["val_errors"][-1], r["val_errors"][-1])  # an accuracy both reach
    return {
        "arm_final_val": r["val_errors"][-1],
        "base_final_val": b["val_errors"][-1],
        "base_val_at_arm_teacher_samples": evidence.value_at_cost(
            b["teacher_samples"], b["val_errors"], run["teacher_samples"]
        ),
        "base_val_at_arm_cpu_s": evidence.value_at_cost(b["cpu_seconds"], b["val_errors"], run["cpu_s"]),
        "target_val": target,
        "arm_teacher_samples_to_target": evidence.cost_to_reach(r["teacher_samples"], r["val_errors"], target),
        "base_teacher_samples_to_target": evidence.cost_to_reach(b["teacher_samples"], b["val_errors"], target),
        "arm_cpu_s_to_target": evidence.cost_to_reach(r["cpu_seconds"], r["val_errors"], target),
        "base_cpu_s_to_target": evidence.cost_to_reach(b["cpu_seconds"], b["val_errors"], target),
    }


def equal_cost_summary(base_rows: list[dict], rows: list[dict]) -> dict:
    """`equal_cost` per seed, and the paired summaries of the arm's final validation errors against the baseline's
    at the arm's teacher samples and CPU seconds (None where the baseline's curve does not reach that low a cost)."""
    readings = [equal_cost(b, r) for b, r in zip(base_rows, rows)]
    arm_final = [x["arm_final_val"] for x in readings]
    by_forwards = [x["base_val_at_arm_teacher_samples"] for x in readings]
    by_cpu = [x["base_val_at_arm_cpu_s"] for x in readings]
    return {
        "per_seed": readings,
        "vs_base_at_equal_teacher_samples": None
        if None in by_forwards
        else evidence.paired_summary(by_forwards, arm_final),
        "vs_base_at_equal_cpu_s": None if None in by_cpu else evidence.paired_summary(by_cpu, arm_final),
    }


def verdict(name: str, stats: dict, what: str) -> str:
    """One line on a paired difference (method - baseline): which way its 95% interval lies."""
    ci = stats["ci"]
    if ci is None:
        return f"{name}: one seed, no interval ({what})"
    lo, hi = ci
    if hi < 0:
        return f"{name}: fewer errors than its baseline, the interval excludes zero ({what})"
    if lo > 0:
        return f"{name}: MORE errors than its baseline, the interval excludes zero ({what})"
    return f"{name}: no clear difference from its baseline, the interval includes zero ({what})"


def fmt_ci(stats: dict) -> str:
    ci = stats["ci"]
    where = "no interval" if ci is None else f"95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}]"
    return f"{stats['diff']:+.1f} ({where}; better on {stats['wins']}/{stats['n']}, {stats['ties']} ties)"


def print_equal_cost(readings: dict) -> None:
    """The equal-cost lines of one arm (`equal_cost_summary`'s record) under its held-out line."""
    for key, label in (("vs_base_at_equal_teacher_samples", "teacher samples"), ("vs_base_at_equal_cpu_s", "CPU s")):
        s = readings[key]
        print(f"    validation, at equal {label}: " + ("baseline curve too short" if s is None else fmt_ci(s)))

    def ratio(a, b):
        return "never" if a is None or b is None else f"{a / b:.2f}"

    reach = [
        (
            ratio(x["arm_teacher_samples_to_target"], x["base_teacher_samples_to_target"]),
            ratio(x["arm_cpu_s_to_target"], x["base_cpu_s_to_target"]),
        )
        for x in readings["per_seed"]
    ]
    print(
        "    cost to the worse final validation errors of the pair, arm / baseline, per seed: teacher samples "
        + ", ".join(f for f, _ in reach)
        + "; CPU s "
        + ", ".join(t for _, t in reach)
    )


def plot_cost_curves(output_dir: str, runs: dict, title: str, *, cpu_label: str, forwards_label: str) -> None:
    """The final runs' validation curves against the epoch, the CPU seconds and the teacher's samples
    (`curves.png`, `cpu_to_accuracy.png`, `forwards_to_accuracy.png`); `runs[arm]` holds each run's `curve`."""
    curves = {arm: [r["curve"]["val_errors"] for r in rows] for arm, rows in runs.items()}
    for name, key, xlabel in (
        ("curves", "epoch", "epoch"),
        ("cpu_to_accuracy", "cpu_seconds", cpu_label),
        ("forwards_to_accuracy", "teacher_samples", forwards_label),
    ):
        x = {arm: [r["curve"][key] for r in rows] for arm, rows in runs.items()}
        plot_curves(f"{output_dir}/{name}.png", curves, x=x, xlabel=xlabel, title=title)
