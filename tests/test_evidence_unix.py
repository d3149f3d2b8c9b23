"""recipes/evidence_unix.py: its helpers, and its `--quick` mode end to end (the pipeline, not the numbers)."""

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def recipe(monkeypatch):
    spec = importlib.util.spec_from_file_location("evidence_unix", os.path.join(ROOT, "recipes", "evidence_unix.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "evidence_unix", module)  # dataclasses look their module up
    monkeypatch.syspath_prepend(os.path.join(ROOT, "recipes"))  # as `python recipes/...` would
    spec.loader.exec_module(module)
    return module


def test_arms_controls_and_bad_arguments_are_refused(recipe):
    arms = recipe.ARMS
    assert arms["select50"]["callback"] == {**arms["unix50"]["callback"], "mixup": False}
    assert arms["select75"]["callback"] == {**arms["unix75"]["callback"], "mixup": False}
    # The control drops a random share: the same ratio, no uncertainty (so no scoring pass), no mixup.
    assert arms["random75"]["callback"] == {"select_ratio": 0.75, "uncertainty": "random", "mixup": False}
    assert arms["unix75free"]["callback"] == {**arms["unix75"]["callback"], "scoring": "free"}
    assert arms["unix75_big"]["callback"] == arms["unix75"]["callback"]
    assert {a["student"] for a in arms.values()} == {"small", "big"} == set(recipe.BASELINES)
    q = recipe.UnixEvidenceArguments(
        arms=["kd", "unix75", "kd_big", "unix75_big"], seed_limits=["unix75_big:3", "kd_big:3"]
    )
    assert q.arm_seeds("unix75_big") == [0, 1, 2] and q.arm_seeds("unix75") == [0, 1, 2, 3, 4]
    assert recipe.widths(q, "unix75_big") == [8, 8, 16, 16] and recipe.widths(q, "unix75") == [4, 4, 8, 8]
    for bad in (["unix50"], ["kd", "unix50", "unix50"], ["kd", "mixup"], [], ["kd", "unix75_big"]):
        with pytest.raises(ValueError, match="--arms must name distinct arms"):
            recipe.UnixEvidenceArguments(arms=bad)
    with pytest.raises(ValueError, match="--epoch_ladder, not --epochs"):
        recipe.UnixEvidenceArguments(epochs=30)
    with pytest.raises(ValueError, match="rising order"):
        recipe.UnixEvidenceArguments(epoch_ladder=[120, 60])
    with pytest.raises(ValueError, match="arm:n"):
        recipe.UnixEvidenceArguments(seed_limits=["unix75:0"])
    with pytest.raises(ValueError, match="its baseline kd fewer"):
        recipe.UnixEvidenceArguments(seed_limits=["kd:2", "unix75:3"])


def test_equal_grids_and_the_quickstarts_regime(recipe):
    q = recipe.UnixEvidenceArguments()
    assert recipe.tuning_grid(q) == [
        {"learning_rate": 0.2, "temperature": 4.0, "alpha": 0.5},
        {"learning_rate": 0.2, "temperature": 4.0, "alpha": 1.0},
    ]
    # The quickstart's regime: every argument they share has the quickstart's default, but the length.
    common = sys.modules["mnist_common"]
    theirs = vars(common.QuickstartArguments())
    ours = {k: v for k, v in vars(recipe.UnixEvidenceArguments()).items() if k in theirs}
    assert ours == {**theirs, "output_dir": "out/evidence_unix", "epochs": 0, "eval_every": 4}


def test_equal_cost_readings_of_one_seed(recipe):
    base = {
        "teacher_samples": 4000,
        "cpu_s": 40.0,
        "curve": {
            "teacher_samples": [1000, 2000, 3000, 4000],
            "cpu_seconds": [10, 20, 30, 40],
            "val_errors": [300, 150, 100, 90],
        },
    }
    run = {
        "teacher_samples": 3000,
        "cpu_s": 36.0,
        "curve": {
            "teacher_samples": [750, 1500, 2250, 3000],
            "cpu_seconds": [9, 18, 27, 36],
            "val_errors": [350, 200, 120, 95],
        },
    }
    r = sys.modules["mnist_common"].equal_cost(base, run)  # the readings every evidence recipe shares
    assert r["base_val_at_arm_teacher_samples"] == 100  # kd after 3000 teacher samples
    assert r["base_val_at_arm_cpu_s"] == 100  # kd after 30 of the arm's 36 CPU seconds
    assert (r["arm_final_val"], r["base_final_val"], r["target_val"]) == (95, 90, 95)
    assert (r["arm_teacher_samples_to_target"], r["base_teacher_samples_to_target"]) == (3000, 4000)
    assert (r["arm_cpu_s_to_target"], r["base_cpu_s_to_target"]) == (36, 40)


def test_epoch_clock_does_not_change_the_run(recipe, tmp_path):
    """Scoring validation after every epoch leaves the training identical, weights bit for bit."""
    import timm
    from transformers import set_seed

    from hf_kdsearch import DistillationTrainer
    from hf_kdsearch.evidence import protocol_split

    train, val, _ = protocol_split(96, 50)
    set_seed(1)
    teacher = timm.create_model("mnist_cnn", widths=[4, 4, 8, 8])

    def run(with_clock: bool):
        set_seed(0)
        student = timm.create_model("mnist_cnn", widths=[2, 2, 4, 4])
        # An untrained teacher: its accuracy check would (rightly) refuse it.
        args = recipe.run_args(str(tmp_path), 0, 2, 32, learning_rate=0.1, check_teacher_accuracy=False)
        clock = recipe.EpochClock(student, val if with_clock else None, teacher_samples=lambda: 7)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train,
            data_collator=recipe.ShiftCollate(0, 2),
            callbacks=[clock],
        )
        recipe.quiet(trainer)
        return student.state_dict(), clock

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every run of the recipe; two threads on a busy 2-core machine crawl
    try:
        plain, _ = run(False)
        clocked, clock = run(True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(plain[k], clocked[k]) for k in plain)
    assert clock.curve["epoch"] == [1.0, 2.0] and len(clock.epoch_seconds) == len(clock.epoch_cpu_seconds) == 2
    assert all(0 <= e <= 50 for e in clock.curve["val_errors"])
    assert clock.curve["seconds"] == [clock.epoch_seconds[0], sum(clock.epoch_seconds)]
    assert clock.curve["cpu_seconds"] == [clock.epoch_cpu_seconds[0], sum(clock.epoch_cpu_seconds)]
    assert clock.curve["teacher_samples"] == [7, 7]


@pytest.mark.slow  # the whole evidence pipeline in --quick mode (about 40 s)
def test_quick_mode_writes_results_and_plots(recipe, tmp_path):
    threads = torch.get_num_threads()
    argv = ["--quick", "--output_dir", str(tmp_path), "--workers", "1", "--arms", "kd", "unix75", "random75"]
    argv += ["unix75free", "kd_big", "unix75_big", "--seed_limits", "unix75free:1", "kd_big:1", "unix75_big:1"]
    try:  # --workers 1: the runs go in this process (a spawned worker could not import a module loaded from a path)
        summary = recipe.main(argv)
    finally:
        torch.set_num_threads(threads)
    on_disk = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk == json.loads(json.dumps(summary))
    arms = ["kd", "unix75", "random75", "unix75free", "kd_big", "unix75_big"]
    assert on_disk["arguments"]["seeds"] == [0, 1] and on_disk["workers"] == 1 and on_disk["torch_threads"] == 1
    assert on_disk["command"].endswith(" ".join(argv))
    assert {"hf_kdsearch", "torch", "transformers", "python"} <= set(on_disk["versions"])
    assert on_disk["machine"]["cpu_model"] and on_disk["machine"]["torch_build"]
    assert on_disk["splits"] == {"train": 200, "validation": 200, "test": 2000, "teacher": 7800, "split_seed": 0}
    # The length rule ran on the ladder [1, 2], the same grid for every arm and length.
    rule = on_disk["length_rule"]
    assert set(on_disk["tuning"]) == {"1", "2"} and on_disk["epochs"] == rule["epochs_used"] in (1, 2)
    assert {c["arm"] for c in rule["checks"]} == set(arms) and set(rule["converged"]) == set(arms)
    for tuned in on_disk["tuning"].values():
        assert list(tuned) == arms and {len(t["trials"]) for t in tuned.values()} == {2}
        for arm in tuned.values():
            assert arm["best"] in [t["setting"] for t in arm["trials"]] and arm["diverged"] == []
            assert all(t["curve"]["val_errors"] for t in arm["trials"])
    assert on_disk["chosen"] == {a: on_disk["tuning"][str(on_disk["epochs"])][a]["best"] for a in arms}
    # Paired seeds: two for most arms, one where limited.
    assert {a: len(e) for a, e in on_disk["test_errors"].items()} == {
        "kd": 2, "unix75": 2, "random75": 2, "unix75free": 1, "kd_big": 1, "unix75_big": 1
    }  # fmt: skip
    assert on_disk["paired"]["unix75free"]["ci"] is None  # one seed: no interval, and strict JSON
    for arm, rows in on_disk["runs"].items():
        base = "kd_big" if arm.endswith("_big") else "kd"
        for row, b in zip(rows, on_disk["runs"][base]):
            assert row["digest"] == b["digest"]
            assert row["cpu_s"] > 0 and row["train_s"] > 0
            curve = row["curve"]
            assert curve["epoch"][-1] == on_disk["epochs"] and curve["teacher_samples"][-1] == row["teacher_samples"]
            assert curve["cpu_seconds"][-1] == pytest.approx(row["cpu_s"])
            assert row["teacher_samples"] <= row["samples_seen"] == 200 * on_disk["epochs"]
    shares = {arm: on_disk["per_arm"][arm]["teacher_fraction"] for arm in arms}
    assert shares["kd"] == shares["kd_big"] == 1.0
    for arm in ("unix75", "random75", "unix75free", "unix75_big"):
        assert shares[arm] == pytest.approx(0.75, abs=0.02)
    cost = {arm: on_disk["per_arm"][arm]["cost_ratio"] for arm in arms}
    assert cost["random75"] == pytest.approx(shares["random75"])  # no scoring pass
    assert shares["unix75"] < cost["unix75"] and cost["unix75free"] <= cost["unix75"]
    assert (
        set(on_disk["paired"]) == set(on_disk["equal_cost"]) == set(on_disk["verdicts"]) == set(arms) - {"kd", "kd_big"}
    )
    assert on_disk["equal_cost"]["unix75_big"]["baseline"] == "kd_big"
    for png in ("paired.png", "curves.png", "cpu_to_accuracy.png", "forwards_to_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # --quick with two arms (about 30 s)
def test_a_tuning_seed_among_the_final_seeds_reuses_its_chosen_run(recipe, tmp_path):
    threads = torch.get_num_threads()
    argv = ["--quick", "--output_dir", str(tmp_path), "--workers", "1", "--arms", "kd", "random75"]
    try:
        summary = recipe.main(argv + ["--tune_seed", "0", "--lrs", "0.2", "--alphas", "1.0"])
    finally:
        torch.set_num_threads(threads)
    epochs = summary["epochs"]
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    # Tuning: 2 lengths x 2 arms, on seed 0; finals: seed 1 only (seed 0's is the chosen tuning run).
    assert sorted((r["kind"], r["arm"], r["seed"], r["epochs"]) for r in lines) == sorted(
        [("tune", a, 0, e) for a in ("kd", "random75") for e in (1, 2)]
        + [("final", a, s, epochs) for a in ("kd", "random75") for s in (0, 1)]
    )
    assert all("held_out" not in r for r in lines if r["kind"] == "tune")  # sealed until the choice
    for arm in ("kd", "random75"):
        first, second = summary["runs"][arm]
        assert first["reused_tuning_run"] and "reused_tuning_run" not in second
        tuned = next(r for r in lines if r["kind"] == "tune" and r["arm"] == arm and r["epochs"] == epochs)
        assert first["curve"] == tuned["curve"] and first["val"] == tuned["val"]
        assert summary["test_errors"][arm][0] == first["errors"] and 0 <= first["errors"] <= 2000
