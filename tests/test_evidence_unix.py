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


def test_ablation_arms_select_without_mixup_and_bad_arms_are_refused(recipe):
    q = recipe.UnixEvidenceArguments(arms=["kd", "select50", "unix50"])
    assert set(recipe.tuning_grids(q)) == {"kd", "select50", "unix50"}
    assert recipe.ARMS["select50"] == {**recipe.ARMS["unix50"], "mixup": False}
    assert recipe.ARMS["select75"] == {**recipe.ARMS["unix75"], "mixup": False}
    for bad in (["unix50", "kd"], ["kd", "unix50", "unix50"], ["kd", "mixup"], []):
        with pytest.raises(ValueError, match="--arms must start with kd"):
            recipe.UnixEvidenceArguments(arms=bad)


def test_time_to_reach_and_equal_grids(recipe):
    seconds, errors = [1.0, 2.0, 3.0, 4.0], [300, 120, 90, 95]
    assert recipe.time_to_reach(seconds, errors, 100) == 3.0
    assert recipe.time_to_reach(seconds, errors, 300) == 1.0
    assert recipe.time_to_reach(seconds, errors, 89) is None
    # One grid, hence the same tuning budget, for every arm; it holds the quickstart's distilled grid.
    q = recipe.UnixEvidenceArguments()
    grids = recipe.tuning_grids(q)
    assert set(grids) == set(q.arms) == {"kd", "unix75", "unix50"}
    assert all(g == grids["kd"] for g in grids.values()) and len(grids["kd"]) == 9
    quickstart = sys.modules["mnist_quickstart"]
    assert all(s in grids["kd"] for s in quickstart.GRIDS["distilled"])
    q.quick = True
    assert {len(g) for g in recipe.tuning_grids(q).values()} == {2}
    # The quickstart's regime: every argument they share has the quickstart's default.
    theirs = vars(quickstart.QuickstartArguments())
    assert {k: v for k, v in vars(recipe.UnixEvidenceArguments()).items() if k in theirs} == {
        **theirs,
        "output_dir": "out/evidence_unix",
    }


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
        clock = recipe.EpochClock(student, val if with_clock else None)
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
    assert clock.curve["epoch"] == [1.0, 2.0] and len(clock.epoch_seconds) == 2
    assert all(0 <= e <= 50 for e in clock.curve["val_errors"])
    assert clock.curve["seconds"] == [clock.epoch_seconds[0], sum(clock.epoch_seconds)]


@pytest.mark.slow  # the whole evidence pipeline in --quick mode (about 20 s)
def test_quick_mode_writes_results_and_plots(recipe, tmp_path):
    threads = torch.get_num_threads()
    try:  # --workers 1: the runs go in this process (a spawned worker could not import a module loaded from a path)
        summary = recipe.main(["--quick", "--output_dir", str(tmp_path), "--workers", "1"])
    finally:
        torch.set_num_threads(threads)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    arms = ["kd", "unix75", "unix50"]
    assert on_disk["seeds"] == [0, 1] and on_disk["workers"] == 1 and on_disk["torch_threads"] == 1
    assert on_disk["command"].endswith("--quick --output_dir " + str(tmp_path) + " --workers 1")
    assert {"hf_kdsearch", "torch", "transformers", "python"} <= set(on_disk["versions"])
    assert on_disk["splits"] == {"train": 200, "validation": 200, "test": 2000, "teacher": 7800, "split_seed": 0}
    # Equal tuning budget; each arm's chosen setting is one of its trials.
    tuning = on_disk["tuning"]
    assert list(tuning) == arms and {len(t["trials"]) for t in tuning.values()} == {2}
    for arm in tuning.values():
        assert arm["best"] in [t["setting"] for t in arm["trials"]]
    assert list(on_disk["test_errors"]) == arms
    assert all(len(e) == 2 and all(0 <= x <= 2000 for x in e) for e in on_disk["test_errors"].values())
    for rows in on_disk["runs"].values():
        assert len(rows) == 2
        for row in rows:
            assert row["train_s"] > 0 and row["s_per_epoch"] > 0 and row["train_runtime_s"] > 0
            assert len(row["epoch_seconds"]) == 1  # one epoch in --quick
            curve = row["curve"]
            assert len(curve["epoch"]) == len(curve["seconds"]) == len(curve["val_errors"]) == 1
            assert all(0 <= e <= 200 for e in curve["val_errors"]) and curve["seconds"][0] > 0
            assert row["teacher_samples"] <= row["samples_seen"] == 200
        # Every arm saw the same batches (paired), and the teacher ran on the select ratio's share.
        assert [r["digest"] for r in rows] == [r["digest"] for r in on_disk["runs"]["kd"]]
    shares = {arm: on_disk["per_arm"][arm]["teacher_fraction"] for arm in arms}
    assert shares["kd"] == 1.0 and shares["unix75"] == pytest.approx(0.75, abs=0.02)
    assert shares["unix50"] == pytest.approx(0.5, abs=0.02)
    assert on_disk["per_arm"]["kd"]["cost_ratio"] == 1.0
    assert shares["unix50"] < on_disk["per_arm"]["unix50"]["cost_ratio"] < on_disk["per_arm"]["unix75"]["cost_ratio"]
    assert set(on_disk["paired"]) == set(on_disk["verdicts"]) == {"unix75", "unix50"}
    assert all(p["n"] == 2 for p in on_disk["paired"].values())
    for png in ("paired.png", "time_to_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
