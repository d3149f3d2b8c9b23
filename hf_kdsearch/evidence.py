"""A fair comparison protocol for "does distillation (or a searched student) beat the baseline?".

The rules it encodes:

1. **Three splits.** `protocol_split` cuts the bundled digits into train / validation / held-out test with a seeded
   shuffle. Every choice (learning rate, T, alpha, epochs, ...) is made on validation; the held-out digits are scored
   once, at the end.
2. **Equal tuning budget.** `tune_arms` gives every arm the same number of trial runs (one grid per arm, all of the
   same length) and keeps, per arm, the setting with the fewest validation errors.
3. **Paired seeds.** Arms that share an architecture are run with the same seed list; the caller seeds the initial
   weights and the data order with it, so seed `s` of one arm differs from seed `s` of another only by the method.
4. **Paired statistics.** `paired_summary` reports mean ± std per arm, the mean paired difference with a 95%
   Student-t interval, an exact two-sided sign test, and wins / losses / ties out of N.

`write_results` and `plot_paired` save what a run found (results JSON with versions, seeds, command, wall-clock and
the chosen settings; a PNG of per-seed paired lines). Everything here is pure Python or numpy except the plot.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .data import TensorImageDataset, load_mnist10k

__all__ = [
    "protocol_split",
    "t_quantile",
    "sign_test_pvalue",
    "mean_std",
    "paired_summary",
    "tune_arms",
    "write_results",
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
    `level` t-interval `ci`, `wins` (method strictly better), `losses`, `ties`, `n`, and the sign test's `p_sign`.
    """
    if len(baseline) != len(method) or not baseline:
        raise ValueError(f"paired_summary needs two equal, non-empty lists; got {len(baseline)} and {len(method)}")
    d = [m - b for b, m in zip(baseline, method)]
    n = len(d)
    dm, ds = mean_std(d)
    half = t_quantile(0.5 + level / 2, n - 1) * ds / math.sqrt(n) if n > 1 else math.inf
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
        "ci": [dm - half, dm + half],
        "level": level,
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "p_sign": sign_test_pvalue(wins, losses),
    }


# ---- tuning --------------------------------------------------------------------------------------------------------


def tune_arms(
    grids: Mapping[str, Sequence[Mapping[str, Any]]],
    run: Callable[[str, Mapping[str, Any]], float],
) -> dict[str, dict[str, Any]]:
    """Try every setting of every arm's grid with `run(arm, setting) -> validation errors`; keep each arm's best.

    All grids must have the same length: each arm gets the same number of trial runs. Ties go to the earlier
    setting. Returns `{arm: {"best": setting, "best_val": errors, "trials": [{"setting", "val"}, ...]}}`.
    """
    sizes = {arm: len(g) for arm, g in grids.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"every arm needs the same, non-zero number of trials; got {sizes}")
    out = {}
    for arm, grid in grids.items():
        trials = [{"setting": dict(s), "val": run(arm, s)} for s in grid]
        best = min(range(len(trials)), key=lambda i: trials[i]["val"])
        out[arm] = {"best": trials[best]["setting"], "best_val": trials[best]["val"], "trials": trials}
    return out


# ---- output --------------------------------------------------------------------------------------------------------


def write_results(path: str, summary: Mapping[str, Any], *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Write `summary` plus versions, command line and thread count as JSON to `path`; return what was written."""
    import transformers

    from . import __version__

    record = {
        **summary,
        "command": " ".join(command if command is not None else sys.argv),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "hf_kdsearch": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
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
