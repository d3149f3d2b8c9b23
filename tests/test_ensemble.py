"""Online ensemble compression: widths, shared stem, export, loss identities and the trainer."""

import copy

import numpy as np
import pytest
import timm
import torch
from conftest import random_images, tiny_args
from safetensors.torch import load_file
from transformers import EvalPrediction, TrainerCallback, TrainingArguments

from hf_kdsearch import (
    DistillationArguments,
    OnlineEnsemble,
    OnlineEnsembleArguments,
    OnlineEnsembleTrainer,
    build_ensemble,
    save_student,
)
from hf_kdsearch.data import collate_tensor_batch
from hf_kdsearch.ensemble import ensemble_accuracy, ensemble_loss_terms, student_widths
from hf_kdsearch.losses import kd_loss


def tiny_ensemble(num_students: int = 3, arch: str = "cifar_resnet8", **kwargs) -> OnlineEnsemble:
    torch.manual_seed(0)
    return build_ensemble(
        arch, num_students=num_students, num_classes=10, in_chans=1, stage_widths=(6, 12, 24), **kwargs
    )


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def args(tmp_path, **overrides) -> OnlineEnsembleArguments:
    return tiny_args(tmp_path, OnlineEnsembleArguments, **{"optim_args": "momentum=0.9,nesterov=True", **overrides})


# ---- structure -------------------------------------------------------------------------------------------------------


def test_width_rule_matches_the_paper():
    assert student_widths([16, 32, 64], 5) == [[16, 32, 64], [12, 25, 51], [9, 19, 38], [6, 12, 25], [3, 6, 12]]
    assert student_widths([16, 32, 64], 4) == [[16, 32, 64], [12, 24, 48], [8, 16, 32], [4, 8, 16]]


def test_resnet110_student_sizes_reproduce_table_1():
    ens = build_ensemble("cifar_resnet110", num_students=5, num_classes=10)
    counts = [num_params(ens.export_student(j)) for j in range(5)]
    assert counts[0] == 1_730_714  # option-B resnet110 at 10 classes
    assert [round(100 * c / counts[0], 2) for c in counts] == [100.0, 62.79, 35.26, 15.15, 3.64]
    # The stem is stored once: the ensemble holds every student's own weights, one stem and the adapters.
    stem = sum(p.numel() for n, p in ens.students[0].named_parameters() if n.startswith(("conv1.", "bn1.")))
    assert stem == 16 * 3 * 9 + 2 * 16
    assert num_params(ens) == sum(counts) - 4 * stem + num_params(ens.adapters)


def test_narrow_students_use_the_shared_stem():
    ens = tiny_ensemble()
    assert all(not hasattr(s, "conv1") and not hasattr(s, "bn1") for s in ens.students[1:])
    x = torch.randn(4, 1, 12, 12)
    out = ens(pixel_values=x)
    out["student_logits"][2].sum().backward()
    # The smallest student's loss reaches the stem inside student 0, and not student 0's own stages.
    assert ens.students[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ens.students[0].stages.parameters())
    # Option B: the narrowest student's first block projects the 16-wide shared stem to its 2 channels.
    assert ens.students[2].stages[0][0].shortcut[0].weight.shape == (2, 16, 1, 1)


def test_forward_returns_the_mean_and_every_student():
    ens = tiny_ensemble()
    x = torch.randn(5, 1, 12, 12)
    out = ens(pixel_values=x, output_features=True)
    assert len(out["student_logits"]) == 3 and all(z.shape == (5, 10) for z in out["student_logits"])
    torch.testing.assert_close(out["logits"], torch.stack(out["student_logits"]).mean(0))
    assert [[f.shape[1] for f in feats] for feats in out["student_features"]] == ens.widths
    # Adapters map every narrow student to student 0's widths at each of the 3 stage ends.
    for adapted in out["adapted_features"]:
        assert [a.shape for a in adapted] == [f.shape for f in out["student_features"][0]]
    assert "student_features" not in ens(pixel_values=x)


