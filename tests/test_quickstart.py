"""The bundled digits, and the README's main command in its `--quick` mode (the pipeline, not the numbers)."""

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mnist10k_is_the_documented_real_data():
    from hf_kdsearch import load_mnist10k

    train, held_out = load_mnist10k()
    assert (len(train), len(held_out)) == (8000, 2000)
    assert torch.bincount(held_out.labels, minlength=10).min() > 150  # shuffled, every class present
    again, _ = load_mnist10k()
    assert torch.equal(train.labels, again.labels)  # the split is fixed
    assert abs(train.images.mean().item()) < 0.05 and abs(train.images.std().item() - 1) < 0.05


@pytest.mark.slow  # the main job end to end in --quick mode (about 20 s): CI runs it in the slow tier
def test_quickstart_quick_mode_writes_its_results_and_plot(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "recipes", "mnist_quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quickstart", quickstart)  # dataclasses look their module up
    monkeypatch.syspath_prepend(os.path.join(ROOT, "recipes"))  # as `python recipes/...` would
    spec.loader.exec_module(quickstart)
    threads = torch.get_num_threads()
    try:  # --workers 1: the runs go in this process (a spawned worker could not import a module loaded from a path)
        summary = quickstart.main(["--quick", "--workers", "1", "--output_dir", str(tmp_path), "--check_length"])
    finally:
        torch.set_num_threads(threads)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["seeds"] == [0, 1] and on_disk["threads"] == 1 == on_disk["torch_threads"]
    assert on_disk["workers"] == 1
    assert on_disk["command"].endswith("--quick --workers 1 --output_dir " + str(tmp_path) + " --check_length")
    assert {"hf_kdsearch", "torch", "transformers", "python"} <= set(on_disk["versions"])
    assert on_disk["machine"]["cpu_model"] and on_disk["machine"]["torch_build"]  # what the digits depend on
    # Every final run's validation curve (one epoch in --quick), and the length check at twice the epochs.
    curves = on_disk["validation_curves"]
    assert [len(curves["alone"]), len(curves["distilled"])] == [2, 2]
    assert all(c["epoch"] == [1.0] and 0 <= c["val_errors"][0] <= 200 for c in curves["alone"] + curves["distilled"])
    check = on_disk["length_check"]
    assert (check["epochs"], check["long_epochs"], check["rule"]) == (1, 2, {"rel_tol": 0.05, "abs_tol": 2.0})
    for arm in ("alone", "distilled"):
        assert check[arm]["short"] == on_disk["tuning"][arm]["best_val"]
        assert check[arm]["converged"] == (check[arm]["short"] - check[arm]["long"] <= check[arm]["tolerance"])
    # Equal tuning budget: the same number of validation runs per arm; the chosen setting is one of them.
    tuning = on_disk["tuning"]
    assert set(tuning) == {"alone", "distilled"}
    assert len(tuning["alone"]["trials"]) == len(tuning["distilled"]["trials"]) == 2
    for arm in tuning.values():
        assert arm["best"] in [t["setting"] for t in arm["trials"]]
        assert arm["best_val"] == min(t["val"] for t in arm["trials"])
    assert {"temperature", "alpha"} <= set(tuning["distilled"]["best"])
    errors = on_disk["test_errors"]
    assert [len(errors["alone"]), len(errors["distilled"])] == [2, 2]
    assert all(0 <= e <= 2000 for e in errors["alone"] + errors["distilled"] + [on_disk["teacher"]["test_errors"]])
    paired = on_disk["paired"]
    assert paired["n"] == 2 and paired["wins"] + paired["losses"] + paired["ties"] == 2
    assert paired["diff"] == sum(d - a for a, d in zip(errors["alone"], errors["distilled"])) / 2
    assert on_disk["splits"] == {"train": 200, "validation": 200, "test": 2000, "teacher": 7800, "split_seed": 0}
    assert on_disk["teacher"]["params"] > 10 * on_disk["student"]["params"]
    assert (tmp_path / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
