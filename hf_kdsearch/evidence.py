"""A fair comparison protocol for "does distillation (or a searched student) beat the baseline?".

The rules it encodes:

1. **Three splits.** `protocol_split` cuts the bundled digits into train / validation / held-out test with a seeded
   shuffle. Every choice (learning rate, T, alpha, epochs, ...) is made on validation; the held-out digits are scored
   once, at the end.
2. **Equal tuning budget.** `tune_arms` gives every arm the same number of trial runs (one grid per arm, all of the
   same length) and keeps, per arm, the setting with the fewest validation errors. A trial whose validation result is
   not a finite number (a diverged run) is never chosen; the arm's entry names it.
3. **Training length is part of the protocol.** Every arm trains on the same schedule length, chosen by one stated
   rule on validation: the tuning grid is run at every length of a ladder (e.g. 60 and 120 epochs), and
   `choose_epochs` takes the shortest length that doubling no longer improves by more than `max(2 errors, 5%)` of
   validation errors for any arm (`length_converged`). `tune_arms` keeps each trial's validation curve, so the
   results JSON and the plots show the curves as well.
4. **Paired seeds.** Arms that share an architecture are run with the same seed list; the caller seeds the initial
   weights and the data order with it, so seed `s` of one arm differs from seed `s` of another only by the method.
5. **Paired statistics.** `paired_summary` reports mean ± std per arm, the mean paired difference with a 95%
   Student-t interval (`None` with one seed), an exact two-sided sign test, and wins / losses / ties out of N. It
   refuses non-finite values.
6. **Equal cost.** Where a method's claim is a cost (teacher forwards, seconds), `value_at_cost` reads a curve of
   (cumulative cost, validation errors) at a given cost and `cost_to_reach` the cost at which it first reaches given
   errors, so arms are compared at the same cost, not at the same epoch count.

`write_results` and `plot_paired` save what a run found (results JSON with versions, the CPU model and torch build,
seeds, command (Hub tokens redacted), wall-clock and the chosen settings, strict JSON with non-finite numbers as
`null`; a PNG of per-seed paired lines). `plot_curves` draws validation curves. Everything here is pure Python
or numpy except the plots.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .data import TensorImageDataset, load_mnist10k
from .redact import redact_argv
from .versions import versions

__all__ = [
    "protocol_split",
    "t_quantile",
    "sign_test_pvalue",
    "mean_std",
    "paired_summary",
    "tune_arms",
    "length_converged",
    "choose_epochs",
    "value_at_cost",
    "cost_to_reach",
    "machine_info",
    "redact_command",
    "strict_json",
    "write_results",
    "plot_curves",
    "plot_paired",
    "pyplot",
    "save_figure",
]


def protocol_split(
    n_train: int, n_val: int, seed: int = 0, *, with_rest: bool = False
) -> tuple[TensorImageDataset, ...]:
    """`(train, validation, test)` from the bundled 10,000 digits; with `with_rest`, also `rest`.

    The test part is `load_mnist10k()`'s 2,000 held-out digits (the documented split). Train and validation are
    disjoint, drawn with a permutation seeded by `seed` from its 8,000 training digits, so their class mix is random,
    not the file's class order. `rest` holds the training digits in neither (e.g. for a teacher that has seen more
    data than the student; it never sees validation or test digits).
    """
    pool, test = load_mnist10k()
    if n_train < 1 or n_val < 1 or n_train + n_val > len(pool):
        raise ValueError(f"need 1 <= n_train, 1 <= n_val and n_train + n_val <= {len(pool)}; got {n_train}, {n_val}")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    parts = [perm[:n_train], perm[n_train : n_train + n_val]]
    if with_rest:
        parts.append(perm[n_train + n_val :])
    out = [TensorImageDataset(pool.images[i], pool.labels[i]) for i in parts]
    return (out[0], out[1], test, *out[2:])


# ---- statistics --------------------------------------------------------------------------------------------------


def _t_cdf(x: float, df: float, steps: int = 4000) -> float:
    """Student-t CDF at `x >= 0`, by Simpson's rule on the density (accurate to ~1e-9 for the quantiles used here)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    # Substitute t = tan(u) so heavy tails (df = 1) integrate on a finite, smooth interval.
    top = math.atan(x)
    h = top / steps
    total = pdf(0.0) + pdf(x) * (1 + x * x)
    for i in range(1, steps):
        u = i * h
        total += (4 if i % 2 else 2) * pdf(math.tan(u)) / math.cos(u) ** 2
    return 0.5 + total * h / 3


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (`t_quantile(0.975, 4)` = 2.776)."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    # Newton from 0: the CDF is concave on [0, inf), so the iterates rise monotonically to the root.
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = 0.0
    for _ in range(200):
        step = (p - _t_cdf(x, df)) / math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))
        x += step
        if step < 1e-10 * max(1.0, x):
            break
    return x


