"""Online ensemble compression, measured: is each student better trained inside the ensemble than trained alone?

    python recipes/evidence_ensemble.py            # the full run: about 80 minutes on 2 idle CPU cores
    python recipes/evidence_ensemble.py --quick    # a smoke run of the same pipeline, in about 20 seconds

The claim (Walawalkar, Shen & Savvides, ECCV 2020, https://arxiv.org/abs/2011.07449): students of several widths
trained together from scratch, each learning from the labels, from the ensemble's (the students' mean) soft targets
and, through 1x1 adapters, from the widest student's features, end up more accurate than the same students trained
alone, the narrowest gaining most. Here on real MNIST digits, on the CPU, with the library's trainers.

Design:
1. Data: `protocol_split`: 2,000 training and 1,000 validation digits (seeded shuffle of the bundled set's training
   part), average-pooled 2x2 to 14x14; the 2,000 held-out digits are scored once per final run. Training digits are
   shifted by up to 1 pixel (about 2 at 28x28), the same shifts in both arms.
2. Models: `build_ensemble("cifar_resnet8", num_students=4, num_classes=10, in_chans=1, stage_widths=[12, 24, 48],
   stem_width=12)`: students with stage widths [12,24,48], [9,18,36], [6,12,24] and [3,6,12] (44,014 / 25,369 /
   11,758 / 3,349 parameters, the smallest 7.6 % of the widest) around one shared 12-channel stem.
3. Arms, with the same optimiser, schedule and batch order:
   - `ensemble`: `OnlineEnsembleTrainer` with the paper's loss (0.7 sum CE + 0.15 features + 0.15 KD, T = 2), the
     adapters as in the authors' code (a bias, frozen the first epoch, then half the learning rate);
   - `alone`: each exported student architecture with `ClassificationTrainer` (cross-entropy), starting from the very
     weights its ensemble twin started from (stem included), with the same seed (batch order and shifts).
   The schedule is the shape of the authors' released CIFAR-100 configs: Adam with coupled L2 weight decay 1e-5
   (`torch.optim.Adam` through `hf_kdsearch.ensemble.adam_l2`; none on biases and norm layers, the Trainer's
   grouping), batch 128, lr x0.1 at 57 % and 86 % of the steps (their epochs 200 and 300 of 350), no gradient
   clipping. 50 epochs are 800 steps.
4. Tuning, the same budget per arm: three Adam learning rates, {1e-3, 1e-2, 3e-2}, one validation run each (seed
   100). The authors' 1e-3 suits their ~137,000 steps, not 800: in 40-epoch probes it left every student far from
   converged (the 1,578-parameter student of a narrower ensemble at 393 validation errors alone, against 88 at 1e-2);
   it stays in the grid so that the authors' setting is tried, and validation decides. The ensemble's setting is
   shared by its students and chosen by the sum of their validation errors; each student alone picks its own (a
   freedom its ensemble twin does not have: where in doubt, the baseline gains).
   The length is tuned too, with the same budget for both arms: the grid is run at every length of `--epoch_ladder`
   (default 50 and 100 epochs), validation errors recorded after every epoch. `hf_kdsearch.evidence.choose_epochs`
   then picks the shortest length at which the next one lowers no student's validation errors (inside the ensemble,
   at the ensemble's chosen setting, and alone) by more than max(2, 5 %); if none passes, the longest is used and the
   students still improving are named. Both arms' final runs use that one length (a flat tail of one curve proves
   nothing under a decaying learning rate: every curve flattens after the first decay).
5. Five paired seeds (0-4): seed s fixes the ensemble's initial weights (and so each alone student's), the batch
   order and the shifts; the recipe checks that both arms saw the same batches (`ShiftCollate.digest`) and started
   from the same weights.

Every training run uses one torch thread, in up to `--workers` processes side by side (default min(2, cores)), so
the errors do not depend on the machine's core count. It prints, per student, the held-out errors alone and in the
ensemble (mean ± std), the paired difference with a 95 % t-interval, the sign test and wins out of 5, and the
ensemble's own errors (the mean of its students' logits); it writes `results.json`, `paired.png` (one panel per
student, a line per seed) and `curves.png` (validation errors per epoch of the chosen tuning run at every length)
under `--output_dir`.

docs/ensemble.md has the measured table, the length the rule chose and the plots.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from mnist_common import ShiftCollate, executor, length_line, one_thread, quiet
from recipe_common import with_step_decay
from transformers import HfArgumentParser, TrainerCallback, set_seed

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationArguments,
    OnlineEnsembleArguments,
    OnlineEnsembleTrainer,
    TensorImageDataset,
    build_ensemble,
)
from hf_kdsearch.ensemble import adam_l2
from hf_kdsearch.evidence import (
    LENGTH_RULE,
    choose_epochs,
    paired_summary,
    protocol_split,
    pyplot,
    save_figure,
    tune_arms,
    write_results,
)

#: Lengths every arm is tuned at (see --epoch_ladder). At 50 epochs an ensemble run costs about 270 CPU seconds and
#: its four students alone about 250 together; the whole run (tuning at both lengths, finals at 100): about 80 minutes
#: on 2 idle cores.
EPOCH_LADDER = (50, 100)


@dataclass
class EnsembleEvidenceArguments:
    output_dir: str = field(
        default="out/evidence_ensemble", metadata={"help": "Where results.json, paired.png and curves.png go."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Paired seeds."})
    tune_seed: int = field(default=100, metadata={"help": "Seed of the tuning runs (not one of --seeds)."})
    n_train: int = field(default=2000, metadata={"help": "Training digits."})
    n_val: int = field(default=1000, metadata={"help": "Validation digits (tuning only)."})
    image_size: int = field(default=14, metadata={"help": "28 (native) or 14 (2x2 average-pooled, 4x cheaper)."})
    arch: str = field(default="cifar_resnet8", metadata={"help": "CIFAR architecture of the students."})
    num_students: int = field(default=4, metadata={"help": "S, the number of students."})
    stage_widths: list[int] = field(
        default_factory=lambda: [12, 24, 48], metadata={"help": "Stage widths of the widest student (C)."}
    )
    stem_width: int = field(default=12, metadata={"help": "Width of the shared stem."})
    epochs: float = field(default=0, metadata={"help": "Not used here: the lengths come from --epoch_ladder."})
    epoch_ladder: list[float] = field(
        default_factory=lambda: list(EPOCH_LADDER),
        metadata={
            "help": "Lengths (epochs, rising) every arm is tuned at on validation; the length rule "
            "(hf_kdsearch.evidence.choose_epochs) picks one for both arms' final runs, or the longest."
        },
    )
    batch_size: int = field(default=128, metadata={"help": "Batch size (authors: 128)."})
    learning_rates: list[float] = field(
        default_factory=lambda: [1e-3, 1e-2, 3e-2],
        metadata={
            "help": "The tuning grid of Adam learning rates, the same for every arm (authors: 1e-3, for ~170 times "
            "more steps)."
        },
    )
    weight_decay: float = field(default=1e-5, metadata={"help": "Adam's L2 weight decay, coupled (authors: 1e-5)."})
    lr_decay_at: list[float] = field(
        default_factory=lambda: [200 / 350, 300 / 350],
        metadata={"help": "lr x0.1 at these fractions of the steps (authors: epochs 200 and 300 of 350)."},
    )
    max_shift: int = field(default=1, metadata={"help": "Random shift of training digits, in pixels (0: none)."})
    workers: int = field(
        default=0,
        metadata={
            "help": "Training runs at once, each in its own process with one torch thread; 0: min(2, cores this "
            "process may run on). The printed errors do not depend on it."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Smoke run: 300 + 200 digits, 2 seeds, 1 learning rate, ladder 1, 2 epochs."},
    )

    def __post_init__(self):
        if self.epochs:
            raise ValueError("evidence_ensemble.py chooses its length by a rule: give --epoch_ladder, not --epochs")
        ladder = self.epoch_ladder
        if not ladder or sorted(ladder) != ladder or min(ladder) <= 0 or len(set(ladder)) != len(ladder):
            raise ValueError(f"--epoch_ladder must be distinct positive lengths in rising order; got {ladder}")


# ---- the runs: each is a function of its arguments alone, so it gives the same numbers in any process ------------
def splits(q: EnsembleEvidenceArguments) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """train, validation and held-out test, at `q.image_size`."""
    parts = protocol_split(q.n_train, q.n_val)
    if q.image_size == 28:
        return parts
    if q.image_size != 14:
        raise ValueError(f"image_size must be 28 or 14, got {q.image_size}")
    return tuple(TensorImageDataset(F.avg_pool2d(d.images, 2), d.labels) for d in parts)


def make_ensemble(q: EnsembleEvidenceArguments, seed: int):
    """The ensemble of seed `seed`: its initial weights are the initial weights of both arms."""
    set_seed(seed)
    return build_ensemble(
        q.arch,
        num_students=q.num_students,
        num_classes=10,
        in_chans=1,
        stage_widths=q.stage_widths,
        stem_width=q.stem_width,
    )


def run_args(
    q: EnsembleEvidenceArguments,
    out: str,
    seed: int,
    learning_rate: float,
    epochs: float,
    cls=DistillationArguments,
):
    """Trainer settings of every run: the authors' Adam (see `train`), no clipping, nothing saved, quiet; `epochs`
    long, the decays at the same fractions of it."""
    return cls(
        output_dir=out,
        seed=seed,
        num_train_epochs=epochs,
        per_device_train_batch_size=q.batch_size,
        learning_rate=learning_rate,
        weight_decay=q.weight_decay,
        max_grad_norm=0.0,  # the authors do not clip
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )


def train(trainer_cls, q: EnsembleEvidenceArguments, args, curve: TrainerCallback | None, **kwargs) -> None:
    """`trainer_cls` with Adam (coupled L2 weight decay) and lr x0.1 at `q.lr_decay_at`; trained quietly."""
    trainer = with_step_decay(trainer_cls, q.lr_decay_at, 0.1)(
        args=args,
        optimizer_cls_and_kwargs=adam_l2(args),
        callbacks=[curve] if curve is not None else None,
        **kwargs,
    )
    quiet(trainer)


class ErrorCurve(TrainerCallback):
    """Errors of the model on a dataset after every epoch (validation only: a run scored on the test digits is not
    looked at before its end). Evaluation mode and no gradients: the training it watches is unchanged."""

    def __init__(self, score):
        self.score = score
        self.errors = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        training = model.training
        self.errors.append(self.score(model))
        model.train(training)


def errors_of(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(-1) != labels).sum())


@torch.no_grad()
def ensemble_errors(ens, dataset: TensorImageDataset) -> dict:
    """Each student's errors and the ensemble's (the mean of the students' logits), in eval mode."""
    ens.eval()
    out = ens(pixel_values=dataset.images)
    return {
        "students": [errors_of(z, dataset.labels) for z in out["student_logits"]],
        "ensemble": errors_of(out["logits"], dataset.labels),
    }


@torch.no_grad()
def student_errors(model, dataset: TensorImageDataset) -> int:
    model.eval()
    return errors_of(model(dataset.images), dataset.labels)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of a model's weights and buffers: equal digests mean equal starting points."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def ensemble_run(q: EnsembleEvidenceArguments, seed: int, setting: dict, score_on: str, epochs: float) -> dict:
    """One ensemble trained on the training digits; its students' errors on `score_on` ("val" or "test")."""
    train_set, val, test = splits(q)
    ens = make_ensemble(q, seed)
    initial = [weights_digest(ens.export_student(j)) for j in range(ens.num_students)]
    collate = ShiftCollate(seed, q.max_shift)
    curve = ErrorCurve(lambda m: ensemble_errors(m, val)) if score_on == "val" else None
    lr = setting["learning_rate"]
    args = run_args(q, f"{q.output_dir}/ensemble-{seed}", seed, lr, epochs, OnlineEnsembleArguments)
    train(OnlineEnsembleTrainer, q, args, curve, model=ens, train_dataset=train_set, data_collator=collate)
    result = ensemble_errors(ens, val if score_on == "val" else test)
    return {
        "errors": result["students"],
        "ensemble_errors": result["ensemble"],
        "curve": curve.errors if curve else None,
        "digest": collate.digest,
        "initial": initial,
        "widths": ens.widths,
        "params": [sum(p.numel() for p in ens.export_student(j).parameters()) for j in range(ens.num_students)],
    }


def alone_run(q: EnsembleEvidenceArguments, seed: int, j: int, setting: dict, score_on: str, epochs: float) -> dict:
    """Student j trained alone (cross-entropy) from its ensemble twin's initial weights, same seed."""
    train_set, val, test = splits(q)
    student = make_ensemble(q, seed).export_student(j).train()
    initial = weights_digest(student)
    collate = ShiftCollate(seed, q.max_shift)
    curve = ErrorCurve(lambda m: student_errors(m, val)) if score_on == "val" else None
    args = run_args(q, f"{q.output_dir}/alone{j}-{seed}", seed, setting["learning_rate"], epochs)
    train(ClassificationTrainer, q, args, curve, model=student, train_dataset=train_set, data_collator=collate)
    return {
        "errors": student_errors(student, val if score_on == "val" else test),
        "curve": curve.errors if curve else None,
        "digest": collate.digest,
        "initial": initial,
    }


def check_paired(seed: int, ens: dict, alone: list[dict]) -> None:
    for j, a in enumerate(alone):
        if a["digest"] != ens["digest"]:
            raise RuntimeError(f"seed {seed}: student {j} alone saw other batches than the ensemble; not paired")
        if a["initial"] != ens["initial"][j]:
            raise RuntimeError(f"seed {seed}: student {j} alone started from other weights than its ensemble twin")


def print_convergence(q: EnsembleEvidenceArguments, tuned: dict, tune_runs: dict, grid: list[dict]) -> None:
    """Each chosen tuning run's validation errors at the two decays and at the end (for the eye: the length rule
    decides)."""
    epochs = len(tune_runs["ensemble"][0]["curve"])
    marks = [max(1, int(m * epochs)) for m in q.lr_decay_at] + [epochs]
    print(f"validation errors at epochs {' / '.join(map(str, marks))} (the decays, the end), chosen settings:")
    for arm, runs in tune_runs.items():
        best = tuned[arm]["best"]
        curve = runs[grid.index(best)]["curve"]
        if arm == "ensemble":
            points = [" / ".join(str(curve[m - 1]["students"][j]) for m in marks) for j in range(q.num_students)]
            shown = ", ".join(f"S{j} {p}" for j, p in enumerate(points))
        else:
            shown = " / ".join(str(curve[m - 1]) for m in marks)
        print(f"  {arm:<14} lr {best['learning_rate']:g}: {shown}", flush=True)


def length_values(tuned: dict, tune_runs: dict, grid: list[dict], num_students: int) -> dict:
    """What the length rule compares at one length: each student's validation errors inside the ensemble (the
    ensemble's chosen setting) and alone (its own chosen setting)."""
    ens = tune_runs["ensemble"][grid.index(tuned["ensemble"]["best"])]["errors"]
    return {
        **{f"ensemble_S{j}": ens[j] for j in range(num_students)},
        **{f"alone_S{j}": tuned[f"alone_student{j}"]["best_val"] for j in range(num_students)},
    }


# ---- the figures ---------------------------------------------------------------------------------------------------
def plot_students(path: str, seeds: list[int], alone: list[list[int]], ensemble: list[list[int]], titles: list[str]):
    """One panel per student: a line per seed from its errors alone to its errors in the ensemble; means in red."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(titles), figsize=(2.6 * len(titles), 3.4), squeeze=False)
    for ax, a, e, title in zip(axes[0], alone, ensemble, titles):
        for seed, y0, y1 in zip(seeds, a, e):
            ax.plot([0, 1], [y0, y1], "o-", color="0.6", lw=1)
            ax.annotate(f"s{seed}", (1, y1), xytext=(4, 0), textcoords="offset points", fontsize=7)
        for x, ys in ((0, a), (1, e)):
            m = sum(ys) / len(ys)
            ax.plot([x - 0.2, x + 0.2], [m, m], color="C3", lw=2.5)
        ax.set_xticks([0, 1], ["alone", "in ensemble"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(title, fontsize=8)
    axes[0][0].set_ylabel("held-out errors")
    save_figure(fig, path)


def plot_curves(path: str, curves: dict, tuned_at: dict, num_students: int, lr_decay_at: list[float]) -> None:
    """Validation errors per epoch of the chosen tuning run at every length of the ladder: one panel per student, in
    the ensemble (solid) and alone (dashed), one colour per length; dotted lines at each length's decays."""
    plt = pyplot()
    import matplotlib.ticker

    fig, axes = plt.subplots(1, num_students, figsize=(2.8 * num_students, 3.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        for c, (length, arms) in enumerate(curves.items()):
            lr_e = tuned_at[length]["ensemble"]["best"]["learning_rate"]
            lr_a = tuned_at[length][f"alone_student{j}"]["best"]["learning_rate"]
            ens = [e["students"][j] for e in arms["ensemble"]]
            ax.plot(
                range(1, len(ens) + 1), ens, ".-", ms=2, color=f"C{c}", label=f"{length:g} ep, ensemble (lr {lr_e:g})"
            )
            alone = arms[f"alone_student{j}"]
            ax.plot(
                range(1, len(alone) + 1), alone, ".--", ms=2, color=f"C{c}", label=f"{length:g} ep, alone (lr {lr_a:g})"
            )
            for m in lr_decay_at:
                ax.axvline(m * length, color=f"C{c}", lw=0.6, ls=":", zorder=0)
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_yticks([t for t in (10, 20, 50, 100, 200, 500, 1000, 2000) if lo <= t <= hi])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"student {j}", fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("validation errors")
    axes[0][-1].legend(fontsize=6)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(EnsembleEvidenceArguments).parse_args_into_dataclasses(argv)
    started, cpu_started = time.time(), time.process_time()
    cores = len(os.sched_getaffinity(0))
    workers = q.workers or min(2, cores)
    one_thread()  # every run uses one thread, so its numbers do not depend on the machine's core count
    if q.quick:
        q.seeds, q.epoch_ladder, q.n_train, q.n_val = q.seeds[:2], [1.0, 2.0], 300, 200
        q.learning_rates = q.learning_rates[:1]
    S = q.num_students
    train_set, val, test = splits(q)
    print(
        f"{len(train_set)} training, {len(val)} validation, {len(test)} held-out digits at {q.image_size}x"
        f"{q.image_size}; {workers} run(s) at a time, 1 thread each ({cores} cores)",
        flush=True,
    )
    grid = [{"learning_rate": lr} for lr in q.learning_rates]
    # One arm per choice: the ensemble (one setting for all its students) and each student alone; equal grids.
    grids = {"ensemble": grid, **{f"alone_student{j}": grid for j in range(S)}}

    def done(what: str, result: dict) -> dict:
        shown = result["errors"] if "ensemble_errors" not in result else (result["errors"], result["ensemble_errors"])
        print(f"  {what}: {shown} errors ({time.time() - started:.0f} s)", flush=True)
        return result

    with executor(workers) as pool:
        # Every setting at every length, longest runs first, so the last ones to finish are short (the ensemble
        # costs about all its students together).
        tune = {}
        for length in reversed(q.epoch_ladder):
            tune[length, "ensemble"] = [pool.submit(ensemble_run, q, q.tune_seed, s, "val", length) for s in grid]
            for j in range(S):
                arm = f"alone_student{j}"
                tune[length, arm] = [pool.submit(alone_run, q, q.tune_seed, j, s, "val", length) for s in grid]
        tuned_at, tune_runs_at = {}, {}
        for length in q.epoch_ladder:
            tune_runs = {}

            def tuned_errors(arm: str, setting: dict, length=length, tune_runs=tune_runs) -> int:
                future = tune[length, arm][grid.index(setting)]
                result = done(f"tune {length:g} ep {arm:<14} {setting}", future.result())
                tune_runs.setdefault(arm, []).append(result)
                return sum(result["errors"]) if arm == "ensemble" else result["errors"]

            tuned_at[length] = tune_arms(grids, tuned_errors)
            check_paired(q.tune_seed, tune_runs["ensemble"][0], [tune_runs[f"alone_student{j}"][0] for j in range(S)])
            print_convergence(q, tuned_at[length], tune_runs, grid)
            tune_runs_at[length] = tune_runs
        # The length rule, per student in each arm: the ensemble's students are judged one by one (its chosen
        # setting's run at each length), so a length is long enough only if no student, in or out, still improves.
        rule_values = {length: length_values(tuned_at[length], tune_runs_at[length], grid, S) for length in tuned_at}
        length_rule = choose_epochs(rule_values)
        epochs = length_rule["epochs"] if length_rule["epochs"] is not None else q.epoch_ladder[-1]
        tuned = tuned_at[epochs]
        print(length_line({**length_rule, "epochs_used": epochs}, of="student"), flush=True)

        finals = {
            "ensemble": [
                pool.submit(ensemble_run, q, seed, tuned["ensemble"]["best"], "test", epochs) for seed in q.seeds
            ]
        }
        for j in range(S):
            best = tuned[f"alone_student{j}"]["best"]
            finals[f"alone_student{j}"] = [pool.submit(alone_run, q, seed, j, best, "test", epochs) for seed in q.seeds]
        runs = {
            arm: [done(f"seed {seed} {arm}", f.result()) for seed, f in zip(q.seeds, fs)] for arm, fs in finals.items()
        }
    for i, seed in enumerate(q.seeds):
        check_paired(seed, runs["ensemble"][i], [runs[f"alone_student{j}"][i] for j in range(S)])

    widths, params = runs["ensemble"][0]["widths"], runs["ensemble"][0]["params"]
    in_ensemble = [[r["errors"][j] for r in runs["ensemble"]] for j in range(S)]
    alone = [[r["errors"] for r in runs[f"alone_student{j}"]] for j in range(S)]
    ensemble_mean = [r["ensemble_errors"] for r in runs["ensemble"]]
    stats = [paired_summary(alone[j], in_ensemble[j]) for j in range(S)]
    seconds = time.time() - started

    print(
        f"\nHeld-out errors on {len(test)} real MNIST digits ({q.arch} students, {len(train_set)} training digits, "
        f"{epochs:g} epochs; seeds {q.seeds}); lr chosen on validation: ensemble "
        f"{tuned['ensemble']['best']['learning_rate']:g}, alone "
        f"{[tuned[f'alone_student{j}']['best']['learning_rate'] for j in range(S)]}"
    )
    print(
        f"{'student':<8} {'widths':<13} {'params':>7}  {'alone':>14} {'in ensemble':>14}  "
        f"{'ensemble - alone [95% CI]':<27} {'sign p':>6}  wins"
    )
    verdicts = []
    for j, s in enumerate(stats):
        lo, hi = s["ci"] or (float("nan"), float("nan"))  # one seed: no interval
        alone_ms = f"{s['baseline_mean']:.1f} ± {s['baseline_std']:.1f}"
        ens_ms = f"{s['method_mean']:.1f} ± {s['method_std']:.1f}"
        diff = f"{s['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        print(
            f"S{j:<7} {str(widths[j]):<13} {params[j]:>7,}  {alone_ms:>14} {ens_ms:>14}  {diff:<27} "
            f"{s['p_sign']:>6.3f}  {s['wins']}/{s['n']}"
        )
    for j, s in enumerate(stats):
        lo, hi = s["ci"] or (float("-inf"), float("inf"))
        if hi < 0:
            verdict = "the ensemble made it better than alone (the interval excludes zero)"
        elif lo > 0:
            verdict = "the ensemble made it WORSE than alone (the interval excludes zero)"
        else:
            verdict = "no clear difference: the interval includes zero"
        verdicts.append(verdict)
        print(f"verdict S{j} {widths[j]}: {verdict}")
    m_e = sum(ensemble_mean) / len(ensemble_mean)
    print(f"the ensemble itself (mean of the students' logits): {ensemble_mean} held-out errors, mean {m_e:.1f}")
    print(f"wall-clock {seconds:.0f} s, {workers} run(s) at a time (not part of the reproducible numbers)")

    summary = {
        "arguments": asdict(q),
        "threads": 1,
        "workers": workers,
        "cores": cores,
        "splits": {"train": len(train_set), "validation": len(val), "test": len(test), "split_seed": 0},
        "students": [{"widths": w, "params": p} for w, p in zip(widths, params)],
        "schedule": {
            "optimizer": "torch.optim.Adam (coupled L2 weight decay; none on biases and norm layers)",
            "weight_decay": q.weight_decay,
            "batch_size": q.batch_size,
            "lr_decay_at": q.lr_decay_at,
            "lr_decay_factor": 0.1,
            "epochs": epochs,
            "max_grad_norm": 0.0,
        },
        "tuning": tuned,
        "tuning_by_length": {f"{length:g}": t for length, t in tuned_at.items()},
        "validation_curves": {
            f"{length:g}": {arm: [r["curve"] for r in rs] for arm, rs in runs_at.items()}
            for length, runs_at in tune_runs_at.items()
        },
        "length_rule": {
            **length_rule,
            "epochs_used": epochs,
            "values": {f"{length:g}": v for length, v in rule_values.items()},
            "stated": LENGTH_RULE,
        },
        "seeds": q.seeds,
        "test_errors": {
            "alone": alone,
            "in_ensemble": in_ensemble,
            "ensemble_mean_logits": ensemble_mean,
        },
        "paired": stats,
        "verdicts": verdicts,
        "wall_clock_s": seconds,
        "cpu_s_main_process": time.process_time() - cpu_started,
    }
    os.makedirs(q.output_dir, exist_ok=True)
    titles = [
        f"S{j} {'-'.join(map(str, widths[j]))}, {params[j]:,} params\nens - alone = {s['diff']:+.1f} "
        + (f"[{s['ci'][0]:+.1f}, {s['ci'][1]:+.1f}]" if s["ci"] else "(one seed)")
        for j, s in enumerate(stats)
    ]
    plot_students(f"{q.output_dir}/paired.png", q.seeds, alone, in_ensemble, titles)
    chosen_curves = {
        length: {arm: runs_at[arm][grid.index(tuned_at[length][arm]["best"])]["curve"] for arm in runs_at}
        for length, runs_at in tune_runs_at.items()
    }
    plot_curves(f"{q.output_dir}/curves.png", chosen_curves, tuned_at, S, q.lr_decay_at)
    return write_results(
        f"{q.output_dir}/results.json",
        summary,
        command=["python", *sys.argv] if argv is None else ["python", "recipes/evidence_ensemble.py", *argv],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
