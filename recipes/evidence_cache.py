"""Evidence for the teacher cache: does distilling from R stored views reach online KD's accuracy, and at what cost?

    python recipes/evidence_cache.py            # the full run (see docs/cache.md for the protocol)
    python recipes/evidence_cache.py --quick    # smoke run of the same pipeline, well under a minute or two

`TeacherCache` runs the teacher once over R random views of every training digit and replays them, so training
runs no teacher forward; online KD runs the teacher on a fresh random view at every step. The cache's claim is about
cost, so this script compares the arms at equal measured cost as well as at the end of equal schedules, in the
quickstart's regime and with its teacher (`mnist_common`: splits, teacher, Trainer settings, arguments), under the
protocol of `hf_kdsearch.evidence`:

1. data: 1,000 training digits kept as uint8 `DeviceImageDataset` and augmented by the device path of every arm
   (`device_augment=True`, `augment_padding=--max_shift` (2): a random crop of the zero-padded digit, i.e. a shift of
   up to 2 pixels; no flip), the same view for teacher and student; 1,000 validation digits; 2,000 held-out digits
   scored once per final run;
2. teacher: `mnist_cnn` 16-16-32-32, AdamW, 8 epochs on the 7,000 digits outside validation and test;
3. students: `mnist_cnn` 4-4-8-8, batch 64, SGD momentum 0.9, cosine decay, `DistillationTrainer`
   (`alpha * T^2 * KL + (1 - alpha) * CE`), T = 4. Arms (`ARMS`), the augmentation family the same in all, so that
   only the teacher's source differs:
   - `online`: the teacher runs on every step's fresh random views;
   - `cache1` / `cache4` / `cache16`: `TeacherCache.build(teacher, train, args, num_views=R, top_k=None)` (float16
     logits, the library's default), then `DistillationTrainer(teacher_cache=cache)`: each epoch replays one of the
     R stored views per digit with its stored logits. The cache is built per seed, from that seed (the views are
     drawn from `args.seed`), so its build is part of every run's cost;
4. training length and tuning, the same budget for every arm: every setting of the grid (`--lrs` x `--alphas`) is run
   on validation (seed `--tune_seed`) at every length of `--epoch_ladder`; the length is the one
   `hf_kdsearch.evidence.choose_epochs` picks (the shortest at which doubling it no longer lowers any arm's best
   validation errors by more than max(2 errors, 5%); else the longest, with the arms still improving named), and
   each arm takes its best setting there (`mnist_common.tune_lengths`);
5. final runs: paired seeds (`--seeds`), scored once on the held-out digits. Seed s gives every arm the same initial
   student (its SHA-256 is recorded and compared) and the same batch order (a checksum of the indices served,
   compared too). The views cannot all match: online draws fresh ones at every step from the Trainer's generator,
   the cache replays R drawn once from the seed. With `--tune_seed` one of `--seeds` (the default, 0), the tuning
   run of the chosen setting and length is that seed's final run, its held-out errors sealed until the choice.

Measured per run, after every `--eval_every` epochs: validation errors, the cumulative teacher samples (a forward
hook on the teacher module, whoever calls it), the run's training CPU seconds (one torch thread; other jobs do not
inflate it) and wall seconds. A cache arm's curve starts at its build's cost: the build's teacher samples (N x R,
checked against the hook), CPU and wall seconds are added to every point, and its training must run no teacher
forward (checked). From these curves, per seed against `online`:
- errors at equal cost: online's validation errors after as many teacher samples (and as many CPU seconds, the
  build included) as the arm spent in its whole run, against the arm's final validation errors. Online is read
  mid-schedule there, before its learning rate has decayed, which favours the arm;
- cost to the same accuracy: the teacher samples and CPU seconds each needs to first reach the worse of the two final
  validation errors.

It prints the tables and verdicts, and writes `results.json`, `runs.jsonl`, `paired.png` (held-out errors per seed),
`curves.png` (validation errors per epoch, the final runs), `cpu_to_accuracy.png` and `forwards_to_accuracy.png`
under `--output_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import timm
import torch
from mnist_common import (
    EpochClock,
    QuickstartArguments,
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

from hf_kdsearch import DistillationTrainer, TeacherCache
from hf_kdsearch.data import MNIST_MEAN, MNIST_STD, TensorImageDataset
from hf_kdsearch.evidence import (
    LENGTH_RULE,
    mean_std,
    paired_summary,
    plot_paired,
    strict_json,
    write_results,
)
from hf_kdsearch.fastpath import DeviceImageDataset

#: Per arm: the views stored per digit (None: online KD, the teacher on every step).
ARMS = {"online": {"views": None}, "cache1": {"views": 1}, "cache4": {"views": 4}, "cache16": {"views": 16}}
BASELINE = "online"
DEFAULT_ARMS = ["online", "cache1", "cache4"]


@dataclass
class CacheEvidenceArguments(QuickstartArguments):
    """The quickstart's arguments (regime, teacher, workers), with this run's arms, grid, lengths and output folder."""

    output_dir: str = field(default="out/evidence_cache", metadata={"help": "Where results.json and the plots go."})
    epochs: float = field(default=0, metadata={"help": "Not used here: the lengths come from --epoch_ladder."})
    tune_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the tuning runs; one of --seeds (default 0): the chosen tuning run is that seed's final "
            "run, its held-out errors sealed until the choice (saves one final run per arm)."
        },
    )
    epoch_ladder: list[float] = field(
        default_factory=lambda: [60, 120],
        metadata={"help": "Schedule lengths tried on validation; the rule picks the one every arm trains for."},
    )
    eval_every: int = field(
        default=1,
        metadata={
            "help": "Epochs between validation points of a curve (1: online's curve has a point at every 1,000 "
            "teacher samples, the cost of a one-view cache)."
        },
    )
    lrs: list[float] = field(default_factory=lambda: [0.2], metadata={"help": "Learning rates to tune."})
    alphas: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "KD weights to tune."})
    temperature: float = field(default=4.0, metadata={"help": "T of every run."})
    arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={"help": f"Arms to run, with the baseline {BASELINE}; any of {', '.join(ARMS)}."},
    )
    teacher_state: str = field(
        default="",
        metadata={
            "help": "A teacher.pt written by an earlier run of this recipe (or evidence_unix.py) with the same data "
            "and teacher arguments: used instead of training the teacher again (its errors are checked)."
        },
    )

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or BASELINE not in self.arms or len(self.arms) < 2 or len(set(self.arms)) != len(self.arms):
            raise ValueError(
                f"--arms must name distinct arms of {list(ARMS)}, {BASELINE} and at least one other; got {self.arms}"
            )
        if self.epochs:
            raise ValueError("evidence_cache.py chooses its length by a rule: give --epoch_ladder, not --epochs")
        if not self.epoch_ladder or sorted(self.epoch_ladder) != self.epoch_ladder or min(self.epoch_ladder) <= 0:
            raise ValueError(f"--epoch_ladder must be positive lengths in rising order; got {self.epoch_ladder}")
        if self.max_shift < 1:
            raise ValueError("--max_shift must be >= 1: a cache of several views needs views that differ; got 0")


def tuning_grid(q: CacheEvidenceArguments) -> list[dict]:
    """One grid, lr x alpha at the fixed T, for every arm and length: the same budget, the teacher's source the only
    change."""
    return [{"learning_rate": lr, "temperature": q.temperature, "alpha": a} for lr in q.lrs for a in q.alphas]


def uint8_digits(dataset: TensorImageDataset) -> torch.Tensor:
    """The standardised digits of `splits` back as the uint8 pixels they were read from (exactly: they were uint8)."""
    pixels = (dataset.images * MNIST_STD[0] + MNIST_MEAN[0]) * 255
    out = pixels.round().clamp(0, 255).to(torch.uint8)
    if (out.float() - pixels).abs().max() > 1e-3:
        raise ValueError("the digits are not standardised uint8 pixels")
    return out


class OrderedDigits(DeviceImageDataset):
    """The uint8 training digits, with `digest`: a running checksum of the indices every batch read, so that two
    paired runs can show that they were served the same batches in the same order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.digest = 0

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        for i in indices:
            self.digest = (self.digest * 1_000_003 + int(i) + 1) % (1 << 61)
        return super().__getitems__(indices)


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers, in order: equal for two identical initial students."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_run(q, arm: str, seed: int, setting: dict, epochs: float, score_on: str, teacher: dict) -> dict:
    """One student distilled in arm `arm` for `epochs` epochs, scored on `score_on` ("val" or "test"; "val+test": a
    tuning run that may also be a final run, scored on validation, its held-out errors kept sealed under `held_out`).

    A cache arm builds its cache first, from this seed, with the run's own arguments; the build's teacher samples,
    CPU and wall seconds are its cost at the start of the curve. A run whose training loss is not finite has `val` NaN
    (it diverged; the tuning never picks it)."""
    train, val, test, _ = splits(q)
    digits = OrderedDigits(uint8_digits(train), train.labels)
    set_seed(seed)
    student = timm.create_model("mnist_cnn", widths=q.student_widths)
    init = state_digest(student)
    args = run_args(
        f"{q.output_dir}/{arm}-{seed}",
        seed,
        epochs,
        q.batch_size,
        device_augment=True,
        augment_padding=q.max_shift,
        augment_flip=False,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        **setting,
    )
    model = timm.create_model("mnist_cnn", widths=q.teacher_widths)
    model.load_state_dict(teacher["state"])
    ran_on = [0]  # every sample the teacher runs on, whoever calls it
    model.register_forward_hook(lambda module, inputs, out: ran_on.__setitem__(0, ran_on[0] + len(out)))
    views = ARMS[arm]["views"]
    cache, build = None, {"teacher_samples": 0, "cpu_s": 0.0, "seconds": 0.0, "teacher_accuracy": None}
    if views is not None:
        wall, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stderr(io.StringIO()) as err:  # no progress bar per build in the log
            cache = TeacherCache.build(model, digits, args, num_views=views, top_k=None, student=student)
        said = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
        if kept := [line for line in said if not line.startswith("teacher cache:")]:  # warnings, errors
            print("\n".join(kept), file=sys.stderr)
        build = {
            "teacher_samples": ran_on[0],
            "cpu_s": time.process_time() - cpu,
            "seconds": time.perf_counter() - wall,
            "teacher_accuracy": cache.info["teacher_accuracy"],
        }
        if ran_on[0] != len(digits) * views:
            raise RuntimeError(f"{arm} seed {seed}: the build ran the teacher on {ran_on[0]} samples, not N x R")
        ran_on[0], digits.digest = 0, 0  # training's own count and batch order start here
    clock = EpochClock(student, val, eval_every=q.eval_every, teacher_samples=lambda: ran_on[0])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=model if cache is None else None,
        teacher_cache=cache,
        args=args,
        train_dataset=digits,
        data_collator=DeviceImageDataset.collate,
        callbacks=[clock],
    )
    quiet(trainer)
    if cache is not None and ran_on[0] != 0:
        raise RuntimeError(f"{arm} seed {seed}: training from the cache ran the teacher on {ran_on[0]} samples")
    if cache is None and ran_on[0] != trainer.teacher_samples:
        raise RuntimeError(
            f"{arm} seed {seed}: the hook counted {ran_on[0]} teacher samples, the trainer {trainer.teacher_samples}"
        )
    # The cost axes of the curve start at the build's cost.
    curve = dict(clock.curve)
    curve["teacher_samples"] = [build["teacher_samples"] + n for n in curve["teacher_samples"]]
    curve["cpu_seconds"] = [build["cpu_s"] + s for s in curve["cpu_seconds"]]
    curve["seconds"] = [build["seconds"] + s for s in curve["seconds"]]
    loss = trainer.state.log_history[-1].get("train_loss", math.nan)
    errors = held_out_errors(student, test if score_on == "test" else val)
    sealed = {"held_out": held_out_errors(student, test)} if score_on == "val+test" else {}
    return {
        **sealed,
        "val": float(errors) if math.isfinite(loss) else math.nan,
        "errors": errors,
        "train_loss": loss,
        "digest": digits.digest,
        "init_digest": init,
        "params": sum(p.numel() for p in student.parameters()),
        "build": build,
        "teacher_samples": build["teacher_samples"] + ran_on[0],
        "teacher_samples_training": ran_on[0],
        "teacher_logits_used": trainer.teacher_samples,
        "samples_seen": trainer.samples_seen,
        "train_cpu_s": sum(clock.epoch_cpu_seconds),
        "train_s": build["seconds"] + sum(clock.epoch_seconds),
        "cpu_s": build["cpu_s"] + sum(clock.epoch_cpu_seconds),
        "cpu_s_per_epoch": sum(clock.epoch_cpu_seconds) / len(clock.epoch_cpu_seconds),
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(CacheEvidenceArguments).parse_args_into_dataclasses(argv)
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
    print(
        f"{len(train)} training, {len(val)} validation, {len(test)} held-out digits; {workers} run(s) at a time, "
        f"1 thread each ({cores} cores, load {load_at_start[0]:.1f}); arms {', '.join(q.arms)}",
        flush=True,
    )

    def done(what: str, result: dict) -> dict:
        print(
            f"  {what}: {result['errors']} errors, {result['cpu_s']:.1f} CPU s (build {result['build']['cpu_s']:.1f}),"
            f" {result['train_s']:.0f} s ({time.time() - started:.0f} s)",
            flush=True,
        )
        return result

    os.makedirs(q.output_dir, exist_ok=True)
    progress = open(f"{q.output_dir}/runs.jsonl", "w")  # every finished run, at once: a cut-off run keeps its data

    def keep(kind: str, arm: str, seed: int, extra: dict, result: dict) -> dict:
        row = {"kind": kind, "arm": arm, "seed": seed, **extra, **result}
        progress.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        progress.flush()
        return result

    final_seeds = {arm: list(q.seeds) for arm in q.arms}
    with executor(workers) as pool:
        teacher = teacher_for(q, pool)
        print(
            f"teacher {q.teacher_widths} on {len(teacher_data)} digits: {teacher['val']} validation errors "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )

        def submit(arm, seed, setting, length, score_on):
            return pool.submit(cache_run, q, arm, seed, setting, length, score_on, teacher)

        tuning = tune_lengths(q, q.arms, grid, final_seeds, submit, done, keep)
        runs = final_runs(q, tuning, grid, final_seeds, submit, done, keep)
    progress.close()
    tuned, length_rule, epochs, chosen = (tuning[k] for k in ("tuned", "length_rule", "epochs", "chosen"))
    seconds = time.time() - started
    load_at_end = os.getloadavg()
    for arm in q.arms:
        for seed, r, b in zip(q.seeds, runs[arm], runs[BASELINE]):
            if (r["digest"], r["init_digest"]) != (b["digest"], b["init_digest"]):
                raise RuntimeError(f"seed {seed}: {arm} and {BASELINE} started or ran differently; not paired")
    test_errors = {arm: [r["errors"] for r in rs] for arm, rs in runs.items()}

    # ---- summary -----------------------------------------------------------------------------------------------
    per_arm, paired, at_cost, verdicts = {}, {}, {}, {}
    for arm, rows in runs.items():
        mean, std = mean_std(test_errors[arm])
        per_arm[arm] = {
            "views": ARMS[arm]["views"],
            "mean": mean,
            "std": std,
            "teacher_samples": float(np.mean([r["teacher_samples"] for r in rows])),
            "build_cpu_s": float(np.mean([r["build"]["cpu_s"] for r in rows])),
            "cpu_s": float(np.mean([r["cpu_s"] for r in rows])),
            "cpu_s_per_epoch": float(np.mean([r["cpu_s_per_epoch"] for r in rows])),
            "train_s": float(np.mean([r["train_s"] for r in rows])),
            "final_val_errors_mean": float(np.mean([r["curve"]["val_errors"][-1] for r in rows])),
        }
        if arm == BASELINE:
            continue
        paired[arm] = paired_summary(test_errors[BASELINE], test_errors[arm])
        at_cost[arm] = {
            "baseline": BASELINE,
            **equal_cost_summary(runs[BASELINE], rows),
            "cpu_s_ratio": per_arm[arm]["cpu_s"] / per_arm[BASELINE]["cpu_s"],
            "teacher_samples_ratio": per_arm[arm]["teacher_samples"] / per_arm[BASELINE]["teacher_samples"],
        }
        share = (
            f"{at_cost[arm]['teacher_samples_ratio']:.1%} of its teacher samples, "
            f"{at_cost[arm]['cpu_s_ratio']:.2f}x its CPU s, the build included"
        )
        verdicts[arm] = verdict(f"{arm} vs {BASELINE}, held-out errors after equal epochs", paired[arm], share)

    def fmt(setting: dict) -> str:
        return ", ".join(f"{ {'learning_rate': 'lr', 'temperature': 'T'}.get(k, k) }={v:g}" for k, v in setting.items())

    print(
        f"\nHeld-out errors on {len(test)} real MNIST digits after {epochs:g} epochs (students trained on {len(train)} "
        f"digits, the teacher on {len(teacher_data)}: {teacher['test']} errors)"
    )
    print(
        "{:<8} {:<22} {:<26} {:>13} {:>9} {:>8} {:>9} {:>7}".format(
            "arm", "chosen on validation", "errors per seed", "mean ± std", "teacher", "build s", "CPU s/ep", "CPU s"
        )
    )
    for arm in q.arms:
        a = per_arm[arm]
        mean_pm = f"{a['mean']:.1f} ± {a['std']:.1f}"
        print(
            f"{arm:<8} {fmt(chosen[arm]):<22} {str(test_errors[arm]):<26} {mean_pm:>13} {a['teacher_samples']:>9.0f} "
            f"{a['build_cpu_s']:>8.1f} {a['cpu_s_per_epoch']:>9.2f} {a['cpu_s']:>7.0f}"
        )
    print("(teacher: samples the teacher ran on, build included; CPU s: the run's training CPU seconds plus its build)")
    print(f"\nPaired against {BASELINE} (negative: fewer errors than {BASELINE}):")
    for arm, stats in paired.items():
        print(f"{arm} - {BASELINE}, held-out, equal epochs: {fmt_ci(stats)}")
        print_equal_cost(at_cost[arm])
    for v in verdicts.values():
        print(f"verdict: {v}")
    print(
        f"wall-clock {seconds:.0f} s, {workers} run(s) at a time, load {load_at_start[0]:.1f} at the start and "
        f"{load_at_end[0]:.1f} at the end (the seconds are not part of the reproducible numbers; the CPU seconds "
        "are each run's own)"
    )

    summary = {
        "arguments": asdict(q),
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
        "augmentation": {"device_augment": True, "augment_padding": q.max_shift, "augment_flip": False},
        "teacher": {
            "widths": q.teacher_widths,
            "params": teacher["params"],
            "val_errors": teacher["val"],
            "test_errors": teacher["test"],
        },
        "student": {"widths": q.student_widths, "params": runs[BASELINE][0]["params"]},
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
    plot_paired(
        f"{q.output_dir}/paired.png",
        q.seeds,
        test_errors,
        title=f"held-out errors after {epochs:g} epochs, {len(train)} training digits",
    )
    head = f"{len(train)} training digits, final runs, {epochs:g} epochs; 1 thread per run"
    plot_cost_curves(
        q.output_dir,
        runs,
        head,
        cpu_label="CPU seconds of the run's process: cache build + training (evaluation excluded)",
        forwards_label="samples the teacher ran on (forward hook; cache build + training)",
    )
    return write_results(
        f"{q.output_dir}/results.json",
        summary,
        command=["python", *sys.argv] if argv is None else ["python", "recipes/evidence_cache.py", *argv],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
