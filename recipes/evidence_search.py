"""Evidence for student search: the searched student, chosen among width candidates on validation, against uniform.

    python recipes/evidence_search.py            # full run (see docs/evidence.md for its wall-clock)
    python recipes/evidence_search.py --quick    # smoke run of the same pipeline, a few minutes

Gu & Tresp (2020, https://arxiv.org/abs/2001.11612) claim that a student found as a subgraph of the teacher by L1 gate
search beats a hand-designed student of the same FLOPs. This script checks it on the bundled digits under the
comparison protocol of `hf_kdsearch.evidence`, with the search as the library runs it:

1. Data: `--n_train` training and `--n_val` validation digits (seeded shuffle), 2,000 held-out digits scored once;
   training digits shifted by up to 2 pixels, the same view for teacher and student.
2. Teachers, trained on the 7,000 digits outside validation and test: `mnist_cnn` 16-16-32-32 (the quickstart's) and,
   so that the claim is not tied to one small CNN, a residual `cifar_resnet20` (stem 8, stages 8-16-32, one input
   channel; it takes the 28 x 28 digits as they are: convolutions and a global pool).
3. Search, per teacher and budget: a gated copy of the teacher (`add_gates`, width gates only), only the gates
   trainable, `--search_epochs` of `DistillationTrainer` with `GateSearchCallback` (FLOPs-weighted L1, the "max" gate
   projection, the controller on the selected student's FLOPs). At its end the callback ranks units by
   `unit_importance` and lists the width candidates `uniform`, `found`, `box` (0.75-1.5x uniform per layer).
4. Training length and candidate selection, per setting (teacher, budget, start), the same budget for every
   candidate: each candidate (at most `--max_candidate_runs`, uniform first) is distilled on the training digits
   exactly as the final runs will be (same lr and start: from scratch, or from the teacher's weights as cut out, gates
   folded in) with `--tune_seed`, once at every length of `--epoch_ladder`, and scored on validation. The length is
   chosen by `hf_kdsearch.evidence.choose_epochs`: the shortest length at which the next one of the ladder no longer
   lowers any candidate's validation errors by more than max(2 errors, 5%); if no length passes, the longest is used
   and the candidates still improving are named. `pick_candidate` then keeps the fewest validation errors *at that
   length*, ties to uniform. That is *the* searched student.
5. Finals: the searched student and uniform thinning, trained for the setting's length, 5 paired seeds (seed s: same
   initialisation rule, batch order and views; checked), scored once on the held-out digits. When the searched
   student *is* uniform, the two arms are the same runs, reported as a tie (the runs are deterministic, so they are
   run once).

Every student run (candidates and finals) records its validation curve (`EpochClock`: validation errors every
`--eval_every` epochs and after the last, with the run's own CPU seconds); the held-out digits are scored only at the
end of a final run.

Every run uses one torch thread; `--workers` runs go side by side in worker processes, so the numbers do not depend on
the machine's core count. It prints, per setting, every candidate (widths, FLOPs, validation errors at each length),
the length and the rule's verdict, the chosen candidate, and searched against uniform (mean ± std, the paired
difference with its 95% t-interval, wins out of N, sign test), and writes `results.json` (per setting: the length
rule, the candidates' runs and curves at every length, the finals' curves), `paired.png`, `widths.png` and
`curves.png` (the finals' validation curves) under `--output_dir`.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import timm
import torch
from mnist_common import (
    EpochClock,
    QuickstartArguments,
    ShiftCollate,
    executor,
    held_out_errors,
    length_line,
    one_thread,
    quiet,
    run_args,
    splits,
    teacher_run,
)
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import ClassificationTrainer, DistillationTrainer, GateSearchCallback, add_gates, count_flops
from hf_kdsearch.candidates import pick_candidate
from hf_kdsearch.evidence import (
    LENGTH_RULE,
    choose_epochs,
    paired_summary,
    plot_curves,
    pyplot,
    save_figure,
    write_results,
)

INPUT = (1, 28, 28)
STARTS = ("scratch", "teacher")
#: The residual teacher: cifar_resnet20 at half width, for one-channel 28 x 28 digits and 10 classes.
RESNET = {"stem_width": 8, "stage_widths": [8, 16, 32], "in_chans": 1, "num_classes": 10}
#: Lengths every candidate is run at (see --epoch_ladder). A student epoch of 1,000 digits costs about 1 CPU second
#: (CNN students) and 2.5 (ResNet), teacher forwards included, so the default run needs about 2,500 CPU seconds at
#: most (every final at 24 epochs, two arms per setting): about 20 minutes on 2 idle cores.
DEFAULT_LADDER = [12.0, 24.0]


@dataclass
class SearchEvidenceArguments(QuickstartArguments):
    """The quickstart's arguments (teacher, data, batch, shifts, seeds, workers) with this run's own settings;
    `--student_widths` is unused (the search finds the widths)."""

    output_dir: str = field(default="out/evidence_search", metadata={"help": "Where results.json and the plots go."})
    epochs: float = field(default=0, metadata={"help": "Not used here: the lengths come from --epoch_ladder."})
    epoch_ladder: list[float] = field(
        default_factory=lambda: DEFAULT_LADDER,
        metadata={
            "help": "Distillation lengths (epochs, rising) every candidate is run at on validation; the length rule "
            "picks the one the setting's final runs train for."
        },
    )
    eval_every: int = field(default=3, metadata={"help": "Epochs between validation points of a run's curve."})
    teacher_epochs: float = field(default=4, metadata={"help": "Epochs of the CNN teacher (over its 7,000 digits)."})
    budgets: list[float] = field(
        default_factory=lambda: [0.25, 0.10], metadata={"help": "FLOPs budgets of the CNN, fractions of the teacher's."}
    )
    starts: list[str] = field(
        default_factory=lambda: list(STARTS), metadata={"help": "CNN starts: scratch and/or teacher (its weights)."}
    )
    resnet_settings: list[str] = field(
        default_factory=lambda: ["0.25:scratch"],
        metadata={"help": "Residual-family settings as budget:start (e.g. 0.25:scratch 0.1:teacher); none: skip."},
    )
    resnet_teacher_epochs: float = field(default=3, metadata={"help": "Epochs of the residual teacher."})
    search_epochs: float = field(default=3, metadata={"help": "Gate search epochs."})
    lr_scratch: float = field(default=0.2, metadata={"help": "lr of every student from scratch."})
    lr_teacher: float = field(default=0.05, metadata={"help": "lr of every student from the teacher's weights."})
    max_candidate_runs: int = field(
        default=3, metadata={"help": "Validation runs per setting to pick the candidate (uniform first; >= 1)."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Smoke run: 200 + 200 digits, 2 seeds, ladder 1, 2 epochs (teachers and search: 1 epoch)."},
    )

    def __post_init__(self):
        if self.epochs:
            raise ValueError("evidence_search.py chooses its length by a rule: give --epoch_ladder, not --epochs")
        if not self.epoch_ladder or sorted(self.epoch_ladder) != self.epoch_ladder or min(self.epoch_ladder) <= 0:
            raise ValueError(f"--epoch_ladder must be positive lengths in rising order; got {self.epoch_ladder}")
        if len(set(self.epoch_ladder)) != len(self.epoch_ladder) or self.eval_every < 1:
            raise ValueError(f"--epoch_ladder must not repeat a length and --eval_every must be >= 1; got "
                             f"{self.epoch_ladder}, {self.eval_every}")  # fmt: skip


# ---- the runs: functions of their arguments alone, so they give the same numbers in any process -------------------
def make_teacher(family: str, widths: list[int]) -> torch.nn.Module:
    if family == "cnn":
        return timm.create_model("mnist_cnn", widths=widths)
    return timm.create_model("cifar_resnet20", **RESNET)


def load_teacher(q: SearchEvidenceArguments, family: str, state: dict) -> torch.nn.Module:
    teacher = make_teacher(family, q.teacher_widths)
    teacher.load_state_dict(state)
    return teacher.eval()


def resnet_teacher_run(q: SearchEvidenceArguments) -> dict:
    """The residual teacher, trained like the CNN teacher (AdamW, the students' augmentation)."""
    _, val, test, teacher_data = splits(q)
    set_seed(0)
    teacher = make_teacher("resnet", q.teacher_widths)
    t_args = run_args(f"{q.output_dir}/resnet-teacher", 0, q.resnet_teacher_epochs, q.batch_size, learning_rate=3e-3)
    t_args.optim, t_args.optim_args, t_args.weight_decay = "adamw_torch", None, 5e-4
    quiet(
        ClassificationTrainer(
            model=teacher, args=t_args, train_dataset=teacher_data, data_collator=ShiftCollate(0, q.max_shift)
        )
    )
    return {"state": teacher.state_dict(), "val": held_out_errors(teacher, val), "test": held_out_errors(teacher, test)}


def search_job(q: SearchEvidenceArguments, family: str, teacher_state: dict, ratio: float) -> dict:
    """One gate search at `ratio`: its width candidates, each with the student's architecture and cut-out weights."""
    started = time.time()
    train, *_ = splits(q)
    teacher = load_teacher(q, family, teacher_state)
    set_seed(q.tune_seed)
    gated = add_gates(copy.deepcopy(teacher), depth=False)
    for name, p in gated.named_parameters():
        p.requires_grad_("gate" in name)  # frozen weights: a gate's size measures its unit's worth
    cb = GateSearchCallback(
        target_flops_ratio=ratio, l1_weight=5.0, l1_growth=1.02, input_size=INPUT, write_report=False
    )
    args = run_args(f"{q.output_dir}/search-{family}-{ratio:g}", q.tune_seed, q.search_epochs, q.batch_size,
                    learning_rate=0.05)  # fmt: skip
    quiet(
        DistillationTrainer(
            model=gated,
            teacher_model=teacher,
            args=args,
            train_dataset=train,
            data_collator=ShiftCollate(q.tune_seed, q.max_shift),
            callbacks=[cb],
        )
    )
    gated.eval()
    candidates = []
    for c in cb.candidates:
        student = c.student(gated)
        c.selection = None  # the main process needs the numbers, not the gated model's indices
        candidates.append(
            {
                "candidate": c,
                "arch": student.pretrained_cfg["architecture"],
                "model_args": dict(student.model_args),
                "state": student.state_dict(),
            }
        )
    return {
        "candidates": candidates,
        "selected_flops_ratio": float(cb.selected_flops_ratio()),
        "final_l1_weight": cb.current_l1_weight,
        "seconds": time.time() - started,
    }


def student_job(q, family: str, teacher_state: dict, spec: dict, start: str, seed: int, score_on: str,
                epochs: float) -> dict:  # fmt: skip
    """One student distilled on the training digits for `epochs`, from scratch or from its cut-out weights, scored on
    `score_on` ("val" or "test"), with its validation curve (`EpochClock`, every `q.eval_every` epochs and after the
    last; the evaluation leaves the run as it is)."""
    started = time.time()
    train, val, test, _ = splits(q)
    teacher = load_teacher(q, family, teacher_state)
    set_seed(seed)
    extra = {"num_classes": 10} if family == "resnet" else {}
    student = timm.create_model(spec["arch"], **spec["model_args"], **extra)
    if start == "teacher":
        student.load_state_dict(spec["state"])
    collate = ShiftCollate(seed, q.max_shift)
    lr = q.lr_teacher if start == "teacher" else q.lr_scratch
    args = run_args(f"{q.output_dir}/student-{seed}", seed, epochs, q.batch_size, temperature=4.0, alpha=0.9,
                    learning_rate=lr)  # fmt: skip
    clock = EpochClock(student, val, eval_every=q.eval_every)
    quiet(
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train,
            data_collator=collate,
            callbacks=[clock],
        )
    )
    errors = held_out_errors(student, val if score_on == "val" else test)
    return {
        "errors": errors,
        "digest": collate.digest,
        "seconds": time.time() - started,
        "cpu_s": sum(clock.epoch_cpu_seconds),
        "cpu_s_per_epoch": sum(clock.epoch_cpu_seconds) / len(clock.epoch_cpu_seconds),
        "curve": {k: clock.curve[k] for k in ("epoch", "seconds", "cpu_seconds", "val_errors")},
    }


