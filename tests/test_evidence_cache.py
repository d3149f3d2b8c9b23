"""recipes/evidence_cache.py: its arguments, one paired pair of runs, and its `--quick` mode end to end."""

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def recipe(monkeypatch):
    spec = importlib.util.spec_from_file_location("evidence_cache", os.path.join(ROOT, "recipes", "evidence_cache.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "evidence_cache", module)  # dataclasses look their module up
    monkeypatch.syspath_prepend(os.path.join(ROOT, "recipes"))  # as `python recipes/...` would
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every run of the recipe; two threads on a busy 2-core machine crawl
    yield
    torch.set_num_threads(threads)


def test_arms_and_bad_arguments_are_refused(recipe):
    assert {a: s["views"] for a, s in recipe.ARMS.items()} == {"online": None, "cache1": 1, "cache4": 4, "cache16": 16}
    q = recipe.CacheEvidenceArguments()
    assert q.arms == ["online", "cache1", "cache4"] and q.epoch_ladder == [60, 120] and q.tune_seed in q.seeds
    assert recipe.tuning_grid(q) == [{"learning_rate": 0.2, "temperature": 4.0, "alpha": 1.0}]
    for bad in (["cache4"], ["online"], ["online", "cache4", "cache4"], ["online", "cache3"], []):
        with pytest.raises(ValueError, match="--arms must name distinct arms"):
            recipe.CacheEvidenceArguments(arms=bad)
    with pytest.raises(ValueError, match="--epoch_ladder, not --epochs"):
        recipe.CacheEvidenceArguments(epochs=30)
    with pytest.raises(ValueError, match="rising order"):
        recipe.CacheEvidenceArguments(epoch_ladder=[120, 60])
    with pytest.raises(ValueError, match="--max_shift must be >= 1"):
        recipe.CacheEvidenceArguments(max_shift=0)
    # The quickstart's regime: every argument they share has the quickstart's default, but these.
    theirs = vars(sys.modules["mnist_common"].QuickstartArguments())
    ours = {k: v for k, v in vars(q).items() if k in theirs}
    assert ours == {**theirs, "output_dir": "out/evidence_cache", "epochs": 0, "eval_every": 1, "tune_seed": 0}


def test_digits_as_uint8_and_the_batch_order_checksum(recipe):
    from hf_kdsearch.evidence import protocol_split

    train, _, _ = protocol_split(50, 10)
    pixels = recipe.uint8_digits(train)
    assert pixels.dtype == torch.uint8 and pixels.shape == (50, 1, 28, 28) and pixels.max() > 200
    again = (pixels.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(again, train.images, atol=1e-5)
    with pytest.raises(ValueError, match="not standardised uint8"):
        recipe.uint8_digits(type(train)(train.images + 0.01, train.labels))
    a, b = (recipe.OrderedDigits(pixels, train.labels) for _ in range(2))
    a.__getitems__([0, 1, 2])
    b.__getitems__([0, 2, 1])
    assert a.digest != b.digest != 0
    b.digest = 0
    batch = b.__getitems__([0, 1, 2])
    assert a.digest == b.digest and torch.equal(batch["pixel_values"], pixels[:3])


def test_online_and_cache_runs_are_paired_and_costed(recipe, tmp_path, one_torch_thread):
    """One seed of `online` and `cache4`, 2 epochs on 64 digits: the same initial student and batches; the teacher
    runs N x R times in the build and never in the cache's training, on every sample in online's."""
    import timm

    q = recipe.CacheEvidenceArguments(n_train=64, n_val=40, output_dir=str(tmp_path))
    teacher = {"state": timm.create_model("mnist_cnn", widths=q.teacher_widths).state_dict()}
    # An untrained teacher: the build's accuracy check would (rightly) refuse it.
    setting = {"learning_rate": 0.1, "temperature": 4.0, "alpha": 1.0, "check_teacher_accuracy": False}
    online = recipe.cache_run(q, "online", 3, setting, 2, "val", teacher)
    cache = recipe.cache_run(q, "cache4", 3, setting, 2, "val", teacher)
    assert online["init_digest"] == cache["init_digest"] and online["digest"] == cache["digest"] != 0
    assert online["samples_seen"] == cache["samples_seen"] == 128
    assert online["teacher_samples"] == online["teacher_samples_training"] == online["teacher_logits_used"] == 128
    assert online["build"]["teacher_samples"] == 0 and online["build"]["cpu_s"] == 0
    assert cache["build"]["teacher_samples"] == cache["teacher_samples"] == 64 * 4
    assert cache["teacher_samples_training"] == 0 and cache["teacher_logits_used"] == 128  # read from the cache
    assert 0 < cache["build"]["cpu_s"] and 0 < cache["build"]["teacher_accuracy"] <= 1
    # The cache's cost axes start at its build's cost.
    c = cache["curve"]
    assert c["epoch"] == [1.0, 2.0] and c["teacher_samples"] == [256, 256]
    assert c["cpu_seconds"][0] > cache["build"]["cpu_s"] and c["cpu_seconds"][-1] == pytest.approx(cache["cpu_s"])
    assert cache["cpu_s"] == pytest.approx(cache["build"]["cpu_s"] + cache["train_cpu_s"])
    assert online["curve"]["teacher_samples"] == [64, 128]
    assert (
        online["curve"]["cpu_seconds"][-1] == pytest.approx(online["cpu_s"])
        and online["cpu_s"] == online["train_cpu_s"]
    )


@pytest.mark.slow  # the whole evidence pipeline in --quick mode (about 40 s)
def test_quick_mode_writes_results_and_plots(recipe, tmp_path, one_torch_thread):
    argv = ["--quick", "--output_dir", str(tmp_path), "--workers", "1", "--arms", "online", "cache1", "cache4"]
    # --workers 1: the runs go in this process (a spawned worker could not import a module loaded from a path)
    summary = recipe.main(argv)
    on_disk = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk == json.loads(json.dumps(summary))
    arms = ["online", "cache1", "cache4"]
    assert on_disk["arguments"]["seeds"] == [0, 1] and on_disk["workers"] == 1 and on_disk["torch_threads"] == 1
    assert on_disk["command"].endswith(" ".join(argv))
    assert on_disk["machine"]["cpu_model"] and on_disk["machine"]["torch_build"]
    assert on_disk["splits"] == {"train": 200, "validation": 200, "test": 2000, "teacher": 7800, "split_seed": 0}
    assert on_disk["augmentation"] == {"device_augment": True, "augment_padding": 2, "augment_flip": False}
    # The length rule ran on the ladder [1, 2], the same grid for every arm and length.
    rule = on_disk["length_rule"]
    assert set(on_disk["tuning"]) == {"1", "2"} and on_disk["epochs"] == rule["epochs_used"] in (1, 2)
    assert set(rule["converged"]) == set(arms) and rule["stated"] == {"rel_tol": 0.05, "abs_tol": 2.0}
    for tuned in on_disk["tuning"].values():
        assert list(tuned) == arms and all(t["trials"][0]["curve"]["val_errors"] for t in tuned.values())
    epochs = on_disk["epochs"]
    assert {a: len(e) for a, e in on_disk["test_errors"].items()} == dict.fromkeys(arms, 2)
    for arm, rows in on_disk["runs"].items():
        views = recipe.ARMS[arm]["views"]
        for seed, row, base in zip([0, 1], rows, on_disk["runs"]["online"]):
            assert (row["init_digest"], row["digest"]) == (base["init_digest"], base["digest"])
            assert row["samples_seen"] == 200 * epochs and row["cpu_s"] > 0
            assert row.get("reused_tuning_run", False) is (
                seed == 0
            )  # --tune_seed 0: seed 0's final run is its tuning run
            curve = row["curve"]
            assert curve["epoch"][-1] == epochs and curve["cpu_seconds"][-1] == pytest.approx(row["cpu_s"])
            assert curve["teacher_samples"][-1] == row["teacher_samples"]
            if views is None:  # online: the teacher on every sample seen, nothing built
                assert row["teacher_samples"] == row["teacher_samples_training"] == row["samples_seen"]
            else:  # a cache: N x R teacher samples in the build, none in training
                assert row["build"]["teacher_samples"] == row["teacher_samples"] == 200 * views
                assert row["teacher_samples_training"] == 0 and row["build"]["cpu_s"] > 0
                assert curve["cpu_seconds"][0] > row["build"]["cpu_s"]
    assert set(on_disk["paired"]) == set(on_disk["equal_cost"]) == set(on_disk["verdicts"]) == {"cache1", "cache4"}
    for arm in ("cache1", "cache4"):
        readings = on_disk["equal_cost"][arm]
        assert readings["baseline"] == "online" and len(readings["per_seed"]) == 2
        for x, row, base in zip(readings["per_seed"], on_disk["runs"][arm], on_disk["runs"]["online"]):
            assert x["arm_final_val"] == row["curve"]["val_errors"][-1]
            assert x["target_val"] == max(x["arm_final_val"], x["base_final_val"])
            assert x["arm_cpu_s_to_target"] <= row["cpu_s"] and x["base_cpu_s_to_target"] <= base["cpu_s"]
            assert x["arm_teacher_samples_to_target"] == row["teacher_samples"]  # a cache's forwards are all up front
        assert readings["teacher_samples_ratio"] == pytest.approx(recipe.ARMS[arm]["views"] / epochs)
    for png in ("paired.png", "curves.png", "cpu_to_accuracy.png", "forwards_to_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
