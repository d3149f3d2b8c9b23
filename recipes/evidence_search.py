"""Evidence for student search on a conv net: searched vs uniformly thinned vs shallower, at 25% and 10% of the FLOPs.

    python recipes/evidence_search.py            # full run: 29 min on 2 shared cores; ~15 alone (est.)
    python recipes/evidence_search.py --quick    # smoke run of the same pipeline, about a minute

Gu & Tresp (2020, https://arxiv.org/abs/2001.11612) claim that a student found as a subgraph of the teacher by L1 gate
search beats a hand-designed student of the same FLOPs. This script checks it on the bundled digits under the
comparison protocol of `hf_kdsearch.evidence`. Every training run uses one torch thread; up to `min(2, cores)` runs
go side by side in worker processes (`--workers`), so the numbers do not depend on the machine's core count.

1. Data: 2,000 training and 1,000 validation digits (seeded shuffle), 2,000 held-out digits scored once; every
   training digit shifted by up to 2 pixels, the same view for teacher and student.
2. Teacher: `mnist_cnn` 16-16-32-32 trained on the 7,000 digits outside validation and test (the quickstart's).
3. Search criteria, each a 2,000-digit `DistillationTrainer` run of a gated teacher copy with `GateSearchCallback`
   at the budget, then `select_units` + `build_student` (`extract_student` with a ranking of its own):
   - `l1`: the paper's FLOPs-weighted L1 on the gates, only the gates trainable, `--search_epochs`; rank by `|g|`;
   - `l1_long`: the same, 5x the epochs;
   - `floor`: the `l1` gates, but every layer keeps at least half of its uniformly thinned width (per-layer floors);
   - `expected_flops`: only the gates trainable, penalty on the expected FLOPs (`penalty="expected_flops"`,
     MorphNet-like: counts each FLOP once, and a channel's pull shrinks as its neighbours thin);
   - `slim`: every weight trainable with the L1 gate penalty, ranked by `|g * gamma|` (the channel's effective
     batch-norm scale; network slimming, Liu et al. 2017, ranks by `|gamma|`).
   At each budget, each criterion's student is distilled from scratch once on validation (seed 100, lr 0.2); the one
   with the fewest validation errors is *the* searched student. (This gives the searched arm 5 extra validation runs
   that the other arms do not get: the comparison favours it.)
4. Students at each budget, their FLOPs matched to the searched student's (within 2%):
   - `searched`; `uniform`: every layer thinned by one factor; `shallow`: two convs (a pool after each), scaled;
   - from scratch (the claim is about the architecture) and, for `searched_init` / `uniform_init`, from the teacher's
     weights: the searched student keeps the weights it was cut out with (gates folded in); the uniform one keeps each
     layer's channels of largest `|gamma|`. (`shallow` is no subgraph of the teacher: from scratch only.)
5. Every student is distilled with the same schedule (SGD momentum 0.9, cosine, T = 4, alpha = 0.9, `--epochs`);
   each arm picks its learning rate on validation from the same grid (`--lrs` from scratch, `--init_lrs` from the
   teacher's weights), then trains with the paired seeds (seed s: the same batch order and views in every arm,
   checked) and is scored once on the held-out digits.

It prints per-arm errors, each arm's paired difference against `searched` (same initialisation) with a 95%
t-interval, the sign test and wins out of N, and writes `results.json`, `paired_<budget>.png` (per-seed lines across
the arms) and `widths.png` (teacher and student widths per layer) under `--output_dir`.

Measured (torch 2.14.1, transformers 5.25.0), held-out errors of 2,000 over seeds 0-4, searched against uniform:
25%: 91.4 ± 5.0 vs 77.2 ± 5.8 from scratch, 95.8 vs 81.6 from the teacher's weights; 10%: 153.8 vs 104.2 and 214.8
vs 127.6. Uniform thinning won on every seed; docs/evidence.md has the tables, the criteria and the plots.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import timm
import torch
from mnist_common import ShiftCollate, held_out_errors
from mnist_quickstart import QuickstartArguments, _one_thread, executor, quiet, run_args, splits, teacher_run
from transformers import HfArgumentParser, set_seed

from hf_kdsearch import DistillationTrainer, GateSearchCallback, add_gates, count_flops
from hf_kdsearch.evidence import (
    paired_summary,
    plot_paired,
    pyplot,
    save_figure,
    tune_arms,
    write_results,
)
from hf_kdsearch.gates import GateSelection, build_student, gate_parameters, gate_plan, select_units

INPUT = (1, 28, 28)
CRITERIA = ("l1", "l1_long", "floor", "expected_flops", "slim")
#: search run -> (trainable, epochs factor, penalty, the criteria it yields)
SEARCHES = {
    "gates": ("gates", 1, "l1", ("l1", "floor")),
    "gates_long": ("gates", 5, "l1", ("l1_long",)),
    "expected_flops": ("gates", 1, "expected_flops", ("expected_flops",)),
    "slim": ("all", 1, "l1", ("slim",)),
}
SCRATCH_ARMS = ("searched", "uniform", "shallow")
INIT_ARMS = ("searched_init", "uniform_init")
ARMS = SCRATCH_ARMS + INIT_ARMS


@dataclass
class SearchEvidenceArguments(QuickstartArguments):
    """The quickstart's arguments (teacher, data, batch, shifts, seeds, workers) with this run's own defaults and
    settings; `--student_widths` is unused (the search finds the widths)."""

    output_dir: str = field(default="out/evidence_search", metadata={"help": "Where results.json and the plots go."})
    n_train: int = field(default=2000, metadata={"help": "Student training digits."})
    epochs: float = field(default=20, metadata={"help": "Distillation epochs of every student."})
    budgets: list[float] = field(
        default_factory=lambda: [0.25, 0.10], metadata={"help": "FLOPs budgets, fractions of the teacher's."}
    )
    search_epochs: float = field(default=3, metadata={"help": "Gate search epochs (l1_long: 5x)."})
    lrs: list[float] = field(default_factory=lambda: [0.05, 0.2], metadata={"help": "lr grid, from scratch."})
    init_lrs: list[float] = field(
        default_factory=lambda: [0.01, 0.05], metadata={"help": "lr grid, from the teacher's weights."}
    )
    criterion_lr: float = field(default=0.2, metadata={"help": "lr of the validation run that picks the criterion."})
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


# ---- the runs: functions of their arguments alone, so they give the same numbers in any process -------------------
def load_teacher(q: SearchEvidenceArguments, state: dict) -> torch.nn.Module:
    teacher = cnn(q.teacher_widths)
    teacher.load_state_dict(state)
    return teacher.eval()


def ranked_student(gated: torch.nn.Module, ratio: float, scores: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The student at `ratio` of the FLOPs whose units are chosen by `scores` (one tensor per gate group, largest
    first) instead of the gate magnitudes; its weights are the gated model's, gates folded in."""
    ranking = copy.deepcopy(gated)
    with torch.no_grad():
        for name, gate in gate_parameters(ranking).items():
            gate.copy_(scores[name])
    return build_student(gated, select_units(ranking, target_flops_ratio=ratio, input_size=INPUT))


