"""One training step of every trainer on every student kind it takes: which parameters move, by name.

In the manner of PEFT's `test_only_params_are_updated`: each case names the parameters that must not move (frozen
weights, adapters in their freeze); every other parameter of the trained model must move, and the teacher (weights
and buffers) must stay bit-identical.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
from conftest import random_images, tiny_args
from transformers import ResNetConfig, ResNetForImageClassification, Trainer

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationMixin,
    DistillationTrainer,
    GateSearchCallback,
    OnlineEnsembleArguments,
    OnlineEnsembleTrainer,
    UncertaintyMixupCallback,
    add_gates,
    build_ensemble,
)


class UsersTrainer(Trainer):
    """A user's own Trainer subclass, with behaviour of its own."""

    def training_step(self, *args, **kwargs):
        self.steps = getattr(self, "steps", 0) + 1
        return super().training_step(*args, **kwargs)


class UsersDistiller(DistillationMixin, UsersTrainer):
    pass


# ---- students ------------------------------------------------------------------------------------------------------
def timm_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("cifar_resnet8", num_classes=10)


def transformers_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return ResNetForImageClassification(config)


def text_model(seed: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=10,
    )
    return BertForSequenceClassification(config)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("mnist_mlp", hidden_dims=[24, 16], img_size=8, num_classes=10).eval()


def images(shape=(3, 32, 32)):
    return random_images(16, shape)


def text():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (16, 12), generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 16, "labels": labels.tolist()})


STUDENTS = {"timm": (timm_model, images), "transformers": (transformers_model, images), "text": (text_model, text)}


# ---- the table -----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    build: Callable  # (tmp_path) -> (trainer, teacher or None)
    frozen: Callable[[str], bool] = lambda name: False  # parameters that must not move
    teachers: list = field(default_factory=list)


def distill(trainer_cls, kind):
    def build(tmp_path):
        make, data = STUDENTS[kind]
        teacher = make(1)
        args = tiny_args(tmp_path, max_steps=1, remove_unused_columns=False)
        trainer = trainer_cls(model=make(0), teacher_model=teacher, args=args, train_dataset=data())
        return trainer, teacher

    return build


def classify(kind):
    def build(tmp_path):
        make, data = STUDENTS[kind]
        args = tiny_args(tmp_path, max_steps=1, remove_unused_columns=False)
        return ClassificationTrainer(model=make(0), args=args, train_dataset=data()), None

    return build


def unix(tmp_path):
    teacher = timm_model(1)
    args = tiny_args(tmp_path, max_steps=1, alpha=1.0)
    callback = UncertaintyMixupCallback(select_ratio=0.5, seed=0)
    trainer = DistillationTrainer(
        model=timm_model(0), teacher_model=teacher, args=args, train_dataset=images(), callbacks=[callback]
    )
    return trainer, teacher


def gate_search(frozen_weights: bool):
    def build(tmp_path):
        teacher = mlp(1)
        student = add_gates(copy.deepcopy(teacher))
        if frozen_weights:
            for name, p in student.named_parameters():
                p.requires_grad_("gate" in name)
        callback = GateSearchCallback(
            target_flops_ratio=0.5, warmup_ratio=0.0, input_size=(1, 8, 8), write_report=False
        )
        args = tiny_args(tmp_path, max_steps=1)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=images((1, 8, 8)), callbacks=[callback]
        )
        return trainer, teacher

    return build


def ensemble(tmp_path):
    torch.manual_seed(0)
    ens = build_ensemble("cifar_resnet8", num_students=3, num_classes=10, in_chans=1, stage_widths=(6, 12, 24))
    args = tiny_args(tmp_path, OnlineEnsembleArguments, max_steps=1, adapter_freeze_epochs=1.0)
    return OnlineEnsembleTrainer(model=ens, args=args, train_dataset=images((1, 12, 12))), None


CASES = {
    **{f"DistillationTrainer-{k}": Case(distill(DistillationTrainer, k)) for k in STUDENTS},
    **{f"mixin-on-users-trainer-{k}": Case(distill(UsersDistiller, k)) for k in STUDENTS},
    **{f"ClassificationTrainer-{k}": Case(classify(k)) for k in STUDENTS},
    # The adapters sit out their first epoch (the authors' schedule); every student and the shared stem train.
    "OnlineEnsembleTrainer-timm": Case(ensemble, frozen=lambda name: name.startswith("adapters.")),
    "UNIX-timm": Case(unix),
    "gate-search-trainable-weights-timm": Case(gate_search(frozen_weights=False)),
    "gate-search-frozen-weights-timm": Case(gate_search(frozen_weights=True), frozen=lambda name: "gate" not in name),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_moves_exactly_the_parameters_it_should(name, tmp_path):
    case = CASES[name]
    trainer, teacher = case.build(tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else {}
    trainer.train()
    assert trainer.state.global_step == 1
    after = dict(model.named_parameters())
    must_move = [n for n in before if not case.frozen(n)]
    must_stay = [n for n in before if case.frozen(n)]
    assert must_move, "a case where nothing trains tests nothing"
    still = [n for n in must_move if torch.equal(before[n], after[n].detach())]
    moved = [n for n in must_stay if not torch.equal(before[n], after[n].detach())]
    assert (still, moved) == ([], [])
    if teacher is not None:
        changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, teacher_before[k])]
        assert changed == []
        assert not any(p.requires_grad for p in teacher.parameters())
    if isinstance(trainer, UsersDistiller):
        assert trainer.steps == 1  # the user's own training_step ran