@pytest.mark.parametrize("arch", ["cifar_resnet8", "cifar_wrn_16_1"])
def test_exported_student_is_standalone_with_equal_logits(arch):
    ens = tiny_ensemble(arch=arch)
    x = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        for _ in range(3):  # move the BN running statistics away from their initial values
            ens(pixel_values=x * 3 + 1)
    ens.eval()
    out = ens(pixel_values=x)
    for j in range(ens.num_students):
        student = ens.export_student(j)
        assert not student.training
        assert student.model_args["stage_widths"] == ens.widths[j]
        assert student.pretrained_cfg["architecture"] == arch
        torch.testing.assert_close(student(x), out["student_logits"][j], rtol=0, atol=0)
        # Rebuilding from model_args gives the same shape: the export is an ordinary member of the family.
        rebuilt = timm.create_model(arch, num_classes=10, **student.model_args)
        rebuilt.load_state_dict(student.state_dict())
        # It shares no storage with the ensemble.
        ens_ptrs = {p.data_ptr() for p in ens.parameters()}
        assert not any(p.data_ptr() in ens_ptrs for p in student.parameters())


def test_bad_inputs_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="num_students=1"):
        build_ensemble("cifar_resnet8", num_students=1)
    with pytest.raises(ValueError, match="too narrow"):
        build_ensemble("cifar_resnet8", num_students=5, stage_widths=(4, 8, 16))
    with pytest.raises(ValueError, match="unknown architecture 'resnet18'"):
        build_ensemble("resnet18")
    with pytest.raises(ValueError, match="block_widths"):
        build_ensemble("cifar_resnet8", block_widths=[[4], [4], [4]])
    with pytest.raises(IndexError, match="got 3"):
        tiny_ensemble().export_student(3)


# ---- loss maths ------------------------------------------------------------------------------------------------------


def _terms(logits, features, adapted, temperature=2.0):
    return ensemble_loss_terms(logits, torch.tensor([1, 2, 3]), features, adapted, temperature=temperature)


def test_loss_terms_vanish_when_students_agree():
    z = torch.randn(3, 10)
    f = [torch.randn(3, 4, 2, 2)]
    terms = _terms([z, z.clone(), z.clone()], [f, f, f], [f, f])
    assert terms["kd"].abs() < 1e-6 and terms["int"] == 0
    torch.testing.assert_close(terms["ce_student1"], torch.nn.functional.cross_entropy(z, torch.tensor([1, 2, 3])))


def test_kd_term_distils_every_student_from_the_detached_mean():
    logits = [torch.randn(3, 10, requires_grad=True) for _ in range(3)]
    f = [torch.zeros(3, 1)]
    terms = _terms(logits, [f] * 3, [f] * 2, temperature=3.0)
    mean = torch.stack([z.detach() for z in logits]).mean(0)
    expected = sum(kd_loss(z, teacher_logits=mean, temperature=3.0) for z in logits)
    torch.testing.assert_close(terms["kd"], expected)
    # The teacher is detached: the gradient on student 0 is that of its own KL term against a constant target.
    (grad,) = torch.autograd.grad(terms["kd"], logits[0])
    (own,) = torch.autograd.grad(kd_loss(logits[0], teacher_logits=mean, temperature=3.0), logits[0])
    torch.testing.assert_close(grad, own)


def test_feature_term_sums_stages_and_leaves_the_pseudo_teacher_alone():
    teacher = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(3)]
    adapted = [[torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(3)] for _ in range(2)]
    terms = ensemble_loss_terms(
        [torch.randn(2, 5) for _ in range(3)],
        torch.tensor([0, 1]),
        [teacher, teacher, teacher],
        adapted,
        temperature=2.0,
    )
    expected = sum(((a - t) ** 2).mean() for stage in adapted for a, t in zip(stage, teacher))
    torch.testing.assert_close(terms["int"], expected)
    terms["int"].backward()
    assert all(t.grad is None for t in teacher) and all(a.grad is not None for s in adapted for a in s)


def test_ensemble_accuracy_counts_students_and_ensemble():
    labels = np.array([0, 1, 1, 0])
    preds = np.zeros((4, 3, 2))
    preds[:, 0, 0] = 1  # student 0 always says 0: 2/4
    preds[:, 1] = np.eye(2)[labels]  # student 1 always right
    preds[:, 2] = np.eye(2)[1 - labels]  # ensemble always wrong
    assert ensemble_accuracy(EvalPrediction(preds, labels)) == {
        "acc_student0": 0.5,
        "acc_student1": 1.0,
        "acc_ensemble": 0.0,
    }


