"""A new user's drop-in: the teacher's input statistics and check, the user's own loss, eval_loss, logs, the card."""

import ast
import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import random_images, tiny_args
from torch import nn
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    ViTImageProcessor,
)

import hf_kdsearch
from hf_kdsearch import (
    ClassificationTrainer,
    DistillationCallback,
    DistillationMixin,
    DistillationTrainer,
    kd_loss,
    load_mnist10k,
    save_student,
)
from hf_kdsearch.data import TensorImageDataset
from hf_kdsearch.teacher import Teacher, TeacherCheckError, TeacherSource

PACKAGE = Path(hf_kdsearch.__file__).parent
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def cifar(name="cifar_resnet8", num_classes=10, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- a teacher that is actually good: an MLP trained on the bundled digits -------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """Raw [0, 1] digits: 2,000 to train the teacher on, 256 for the distillation runs."""
    train, _ = load_mnist10k(normalize=False)
    return train.images[:2000], train.labels[:2000], train.images[2000:2256], train.labels[2000:2256]


@pytest.fixture(scope="module")
def digits_teacher(digits, tmp_path_factory):
    """An `mnist_mlp` trained on MNIST-normalised digits, saved with its measured accuracy in the card."""
    x, y, x_test, y_test = digits
    torch.manual_seed(0)
    teacher = timm.create_model("mnist_mlp", hidden_dims=[64])  # pretrained_cfg: the MNIST mean/std
    opt = torch.optim.Adam(teacher.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, len(x), 100):
            loss = F.cross_entropy(teacher((x[i : i + 100] - MNIST_MEAN) / MNIST_STD), y[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher.eval()
    with torch.no_grad():
        accuracy = (teacher((x_test - MNIST_MEAN) / MNIST_STD).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.8
    folder = save_student(teacher, tmp_path_factory.mktemp("teacher") / "digits_mlp", card={"accuracy": accuracy})
    return folder, accuracy


def linear_student(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))  # no pretrained_cfg: its statistics are unknown


def digits_args(tmp_path, folder, **overrides):
    settings = dict(teacher_model_name_or_path=str(folder), check_teacher_accuracy=True, per_device_train_batch_size=64)
    return tiny_args(tmp_path, **{**settings, "max_steps": 2, **overrides})


def test_wrongly_normalised_teacher_input_is_stopped_before_the_first_step(tmp_path, digits, digits_teacher, caplog):
    # The script normalises for the student with (0.5, 0.5) and nothing tells the library so: the teacher, trained on
    # MNIST statistics, sees inputs it does not understand.
    folder, reported = digits_teacher
    _, _, x, y = digits
    data = TensorImageDataset((x - 0.5) / 0.5, y)
    student = linear_student()
    before = params_of(student)
    trainer = DistillationTrainer(model=student, args=digits_args(tmp_path, folder), train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="hf_kdsearch"), pytest.raises(TeacherCheckError) as err:
        trainer.train()
    message = str(err.value)
    assert f"far below the {reported:.3f} its model card reports" in message
    for cause in ("normalisation", "label order", "resolution", "channels", "check_teacher_accuracy=False"):
        assert cause in message
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in params_of(student).items())  # no optimizer step was taken
    unknown = [r for r in caplog.records if "cannot tell the student's input statistics" in r.getMessage()]
    assert len(unknown) == 1  # said once, not per batch


def test_declared_student_statistics_fix_it_and_teacher_accuracy_reaches_the_log(tmp_path, digits, digits_teacher):
    folder, reported = digits_teacher
    _, _, x, y = digits
    data = TensorImageDataset((x - 0.5) / 0.5, y)
    args = digits_args(tmp_path, folder, image_mean=[0.5], image_std=[0.5])
    trainer = DistillationTrainer(model=linear_student(), args=args, train_dataset=data)
    trainer.train()
    logged = [h["teacher_accuracy"] for h in trainer.state.log_history if "teacher_accuracy" in h]
    assert len(logged) == 1 and logged[0] == pytest.approx(trainer.teacher_accuracy)
    assert trainer.teacher_accuracy > reported - 0.1  # the teacher sees its own statistics again
    # What the teacher received is exactly the MNIST-normalised image.
    seen = []
    trainer.teacher_model.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    trainer.teacher_logits({"pixel_values": data.images[:4]})
    torch.testing.assert_close(seen[-1], (x[:4] - MNIST_MEAN) / MNIST_STD, rtol=1e-5, atol=1e-5)


def test_wrong_label_order_is_near_chance_and_named(tmp_path, digits, digits_teacher):
    folder, _ = digits_teacher
    _, _, x, y = digits
    data = TensorImageDataset((x - MNIST_MEAN) / MNIST_STD, (y + 1) % 10)  # class ids shifted by one
    args = digits_args(tmp_path, folder, image_mean=[MNIST_MEAN], image_std=[MNIST_STD])
    trainer = DistillationTrainer(model=linear_student(), args=args, train_dataset=data)
    with pytest.raises(TeacherCheckError, match=r"is 0\.0\d\d, near chance .*label order"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_check_can_be_turned_off(tmp_path, digits, digits_teacher):
    folder, _ = digits_teacher
    _, _, x, y = digits
    data = TensorImageDataset((x - MNIST_MEAN) / MNIST_STD, (y + 1) % 10)
    args = digits_args(tmp_path, folder, check_teacher_accuracy=False)
    trainer = DistillationTrainer(model=linear_student(), args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.teacher_accuracy is None
    assert not any("teacher_accuracy" in h for h in trainer.state.log_history)


# ---- where the teacher's statistics come from -----------------------------------------------------------------------
def tiny_resnet(seed=1, num_labels=10):
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels
    )
    return ResNetForImageClassification(config)


def test_teacher_statistics_from_the_image_processor_saved_with_it(tmp_path, images32):
    folder = tmp_path / "teacher"
    tiny_resnet().save_pretrained(folder)
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    ViTImageProcessor(image_mean=mean, image_std=std, size={"height": 32, "width": 32}).save_pretrained(folder)
    student = cifar(seed=0)  # a timm student: its pretrained_cfg gives the CIFAR statistics
    trainer = DistillationTrainer(model=student, teacher_model=str(folder), args=tiny_args(tmp_path))
    assert trainer.teacher.stats.source == f"image processor of {folder}"
    seen = []
    trainer.teacher_model.register_forward_pre_hook(lambda m, a, k: seen.append(k["pixel_values"]), with_kwargs=True)
    x = images32.images[:4]
    trainer.teacher_logits({"pixel_values": x})
    s_mean = torch.tensor(student.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    s_std = torch.tensor(student.pretrained_cfg["std"]).view(1, 3, 1, 1)
    expected = (x * s_std + s_mean - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[-1], expected, rtol=1e-5, atol=1e-5)


def test_explicit_teacher_statistics_win(tmp_path):
    args = tiny_args(tmp_path, teacher_image_mean=[0.1, 0.2, 0.3], teacher_image_std=[0.3, 0.3, 0.3])
    trainer = DistillationTrainer(model=cifar(seed=0), teacher_model=cifar(seed=1), args=args)
    assert trainer.teacher.stats.source == "explicit arguments"
    assert trainer.teacher.stats.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="teacher_image_mean and teacher_image_std go together"):
        tiny_args(tmp_path, teacher_image_mean=[0.1, 0.2, 0.3])


# ---- the teacher object ---------------------------------------------------------------------------------------------
def test_nan_in_the_input_is_blamed_on_the_input_not_the_teacher(tmp_path):
    data = random_images(32)
    data.images[3, 0, 0, 0] = float("nan")
    args = tiny_args(tmp_path, check_teacher_accuracy=True)
    trainer = DistillationTrainer(model=cifar(seed=0), teacher_model=cifar(seed=1), args=args, train_dataset=data)
    with pytest.raises(FloatingPointError, match=r"at global step 0: the input batch holds NaN or inf \(in pixel"):
        trainer.train()


def test_a_teacher_source_can_stand_in_for_the_teacher(tmp_path, images32):
    runs = {}
    for kind in ("teacher_model", "teacher_cache"):
        source = cifar(seed=1) if kind == "teacher_model" else Teacher.from_args(cifar(seed=1), tiny_args(tmp_path))
        trainer = DistillationTrainer(
            model=cifar(seed=0), args=tiny_args(tmp_path), train_dataset=images32, **{kind: source}
        )
        trainer.train()
        runs[kind] = [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h]
    assert isinstance(trainer.teacher_source, TeacherSource) and trainer.teacher is None
    assert runs["teacher_cache"] == runs["teacher_model"] and len(runs["teacher_model"]) == 3


def test_student_call_style_is_read_once(tmp_path, images32, monkeypatch):
    import hf_kdsearch.trainer as trainer_module

    calls = []
    original = trainer_module.takes_keywords
    monkeypatch.setattr(trainer_module, "takes_keywords", lambda m: calls.append(m) or original(m))
    trainer = DistillationTrainer(
        model=cifar(seed=0), teacher_model=cifar(seed=1), args=tiny_args(tmp_path), train_dataset=images32
    )
    trainer.train()
    assert len(calls) == 1


def test_batch_plumbing_is_a_leaf_and_flops_does_not_import_the_trainer():
    def package_imports(name):
        tree = ast.parse((PACKAGE / name).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if "hf_kdsearch" in a.name
        }

    assert package_imports("batch.py") == set()
    assert package_imports("flops.py") == {"batch"}
    assert hf_kdsearch.forward_model is hf_kdsearch.batch.forward_model is hf_kdsearch.trainer.forward_model


# ---- the user's own loss ---------------------------------------------------------------------------------------------
class LabelSmoothingTrainer(Trainer):
    """A user's Trainer subclass with a loss of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.user_loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.user_loss_calls += 1
        logits = model(inputs["pixel_values"])
        loss = F.cross_entropy(logits, inputs["labels"], label_smoothing=0.2)
        return (loss, logits) if return_outputs else loss


class DistilledLabelSmoothing(DistillationMixin, LabelSmoothingTrainer):
    pass


def test_a_subclass_loss_becomes_the_hard_label_term_with_one_student_forward(tmp_path, images32):
    student, teacher = cifar(seed=0), cifar(seed=1)
    forwards = []
    student.register_forward_hook(lambda m, a, o: forwards.append(1))
    args = tiny_args(tmp_path, alpha=0.6)
    trainer = DistilledLabelSmoothing(model=student, teacher_model=teacher, args=args, train_dataset=images32)
    trainer.train()
    assert trainer.user_loss_calls == 3 and len(forwards) == 3  # the user's loss ran; one student forward per step
    for h in (h for h in trainer.state.log_history if "loss" in h):
        assert h["loss"] == pytest.approx(h["loss_kd"] + h["loss_ce"], rel=1e-4)

    # loss = alpha * KD + (1 - alpha) * user_loss, on a fixed batch
    batch = {"pixel_values": images32.images[:16], "labels": images32.labels[:16]}
    student.train()
    with torch.no_grad():
        s, t = student(batch["pixel_values"]), trainer.teacher_logits(batch)
        expected = 0.6 * kd_loss(s, teacher_logits=t, temperature=4.0) + 0.4 * F.cross_entropy(
            s, batch["labels"], label_smoothing=0.2
        )
        got = trainer.compute_loss(student, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- evaluation ------------------------------------------------------------------------------------------------------
def test_eval_loss_is_the_task_loss_of_a_student_trained_alone(tmp_path, images32):
    student = cifar(seed=0)
    eval_data = random_images(40, seed=3)  # 16 + 16 + 8: a short last batch
    args = tiny_args(tmp_path, alpha=0.7)
    kd = DistillationTrainer(model=student, teacher_model=cifar(seed=1), args=args, eval_dataset=eval_data)
    alone = ClassificationTrainer(model=copy.deepcopy(student), args=tiny_args(tmp_path), eval_dataset=eval_data)
    with_kd, without = kd.evaluate(), alone.evaluate()
    assert with_kd["eval_loss"] == pytest.approx(without["eval_loss"], rel=1e-5)
    assert with_kd["eval_loss_ce"] == pytest.approx(0.3 * with_kd["eval_loss"], rel=1e-4)  # weighted, as in training
    assert with_kd["eval_loss_kd"] > 0


# ---- logged components add up ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("logging", [{"logging_strategy": "epoch"}, {"logging_steps": 2}])
def test_logged_components_add_up_under_accumulation_and_at_epoch_ends(tmp_path, logging):
    # 8 micro-batches per epoch in steps of 3, 3 and 2: a log window mixes steps of different lengths.
    class Penalty(DistillationCallback):
        def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
            return {"logit_l2": 0.01 * student_logits.float().pow(2).mean()}

    args = tiny_args(
        tmp_path,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=3,
        max_steps=-1,
        num_train_epochs=2,
        **logging,
    )
    data = random_images(64)
    trainer = DistillationTrainer(
        model=cifar(seed=0), teacher_model=cifar(seed=1), args=args, train_dataset=data, callbacks=[Penalty()]
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) >= 2
    for h in logs:
        assert h["loss"] == pytest.approx(h["loss_kd"] + h["loss_ce"] + h["logit_l2"], rel=1e-5), h


# ---- the model card --------------------------------------------------------------------------------------------------
def test_the_trainer_card_tells_the_distillation(tmp_path, digits, digits_teacher):
    from huggingface_hub import ModelCard

    folder, _ = digits_teacher
    _, _, x, y = digits
    data = TensorImageDataset((x - MNIST_MEAN) / MNIST_STD, y)

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    args = digits_args(tmp_path, folder, image_mean=[MNIST_MEAN], image_std=[MNIST_STD], temperature=3.0, alpha=0.8)
    trainer = DistillationTrainer(
        model=linear_student(), args=args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy
    )
    trainer.train()
    student_accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    section = card.text[card.text.index("## Distillation") :]
    for needle in (
        str(folder),
        "knowledge distillation",
        "| Temperature T | 3 |",
        "| alpha (weight of the KD term) | 0.8 |",
        f"{trainer.teacher_accuracy:.4g}",
        f"{student_accuracy:.4g}",
        f"| hf_kdsearch version | {hf_kdsearch.__version__} |",
    ):
        assert needle in section, needle
    assert card.data.distillation["temperature"] == 3.0 and card.data.distillation["teacher"] == str(folder)
    assert "knowledge-distillation" in card.data.tags


# ---- two lines in a Hugging Face example script ----------------------------------------------------------------------
SCRIPT = Path(__file__).parent / "scripts" / "run_image_classification.py"
TWO_LINES = {
    "from transformers import Trainer\n": "from hf_kdsearch import DistillationTrainer as Trainer\n",
    "from transformers import TrainingArguments\n": (
        "from hf_kdsearch import DistillationArguments as TrainingArguments\n"
    ),
}
LEVELS = (0.15, 0.5, 0.85)  # three classes of images told apart by their brightness, whatever the crop or flip


def brightness_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(LEVELS)
    images = torch.tensor(LEVELS)[labels].view(n, 1, 1, 1) + 0.1 * (2 * torch.rand(n, 3, 32, 32, generator=g) - 1)
    return images.clamp(0, 1), labels


@pytest.mark.slow  # a subprocess that imports transformers and datasets: ~20-60 s on 2 busy cores
def test_the_example_script_distils_with_two_changed_lines(tmp_path):
    import difflib
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    # Data: an image folder of PNGs, as the example reads it.
    images, labels = brightness_images(48, seed=0)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / f"level{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    # Teacher: a timm model trained on its own (CIFAR) statistics, saved as a folder.
    teacher = cifar(num_classes=3, seed=1)
    mean = torch.tensor(teacher.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(teacher.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x, y = brightness_images(96, seed=1)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(15):
        loss = F.cross_entropy(teacher((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    with torch.no_grad():
        assert (teacher((images - mean) / std).argmax(-1) == labels).float().mean() > 0.9
        # Fed the student's input as is (raw pixels), it would confuse the dark class with the middle one.
        assert (teacher(images).argmax(-1) == labels).float().mean() < 0.7
    save_student(teacher, tmp_path / "teacher")
    # Student: a transformers model whose image processor feeds it raw [0, 1] pixels, not the teacher's statistics.
    tiny_resnet(seed=0, num_labels=3).save_pretrained(tmp_path / "student")
    processor = ViTImageProcessor(image_mean=[0.0] * 3, image_std=[1.0] * 3, size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "student")

    source = SCRIPT.read_text()
    patched = source
    for old, new in TWO_LINES.items():
        assert source.count(old) == 1
        patched = patched.replace(old, new)
    changed = [d for d in difflib.ndiff(source.splitlines(), patched.splitlines()) if d[:1] in "+-"]
    assert len(changed) == 4  # two lines out, two lines in
    script = tmp_path / "run_distillation.py"
    script.write_text(patched)

    out = tmp_path / "out"
    command = [sys.executable, str(script), "--model_name_or_path", tmp_path / "student", "--train_dir"]
    command += [tmp_path / "data", "--output_dir", out, "--do_train", "--do_eval", "--max_steps", "2"]
    command += ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--use_cpu"]
    command += ["--remove_unused_columns", "False", "--report_to", "none", "--save_strategy", "no"]
    command += ["--logging_steps", "1", "--teacher_model_name_or_path", tmp_path / "teacher"]
    command += ["--alpha", "0.5", "--temperature", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 2 and all("loss_kd" in h and "loss_ce" in h for h in train_logs)
    assert train_logs[0]["teacher_accuracy"] > 0.9  # re-normalised from the student's processor to the teacher's cfg
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert {"eval_loss", "eval_loss_kd", "eval_loss_ce", "eval_accuracy"} <= set(evaluation)
    card = (out / "README.md").read_text()
    assert "## Distillation" in card and str(tmp_path / "teacher") in card
    assert "| Temperature T | 2 |" in card and "| alpha (weight of the KD term) | 0.5 |" in card


# ---- beyond images ---------------------------------------------------------------------------------------------------
def tiny_bert(seed, num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def test_a_text_classifier_distils_through_the_same_trainer(tmp_path, caplog):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (48, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0  # padded sequences
    labels = (ids[:, 1] % 2).tolist()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels})
    student, teacher = tiny_bert(0), tiny_bert(1)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, k: seen.append(sorted(k)), with_kwargs=True)
    before = params_of(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=tiny_args(tmp_path), train_dataset=data, eval_dataset=data
    )
    with caplog.at_level(logging.WARNING, logger="hf_kdsearch"):
        trainer.train()
    metrics = trainer.evaluate()
    assert seen[0] == ["attention_mask", "input_ids"]  # no labels, no pixel_values
    assert all(not torch.equal(v, before[k]) for k, v in params_of(student).items() if "classifier" in k)
    for h in (h for h in trainer.state.log_history if "loss" in h):
        assert h["loss"] == pytest.approx(h["loss_kd"] + h["loss_ce"], rel=1e-5)
    assert metrics["eval_loss_ce"] == pytest.approx(0.1 * metrics["eval_loss"], rel=1e-4)
    assert not any("input statistics" in r.getMessage() for r in caplog.records)  # normalisation is image-only


def test_a_text_teacher_folder_loads_through_teacher_model_name_or_path(tmp_path):
    """The two-line change of a run_glue-style script names the teacher by its folder: a sequence classifier there
    loads as the class its config names, not as an image classifier."""
    from transformers import BertForSequenceClassification

    tiny_bert(1).save_pretrained(tmp_path / "bert-teacher")
    args = tiny_args(tmp_path / "out", teacher_model_name_or_path=str(tmp_path / "bert-teacher"))
    trainer = DistillationTrainer(model=tiny_bert(0), args=args)
    assert isinstance(trainer.teacher_model, BertForSequenceClassification)
    batch = {"input_ids": torch.randint(1, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    torch.testing.assert_close(trainer.teacher_logits(batch), tiny_bert(1).eval()(**batch).logits)


def test_a_refused_shared_teacher_leaves_the_student_trainable(tmp_path):
    student = cifar()
    with pytest.raises(ValueError, match="shares parameters"):
        DistillationTrainer(model=student, teacher_model=nn.Sequential(student), args=tiny_args(tmp_path))
    assert all(p.requires_grad for p in student.parameters())
