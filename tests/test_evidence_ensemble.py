"""recipes/evidence_ensemble.py: the authors' optimiser and schedule in both arms, and its --quick mode end to end."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationArguments,
    OnlineEnsembleArguments,
    OnlineEnsembleTrainer,
)
from hf_kdsearch.ensemble import adam_l2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """The recipe's runs use one torch thread; two on a busy 2-core machine make these tiny runs 5 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recipe(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "evidence_ensemble", os.path.join(ROOT, "recipes", "evidence_ensemble.py")
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "evidence_ensemble", module)  # dataclasses look their module up
    monkeypatch.syspath_prepend(os.path.join(ROOT, "recipes"))  # as `python recipes/...` would
    spec.loader.exec_module(module)
    return module


def rates_over(trainer, steps: int) -> list[list[float]]:
    """Each parameter group's learning rate at every step of a `steps`-step run."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.optimizer.step()  # no gradients: nothing moves
        trainer.lr_scheduler.step()
    return rates


def test_adam_l2_is_torch_adam_with_coupled_decay_in_both_arms(recipe, tmp_path):
    """Both arms get torch.optim.Adam (L2 added to the gradient, not AdamW's decoupled decay) with weight decay 1e-5
    on the weights, and lr x0.1 at 57 % and 86 % of the steps; the ensemble's adapters keep half the rate."""
    q = recipe.EnsembleEvidenceArguments(output_dir=str(tmp_path), num_students=3, stage_widths=[6, 12, 24])
    ens = recipe.make_ensemble(q, 0)
    adapters = {id(p) for p in ens.adapters.parameters()}
    steps = 100
    for cls, trainer_cls, model in (
        (OnlineEnsembleArguments, OnlineEnsembleTrainer, ens),
        (DistillationArguments, ClassificationTrainer, ens.export_student(2)),
    ):
        args = recipe.run_args(q, str(tmp_path), 0, 1e-3, 1, cls)
        trainer = recipe.with_step_decay(trainer_cls, q.lr_decay_at, 0.1)(
            model=model, args=args, optimizer_cls_and_kwargs=adam_l2(args)
        )
        rates = rates_over(trainer, steps)
        optimizer = trainer.optimizer
        assert type(optimizer) is torch.optim.Adam  # not AdamW
        assert args.max_grad_norm == 0.0 and args.per_device_train_batch_size == 128
        decays = {g["weight_decay"] for g in optimizer.param_groups}
        assert decays == {1e-5, 0.0}  # weights decay; biases and norm layers do not (the Trainer's grouping)
        conv = next(p for n, p in model.named_parameters() if n.endswith("conv1.weight"))
        assert any(g["weight_decay"] == 1e-5 and any(p is conv for p in g["params"]) for g in optimizer.param_groups)
        scales = [1.0 if not any(id(p) in adapters for p in g["params"]) else 0.5 for g in optimizer.param_groups]
        if trainer_cls is OnlineEnsembleTrainer:
            assert 0.5 in scales  # the adapters' own groups
        for step, expected in ((0, 1e-3), (56, 1e-3), (57, 1e-4), (60, 1e-4), (85, 1e-4), (86, 1e-5), (99, 1e-5)):
            assert rates[step] == pytest.approx([expected * s for s in scales]), step

    # Coupled: one Adam step on a weight whose gradient is zero moves it only through the L2 term's gradient, by
    # the full learning rate (Adam normalises wd * w); AdamW would move it by lr * wd * w, 1e5 times less.
    w = torch.nn.Parameter(torch.ones(1))
    optimizer_cls, kwargs = adam_l2(DistillationArguments(output_dir=str(tmp_path), learning_rate=1e-3))
    opt = optimizer_cls([{"params": [w], "weight_decay": 1e-5}], **kwargs)
    w.grad = torch.zeros(1)
    opt.step()
    assert w.item() == pytest.approx(1 - 1e-3, rel=1e-5)


def test_alone_starts_from_its_ensemble_twin_and_sees_its_batches(recipe, tmp_path, one_thread):
    """The pairing the recipe checks: same initial weights and batch digest for a student alone and in the ensemble."""
    q = recipe.EnsembleEvidenceArguments(
        output_dir=str(tmp_path),
        n_train=64,
        n_val=32,
        batch_size=32,
        num_students=2,
        stage_widths=[4, 8, 8],
        stem_width=4,
    )
    ens = recipe.ensemble_run(q, 3, {"learning_rate": 1e-2}, "val", 1)
    alone = recipe.alone_run(q, 3, 0, {"learning_rate": 1e-2}, "val", 1)
    recipe.check_paired(3, ens, [alone])
    assert len(ens["curve"]) == 1 and len(ens["curve"][0]["students"]) == 2 and len(alone["curve"]) == 1
    other = recipe.alone_run(q, 4, 0, {"learning_rate": 1e-2}, "val", 1)  # another seed: other weights and batches
    with pytest.raises(RuntimeError, match="not paired"):
        recipe.check_paired(3, ens, [other])


@pytest.mark.slow  # the whole pipeline in --quick mode (about 15 s): CI's slow tier
def test_quick_mode_writes_its_results_and_plots(recipe, tmp_path, one_thread):
    # --workers 1: the runs go in this process (a spawned worker could not import a module loaded from a path)
    summary = recipe.main(["--quick", "--output_dir", str(tmp_path), "--workers", "1"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["seeds"] == [0, 1] and on_disk["threads"] == 1 == on_disk["torch_threads"]
    assert on_disk["command"].endswith("--quick --output_dir " + str(tmp_path) + " --workers 1")
    assert {"hf_kdsearch", "torch", "transformers", "python"} <= set(on_disk["versions"])
    assert on_disk["splits"] == {"train": 300, "validation": 200, "test": 2000, "split_seed": 0}
    S = on_disk["arguments"]["num_students"]
    assert [len(s["widths"]) for s in on_disk["students"]] == [3] * S
    params = [s["params"] for s in on_disk["students"]]
    assert params == sorted(params, reverse=True)
    # Equal tuning budget: one arm for the ensemble, one per student alone, each with the same grid.
    tuning = on_disk["tuning"]
    assert set(tuning) == {"ensemble", *(f"alone_student{j}" for j in range(S))}
    assert len({len(t["trials"]) for t in tuning.values()}) == 1
    for arm in tuning.values():
        assert arm["best"] in [t["setting"] for t in arm["trials"]]
    curves = on_disk["validation_curves"]["1"]
    assert len(curves["ensemble"][0]) == 1 and len(curves["ensemble"][0][0]["students"]) == S
    errors = on_disk["test_errors"]
    assert len(errors["alone"]) == len(errors["in_ensemble"]) == S
    assert all(len(e) == 2 and all(0 <= x <= 2000 for x in e) for e in errors["alone"] + errors["in_ensemble"])
    assert len(errors["ensemble_mean_logits"]) == 2
    assert len(on_disk["paired"]) == len(on_disk["verdicts"]) == S
    for j, p in enumerate(on_disk["paired"]):
        assert p["n"] == 2 and p["diff"] == sum(e - a for a, e in zip(errors["alone"][j], errors["in_ensemble"][j])) / 2
    assert on_disk["wall_clock_s"] > 0
    # The length rule over the ladder (1, 2 epochs in --quick): every student, in the ensemble and alone, judged on
    # its chosen tuning run at each length; the finals ran at the length it chose (or the longest).
    rule = on_disk["length_rule"]
    assert set(on_disk["validation_curves"]) == set(on_disk["tuning_by_length"]) == {"1", "2"}
    assert rule["epochs_used"] == on_disk["schedule"]["epochs"] == (rule["epochs"] or 2)
    assert on_disk["tuning"] == on_disk["tuning_by_length"][f"{rule['epochs_used']:g}"]
    for length in ("1", "2"):
        values, runs = rule["values"][length], on_disk["validation_curves"][length]
        assert set(values) == {f"{arm}_S{j}" for arm in ("ensemble", "alone") for j in range(S)}
        assert len(runs["ensemble"][0]) == int(length)  # a point per epoch
        for j in range(S):
            assert values[f"ensemble_S{j}"] == runs["ensemble"][0][-1]["students"][j]  # one lr in --quick
            assert values[f"alone_S{j}"] == on_disk["tuning_by_length"][length][f"alone_student{j}"]["best_val"]
    for check in rule["checks"]:
        assert check["converged"] == (check["improvement"] <= check["tolerance"])
    assert rule["epochs"] == (1 if all(c["converged"] for c in rule["checks"]) else None)

    for png in ("paired.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_length_comes_from_the_ladder(recipe, tmp_path):
    with pytest.raises(ValueError, match="give --epoch_ladder, not --epochs"):
        recipe.EnsembleEvidenceArguments(output_dir=str(tmp_path), epochs=50)
    for ladder in ([100, 50], [50, 50], [0, 50], []):
        with pytest.raises(ValueError, match="rising order"):
            recipe.EnsembleEvidenceArguments(output_dir=str(tmp_path), epoch_ladder=ladder)
    assert recipe.EnsembleEvidenceArguments(output_dir=str(tmp_path)).epoch_ladder == [50, 100]