# ---- trainer ---------------------------------------------------------------------------------------------------------


def test_trainer_loss_is_the_weighted_sum_of_its_logged_terms(tmp_path):
    ens = tiny_ensemble()
    data = random_images(32, shape=(1, 12, 12))
    trainer = OnlineEnsembleTrainer(
        model=ens, args=args(tmp_path, ce_weight=0.5, feature_weight=0.3, kd_weight=0.2, temperature=3.0)
    )
    batch = {"pixel_values": data.images[:8], "labels": data.labels[:8]}
    loss = trainer.compute_loss(ens, batch)
    out = ens(pixel_values=batch["pixel_values"], output_features=True)
    t = ensemble_loss_terms(
        out["student_logits"], batch["labels"], out["student_features"], out["adapted_features"], temperature=3.0
    )
    expected = 0.5 * sum(t[f"ce_student{j}"] for j in range(3)) + 0.3 * t["int"] + 0.2 * t["kd"]
    torch.testing.assert_close(loss, expected)
    logged = trainer._flush_metrics("train")
    assert logged["loss_ce"] + logged["loss_int"] + logged["loss_kd"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["ce_student2"] == pytest.approx(t["ce_student2"].item(), rel=1e-5)


def test_trainer_trains_every_student_and_adapter_and_logs_components(tmp_path):
    ens = tiny_ensemble()
    before = copy.deepcopy(ens.state_dict())
    data = random_images(48, shape=(1, 12, 12))
    trainer = OnlineEnsembleTrainer(
        model=ens, args=args(tmp_path, adapter_freeze_epochs=0), train_dataset=data, data_collator=collate_tensor_batch
    )
    a = trainer.args
    assert (a.ce_weight, a.feature_weight, a.kd_weight, a.temperature) == (0.7, 0.15, 0.15, 2)
    trainer.train()
    after = ens.state_dict()
    for name, _ in ens.named_parameters():
        assert not torch.equal(before[name], after[name]), f"{name} was not trained"
    logs = [entry for entry in trainer.state.log_history if "loss_kd" in entry]
    assert len(logs) == 3
    for key in ("loss_ce", "loss_int", "loss_kd", "ce_student0", "ce_student1", "ce_student2"):
        assert all(np.isfinite(entry[key]) for entry in logs), key
    assert logs[0]["loss_int"] > 0 and logs[0]["loss_kd"] > 0


def test_evaluate_reports_each_student_and_the_ensemble(tmp_path):
    ens = tiny_ensemble()
    data = random_images(40, shape=(1, 12, 12))
    trainer = OnlineEnsembleTrainer(
        model=ens, args=args(tmp_path), eval_dataset=data, data_collator=collate_tensor_batch
    )
    metrics = trainer.evaluate()
    ens.eval()
    with torch.no_grad():
        out = ens(pixel_values=data.images)
    for j in range(3):
        expected = (out["student_logits"][j].argmax(-1) == data.labels).float().mean().item()
        assert metrics[f"eval_acc_student{j}"] == pytest.approx(expected)
    assert metrics["eval_acc_ensemble"] == pytest.approx(
        (out["logits"].argmax(-1) == data.labels).float().mean().item()
    )
    for key in ("eval_loss", "eval_loss_ce", "eval_loss_int", "eval_loss_kd", "eval_ce_student1"):
        assert key in metrics
    # predict() on unlabelled data gives the stacked logits: students, then the ensemble.
    unlabelled = [{"pixel_values": x} for x in data.images[:7]]
    pred = trainer.predict(unlabelled).predictions
    assert pred.shape == (7, 4, 10)
    np.testing.assert_allclose(pred[:, 3], out["logits"][:7].numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = random_images(32, shape=(1, 12, 12))
    states = []
    for bs, ga in ((16, 1), (8, 2)):
        ens = tiny_ensemble()
        # Eval-mode BN makes the two splits compute the same function; the test is about loss scaling.
        ens.eval()
        ens.train = lambda mode=True, _m=ens: _m
        trainer = OnlineEnsembleTrainer(
            model=ens,
            args=args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1),
            train_dataset=data,
            data_collator=collate_tensor_batch,
        )
        trainer.train()
        states.append(ens.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-4, atol=1e-6)


def test_checkpoint_holds_students_and_adapters_and_reloads(tmp_path):
    ens = tiny_ensemble()
    trainer = OnlineEnsembleTrainer(model=ens, args=args(tmp_path))
    trainer.save_model(str(tmp_path / "ckpt"))
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert any(k.startswith("adapters.") for k in state)
    fresh = build_ensemble("cifar_resnet8", num_students=3, num_classes=10, in_chans=1, stage_widths=(6, 12, 24))
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(fresh.eval()(pixel_values=x)["logits"], ens.eval()(pixel_values=x)["logits"])


def test_trainer_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="kd_weight=-1"):
        args(tmp_path, kd_weight=-1)
    with pytest.raises(ValueError, match="temperature=0"):
        args(tmp_path, temperature=0)
    with pytest.raises(TypeError, match="got CifarResNet"):
        OnlineEnsembleTrainer(model=timm.create_model("cifar_resnet8"), args=args(tmp_path))