def sign_test_pvalue(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least this lopsided | each non-tied pair is a fair coin)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s


def paired_summary(baseline: Sequence[float], method: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Compare per-seed errors (lower is better) of `method` against `baseline`, paired by position.

    Returns means and stds of both, `diff` (mean of `method - baseline`, negative = method better) with its
    `level` t-interval `ci` (`None` with a single pair: one seed has no interval), `wins` (method strictly better),
    `losses`, `ties`, `n`, and the sign test's `p_sign`. A value that is not a finite number (a diverged run) is
    refused: it would count as a tie and turn the means into NaN.
    """
    if len(baseline) != len(method) or not baseline:
        raise ValueError(f"paired_summary needs two equal, non-empty lists; got {len(baseline)} and {len(method)}")
    bad = [
        f"{name}[{i}] = {v}"
        for name, vs in (("baseline", baseline), ("method", method))
        for i, v in enumerate(vs)
        if not math.isfinite(v)
    ]
    if bad:
        raise ValueError(f"paired_summary needs finite values (a diverged run has no error count): {', '.join(bad)}")
    d = [m - b for b, m in zip(baseline, method)]
    n = len(d)
    dm, ds = mean_std(d)
    half = t_quantile(0.5 + level / 2, n - 1) * ds / math.sqrt(n) if n > 1 else None
    wins, losses = sum(x < 0 for x in d), sum(x > 0 for x in d)
    (bm, bs), (mm, ms) = mean_std(baseline), mean_std(method)
    return {
        "n": n,
        "baseline_mean": bm,
        "baseline_std": bs,
        "method_mean": mm,
        "method_std": ms,
        "diff": dm,
        "diff_std": ds,
        "ci": None if half is None else [dm - half, dm + half],
        "level": level,
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "p_sign": sign_test_pvalue(wins, losses),
    }


# ---- tuning --------------------------------------------------------------------------------------------------------


def tune_arms(
    grids: Mapping[str, Sequence[Mapping[str, Any]]],
    run: Callable[[str, Mapping[str, Any]], float | Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Try every setting of every arm's grid with `run(arm, setting)`; keep each arm's best.

    `run` returns the validation errors, or a mapping with them under `"val"` and anything else to record with the
    trial (e.g. `"curve"`: the validation errors after every epoch). All grids must have the same length: each arm
    gets the same number of trial runs. Ties go to the earlier setting. A trial whose `val` is not a finite number
    (a diverged run) is never chosen: it is listed under `"diverged"` and named in a warning; an arm with no finite
    trial raises `ValueError`. Returns `{arm: {"best": setting, "best_val": errors, "best_index": i,
    "trials": [{"setting", "val", ...}, ...], "diverged": [setting, ...]}}`.
    """
    sizes = {arm: len(g) for arm, g in grids.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"every arm needs the same, non-zero number of trials; got {sizes}")
    out = {}
    for arm, grid in grids.items():
        trials = []
        for setting in grid:
            result = run(arm, setting)
            extra = dict(result) if isinstance(result, Mapping) else {"val": result}
            trials.append({"setting": dict(setting), **extra})
        finite = [i for i, t in enumerate(trials) if _finite(t["val"])]
        diverged = [trials[i]["setting"] for i in range(len(trials)) if i not in finite]
        if not finite:
            raise ValueError(f"every trial of arm {arm!r} diverged (no finite validation result): {diverged}")
        if diverged:
            warnings.warn(
                f"arm {arm!r}: {len(diverged)} trial(s) diverged and were not considered: {diverged}", stacklevel=2
            )
        best = min(finite, key=lambda i: trials[i]["val"])
        out[arm] = {
            "best": trials[best]["setting"],
            "best_val": trials[best]["val"],
            "best_index": best,
            "trials": trials,
            "diverged": diverged,
        }
    return out


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---- training length ----------------------------------------------------------------------------------------------

#: The convergence rule of every evidence run: see `length_converged`.
LENGTH_RULE = {"rel_tol": 0.05, "abs_tol": 2.0}


def length_converged(
    short: float,
    long: float,
    *,
    rel_tol: float = LENGTH_RULE["rel_tol"],
    abs_tol: float = LENGTH_RULE["abs_tol"],
) -> dict[str, Any]:
    """Is a schedule long enough? `short` and `long` are the validation errors after a schedule and after one about
    twice as long (same setting and seed): it is when the longer one improves on it by at most
    `max(abs_tol, rel_tol * long)` errors. A non-finite value (a diverged run) is not converged.

    The rule compares whole schedules, not the tail of one curve: under a decaying learning rate every curve flattens
    at its end, converged or not, so a flat tail proves nothing; what matters is whether more epochs would help."""
    out = {"short": short, "long": long, "improvement": None, "tolerance": None, "converged": False}
    if not (_finite(short) and _finite(long)):
        return out
    tolerance = max(abs_tol, rel_tol * long)
    out.update(improvement=short - long, tolerance=tolerance, converged=short - long <= tolerance)
    return out


def choose_epochs(val: Mapping[float, Mapping[str, float]], **rule: float) -> dict[str, Any]:
    """The shortest schedule that is long enough (`length_converged`) for every arm: the same length for all.

    `val` maps each length of a ladder (e.g. 60, 120 epochs) to `{arm: the arm's best validation errors at that
    length}` (the same tuning grid for every arm and length). Length `L` is long enough for an arm when the next
    length of the ladder improves on it by at most the rule's tolerance. Returns `{"epochs": the shortest length
    long enough for every arm, or None; "converged": {arm: True if the arm passed at the chosen length, or (no
    length passed) at the ladder's last step, False if it was still improving there, None with a one-length ladder};
    "checks": [{"short_epochs", "long_epochs", "arm", ...length_converged...}], "rule": the parameters}`. A caller
    given `epochs=None` trains on the longest length and names the arms that were still improving."""
    params = {**LENGTH_RULE, **rule}
    lengths = sorted(val)
    arms = list(val[lengths[0]]) if lengths else []
    checks, passed = [], {}
    for short, long in zip(lengths, lengths[1:]):
        for arm in arms:
            r = length_converged(val[short][arm], val[long][arm], **params)
            checks.append({"short_epochs": short, "long_epochs": long, "arm": arm, **r})
            passed[short, arm] = r["converged"]
    epochs = next((length for length in lengths[:-1] if all(passed[length, a] for a in arms)), None)
    at = epochs if epochs is not None else (lengths[-2] if len(lengths) > 1 else None)
    converged = {arm: None if at is None else passed[at, arm] for arm in arms}
    return {"epochs": epochs, "converged": converged, "checks": checks, "rule": params}


# ---- equal cost ---------------------------------------------------------------------------------------------------


def value_at_cost(costs: Sequence[float], values: Sequence[float], budget: float) -> float | None:
    """The value of the last point of a curve whose cumulative cost is at most `budget`; None if the first is over.

    `costs` rises (teacher forwards, CPU seconds, ...); `values` are the validation errors measured at those costs."""
    if len(costs) != len(values):
        raise ValueError(f"costs and values differ in length: {len(costs)} and {len(values)}")
    within = [v for c, v in zip(costs, values) if c <= budget * (1 + 1e-12)]
    return within[-1] if within else None


def cost_to_reach(costs: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The first cumulative cost at which the values are at most `target`; None if they never are."""
    if len(costs) != len(values):
        raise ValueError(f"costs and values differ in length: {len(costs)} and {len(values)}")
    return next((c for c, v in zip(costs, values) if v <= target), None)


# ---- output --------------------------------------------------------------------------------------------------------


def redact_command(argv: Sequence[str]) -> str:
    """`argv` joined by spaces, tokens redacted (`hf_kdsearch.redact.redact_argv`)."""
    return " ".join(redact_argv(argv))


def machine_info() -> dict[str, Any]:
    """What the digits of a CPU run depend on besides the library versions: the CPU model and the torch build."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    build = [line.strip()[2:] for line in torch.__config__.show().splitlines() if line.strip().startswith("- ")]
    return {
        "cpu_model": model,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_git": torch.version.git_version,
        "torch_cuda": torch.version.cuda,
        "torch_build": [b for b in build if not b.startswith("Build settings")],
    }


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-inf) replaced by None, so that strict JSON parsers accept it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_results(path: str, summary: Mapping[str, Any], *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Write `summary` plus versions, the machine (`machine_info`), the command line (tokens redacted) and the thread
    count as strict JSON to `path` (non-finite numbers become `null`); return what was written."""
    record = strict_json(
        {
            **summary,
            "command": redact_command(command if command is not None else sys.argv),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(("hf_kdsearch", "torch", "transformers", "timm")),
            "machine": machine_info(),
        }
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)
    return record


def plot_paired(
    path: str,
    seeds: Sequence[int],
    arms: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    ylabel: str = "held-out errors",
) -> None:
    """A PNG with one x position per arm and one line per seed joining that seed's results across arms."""
    plt = pyplot()
    names = list(arms)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    for i, seed in enumerate(seeds):
        ys = [arms[a][i] for a in names]
        ax.plot(range(len(names)), ys, "o-", color="0.6", lw=1)
        ax.annotate(f"s{seed}", (len(names) - 1, ys[-1]), xytext=(4, 0), textcoords="offset points", fontsize=7)
    for j, a in enumerate(names):
        m = sum(arms[a]) / len(arms[a])
        ax.plot([j - 0.2, j + 0.2], [m, m], color="C3", lw=2.5, label="mean" if j == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def plot_curves(
    path: str,
    curves: Mapping[str, Sequence[Sequence[float]]],
    *,
    x: Mapping[str, Sequence[Sequence[float]]] | None = None,
    xlabel: str = "epoch",
    ylabel: str = "validation errors",
    title: str = "",
    hline: tuple[float, str] | None = None,
) -> None:
    """Validation curves: per arm a thin line per run and a thick one for their mean (log y axis).

    `curves[arm]` holds one curve per run (seed or trial); `x[arm]`, if given, the matching x values (e.g. the
    cumulative CPU seconds or teacher forwards), else the epochs 1, 2, ...; `hline = (y, label)` draws a reference."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (arm, runs) in enumerate(curves.items()):
        xs = x[arm] if x is not None else [list(range(1, len(c) + 1)) for c in runs]
        for xv, c in zip(xs, runs):
            ax.plot(xv, c, color=f"C{i}", lw=0.7, alpha=0.35)
        length = min(len(c) for c in runs)
        mean_x = [sum(xv[j] for xv in xs) / len(xs) for j in range(length)]
        mean_y = [sum(c[j] for c in runs) / len(runs) for j in range(length)]
        ax.plot(mean_x, mean_y, "-", color=f"C{i}", lw=2, label=f"{arm} (mean of {len(runs)})")
    if hline is not None:
        ax.axhline(hline[0], color="0.4", ls="--", lw=0.8, label=hline[1])
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="both", labelsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def pyplot():
    """`matplotlib.pyplot` on the Agg backend, which draws to files and needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lay out `fig`, write it to `path` (a PNG; its folder is created) and close it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
