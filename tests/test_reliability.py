"""Nothing lost, nothing silent: checkpoints of any student, a diverging student stopped, no NaN model exported.

Recipe-level behaviour (validation before training, seeds, kill and resume, local-first publishing) is tested in
tests/test_recipe.py; this file tests the library pieces with tiny models on CPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
from conftest import random_images, tiny_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_kdsearch import ClassificationTrainer, DistillationTrainer, build_ensemble
from hf_kdsearch.checks import NonFiniteWeightsError, check_finite_weights


def resnet8(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("cifar_resnet8", num_classes=10)


# ---- checkpoints -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True])
def test_channels_last_timm_student_checkpoints_and_resumes_to_the_same_weights(tmp_path, compiled):
    # channels_last conv weights are strided tensors, which safetensors refuses; every checkpoint used to crash.
    data = random_images(64)

    def run(out, resume=None):
        model = resnet8()
        if compiled:  # a student passed in compiled: its state dict holds the same strided tensors under _orig_mod.
            model = torch.compile(model, backend="eager")
        args = tiny_args(out, channels_last=True, max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
        trainer = ClassificationTrainer(model=model, args=args, train_dataset=data)
        assert trainer.model.get_submodule("_orig_mod" if compiled else "").conv1.weight.is_contiguous(
            memory_format=torch.channels_last
        )
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    full = run(tmp_path / "full")
    saved = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    assert saved.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(saved[name], tensor), name
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for name, tensor in full.items():
        assert torch.equal(resumed[name], tensor), name
    first = next(iter(full))
    assert not torch.equal(full[first], next(iter(resnet8().state_dict().values())))  # it did train


def test_resuming_from_the_final_checkpoint_mid_epoch_trains_no_further_step(tmp_path):
    # max_steps=2 ends half-way through a 4-step epoch; the Trainer alone would train step 3 on resume.
    def run(resume=None):
        args = tiny_args(tmp_path, max_steps=2, save_strategy="epoch")
        trainer = ClassificationTrainer(model=resnet8(), args=args, train_dataset=random_images(64))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    resumed = run(str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 2 and not (tmp_path / "checkpoint-3").exists()
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


# ---- a diverging student -----------------------------------------------------------------------------------------
class PoisonAfter(TrainerCallback):
    """Turn one student weight into NaN after optimizer step `step`, as a diverging update would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.fc.weight[0, 0] = float("nan")


def distiller(tmp_path, poison_step: int, **overrides) -> DistillationTrainer:
    args = tiny_args(tmp_path, max_steps=6, alpha=0.5, **overrides)
    return DistillationTrainer(
        model=resnet8(1),
        teacher_model=resnet8(0).eval(),
        args=args,
        train_dataset=random_images(128),
        callbacks=[PoisonAfter(poison_step)],
    )


@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_diverging_student_stops_at_the_next_log_naming_the_step_and_terms(tmp_path, nan_filter):
    # NaN weights after step 1: steps 2.. give NaN losses. With logging_nan_inf_filter (the Trainer's default) the
    # logged `loss` used to read 0.0, since the filter replaces a non-finite loss by the mean of earlier logs (none).
    trainer = distiller(tmp_path, poison_step=1, logging_steps=2, logging_nan_inf_filter=nan_filter)
    with pytest.raises(FloatingPointError, match=r"non-finite .*loss_ce=nan.*loss_kd=nan.* at global step 2"):
        trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged == []  # the diverged log never reached log_history or the integrations


def test_no_checkpoint_of_a_diverged_student_between_two_logs(tmp_path):
    trainer = distiller(tmp_path, poison_step=1, logging_steps=10, save_strategy="steps", save_steps=3)
    with pytest.raises(FloatingPointError, match="before saving a checkpoint at global step 3"):
        trainer.train()
    assert not (tmp_path / "checkpoint-3").exists()


def test_a_finite_run_logs_its_terms_and_is_not_stopped(tmp_path):
    trainer = distiller(tmp_path, poison_step=-1, logging_steps=2, save_strategy="steps", save_steps=3)
    trainer.train()
    assert trainer.state.global_step == 6 and (tmp_path / "checkpoint-6").is_dir()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["loss"] == pytest.approx(h["loss_kd"] + h["loss_ce"], abs=1e-4) for h in logged)


# ---- no NaN model exported ---------------------------------------------------------------------------------------
def test_check_finite_weights_names_the_bad_tensors():
    model = resnet8()
    check_finite_weights(model)  # finite: silent
    with torch.no_grad():
        model.fc.bias[3] = float("inf")
        model.conv1.weight[0, 0, 0, :2] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"student7 has NaN or infinite weights in conv1.weight \(2 of 432"):
        check_finite_weights(model, name="student7")
    with pytest.raises(FloatingPointError, match=r"fc.bias \(1 of 10\)"):
        check_finite_weights(model)
    # Buffers count too: BN running statistics poisoned by a NaN batch.
    clean = resnet8()
    clean.bn1.running_var.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="bn1.running_var"):
        check_finite_weights(clean)


def test_save_students_writes_nothing_when_one_student_is_nan(tmp_path):
    ens = build_ensemble("cifar_resnet8", num_students=2, num_classes=10)
    healthy = copy.deepcopy(ens)
    with torch.no_grad():
        next(iter(ens.students[1].parameters())).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="student1 has NaN"):
        ens.save_students(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")  # student0 was not written either
    assert [p.name for p in healthy.save_students(tmp_path / "ok")] == ["student0", "student1"]
