"""The comparison protocol: splits, equal tuning budgets and the paired statistics, against known values."""

import json
import math

import pytest
import torch

from hf_kdsearch.evidence import (
    LENGTH_RULE,
    choose_epochs,
    mean_std,
    paired_summary,
    plot_paired,
    protocol_split,
    sign_test_pvalue,
    t_quantile,
    tune_arms,
    write_results,
)


@pytest.mark.parametrize(
    "df, p, expected",
    [  # Student-t table values (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
        (1, 0.975, 12.706),
        (2, 0.975, 4.303),
        (4, 0.975, 2.776),
        (9, 0.975, 2.262),
        (29, 0.975, 2.045),
        (100, 0.975, 1.984),
        (4, 0.95, 2.132),
        (10, 0.995, 3.169),
    ],
)
def test_t_quantile_matches_the_table(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=6e-4)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 4)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.9, 0)


def test_sign_test_exact_values():
    assert sign_test_pvalue(5, 0) == 2 / 32  # 5 of 5: two-sided 0.0625
    assert sign_test_pvalue(0, 5) == 2 / 32
    assert sign_test_pvalue(4, 1) == pytest.approx(12 / 32)  # 2 * (1 + 5) / 32
    assert sign_test_pvalue(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_pvalue(3, 3) == 1.0
    assert sign_test_pvalue(0, 0) == 1.0


def test_mean_std_uses_the_sample_std():
    assert mean_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx((5.0, math.sqrt(32 / 7)))
    assert mean_std([3]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def test_paired_summary_known_values():
    alone, distilled = [10, 12, 11, 13, 9], [9, 11, 11, 10, 8]  # differences -1, -1, 0, -3, -1
    s = paired_summary(alone, distilled)
    assert (s["n"], s["wins"], s["losses"], s["ties"]) == (5, 4, 0, 1)
    assert s["diff"] == pytest.approx(-1.2)
    assert s["diff_std"] == pytest.approx(math.sqrt(1.2))  # deviations .2 .2 1.2 1.8 .2 -> 4.8 / 4
    half = 2.7764451 * math.sqrt(1.2) / math.sqrt(5)
    assert s["ci"] == pytest.approx([-1.2 - half, -1.2 + half], abs=1e-4)
    assert s["p_sign"] == pytest.approx(2 / 16)  # 4 wins, 0 losses, the tie dropped
    assert (s["baseline_mean"], s["method_mean"]) == (11.0, 9.8)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_summary([1, 2], [1])


def test_tune_arms_gives_every_arm_the_same_budget_and_keeps_the_best():
    calls = []

    def run(arm, setting):
        calls.append((arm, setting["lr"]))
        return {"a": {0.1: 30, 0.2: 20, 0.4: 20}, "b": {0.1: 5, 0.2: 9, 0.4: 7}}[arm][setting["lr"]]

    grid = [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.4}]
    out = tune_arms({"a": grid, "b": grid}, run)
    assert len(calls) == 6
    assert out["a"]["best"] == {"lr": 0.2} and out["a"]["best_val"] == 20  # ties go to the earlier setting
    assert out["b"]["best"] == {"lr": 0.1}
    assert [t["val"] for t in out["b"]["trials"]] == [5, 9, 7]
    with pytest.raises(ValueError, match="same, non-zero number of trials"):
        tune_arms({"a": grid, "b": grid[:2]}, run)


def test_protocol_split_is_disjoint_shuffled_and_seeded():
    train, val, test = protocol_split(1000, 500)
    assert (len(train), len(val), len(test)) == (1000, 500, 2000)
    assert torch.bincount(train.labels, minlength=10).min() > 60  # shuffled: every class, not the file's first ones
    pool = torch.cat([train.images, val.images, test.images]).flatten(1)
    assert len(torch.unique(pool, dim=0)) == len(pool)  # no digit in two splits
    again, _, _ = protocol_split(1000, 500)
    assert torch.equal(train.images, again.images)
    other, _, _ = protocol_split(1000, 500, seed=1)
    assert not torch.equal(train.labels, other.labels)
    tr2, va2, te2, rest = protocol_split(1000, 500, with_rest=True)
    assert torch.equal(tr2.labels, train.labels) and torch.equal(va2.labels, val.labels) and len(rest) == 6500
    everything = torch.cat([train.images, val.images, rest.images]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == 8000  # the three parts tile the training pool
    with pytest.raises(ValueError, match="n_train \\+ n_val"):
        protocol_split(7000, 2000)


def test_write_results_and_plot(tmp_path):
    record = write_results(str(tmp_path / "r.json"), {"seeds": [0, 1]}, command=["python", "x.py", "--quick"])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == record and on_disk["command"] == "python x.py --quick" and on_disk["seeds"] == [0, 1]
    assert {"hf_kdsearch", "torch", "transformers", "python"} <= set(on_disk["versions"])
    plot_paired(str(tmp_path / "p.png"), [0, 1], {"alone": [10, 12], "distilled": [9, 11]}, title="t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def load_evidence_search(monkeypatch):
    """recipes/evidence_search.py as a module (recipes/ is not a package; it imports mnist_common from beside it)."""
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "evidence_search", os.path.join(root, "recipes", "evidence_search.py")
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "evidence_search", module)  # dataclasses look their module up
    monkeypatch.syspath_prepend(os.path.join(root, "recipes"))
    spec.loader.exec_module(module)
    return module


def test_evidence_search_takes_its_length_from_the_rule_not_from_epochs(monkeypatch):
    module = load_evidence_search(monkeypatch)
    with pytest.raises(ValueError, match="give --epoch_ladder, not --epochs"):
        module.main(["--epochs", "8"])
    for ladder in (["20", "10"], ["0", "10"], ["10", "10"]):
        with pytest.raises(ValueError, match="--epoch_ladder"):
            module.main(["--epoch_ladder", *ladder])
    # The printed verdict: a length that passed, and the longest with the candidates still improving.
    passed = {**choose_epochs({10: {"uniform": 300, "box": 290}, 20: {"uniform": 295, "box": 289}}), "epochs_used": 10}
    assert module.length_line(passed) == (
        "length: 10 epochs (rule: 20 epochs lowered no candidate's validation errors by more than max(2 errors, 5%))"
    )
    failed = {**choose_epochs({10: {"uniform": 300, "box": 290}, 20: {"uniform": 250, "box": 289}}), "epochs_used": 20}
    assert failed["epochs"] is None
    assert module.length_line(failed) == (
        "length: 20 epochs, the longest; still improving by more than max(2 errors, 5%): uniform (300 -> 250)"
    )


@pytest.mark.slow
def test_evidence_search_quick_mode_writes_its_results_and_plot(tmp_path, monkeypatch):
    module = load_evidence_search(monkeypatch)
    threads = torch.get_num_threads()
    try:
        module.main(["--quick", "--workers", "1", "--output_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["seeds"] == [0, 1] and out["epoch_ladder"] == [1, 2]
    labels = ["cnn 25% scratch", "cnn 10% scratch", "resnet 25% scratch", "cnn 25% teacher", "cnn 10% teacher"]
    assert list(out["settings"]) == labels
    for label, s in out["settings"].items():
        budget = s["budget"] * out["teachers"][s["family"]]["flops"]
        names = [c["name"] for c in s["candidates"]]
        assert names[0] == "uniform" and set(names) <= {"uniform", "found", "box"}
        assert all(c["flops"] <= budget and isinstance(c["val_score"], int | float) for c in s["candidates"]), label
        # The length: the rule's choice on the candidates' validation errors at every length, the longest if none.
        runs = s["candidate_runs"]
        assert list(runs) == ["1", "2"] and all(list(r) == names for r in runs.values()), label
        rule = s["length_rule"]
        again = choose_epochs({float(n): {c: r["errors"] for c, r in rs.items()} for n, rs in runs.items()})
        assert (rule["epochs"], rule["converged"]) == (again["epochs"], again["converged"]), label
        epochs = rule["epochs_used"]
        assert epochs == (rule["epochs"] if rule["epochs"] is not None else 2) and s["epochs"] == epochs
        assert rule["stated"] == LENGTH_RULE
        for length, rs in runs.items():  # one validation point per epoch (--eval_every 1), the last the run's score
            for r in rs.values():
                assert r["curve"]["epoch"] == [float(e) for e in range(1, int(length) + 1)], label
                assert len(r["curve"]["val_errors"]) == len(r["curve"]["cpu_seconds"]) == int(length)
                assert r["curve"]["val_errors"][-1] == r["errors"]
        # The candidate: the fewest validation errors at the chosen length, ties to the earlier (uniform first).
        at_length = {n: r["errors"] for n, r in runs[f"{epochs:g}"].items()}
        assert {c["name"]: c["val_score"] for c in s["candidates"]} == at_length
        assert s["chosen"] == min(names, key=lambda n: at_length[n]), label
        if at_length["uniform"] == min(at_length.values()):
            assert s["chosen"] == "uniform" and s["same_runs"]
        assert s["uniform_widths"] == s["candidates"][0]["widths"]
        chosen = next(c for c in s["candidates"] if c["name"] == s["chosen"])
        assert s["chosen_widths"] == chosen["widths"]
        # The finals train for the chosen length, each with its validation curve.
        for arm in ("uniform", "searched"):
            assert len(s["curves"][arm]) == 2
            for curve in s["curves"][arm]:
                assert curve["epoch"] == [float(e) for e in range(1, int(epochs) + 1)], label
                assert all(0 <= v <= 200 for v in curve["val_errors"])
        if s["same_runs"]:
            assert s["curves"]["searched"] == s["curves"]["uniform"]
        errors = s["test_errors"]
        assert len(errors["uniform"]) == len(errors["searched"]) == 2
        assert all(0 <= e <= 2000 for e in errors["uniform"] + errors["searched"])
        assert s["searched_vs_uniform"]["n"] == 2
        assert s["searched_vs_uniform"]["diff"] == pytest.approx((sum(errors["searched"]) - sum(errors["uniform"])) / 2)
    assert len(out["settings"]["resnet 25% scratch"]["uniform_widths"]) == 9  # cifar_resnet20: 9 gated blocks
    for name in ("paired.png", "widths.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