def criterion_scores(gated: torch.nn.Module, criterion: str, ratio: float) -> dict[str, torch.Tensor]:
    plan = gate_plan(gated)
    gates = {n: g.detach().abs() for n, g in gate_parameters(gated).items()}
    if criterion == "slim":
        return {n: g * gated.get_submodule(plan.groups[n].module).weight.detach().abs() for n, g in gates.items()}
    if criterion == "floor":
        # Every layer keeps at least half the width uniform thinning would give it: sqrt(ratio) of its channels.
        floor = 0.5 * math.sqrt(ratio)
        out = {}
        for n, g in gates.items():
            k = max(1, round(floor * g.numel()))
            boost = torch.zeros_like(g)
            boost[g.argsort(descending=True)[:k]] = 1e6
            out[n] = g + boost
        return out
    return gates


def search_job(q: SearchEvidenceArguments, teacher_state: dict, ratio: float, search: str) -> dict:
    """One search run at `ratio`; per criterion it yields, the found widths and the cut-out student's weights."""
    trainable, factor, penalty, criteria = SEARCHES[search]
    train, *_ = splits(q)
    teacher = load_teacher(q, teacher_state)
    set_seed(q.tune_seed)
    gated = add_gates(copy.deepcopy(teacher))
    for name, p in gated.named_parameters():
        p.requires_grad_(trainable == "all" or "gate" in name)
    cb = GateSearchCallback(
        target_flops_ratio=ratio, l1_weight=5.0, l1_growth=1.02, input_size=INPUT, penalty=penalty, write_report=False
    )
    out_dir = f"{q.output_dir}/search-{search}-{ratio:g}"
    args = run_args(out_dir, q.tune_seed, q.search_epochs * factor, q.batch_size, learning_rate=0.05)
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
    found = {}
    for criterion in criteria:
        student = ranked_student(gated, ratio, criterion_scores(gated, criterion, ratio))
        found[criterion] = {
            "widths": list(student.model_args["widths"]),
            "state": student.state_dict(),
            "flops": count_flops(student, INPUT),
            "expected_flops_ratio_at_end": float(cb.expected_flops_ratio()),
        }
    return found