# ---- saving ----------------------------------------------------------------------------------------------------------

MNIST_LIKE = {"input_size": (1, 12, 12), "mean": (0.1307,), "std": (0.3081,), "num_classes": 10}


def test_exported_students_save_and_reload_with_equal_logits(tmp_path):
    ens = tiny_ensemble(pretrained_cfg_overlay=MNIST_LIKE)
    with torch.no_grad():
        ens(pixel_values=torch.randn(8, 1, 12, 12) + 1)  # non-trivial BN statistics must travel too
    ens.eval()
    x = torch.randn(3, 1, 12, 12)
    out = ens(pixel_values=x)
    # One student on its own, with save_student ...
    folder = save_student(ens.export_student(1), tmp_path / "one")
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(reloaded(x), out["student_logits"][1], rtol=0, atol=0)
    # ... and all of them, each in its own folder with a card naming the method.
    paths = ens.save_students(tmp_path / "all", accuracies=[0.9, 0.8, 0.7])
    assert [p.name for p in paths] == ["student0", "student1", "student2"]
    for j, path in enumerate(paths):
        model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        assert model.model_args["stage_widths"] == ens.widths[j]
        torch.testing.assert_close(model(x), out["student_logits"][j], rtol=0, atol=0)
    card = (paths[2] / "README.md").read_text()
    assert "2011.07449" in card and "Student 2 of 3" in card and "value: 0.7" in card


def test_save_students_needs_a_config_that_matches_the_input_channels(tmp_path):
    # 1-channel students get a 1-channel pretrained_cfg by default, so they save; a contradicting overlay is refused.
    tiny_ensemble().save_students(tmp_path / "ok")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'ok' / 'student0'}", pretrained=True)
    assert reloaded.pretrained_cfg["input_size"] == (1, 32, 32)
    bad = tiny_ensemble(pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    with pytest.raises(ValueError, match=r"1 input channels but their pretrained_cfg says input_size=\(3, 32, 32\)"):
        bad.save_students(tmp_path / "bad")


# ---- arguments and adapters (the authors' released code) -------------------------------------------------------------


def test_arguments_check_their_values_and_have_no_teacher_settings(tmp_path):
    defaults = OnlineEnsembleArguments(str(tmp_path), use_cpu=True, report_to="none")
    assert (defaults.ce_weight, defaults.feature_weight, defaults.kd_weight, defaults.temperature) == (
        0.7,
        0.15,
        0.15,
        2,
    )
    assert (defaults.adapter_lr_scale, defaults.adapter_freeze_epochs) == (0.5, 1.0)
    for bad, match in [
        ({"feature_weight": -0.1}, "feature_weight=-0.1"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"adapter_lr_scale": float("nan")}, "adapter_lr_scale=nan"),
    ]:
        with pytest.raises(ValueError, match=match):
            OnlineEnsembleArguments(str(tmp_path), use_cpu=True, report_to="none", **bad)
    for teacher_setting in ("alpha", "teacher_compile", "teacher_model_name_or_path", "check_teacher_accuracy"):
        with pytest.raises(TypeError, match=teacher_setting):
            OnlineEnsembleArguments(str(tmp_path), **{teacher_setting: None})


