"""DistillationTrainer / DistillationMixin: behaviour a user relies on, on tiny CPU models."""

import copy
import os

import pytest
import timm
import torch
from conftest import random_images, tiny_args
from safetensors.torch import load_file
from torch import nn
from transformers import (
    HfArgumentParser,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationArguments,
    DistillationCallback,
    DistillationMixin,
    DistillationTrainer,
    TeacherCheckError,
    TeacherLoadError,
)
from hf_kdsearch.data import TensorImageDataset

kd_args = tiny_args


def cifar(name="cifar_resnet8", num_classes=10, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def tiny_vit(seed=0, num_labels=10):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- gradient accumulation ----------------------------------------------------------------------------------------
class MeanLogitPenalty(DistillationCallback):
    """An added per-batch-mean loss term, to check that extension terms scale like the KD term."""

    def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
        return {"logit_l2": 0.01 * student_logits.float().pow(2).mean()}


class UnscaledForGA(DistillationTrainer):
    """The bug this library avoids: the Trainer believes the loss is already normalised over the accumulated batch."""

    loss_is_scaled_for_ga = None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.model_accepts_loss_kwargs = True


def one_update(tmp_path, batch, accumulation, trainer_cls=DistillationTrainer):
    student, teacher = tiny_vit(0), tiny_vit(1)
    before = params_of(student)
    args = kd_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        max_grad_norm=0.0,  # clipping would hide a wrong gradient scale
        alpha=0.7,
    )
    data = random_images(64, (3, 8, 8))
    trainer = trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=data, callbacks=[MeanLogitPenalty()]
    )
    trainer.train()
    return {k: v - before[k] for k, v in params_of(student).items() if v.is_floating_point()}


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    full = one_update(tmp_path, 64, 1)
    accumulated = one_update(tmp_path, 16, 4)
    assert sum(d.abs().sum() for d in full.values()) > 0
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_check_catches_the_unscaled_loss(tmp_path):
    # The same comparison fails by a factor of 4 when the loss is not divided by the accumulation steps.
    full = one_update(tmp_path, 64, 1)
    broken = one_update(tmp_path, 16, 4, UnscaledForGA)
    ratio = broken["classifier.weight"].norm() / full["classifier.weight"].norm()
    assert ratio.item() == pytest.approx(4.0, rel=1e-3)