# ---- the plots ------------------------------------------------------------------------------------------------------
def plot_paired_settings(path: str, seeds: list[int], settings: dict[str, dict]) -> None:
    """One panel per setting: per seed, held-out errors of uniform and of the searched student, joined by a line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(settings), figsize=(2.6 * len(settings) + 0.6, 3.4), squeeze=False)
    for ax, (label, s) in zip(axes[0], settings.items()):
        u, m = s["test_errors"]["uniform"], s["test_errors"]["searched"]
        for i in range(len(seeds)):
            ax.plot([0, 1], [u[i], m[i]], "o-", color="0.6", lw=1)
        for j, v in enumerate((u, m)):
            ax.plot([j - 0.2, j + 0.2], [sum(v) / len(v)] * 2, color="C3", lw=2.5)
        ax.set_xticks([0, 1], ["uniform", f"searched\n({s['chosen']})"], fontsize=8)
        ax.set_xlim(-0.5, 1.5)
        ci = s["paired"]["ci"]  # None with one seed
        interval = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
        ax.set_title(f"{label}, {s['epochs']:g} epochs\n{s['paired']['diff']:+.1f}{interval}", fontsize=8)
    axes[0][0].set_ylabel("held-out errors (of 2,000)")
    save_figure(fig, path)


def plot_candidate_widths(path: str, searches: dict[str, dict]) -> None:
    """One panel per search: per layer, the teacher's width and every candidate's, with FLOPs and validation errors."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(searches), figsize=(4.6 * len(searches), 3.8), squeeze=False)
    for ax, (label, s) in zip(axes[0], searches.items()):
        series = [("teacher", s["teacher_widths"], "")] + [
            (c["name"] + "".join(f"={a}" for a in c["also"]), c["widths"], c["note"]) for c in s["candidates"]
        ]
        w = 0.8 / len(series)
        for i, (name, widths, note) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(widths))]
            ax.bar(xs, widths, w, label=f"{name} {note}".strip(), color="0.75" if i == 0 else f"C{i - 1}")
        ax.set_xticks(range(len(s["teacher_widths"])), [f"L{j + 1}" for j in range(len(s["teacher_widths"]))])
        ax.set_ylabel("channels")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(SearchEvidenceArguments).parse_args_into_dataclasses(argv)
    started = time.time()
    load_at_start = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    workers = q.workers or min(2, cores)
    one_thread()
    if q.quick:
        q.seeds, q.n_train, q.n_val, q.epoch_ladder, q.eval_every = q.seeds[:2], 200, 200, [1.0, 2.0], 1
        q.teacher_epochs, q.search_epochs, q.resnet_teacher_epochs = 1, 1, 1
    if not set(q.starts) <= set(STARTS) or q.max_candidate_runs < 1:
        raise ValueError(f"--starts must be among {STARTS} and --max_candidate_runs >= 1")
    # From scratch first (the claim is about the architecture), the residual family before the teacher's-weights runs:
    # the settings finish in this order.
    resnet = [("resnet", float(r), s) for r, s in (i.split(":") for i in q.resnet_settings if i != "none")]
    settings = [("cnn", r, s) for s in q.starts if s == "scratch" for r in q.budgets] + resnet
    settings += [("cnn", r, s) for s in q.starts if s != "scratch" for r in q.budgets]
    train, val, test, _ = splits(q)
    print(f"{len(train)} training, {len(val)} validation, {len(test)} held-out digits; {workers} run(s) at a time, "
          f"1 thread each ({cores} cores, load {load_at_start[0]:.1f}); lengths {q.epoch_ladder} epochs")  # fmt: skip

    def log(what: str) -> None:
        print(f"  {what} ({time.time() - started:.0f} s)", flush=True)

    families = sorted({f for f, _, _ in settings})
    with executor(workers) as pool:
        t_futures = {
            f: pool.submit(teacher_run if f == "cnn" else resnet_teacher_run, q) for f in families
        }  # fmt: skip
        teachers, t_flops = {}, {}
        for f, fut in t_futures.items():
            teachers[f] = fut.result()
            t_flops[f] = count_flops(load_teacher(q, f, teachers[f]["state"]), INPUT)
            log(f"teacher {f}: {teachers[f]['val']} validation, {teachers[f]['test']} held-out errors, "
                f"{t_flops[f]:,} FLOPs")  # fmt: skip

        # 1. One search per teacher and budget.
        budgets = sorted({(f, r) for f, r, _ in settings})
        s_futures = {(f, r): pool.submit(search_job, q, f, teachers[f]["state"], r) for f, r in budgets}
        searches = {}
        for (f, r), fut in s_futures.items():
            searches[(f, r)] = fut.result()
            log(f"search {f} {r:.0%} ({searches[(f, r)]['seconds']:.0f} s): " + "; ".join(
                f"{c['candidate'].name} {c['candidate'].width_list} {c['candidate'].flops_ratio:.1%}"
                for c in searches[(f, r)]["candidates"]
            ))  # fmt: skip

        # 2. Candidate runs on validation at every length of the ladder (the longest first: they take longest), every
        #    setting queued at once; then, setting by setting, the length rule, the choice at that length and its
        #    finals (uniform, and the searched student unless it is uniform), scored once on the held-out digits.
        cand_futures = {
            (f, r, s, c["candidate"].name, length): pool.submit(
                student_job, q, f, teachers[f]["state"], c, s, q.tune_seed, "val", length
            )
            for length in reversed(q.epoch_ladder)
            for f, r, s in settings
            for c in searches[(f, r)]["candidates"][: q.max_candidate_runs]
        }
        chosen, cand_runs, final_futures, lengths, cand_curves = {}, {}, {}, {}, {}
        for f, r, s in settings:
            key = (f, r, s)
            cands = [copy.copy(c["candidate"]) for c in searches[(f, r)]["candidates"]]
            cand_runs[key] = cands
            runs = {
                length: {c.name: cand_futures[(*key, c.name, length)].result() for c in cands[: q.max_candidate_runs]}
                for length in q.epoch_ladder
            }
            cand_curves[key] = runs
            rule = choose_epochs({length: {n: x["errors"] for n, x in rs.items()} for length, rs in runs.items()})
            epochs = rule["epochs"] if rule["epochs"] is not None else q.epoch_ladder[-1]
            lengths[key] = {**rule, "epochs_used": epochs, "stated": LENGTH_RULE}
            for c in cands[: q.max_candidate_runs]:  # scored at the chosen length; the cost is every length's
                c.val_score = runs[epochs][c.name]["errors"]
                c.seconds = sum(rs[c.name]["seconds"] for rs in runs.values())
            best = pick_candidate(cands)
            chosen[key] = best
            cost = sum(c.seconds or 0 for c in cands)
            log(f"{f} {r:.0%} {s}: " + "; ".join(
                f"{c.name} {c.width_list} {c.flops_ratio:.1%} val "
                + (" / ".join(str(rs[c.name]["errors"]) for rs in runs.values()) if c.name in runs[epochs] else "-")
                for c in cands
            ) + f" at {' / '.join(f'{x:g}' for x in q.epoch_ladder)} epochs -> {best.name} "
                f"(candidate runs {cost:.0f} s); {length_line(lengths[key])}")  # fmt: skip
            arms = ("uniform",) if best.name == "uniform" else ("uniform", best.name)
            for arm in arms:
                spec = next(c for c in searches[(f, r)]["candidates"] if c["candidate"].name == arm)
                for seed in q.seeds:
                    final_futures[(f, r, s, arm, seed)] = pool.submit(
                        student_job, q, f, teachers[f]["state"], spec, s, seed, "test", epochs
                    )
        report, per_setting = {}, {}
        for f, r, s in settings:
            key = (f, r, s)
            label = f"{f} {r:.0%} {s}"
            u = [final_futures[(*key, "uniform", seed)].result() for seed in q.seeds]
            same = chosen[key].name == "uniform"
            m = u if same else [final_futures[(*key, chosen[key].name, seed)].result() for seed in q.seeds]
            for seed, a, b in zip(q.seeds, u, m):
                if a["digest"] != b["digest"]:
                    raise RuntimeError(f"{label}, seed {seed}: the arms saw different batches; not paired")
            ue, me = [x["errors"] for x in u], [x["errors"] for x in m]
            stats = paired_summary(ue, me)
            lo, hi = stats["ci"] or (float("nan"), float("nan"))  # one seed: no interval
            cands = cand_runs[key]
            epochs = lengths[key]["epochs_used"]
            runs = cand_curves[key]
            ladder = " / ".join(f"{x:g}" for x in q.epoch_ladder)
            print(f"\n{label}: teacher {t_flops[f]:,} FLOPs; candidates (validation errors of {len(val)} after "
                  f"{ladder} epochs):")  # fmt: skip
            for c in cands:
                mark = " <- chosen" if c is chosen[key] else ""
                narrow = f", narrow: {', '.join(c.narrow_layers)}" if c.narrow_layers else ""
                vals = " / ".join(str(rs[c.name]["errors"]) for rs in runs.values()) if c.name in runs[epochs] else "-"
                print(f"    {c.name + ''.join('=' + a for a in c.also):<18} {str(c.width_list):<28} "
                      f"{c.flops_ratio:6.1%}  val {vals}{narrow}{mark}")  # fmt: skip
            print(f"    {length_line(lengths[key])}")
            print(f"    uniform  {ue}  {stats['baseline_mean']:.1f} ± {stats['baseline_std']:.1f}")
            print(f"    searched {me}  {stats['method_mean']:.1f} ± {stats['method_std']:.1f}"
                  + ("  (the chosen candidate is uniform: the same runs)" if same else ""))  # fmt: skip
            print(
                f"    searched - uniform: {stats['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]; searched better in "
                f"{stats['wins']} of {stats['n']}, worse in {stats['losses']}, ties {stats['ties']}, sign test "
                f"p = {stats['p_sign']:.3f} ({time.time() - started:.0f} s)",
                flush=True,
            )
            per_setting[label] = {"test_errors": {"uniform": ue, "searched": me}, "paired": stats,
                                  "chosen": chosen[key].name, "epochs": epochs, "same_runs": same,
                                  "curves": {"uniform": [x["curve"] for x in u],
                                             "searched": [x["curve"] for x in m]}}  # fmt: skip
            report[label] = {
                "family": f,
                "budget": r,
                "start": s,
                "lr": q.lr_teacher if s == "teacher" else q.lr_scratch,
                "candidates": [c.to_dict() for c in cands],
                "chosen": chosen[key].name,
                "chosen_widths": chosen[key].width_list,
                "uniform_widths": cands[0].width_list,
                "same_runs": same,
                "length_rule": lengths[key],
                "epochs": epochs,
                "candidate_runs": {
                    f"{length:g}": {
                        n: {k: x[k] for k in ("errors", "seconds", "cpu_s", "cpu_s_per_epoch", "curve")}
                        for n, x in rs.items()
                    }
                    for length, rs in runs.items()
                },
                "search": {k: v for k, v in searches[(f, r)].items() if k != "candidates"},
                "test_errors": {"uniform": ue, "searched": me},
                "run_seconds": {"uniform": [x["seconds"] for x in u], "searched": [x["seconds"] for x in m]},
                "run_cpu_s": {"uniform": [x["cpu_s"] for x in u], "searched": [x["cpu_s"] for x in m]},
                "curves": per_setting[label]["curves"],
                "searched_vs_uniform": stats,
            }
    plot_paired_settings(f"{q.output_dir}/paired.png", q.seeds, per_setting)
    # The finals' validation curves, every setting in one figure (log y: the settings sit at different levels);
    # a setting whose searched student is uniform has one set of runs.
    finals = {
        f"{label} ({p['epochs']:g} ep): {arm if arm == 'uniform' else 'searched ' + p['chosen']}": p["curves"][arm]
        for label, p in per_setting.items()
        for arm in (("uniform",) if p["same_runs"] else ("uniform", "searched"))
    }
    plot_curves(
        f"{q.output_dir}/curves.png",
        {k: [c["val_errors"] for c in v] for k, v in finals.items()},
        x={k: [c["epoch"] for c in v] for k, v in finals.items()},
        title=f"final runs, {len(train)} training digits, {len(q.seeds)} seeds each; length chosen per setting",
    )
    plot_candidate_widths(
        f"{q.output_dir}/widths.png",
        {
            f"{f} {r:.0%} (validation errors: " + ", ".join(s for ff, rr, s in settings if (ff, rr) == (f, r)) + ")": {
                "teacher_widths": [row["teacher"] for row in searches[(f, r)]["candidates"][0]["candidate"].widths],
                "candidates": [
                    {
                        **c["candidate"].to_dict(),
                        "note": f"{c['candidate'].flops_ratio:.1%}: val "
                        + "/".join(
                            str(next(x.val_score for x in cand_runs[(ff, rr, s)] if x.name == c["candidate"].name))
                            for ff, rr, s in settings
                            if (ff, rr) == (f, r)
                        ),
                    }
                    for c in searches[(f, r)]["candidates"]
                ],
            }
            for f, r in budgets
        },
    )
    summary = {
        "arguments": asdict(q),
        "threads": 1,
        "workers": workers,
        "cores": cores,
        "teachers": {
            f: {"flops": t_flops[f], "val_errors": teachers[f]["val"], "test_errors": teachers[f]["test"]}
            for f in families
        },
        "settings": report,
        "seeds": q.seeds,
        "epoch_ladder": q.epoch_ladder,
        "length_rule": LENGTH_RULE,
        "load_average_at_start": list(load_at_start),
        "load_average_at_end": list(os.getloadavg()),
        "wall_clock_s": time.time() - started,
    }
    print(f"wall-clock {summary['wall_clock_s']:.0f} s, {workers} run(s) at a time")
    cmd = ["python", "recipes/evidence_search.py", *(sys.argv[1:] if argv is None else argv)]
    return write_results(f"{q.output_dir}/results.json", summary, command=cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