def test_other_arguments_are_upcast_once_keeping_their_fields(tmp_path):
    plain = tiny_args(tmp_path, TrainingArguments, learning_rate=0.01, seed=7)
    trainer = OnlineEnsembleTrainer(model=tiny_ensemble(), args=plain)
    assert type(trainer.args) is OnlineEnsembleArguments and trainer.args is not plain
    assert (trainer.args.learning_rate, trainer.args.seed, trainer.args.output_dir) == (0.01, 7, str(tmp_path))
    assert (trainer.args.temperature, trainer.args.ce_weight) == (2.0, 0.7)
    # A sibling's settings (the single-teacher KD of DistillationArguments) cannot be honoured: refused, by name.
    with pytest.raises(TypeError, match="settings that OnlineEnsembleArguments does not: alpha"):
        OnlineEnsembleTrainer(model=tiny_ensemble(), args=tiny_args(tmp_path, DistillationArguments))
    # The keywords of earlier versions are gone: one way to set each knob.
    with pytest.raises(TypeError, match="kd_weight"):
        OnlineEnsembleTrainer(model=tiny_ensemble(), args=args(tmp_path), kd_weight=0.2)
    ens_args = args(tmp_path, kd_weight=0.3)
    assert OnlineEnsembleTrainer(model=tiny_ensemble(), args=ens_args).args is ens_args


def test_adapters_have_a_zero_bias_and_xavier_normal_weights():
    ens = tiny_ensemble()
    convs = [conv for per_student in ens.adapters for conv in per_student]
    assert len(convs) == 2 * 3 and all(torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    widest = max(convs, key=lambda c: c.weight.numel())  # 16 -> 24 channels: 384 weights
    fan_in, fan_out = widest.in_channels, widest.out_channels
    assert widest.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.15)
    assert all(c.bias is None for per in tiny_ensemble(adapter_bias=False).adapters for c in per)


def test_adapters_train_at_half_the_learning_rate_in_their_own_groups(tmp_path):
    trainer = OnlineEnsembleTrainer(model=tiny_ensemble(), args=args(tmp_path, learning_rate=0.08, weight_decay=0.01))
    optimizer = trainer.create_optimizer()
    adapters = {id(p) for p in trainer.model.adapters.parameters()}
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == len(list(trainer.model.parameters()))  # every parameter in exactly one group
    assert {lr_of[i] for i in adapters} == {0.04}
    assert {lr for i, lr in lr_of.items() if i not in adapters} == {0.08}
    # The Trainer's weight-decay split survives: adapter weights decay, adapter biases do not.
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {decay[id(c.weight)] for per in trainer.model.adapters for c in per} == {0.01}
    assert {decay[id(c.bias)] for per in trainer.model.adapters for c in per} == {0.0}
    # The authors' optimizer, Adam, through the Trainer's optimizer_cls_and_kwargs (whose lr wins): the same groups.
    adam = OnlineEnsembleTrainer(
        model=tiny_ensemble(), args=args(tmp_path), optimizer_cls_and_kwargs=(torch.optim.Adam, {"lr": 2e-3})
    ).create_optimizer()
    assert type(adam) is torch.optim.Adam and sorted({g["lr"] for g in adam.param_groups}) == [1e-3, 2e-3]


class AdapterSnapshots(TrainerCallback):
    def __init__(self, ens):
        self.ens, self.states = ens, []

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append({n: p.detach().clone() for n, p in self.ens.named_parameters()})


def test_adapters_are_not_updated_in_the_first_epoch(tmp_path):
    ens = tiny_ensemble()
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    snaps = AdapterSnapshots(ens)
    data = random_images(48, shape=(1, 12, 12))  # 3 steps of 16 per epoch
    trainer = OnlineEnsembleTrainer(
        model=ens, args=args(tmp_path, max_steps=4), train_dataset=data, data_collator=collate_tensor_batch
    )
    trainer.add_callback(snaps)
    trainer.train()
    first_epoch, second_epoch = snaps.states[2], snaps.states[3]
    for name in before:
        if name.startswith("adapters."):
            assert torch.equal(first_epoch[name], before[name]), f"{name} moved in the first epoch"
            assert not torch.equal(second_epoch[name], before[name]), f"{name} did not move in the second epoch"
        else:
            assert not torch.equal(first_epoch[name], before[name]), f"{name} was not trained"