def uniform_from_teacher(teacher: torch.nn.Module, widths: list[int]) -> dict:
    """The teacher sliced to `widths`, each layer keeping its channels of largest batch-norm `|gamma|`."""
    gated = add_gates(copy.deepcopy(teacher))
    plan = gate_plan(gated)
    kept = {}
    for (name, group), k in zip(plan.groups.items(), widths):
        gamma = gated.get_submodule(group.module).weight.detach().abs()
        kept[name] = gamma.argsort(descending=True)[:k].sort().values
    return build_student(gated, GateSelection(kept, {}, float("nan"))).state_dict()


def student_job(q: SearchEvidenceArguments, teacher_state: dict, spec: dict, seed: int, lr: float, score_on: str):
    """One student distilled on the training digits, from scratch or from `spec["state"]`, scored on `score_on`."""
    train, val, test, _ = splits(q)
    teacher = load_teacher(q, teacher_state)
    set_seed(seed)
    student = cnn(spec["widths"], spec["pool_every"])
    if spec.get("state") is not None:
        student.load_state_dict(spec["state"])
    collate = ShiftCollate(seed, q.max_shift)
    args = run_args(
        f"{q.output_dir}/student-{seed}", seed, q.epochs, q.batch_size, temperature=4.0, alpha=0.9, learning_rate=lr
    )
    quiet(
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, data_collator=collate)
    )
    return {"errors": held_out_errors(student, val if score_on == "val" else test), "digest": collate.digest}