# ---- the teacher ----------------------------------------------------------------------------------------------------
def test_teacher_is_bit_identical_and_in_eval_mode_after_training(tmp_path, images32):
    student, teacher = cifar(seed=0), cifar(seed=1)
    teacher.train()  # a user may hand over a teacher in train mode
    before_teacher, before_student = params_of(teacher), params_of(student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    trainer.train()
    after = trainer.teacher_model.state_dict()
    assert set(after) == set(before_teacher)
    for k, v in before_teacher.items():  # BN running stats and num_batches_tracked included
        assert torch.equal(after[k], v), k
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    # Even if someone flips the teacher to train mode, it runs in eval mode and its BN statistics stay put.
    trainer.teacher_model.train()
    trainer.teacher_logits({"pixel_values": images32.images[:8]})
    assert not trainer.teacher_model.training
    assert all(torch.equal(trainer.teacher_model.state_dict()[k], v) for k, v in before_teacher.items())
    changed = [k for k, v in params_of(student).items() if not torch.equal(v, before_student[k])]
    assert any(k.endswith("weight") for k in changed)


def test_teacher_absent_from_checkpoints_and_saved_model(tmp_path, images32):
    student, teacher = cifar("cifar_resnet8"), cifar("cifar_resnet20", seed=1)
    args = kd_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=images32)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    student_keys = set(student.state_dict())
    student_numel = sum(v.numel() for v in student.state_dict().values())
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        weights = load_file(str(folder / "model.safetensors"))
        assert set(weights) == student_keys
        assert sum(v.numel() for v in weights.values()) == student_numel
        other = [f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pt")) and "model" in f]
        assert other == ["model.safetensors"], other


def test_teacher_input_is_renormalised_when_timm_mean_std_differ(tmp_path, images32):
    student, teacher = cifar(seed=0), cifar(seed=1)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    x = images32.images[:4]
    trainer.teacher_logits({"pixel_values": x})
    s_mean, s_std = torch.tensor(student.pretrained_cfg["mean"]), torch.tensor(student.pretrained_cfg["std"])
    raw = x * s_std.view(1, 3, 1, 1) + s_mean.view(1, 3, 1, 1)
    expected = (raw - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[-1], expected, rtol=1e-5, atol=1e-5)


def test_same_normalisation_leaves_teacher_input_alone(tmp_path, images32):
    student, teacher = cifar(seed=0), cifar(seed=1)
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    x = images32.images[:4]
    trainer.teacher_logits({"pixel_values": x})
    assert seen[-1] is x


# ---- model kinds ----------------------------------------------------------------------------------------------------
def test_timm_student_and_teacher_with_pixel_values_batches(tmp_path, images32):
    student, teacher = cifar(seed=0), cifar("cifar_resnet20", seed=1)
    before = params_of(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32, eval_dataset=images32
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss_kd"] > 0 and metrics["eval_loss_ce"] > 0
    assert not torch.equal(params_of(student)["fc.weight"], before["fc.weight"])
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert len(logged) == 3
    for h in logged:  # the logged components add up to the loss
        assert h["loss"] == pytest.approx(h["loss_kd"] + h["loss_ce"], rel=1e-4)


def test_transformers_student_learns_from_timm_teacher(tmp_path, images32):
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    student = ResNetForImageClassification(config)
    before = params_of(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=cifar(seed=1), args=kd_args(tmp_path), train_dataset=images32
    )
    trainer.train()
    assert not torch.equal(params_of(student)["classifier.1.weight"], before["classifier.1.weight"])
    assert any("loss_kd" in h for h in trainer.state.log_history)


class DictOut(nn.Module):
    def __init__(self, out_kind):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        self.out_kind = out_kind

    def forward(self, pixel_values):
        logits = self.net(pixel_values)
        return {"dict": {"logits": logits}, "tuple": (logits, None), "tensor": logits}[self.out_kind]


@pytest.mark.parametrize("kind", ["dict", "tuple", "tensor"])
def test_plain_modules_returning_dict_tuple_or_tensor(tmp_path, images32, kind):
    torch.manual_seed(0)
    student, teacher = DictOut(kind), DictOut("tensor")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    trainer.train()
    assert trainer.state.log_history[0]["loss_kd"] > 0


# ---- the mixin in a user's own Trainer ------------------------------------------------------------------------------
class UsersTrainer(Trainer):
    """A user's existing subclass with behaviour of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_taken = 0

    def training_step(self, *args, **kwargs):
        self.steps_taken += 1
        return super().training_step(*args, **kwargs)


class UsersDistiller(DistillationMixin, UsersTrainer):
    pass


def test_mixin_inside_a_users_trainer_subclass_with_plain_training_arguments(tmp_path, images32):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_steps=3,
        per_device_train_batch_size=16,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = UsersDistiller(model=cifar(seed=0), teacher_model=cifar(seed=1), args=args, train_dataset=images32)
    # Upcast once to DistillationArguments with its defaults, the teacher check included ...
    assert type(trainer.args) is DistillationArguments and trainer.args.output_dir == str(tmp_path)
    assert (trainer.args.temperature, trainer.args.alpha, trainer.args.check_teacher_accuracy) == (4.0, 0.9, True)
    with pytest.raises(TeacherCheckError):  # ... which stops this untrained teacher in the user's own training_step
        trainer.train()
    assert trainer.steps_taken == 1
    trainer = UsersDistiller(
        model=cifar(seed=0),
        teacher_model=cifar(seed=1),
        args=DistillationArguments(**{**args.to_dict(), "hub_token": None, "check_teacher_accuracy": False}),
        train_dataset=images32,
    )
    trainer.train()
    assert trainer.steps_taken == 3
    assert sum("loss_kd" in h for h in trainer.state.log_history) == 3


# ---- extension protocol and logging ---------------------------------------------------------------------------------
class KeepFirstHalf(DistillationCallback):
    def on_distill_batch(self, trainer, model, inputs):
        return {k: v[: len(v) // 2] for k, v in inputs.items()}


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callbacks_replace_the_batch_and_add_logged_terms(tmp_path, images32):
    teacher = cifar(seed=1)
    sizes = []
    teacher.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    recorder = Recorder()
    trainer = DistillationTrainer(
        model=cifar(seed=0),
        teacher_model=teacher,
        args=kd_args(tmp_path),
        train_dataset=images32,
        callbacks=[KeepFirstHalf(), MeanLogitPenalty(), recorder],
    )
    trainer.train()
    assert sizes == [8, 8, 8]
    assert (trainer.samples_seen, trainer.teacher_samples) == (48, 24)
    train_logs = [h for h in recorder.logs if "loss" in h]
    assert len(train_logs) == 3
    for h in train_logs:  # the integrations (on_log) see the components, and they add up to the loss
        assert h["loss"] == pytest.approx(h["loss_kd"] + h["loss_ce"] + h["logit_l2"], rel=1e-4)
    assert [h["logit_l2"] for h in train_logs] == [h["logit_l2"] for h in trainer.state.log_history if "loss" in h]


def test_a_callback_cannot_overwrite_the_kd_term(tmp_path, images32):
    class Clash(DistillationCallback):
        def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
            return {"loss_kd": student_logits.sum() * 0}

    trainer = DistillationTrainer(
        model=cifar(seed=0),
        teacher_model=cifar(seed=1),
        args=kd_args(tmp_path),
        train_dataset=images32,
        callbacks=[Clash()],
    )
    with pytest.raises(ValueError, match="loss_kd"):
        trainer.train()


def test_evaluate_before_train_prepares_the_student_then_trains(tmp_path, images32):
    trainer = DistillationTrainer(
        model=cifar(seed=0),
        teacher_model=cifar(seed=1),
        args=kd_args(tmp_path, bf16=True),
        train_dataset=images32,
        eval_dataset=images32,
    )
    first = trainer.evaluate()
    assert first["eval_loss_kd"] > 0
    assert trainer.model in trainer.accelerator._models  # the student, not the teacher, was prepared
    assert trainer.teacher_model not in trainer.accelerator._models
    trainer.train()
    second = trainer.evaluate()
    assert second["eval_loss_kd"] > 0 and second["eval_loss"] != first["eval_loss"]  # the trained student was evaluated


def test_bf16_autocast_on_cpu_runs_teacher_in_bf16_with_fp32_logits(tmp_path, images32):
    teacher = cifar(seed=1)
    inner = []
    teacher.fc.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    trainer = DistillationTrainer(
        model=cifar(seed=0), teacher_model=teacher, args=kd_args(tmp_path, bf16=True), train_dataset=images32
    )
    trainer.train()
    assert inner and set(inner) == {torch.bfloat16}
    assert trainer.teacher_logits({"pixel_values": images32.images[:2]}).dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(h["loss_kd"])) for h in trainer.state.log_history if "loss_kd" in h)
    assert trainer.teacher_model.conv1.weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_teacher_dtype_casts_the_teacher_weights(tmp_path, images32):
    trainer = DistillationTrainer(
        model=cifar(seed=0),
        teacher_model=cifar(seed=1),
        args=kd_args(tmp_path, teacher_dtype="bfloat16", bf16=True),
        train_dataset=images32,
    )
    trainer.train()
    assert trainer.teacher_model.conv1.weight.dtype == torch.bfloat16


def test_save_and_reload_student(tmp_path, images32):
    student = cifar(seed=0)
    trainer = DistillationTrainer(
        model=student, teacher_model=cifar(seed=1), args=kd_args(tmp_path), train_dataset=images32
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = cifar(seed=5)
    reloaded.load_state_dict(load_file(str(tmp_path / "student" / "model.safetensors")))
    student.eval(), reloaded.eval()
    x = images32.images[:4]
    torch.testing.assert_close(reloaded(x), student(x))


# ---- arguments ------------------------------------------------------------------------------------------------------
def test_hf_argument_parser_parses_every_distillation_field(tmp_path):
    (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--temperature",
            "2.5",
            "--alpha",
            "0.3",
            "--teacher_dtype",
            "bfloat16",
            "--teacher_compile",
            "true",
            "--check_teacher_finite",
            "false",
            "--report_to",
            "none",
        ]
    )
    assert (args.temperature, args.alpha, args.teacher_dtype) == (2.5, 0.3, "bfloat16")
    assert args.teacher_compile is True and args.check_teacher_finite is False


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alpha", 1.5, "alpha=1.5"),
        ("alpha", -0.1, "alpha=-0.1"),
        ("temperature", 0.0, "temperature=0.0"),
        ("temperature", -2.0, "temperature=-2.0"),
        ("teacher_dtype", "int8", "'int8'"),
    ],
)
def test_bad_arguments_name_the_bad_value(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DistillationArguments(output_dir=str(tmp_path), report_to="none", **{field: value})


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_class_count_mismatch_is_caught_at_construction(tmp_path, images32):
    with pytest.raises(ValueError, match="teacher predicts 100 classes but the student 10"):
        DistillationTrainer(model=cifar(num_classes=10), teacher_model=cifar(num_classes=100), args=kd_args(tmp_path))


def test_class_count_mismatch_without_metadata_is_caught_at_the_first_batch(tmp_path, images32):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))
    trainer = DistillationTrainer(model=cifar(), teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    with pytest.raises(ValueError, match="7 classes but the student's 10"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_alpha_below_one_without_labels(tmp_path):
    class NoLabels(TensorImageDataset):
        def __getitem__(self, i):
            return {"pixel_values": self.images[i]}

    data = NoLabels(torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long))
    trainer = DistillationTrainer(
        model=cifar(), teacher_model=cifar(seed=1), args=kd_args(tmp_path, alpha=0.5), train_dataset=data
    )
    with pytest.raises(ValueError, match=r"alpha=0.5 < 1 .* no 'labels'"):
        trainer.train()
    # alpha = 1 needs no labels at all
    trainer = DistillationTrainer(
        model=cifar(), teacher_model=cifar(seed=1), args=kd_args(tmp_path, alpha=1.0), train_dataset=data
    )
    trainer.train()
    assert "loss_ce" not in trainer.state.log_history[0]


def test_teacher_that_is_the_student_is_refused(tmp_path):
    student = cifar()
    with pytest.raises(ValueError, match="student object itself"):
        DistillationTrainer(model=student, teacher_model=student, args=kd_args(tmp_path))
    with pytest.raises(ValueError, match="shares parameters"):
        DistillationTrainer(model=student, teacher_model=nn.Sequential(student), args=kd_args(tmp_path))


def test_several_gpus_without_distributed_launch_is_refused(tmp_path):
    args = kd_args(tmp_path)
    assert args.n_gpu <= 1
    args._n_gpu = 2  # what TrainingArguments reports on a 2-GPU machine started with plain `python`
    with pytest.raises(ValueError, match="DataParallel.*accelerate launch"):
        DistillationTrainer(model=cifar(), teacher_model=cifar(seed=1), args=args)


def test_missing_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_model="):
        DistillationTrainer(model=cifar(), args=kd_args(tmp_path))


def test_teacher_hub_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherLoadError, match="HF_HUB_OFFLINE.*local folder"):
        DistillationTrainer(model=cifar(), teacher_model="someone/no-such-teacher", args=kd_args(tmp_path))


class NaNAfter(nn.Module):
    """A teacher whose logits turn NaN after `good_calls` forwards."""

    def __init__(self, inner, good_calls):
        super().__init__()
        self.inner, self.good_calls, self.calls = inner, good_calls, 0
        self.num_classes = inner.num_classes

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out if self.calls <= self.good_calls else out * float("nan")


def test_non_finite_teacher_logits_stop_before_the_update_with_checkpoints_intact(tmp_path, images32):
    student = cifar(seed=0)
    args = kd_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=6)
    trainer = DistillationTrainer(
        model=student, teacher_model=NaNAfter(cifar(seed=1), 3), args=args, train_dataset=images32
    )
    with pytest.raises(FloatingPointError, match="global step 3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in student.parameters())
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in saved.values())
    assert not (tmp_path / "checkpoint-4").exists()
    resumed = cifar(seed=9)
    resumed.load_state_dict(saved)


def test_classification_trainer_trains_alone_and_logs_ce(tmp_path, images32):
    model = cifar(seed=0)
    trainer = ClassificationTrainer(model=model, args=kd_args(tmp_path), train_dataset=images32, eval_dataset=images32)
    trainer.train()
    assert trainer.evaluate()["eval_loss_ce"] > 0
    assert all("loss_ce" in h for h in trainer.state.log_history if "loss" in h)


def test_a_student_copied_from_a_used_teacher_is_refused_until_thawed(tmp_path, images32):
    teacher = cifar(seed=1)
    DistillationTrainer(model=cifar(seed=0), teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    student = copy.deepcopy(teacher)  # frozen weights come along with the copy
    with pytest.raises(ValueError, match="requires_grad_"):
        DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path))
    student.requires_grad_(True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    trainer.train()
    assert student.training and not teacher.training


def test_gates_get_no_weight_decay(tmp_path, images32):
    from hf_kdsearch import add_gates

    gated = add_gates(cifar(seed=0))
    trainer = DistillationTrainer(model=gated, teacher_model=cifar(seed=1), args=kd_args(tmp_path, weight_decay=0.1))
    decayed = set(trainer.get_decay_parameter_names(gated))
    gates = {n for n, _ in gated.named_parameters() if "gate" in n}
    assert gates and not gates & decayed
    assert "fc.weight" in decayed


def test_teacher_copy_is_independent(tmp_path, images32):
    student = cifar(seed=0)
    teacher = copy.deepcopy(student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=images32)
    trainer.train()
    assert not torch.equal(student.fc.weight, teacher.fc.weight)


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_teacher_logits(tmp_path, images32):
    teacher = cifar(seed=1).eval()
    x = images32.images[:8]
    with torch.no_grad():
        eager = teacher(x)
    trainer = DistillationTrainer(
        model=cifar(seed=0), teacher_model=teacher, args=kd_args(tmp_path, teacher_compile=True), train_dataset=images32
    )
    torch.testing.assert_close(trainer.teacher_logits({"pixel_values": x}), eager, rtol=1e-4, atol=1e-4)
    trainer.train()
    assert trainer.state.global_step == 3
