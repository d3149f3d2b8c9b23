"""The protocol's rules on synthetic inputs: diverged trials, non-finite values, strict JSON, the convergence rule,
equal-cost readings, and what a results JSON records about the machine and the command."""

import json
import math
import warnings

import pytest

from hf_kdsearch import evidence  # attributes looked up per test: each test fails on its own where one is missing


def _strict(text: str):
    """json.loads that refuses NaN / Infinity, as strict parsers (JavaScript, jq, Go) do."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ---- diverged runs --------------------------------------------------------------------------------------------------


def test_tune_arms_never_chooses_a_diverged_trial_and_names_it():
    values = {"a": [math.nan, 30.0, 20.0], "b": [50.0, math.inf, 40.0]}

    def run(arm, setting):
        return values[arm][setting["i"]]

    grids = {arm: [{"i": i} for i in range(3)] for arm in values}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = evidence.tune_arms(grids, run)
    assert tuned["a"]["best"] == {"i": 2} and tuned["a"]["best_val"] == 20.0
    assert tuned["b"]["best"] == {"i": 2} and tuned["b"]["best_val"] == 40.0
    assert tuned["a"]["diverged"] == [{"i": 0}] and tuned["b"]["diverged"] == [{"i": 1}]
    messages = [str(w.message) for w in caught]
    assert any("'a'" in m and "{'i': 0}" in m for m in messages)
    assert any("'b'" in m and "{'i': 1}" in m for m in messages)


def test_tune_arms_refuses_an_arm_whose_every_trial_diverged():
    with pytest.raises(ValueError, match="every trial of arm 'x' diverged"):
        evidence.tune_arms({"x": [{"lr": 1}, {"lr": 2}]}, lambda arm, s: math.nan)


def test_tune_arms_records_each_trials_curve():
    def run(arm, setting):
        return {"val": setting["lr"] * 10, "curve": [100, 50, setting["lr"] * 10]}

    tuned = evidence.tune_arms({"kd": [{"lr": 2}, {"lr": 1}]}, run)
    assert tuned["kd"]["best"] == {"lr": 1} and tuned["kd"]["best_index"] == 1
    assert [t["curve"] for t in tuned["kd"]["trials"]] == [[100, 50, 20], [100, 50, 10]]
    assert tuned["kd"]["diverged"] == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_paired_summary_refuses_non_finite_values(bad):
    with pytest.raises(ValueError, match=r"finite values.*method\[1\]"):
        evidence.paired_summary([10, 11, 12], [9, bad, 11])
    with pytest.raises(ValueError, match=r"baseline\[0\]"):
        evidence.paired_summary([bad, 11, 12], [9, 10, 11])


def test_one_seed_interval_is_null_and_the_results_are_strict_json(tmp_path):
    s = evidence.paired_summary([10], [8])
    assert s["n"] == 1 and s["ci"] is None and s["diff"] == -2
    path = tmp_path / "results.json"
    written = evidence.write_results(str(path), {"paired": s, "odd": [1.0, math.nan, math.inf]}, command=["x"])
    on_disk = _strict(path.read_text())  # raises on NaN / Infinity
    assert on_disk == written
    assert on_disk["paired"]["ci"] is None and on_disk["odd"] == [1.0, None, None]


# ---- what a results JSON records ------------------------------------------------------------------------------------


def test_write_results_records_the_machine_and_redacts_tokens(tmp_path):
    token = "hf_" + "aBcD3fGh1jKlMn0pQrStUvWxYz"
    command = ["python", "r.py", "--hub_token", token, "--api-token=secret1", "--lr", "0.1", f"note={token}"]
    record = evidence.write_results(str(tmp_path / "r.json"), {}, command=command)
    text = (tmp_path / "r.json").read_text()
    assert token not in text and "secret1" not in text
    assert record["command"] == "python r.py --hub_token <redacted> --api-token=<redacted> --lr 0.1 note=<redacted>"
    machine = record["machine"]
    assert machine["cpu_model"] and machine["logical_cpus"] >= 1
    assert machine["torch_cpu_capability"] and machine["torch_git"]
    assert any("C++" in line or "GCC" in line or "Clang" in line for line in machine["torch_build"])
    assert "torch_cuda" in machine  # None for a CPU-only build


def test_redact_command_leaves_ordinary_arguments_alone():
    argv = ["python", "x.py", "--seeds", "0", "1", "--output_dir", "out/hf_run", "--token_budget", "5", "--token", "t"]
    # Only flags that end in `token` hide their value; short `hf_` words are not tokens.
    assert (
        evidence.redact_command(argv)
        == "python x.py --seeds 0 1 --output_dir out/hf_run --token_budget 5 --token <redacted>"
    )


# ---- the convergence rule -------------------------------------------------------------------------------------------


def test_length_converged_on_known_values():
    # 5% of 100 is 5: improving by 5 is within the rule, by 6 is not.
    assert evidence.length_converged(105, 100)["converged"]
    r = evidence.length_converged(106, 100)
    assert not r["converged"] and r["improvement"] == 6 and r["tolerance"] == 5.0
    # The absolute floor: at 20 errors the tolerance is max(2, 1) = 2.
    assert evidence.length_converged(22, 20)["converged"] and not evidence.length_converged(23, 20)["converged"]
    # Worse with the longer schedule: longer does not help, converged.
    assert evidence.length_converged(90, 110)["converged"]
    # A diverged run is never converged.
    assert not evidence.length_converged(math.nan, 100)["converged"]
    assert not evidence.length_converged(100, math.inf)["converged"]
    # The rule's parameters can be stated by the caller.
    assert evidence.length_converged(106, 100, rel_tol=0.1)["converged"]


def test_choose_epochs_takes_the_shortest_length_long_enough_for_every_arm():
    # Errors at 30 / 60 / 120 / 240 epochs, shaped like the runs: KD converges sooner than UNIX.
    val = {
        30: {"kd": 150, "unix": 320},
        60: {"kd": 104, "unix": 190},
        120: {"kd": 100, "unix": 113},
        240: {"kd": 99, "unix": 110},
    }
    chosen = evidence.choose_epochs(val)
    assert chosen["epochs"] == 120 and chosen["converged"] == {"kd": True, "unix": True}
    assert chosen["rule"] == {"rel_tol": 0.05, "abs_tol": 2.0}
    by = {(c["short_epochs"], c["arm"]): c["converged"] for c in chosen["checks"]}
    assert by == {
        (30, "kd"): False, (30, "unix"): False,
        (60, "kd"): True, (60, "unix"): False,
        (120, "kd"): True, (120, "unix"): True,
    }  # fmt: skip
    # Without the 240 rung no length is shown to be enough: the caller uses 120 and names unix as still improving.
    short = evidence.choose_epochs({k: v for k, v in val.items() if k < 240})
    assert short["epochs"] is None and short["converged"] == {"kd": True, "unix": False}
    # One length: nothing checked.
    assert evidence.choose_epochs({120: {"kd": 100}}) == {
        "epochs": None,
        "converged": {"kd": None},
        "checks": [],
        "rule": {"rel_tol": 0.05, "abs_tol": 2.0},
    }


# ---- equal cost -----------------------------------------------------------------------------------------------------


def test_value_at_cost_and_cost_to_reach():
    costs, errors = [10, 20, 30, 40], [300, 120, 90, 95]
    assert evidence.value_at_cost(costs, errors, 30) == 90
    assert evidence.value_at_cost(costs, errors, 39.9) == 90
    assert evidence.value_at_cost(costs, errors, 1000) == 95
    assert evidence.value_at_cost(costs, errors, 9) is None
    assert evidence.cost_to_reach(costs, errors, 100) == 30
    assert evidence.cost_to_reach(costs, errors, 300) == 10
    assert evidence.cost_to_reach(costs, errors, 89) is None
    with pytest.raises(ValueError, match="differ in length"):
        evidence.value_at_cost([1, 2], [3], 1)


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "c.png"
    evidence.plot_curves(
        str(path),
        {"kd": [[300, 100, 90], [310, 110, 95]], "unix": [[400, 200, 120]]},
        x={"kd": [[1, 2, 3], [1.1, 2.1, 3.1]], "unix": [[0.8, 1.6, 2.4]]},
        xlabel="CPU seconds",
        hline=(92.5, "kd final"),
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