# ---- the plots ------------------------------------------------------------------------------------------------------
def plot_widths(path: str, teacher: list[int], rows: dict[str, dict[str, list[int]]]) -> None:
    """One panel per budget: per layer, the teacher's width and each student's."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.6), squeeze=False)
    for ax, (budget, students) in zip(axes[0], rows.items()):
        series = {"teacher": teacher, **students}
        w = 0.8 / len(series)
        for i, (name, widths) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(widths))]
            ax.bar(xs, widths, w, label=name, color="0.75" if name == "teacher" else f"C{i - 1}")
        ax.set_xticks(range(len(teacher)), [f"conv{j + 1}" for j in range(len(teacher))])
        ax.set_ylabel("channels")
        ax.set_title(f"{budget} of the teacher's FLOPs", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    (q,) = HfArgumentParser(SearchEvidenceArguments).parse_args_into_dataclasses(argv)
    started = time.time()
    cores = len(os.sched_getaffinity(0))
    workers = q.workers or min(2, cores)
    _one_thread()
    if q.quick:
        q.seeds, q.n_train, q.n_val, q.epochs, q.teacher_epochs, q.search_epochs = q.seeds[:2], 300, 300, 1, 1, 1
        q.lrs, q.init_lrs = q.lrs[:1], q.init_lrs[:1]
    train, val, test, _ = splits(q)
    print(f"{len(train)} training, {len(val)} validation, {len(test)} held-out digits; {workers} run(s) at a time")

    def log(what: str) -> None:
        print(f"  {what} ({time.time() - started:.0f} s)", flush=True)

    with executor(workers) as pool:
        t = pool.submit(teacher_run, q).result()
        teacher = load_teacher(q, t["state"])
        t_flops = count_flops(teacher, INPUT)
        log(f"teacher {q.teacher_widths}: {t['val']} validation errors, {t_flops:,} FLOPs")

        # 1. Searches, then one validation run per criterion and budget (the same seed and lr for all).
        searches = {(r, s): pool.submit(search_job, q, t["state"], r, s) for r in q.budgets for s in SEARCHES}
        found = {r: {} for r in q.budgets}
        for (r, s), f in searches.items():
            found[r].update(f.result())
            log(f"search {s} at {r:.0%}: " + ", ".join(f"{c} {v['widths']}" for c, v in f.result().items()))
        crit_runs = {
            (r, c): pool.submit(
                student_job, q, t["state"], {"widths": found[r][c]["widths"], "pool_every": 2}, q.tune_seed,
                q.criterion_lr, "val",
            )
            for r in q.budgets
            for c in CRITERIA
        }  # fmt: skip
        crit_val = {r: {} for r in q.budgets}
        for (r, c), f in crit_runs.items():
            crit_val[r][c] = f.result()["errors"]
            log(f"criterion {c} at {r:.0%} {found[r][c]['widths']}: {crit_val[r][c]} validation errors")
        chosen = {r: min(CRITERIA, key=lambda c: (crit_val[r][c], CRITERIA.index(c))) for r in q.budgets}

        # 2. The arms at each budget.
        specs, flops, matches = {}, {}, {}
        for r in q.budgets:
            s = found[r][chosen[r]]
            uniform, u_ratio = match_flops(q.teacher_widths, 2, s["flops"])
            shallow, s_ratio = match_flops(q.teacher_widths[1::2], 1, s["flops"])
            specs[r] = {
                "searched": {"widths": s["widths"], "pool_every": 2},
                "uniform": {"widths": uniform, "pool_every": 2},
                "shallow": {"widths": shallow, "pool_every": 1},
                "searched_init": {"widths": s["widths"], "pool_every": 2, "state": s["state"]},
                "uniform_init": {"widths": uniform, "pool_every": 2, "state": uniform_from_teacher(teacher, uniform)},
            }
            flops[r] = {a: count_flops(cnn(sp["widths"], sp["pool_every"]), INPUT) for a, sp in specs[r].items()}
            matches[r] = {"uniform": u_ratio, "shallow": s_ratio}
            log(f"budget {r:.0%}: chosen criterion {chosen[r]}; " + ", ".join(
                f"{a} {sp['widths']} {flops[r][a] / t_flops:.1%}" for a, sp in specs[r].items() if a in SCRATCH_ARMS
            ))  # fmt: skip

        def grid(arm: str) -> list[float]:
            return q.init_lrs if arm in INIT_ARMS else q.lrs

        tune_futures = {
            (r, a, lr): pool.submit(student_job, q, t["state"], specs[r][a], q.tune_seed, lr, "val")
            for r in q.budgets
            for a in ARMS
            for lr in grid(a)
        }
        tuned = {}
        for r in q.budgets:
            tuned[r] = tune_arms(
                {a: [{"learning_rate": lr} for lr in grid(a)] for a in ARMS},
                lambda a, s, r=r: tune_futures[(r, a, s["learning_rate"])].result()["errors"],
            )
            log(f"budget {r:.0%} tuned: " + ", ".join(f"{a} lr={tuned[r][a]['best']['learning_rate']:g}" for a in ARMS))

        # 3. Paired seeds, scored once on the held-out digits.
        finals = {
            (r, a, seed): pool.submit(
                student_job, q, t["state"], specs[r][a], seed, tuned[r][a]["best"]["learning_rate"], "test"
            )
            for r in q.budgets
            for seed in q.seeds
            for a in ARMS
        }
        runs = {key: f.result() for key, f in finals.items()}
    errors = {r: {a: [runs[(r, a, s)]["errors"] for s in q.seeds] for a in ARMS} for r in q.budgets}
    for (r, a, s), run in runs.items():
        if run["digest"] != runs[(r, "searched", s)]["digest"]:
            raise RuntimeError(f"seed {s}: arm {a} saw other batches than 'searched'; the comparison is not paired")

    versus = {}
    for r in q.budgets:
        print(f"\nHeld-out errors on {len(test)} digits at {r:.0%} of the teacher's FLOPs (criterion: {chosen[r]})")
        versus[r] = {}
        for a in ARMS:
            base = "searched_init" if a in INIT_ARMS else "searched"
            s = paired_summary(errors[r][base], errors[r][a])
            print(
                f"{a:<14} {str(specs[r][a]['widths']):<18} {flops[r][a] / t_flops:>6.1%}  "
                f"lr={tuned[r][a]['best']['learning_rate']:<5g} {str(errors[r][a]):<28} "
                f"{s['method_mean']:.1f} ± {s['method_std']:.1f}"
            )
            if a != base:
                versus[r][a] = s
                lo, hi = s["ci"]
                print(
                    f"    {a} - {base}: {s['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]; {base} better in {s['losses']} "
                    f"of {s['n']}, worse in {s['wins']}, sign test p = {s['p_sign']:.3f}"
                )
        plot_paired(
            f"{q.output_dir}/paired_{round(r * 100)}.png",
            q.seeds,
            errors[r],
            title=f"students at {r:.0%} of the teacher's FLOPs, distilled (_init: from the teacher's weights)",
        )
    plot_widths(
        f"{q.output_dir}/widths.png",
        q.teacher_widths,
        {
            f"{r:.0%}": {"uniform": specs[r]["uniform"]["widths"], **{c: found[r][c]["widths"] for c in CRITERIA}}
            for r in q.budgets
        },
    )
    summary = {
        "arguments": asdict(q),
        "threads": 1,
        "workers": workers,
        "cores": cores,
        "teacher": {"widths": q.teacher_widths, "flops": t_flops, "val_errors": t["val"], "test_errors": t["test"]},
        "budgets": {
            f"{r:g}": {
                "criteria": {
                    c: {k: v for k, v in found[r][c].items() if k != "state"} | {"val_errors": crit_val[r][c]}
                    for c in CRITERIA
                },
                "chosen_criterion": chosen[r],
                "students": {
                    a: {"widths": specs[r][a]["widths"], "pool_every": specs[r][a]["pool_every"], "flops": flops[r][a]}
                    for a in ARMS
                },
                "flops_match": matches[r],
                "tuning": tuned[r],
                "test_errors": errors[r],
                "versus_searched": versus[r],
            }
            for r in q.budgets
        },
        "seeds": q.seeds,
        "wall_clock_s": time.time() - started,
    }
    cmd = ["python", "recipes/evidence_search.py", *(sys.argv[1:] if argv is None else argv)]
    return write_results(f"{q.output_dir}/results.json", summary, command=cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
