"""The README's main command, shortened to one epoch, on the real bundled digits."""

import importlib.util
import json
import os
import sys

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


def test_quickstart_trains_teacher_and_students_on_real_digits(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "recipes", "mnist_quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quickstart", quickstart)  # dataclasses look their module up
    monkeypatch.syspath_prepend(os.path.join(ROOT, "recipes"))  # as `python recipes/...` would
    spec.loader.exec_module(quickstart)
    summary = quickstart.main(
        ["--seeds", "0", "--teacher_epochs", "1", "--student_epochs", "1", "--output_dir", str(tmp_path)]
    )
    assert summary["params"] == {"teacher": 669_706, "student": 50_890}
    # One epoch on 8,000 real digits already gets well below chance (1,800 errors of 2,000).
    assert summary["results"]["teacher"][0] < 250
    assert all(e < 400 for e in summary["results"]["alone"] + summary["results"]["distilled"])
    assert json.loads((tmp_path / "results.json").read_text())["results"] == summary["results"]
