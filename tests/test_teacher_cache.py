"""TeacherCache: training from stored teacher outputs on replayed views equals online KD on the same views; bad caches
are refused before anything is trained or written; the cache survives disk and a (loopback) Hub round trip."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from conftest import random_images, tiny_args
from hub_server import LoopbackHub

from hf_kdsearch import (
    DistillationCallback,
    DistillationTrainer,
    GateSearchCallback,
    TeacherCache,
    UncertaintyMixupCallback,
    add_gates,
)
from hf_kdsearch.data import collate_tensor_batch
from hf_kdsearch.fastpath import DeviceAugment, DeviceImageDataset
from hf_kdsearch.gates import gate_parameters
from hf_kdsearch.teacher import TeacherCheckError
from hf_kdsearch.teacher_cache import INFO_FILE, CachedTeacher, TeacherCacheError, check_replayable

ROOT = Path(__file__).resolve().parents[1]


def uint8_data(n=32, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return DeviceImageDataset(images, torch.randint(0, 10, (n,), generator=g))


def models(seed=0, classes=10):
    torch.manual_seed(seed)
    teacher = timm.create_model("cifar_resnet8", num_classes=classes)
    torch.manual_seed(seed + 1)
    student = timm.create_model("cifar_resnet8", num_classes=classes, drop_rate=0.2)
    return teacher, student


def fast_args(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=8,
        max_steps=8,  # two epochs of 32 samples
        learning_rate=0.1,
        device_augment=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        logging_nan_inf_filter=False,
    )
    return tiny_args(tmp_path, **{**settings, **overrides})


class ReplayViews(DistillationCallback):
    """Online KD on the cache's views: the batch arrives as uint8 with `sample_index`; this callback crops, flips and
    normalises it with the stored parameters of the view the cache run replays in that epoch. The teacher then runs
    online on exactly the images the cache run's student sees."""

    needs_sample_index = True

    def __init__(self, cache: TeacherCache, augment: DeviceAugment, seed: int):
        self.cache, self.augment, self.seed = cache, augment, seed

    def on_distill_batch(self, trainer, model, inputs):
        cached = CachedTeacher(self.cache, self.seed)
        index = inputs["sample_index"]
        view = cached.view_ids(int(trainer.state.epoch or 0))[index]
        tables = self.cache.tensors()
        out = self.augment.replay(inputs, tables["crop"][index, view], tables["flip"][index, view])
        return {k: v for k, v in out.items() if k != "sample_index"}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cache_training_equals_online_kd_on_the_same_views(tmp_path, accumulation):
    data = uint8_data()
    teacher, init = models()
    args = fast_args(tmp_path / "build", gradient_accumulation_steps=accumulation)
    cache = TeacherCache.build(teacher, data, args, num_views=4, logits_dtype="float32")
    assert cache.num_views == 4 and len(cache) == 32
    assert cache.info["augmentation"] == {"padding": 4, "flip": True}

    teacher_calls = []
    teacher.register_forward_hook(lambda m, a, out: teacher_calls.append(out.shape[0]))
    cached_student = copy.deepcopy(init)
    trainer = DistillationTrainer(
        model=cached_student,
        teacher_cache=cache,
        args=fast_args(tmp_path / "cache", gradient_accumulation_steps=accumulation),
        train_dataset=data,
        data_collator=DeviceImageDataset.collate,
    )
    trainer.train()
    assert teacher_calls == []  # the teacher never ran
    assert trainer.teacher_samples == trainer.samples_seen == 8 * 8 * accumulation

    online_student = copy.deepcopy(init)
    augment = DeviceAugment.from_args(args, teacher)
    DistillationTrainer(
        model=online_student,
        teacher_model=teacher,
        args=fast_args(tmp_path / "online", gradient_accumulation_steps=accumulation, device_augment=False),
        callbacks=[ReplayViews(cache, augment, seed=0)],
        train_dataset=data,
        data_collator=DeviceImageDataset.collate,
    ).train()
    assert len(teacher_calls) == 8 * accumulation
    for (name, a), b in zip(cached_student.state_dict().items(), online_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(cached_student.get_classifier().weight, init.get_classifier().weight)  # it did train


def test_views_change_per_epoch_and_follow_the_seed():
    teacher, _ = models()
    cache = TeacherCache.build(teacher, uint8_data(), fast_args("/tmp/unused"), num_views=4)
    a, b = CachedTeacher(cache, seed=0), CachedTeacher(cache, seed=0)
    assert torch.equal(a.view_ids(0), b.view_ids(0)) and torch.equal(a.view_ids(3), b.view_ids(3))
    assert not torch.equal(a.view_ids(0), a.view_ids(1))
    assert set(a.view_ids(0).tolist()) == {0, 1, 2, 3}
    assert not torch.equal(a.view_ids(0), CachedTeacher(cache, seed=1).view_ids(0))
    # The stored crops are real draws: offsets in [0, 8], both flips present.
    crops, flips = cache.tensors()["crop"], cache.tensors()["flip"]
    assert crops.min() >= 0 and crops.max() <= 8 and len(crops.unique()) > 3 and 0 < flips.float().mean() < 1


def test_plain_images_without_augmentation_equal_online_kd(tmp_path):
    data = random_images(32, shape=(3, 16, 16))
    teacher, init = models()
    args = tiny_args(tmp_path / "b", per_device_train_batch_size=8, max_steps=6)
    with pytest.raises(ValueError, match="num_views=4 needs random views"):
        TeacherCache.build(teacher, data, args, num_views=4)
    cache = TeacherCache.build(teacher, data, args, num_views=1, logits_dtype="float32")
    assert cache.info["augmentation"] is None
    students = [copy.deepcopy(init), copy.deepcopy(init)]
    for student, source in zip(students, [{"teacher_cache": cache}, {"teacher_model": teacher}]):
        DistillationTrainer(
            model=student, args=args, train_dataset=data, data_collator=collate_tensor_batch, **source
        ).train()
    for (name, a), b in zip(students[0].state_dict().items(), students[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_cache_is_close_and_top_k_is_exact_at_k_equal_c(tmp_path):
    data, (teacher, _) = uint8_data(), models()
    args = fast_args(tmp_path)
    full32 = TeacherCache.build(teacher, data, args, num_views=2, logits_dtype="float32")
    full16 = TeacherCache.build(teacher, data, args, num_views=2)
    top_c = TeacherCache.build(teacher, data, args, num_views=2, top_k=10)
    top_3 = TeacherCache.build(teacher, data, args, num_views=2, top_k=3)
    assert full16.tensors()["logits"].dtype == torch.float16
    assert torch.equal(full32.tensors()["crop"], top_3.tensors()["crop"])  # same seed, same views
    batch = {"sample_index": torch.arange(32), "view_index": torch.randint(0, 2, (32,))}
    exact = CachedTeacher(full32, 0).logits(batch)
    half = CachedTeacher(full16, 0).logits(batch)
    torch.testing.assert_close(half, exact, rtol=1e-3, atol=1e-3)
    assert torch.equal(CachedTeacher(top_c, 0).logits(batch), half)  # k = C: every stored logit back in place
    truncated = CachedTeacher(top_3, 0).logits(batch).softmax(-1)
    top = half.topk(3, dim=-1)
    assert torch.equal(truncated.topk(3, dim=-1).indices.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(truncated.gather(1, top.indices), top.values.softmax(-1))  # renormalised over k
    assert float(truncated.sum(-1).sub(1).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="top_k must be an int in"):
        TeacherCache.build(teacher, data, args, num_views=1, top_k=11)


# ---- bad input: refused before anything is trained or written -----------------------------------------------------
def test_wrong_dataset_classes_augmentation_or_unix_are_refused_before_training(tmp_path):
    data, (teacher, student) = uint8_data(), models()
    cache = TeacherCache.build(teacher, data, fast_args(tmp_path / "b"), num_views=2)

    def trainer(out, **kw):
        settings = {"train_dataset": data, "args": fast_args(tmp_path / out), **kw}
        return DistillationTrainer(
            model=student, teacher_cache=cache, data_collator=DeviceImageDataset.collate, **settings
        )

    with pytest.raises(TeacherCacheError, match="built on 32 samples but the training set has 24"):
        trainer("size", train_dataset=uint8_data(24))
    with pytest.raises(TeacherCacheError, match="another dataset of the same size"):
        trainer("content", train_dataset=uint8_data(32, seed=1))
    with pytest.raises(TeacherCacheError, match="over 10 classes but the student predicts 5"):
        DistillationTrainer(
            model=models(classes=5)[1], teacher_cache=cache, args=fast_args(tmp_path / "cls"), train_dataset=data
        )
    with pytest.raises(TeacherCacheError, match=r"augmentation \{'padding': 2, 'flip': True\} is not the cache's"):
        trainer("aug", args=fast_args(tmp_path / "aug", augment_padding=2))
    with pytest.raises(TeacherCacheError, match=r"augmentation None is not the cache's"):
        trainer("noaug", args=fast_args(tmp_path / "noaug", device_augment=False))
    with pytest.raises(TeacherCacheError, match="UncertaintyMixupCallback mixes or re-draws"):
        trainer("unix", callbacks=[UncertaintyMixupCallback()])
    with pytest.raises(ValueError, match="teacher_model= or teacher_cache=, not both"):
        DistillationTrainer(model=student, teacher_model=teacher, teacher_cache=cache, args=fast_args(tmp_path / "x"))
    from datasets import Dataset

    stream = Dataset.from_dict({"pixel_values": data.images.tolist(), "labels": data.labels.tolist()})
    with pytest.raises(ValueError, match="needs a map-style train_dataset with random access; a streamed Iterable"):
        trainer("stream", train_dataset=stream.to_iterable_dataset())
    for out in ("size", "content", "cls", "aug", "noaug", "unix", "x", "stream"):
        assert not (tmp_path / out).exists() or not os.listdir(tmp_path / out), out  # nothing written


def test_half_written_or_foreign_folders_are_refused_and_saves_are_atomic(tmp_path, monkeypatch):
    data, (teacher, _) = uint8_data(), models()
    cache = TeacherCache.build(teacher, data, fast_args(tmp_path / "b"), num_views=2)
    path = tmp_path / "cache"
    cache.save_to_disk(path)
    saved = {p.name: p.read_bytes() for p in path.iterdir()}
    info = json.loads((path / INFO_FILE).read_text())
    assert info["num_views"] == 2 and info["teacher"] == "cifar_resnet8" and info["dataset_fingerprint"]
    card = (path / "README.md").read_text()
    assert "| views per sample (R) | 2 |" in card and "random crop with 4 px zero padding, horizontal flip" in card

    loaded = TeacherCache.load_from_disk(path)
    assert loaded.info == cache.info
    for name, tensor in cache.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name

    # A save that dies half-way leaves the old cache whole, and no temporary folder behind.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    other = TeacherCache.build(teacher, data, fast_args(tmp_path / "b"), num_views=3)
    monkeypatch.setattr(type(other.dataset), "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        other.save_to_disk(path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == saved
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    # A complete re-save replaces it whole.
    other.save_to_disk(path)
    assert TeacherCache.load_from_disk(path).num_views == 3 and sorted(os.listdir(tmp_path)) == ["cache"]

    # Half-written: no card file (written last), or a truncated data file.
    (path / INFO_FILE).unlink()
    with pytest.raises(TeacherCacheError, match="not a complete teacher cache: it has no teacher_cache.json"):
        TeacherCache.load_from_disk(path)
    other.save_to_disk(path)
    arrow = next(path.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    with pytest.raises(TeacherCacheError, match="not a readable teacher cache"):
        TeacherCache.load_from_disk(path)
    # A folder of something else is never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"keep me")
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        cache.save_to_disk(foreign)
    assert (foreign / "weights.bin").read_bytes() == b"keep me"


def test_gate_search_kd_phase_trains_from_the_cache(tmp_path):
    data, (teacher, _) = uint8_data(), models()
    cache = TeacherCache.build(teacher, data, fast_args(tmp_path / "b"), num_views=2)
    gated = add_gates(copy.deepcopy(teacher))
    gated.requires_grad_(True)
    cb = GateSearchCallback(target_flops_ratio=0.5, l1_weight=1.0, input_size=(3, 16, 16), write_report=False)
    trainer = DistillationTrainer(
        model=gated,
        teacher_cache=cache,
        args=fast_args(tmp_path / "search", max_steps=4, alpha=1.0),
        callbacks=[cb],
        train_dataset=data,
        data_collator=DeviceImageDataset.collate,
    )
    before = [g.detach().clone() for g in gate_parameters(gated).values()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "flops_ratio" in h]
    assert len(logs) == 4 and all(h["loss_kd"] > 0 for h in logs)
    # The penalty and the cached teacher's KD term both reach the gates (flops_ratio counts whole units switched off,
    # which 4 steps do not reach).
    assert any(not torch.equal(a, b) for a, b in zip(before, gate_parameters(gated).values()))


# ---- Hub round trip (loopback server, subprocesses: huggingface_hub reads HF_ENDPOINT at import) -----------------
PUSH = """
import sys
from hf_kdsearch import TeacherCache
print("URL", TeacherCache.load_from_disk(sys.argv[1]).push_to_hub("user/r8-views"))
"""

PULL = """
import sys, torch
from hf_kdsearch import TeacherCache
cache = TeacherCache.load_from_hub("user/r8-views")
torch.save({"info": cache.info, "tensors": cache.tensors()}, sys.argv[1])
"""


def run_python(code, *args, env):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow  # two subprocesses that import torch, transformers and datasets: about a minute on 2 busy cores
def test_push_then_load_through_loopback_hub(tmp_path):
    data, (teacher, _) = uint8_data(), models()
    cache = TeacherCache.build(teacher, data, fast_args(tmp_path / "b"), num_views=2, top_k=4)
    cache.save_to_disk(tmp_path / "cache")
    with LoopbackHub(timeout=400) as hub:
        out = run_python(PUSH, tmp_path / "cache", env=hub.env(tmp_path / "hf_push"))
        assert out.split("URL")[1].split()[0] == f"{hub.endpoint}/datasets/user/r8-views"
        files = hub.files("user/r8-views", repo_type="dataset")
        assert "README.md" in files and INFO_FILE in files and "dataset_info.json" in files
        run_python(PULL, tmp_path / "pulled.pt", env=hub.env(tmp_path / "hf_pull"))
    pulled = torch.load(tmp_path / "pulled.pt")
    assert pulled["info"] == cache.info
    for name, tensor in cache.tensors().items():
        assert torch.equal(pulled["tensors"][name], tensor), name


# ---- one teacher path, checked at build time ----------------------------------------------------------------------
class Brightness(torch.nn.Module):
    """A teacher that reads the class off the brightest pixel (crops pad with zeros and flips keep it): accurate on
    `bright_data` whatever the view, with its own input statistics, which it undoes first."""

    pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "architecture": "brightness"}

    def __init__(self, scale=50.0, shift=0):
        super().__init__()
        self.register_buffer("centers", torch.roll((20 + 23 * torch.arange(10)) / 255.0, shift))
        self.scale = scale

    def forward(self, x):
        v = x.amax(dim=(1, 2, 3)) * 0.25 + 0.5
        return -self.scale * (v[:, None] - self.centers) ** 2 * 100


def bright_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randint(-3, 1, (n, 3, 16, 16), generator=g)
    images = (20 + 23 * labels.view(n, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return DeviceImageDataset(images, labels)


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    return calls


def test_cache_logits_equal_online_teachers_with_other_statistics_and_resolution(tmp_path):
    """The cache runs the teacher through `Teacher`: re-normalised from the student's statistics into its own, and
    resized to teacher_image_size, as online KD does."""
    data, (teacher, student) = uint8_data(), models()
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7)}
    settings = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], teacher_image_size=[24, 24])
    cache = TeacherCache.build(
        teacher, data, fast_args(tmp_path / "b", **settings), num_views=3, logits_dtype="float32", batch_size=8
    )
    assert cache.info["teacher_image_size"] == [24, 24]
    online = DistillationTrainer(
        model=student, teacher_model=teacher, args=fast_args(tmp_path / "online", **settings), train_dataset=data
    )
    stored, tables = cache.tensors()["logits"], cache.tensors()
    batch = {"pixel_values": data.images, "labels": data.labels}
    for r in range(3):
        views = online.device_augment.replay(batch, tables["crop"][:, r], tables["flip"][:, r])  # student-normalised
        torch.testing.assert_close(stored[:, r], online.teacher_logits(views), rtol=1e-5, atol=1e-5)
        # Fed the student's statistics at the student's resolution (what the cache used to do), the teacher answers
        # otherwise: the test can tell the two paths apart.
        with torch.no_grad():
            naive = teacher(views["pixel_values"])
        assert (naive - stored[:, r]).abs().max() > 0.1


def test_build_measures_accuracy_on_every_view_and_refuses_a_blind_teacher(tmp_path):
    data = bright_data()
    args = fast_args(tmp_path / "b", augment_padding=2, check_teacher_accuracy=True)
    cache = TeacherCache.build(Brightness(), data, args, num_views=4)
    assert cache.info["teacher_accuracy"] == 1.0 and cache.info["teacher"] == "brightness"
    cache.save_to_disk(tmp_path / "good")
    assert "| teacher accuracy on every stored view | 1.0000 |" in (tmp_path / "good" / "README.md").read_text()

    # Wrong label order: at chance. Refused before anything is stored, with the causes online KD names.
    blind = Brightness(shift=3)
    calls = count_forwards(blind)
    with pytest.raises(
        TeacherCheckError, match=r"accuracy on all 128 stored views \(4 per sample\) is 0.000, near"
    ) as e:
        TeacherCache.build_or_load(tmp_path / "blind", blind, data, args, num_views=4)
    assert "the label order" in str(e.value) and "the cache was not built" in str(e.value)
    assert sum(calls) == 32 * 4 and not (tmp_path / "blind").exists()
    assert sorted(os.listdir(tmp_path)) == ["good"]
    # Measured but not judged with check_teacher_accuracy=False.
    off = TeacherCache.build(blind, data, fast_args(tmp_path / "b", augment_padding=2), num_views=2)
    assert off.info["teacher_accuracy"] == 0.0


def test_a_dataset_that_cannot_be_replayed_is_refused_before_the_teacher_runs(tmp_path):
    from datasets import Dataset

    base = bright_data(16)
    teacher = Brightness()
    calls = count_forwards(teacher)
    args = fast_args(tmp_path / "b", check_teacher_accuracy=True)

    class HostFlip(torch.utils.data.Dataset):  # a random augmentation on the host
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            item = base[i]
            flip = torch.rand(()) < 0.5
            return {**item, "pixel_values": item["pixel_values"].flip(-1) if flip else item["pixel_values"]}

    torch.manual_seed(0)
    with pytest.raises(
        TeacherCacheError, match=r"different items for index \d+ on two reads.*device_augment=True.*online"
    ):
        TeacherCache.build(teacher, HostFlip(), args, num_views=2)
    hf = Dataset.from_dict({"pixel_values": base.images.tolist(), "labels": base.labels.tolist()})

    def random_crop(batch):
        return batch

    with pytest.raises(TeacherCacheError, match=r"transform \(random_crop, set by with_transform.*device.*online"):
        TeacherCache.build(teacher, hf.with_transform(random_crop), args, num_views=2)
    assert calls == []
    # A stable dataset passes (a plain datasets.Dataset, torch-formatted, read twice alike).
    check_replayable(hf.with_format("torch"))


def test_a_logit_beyond_float16_is_an_error_naming_logits_dtype(tmp_path):
    data, args = bright_data(), fast_args(tmp_path / "b", augment_padding=2, check_teacher_accuracy=True)
    loud = Brightness(scale=1e6)
    with pytest.raises(TeacherCacheError, match=r"not finite after the cast to logits_dtype='float16'.*'float32'"):
        TeacherCache.build(loud, data, args, num_views=2)
    with pytest.raises(TeacherCacheError, match=r"stored top-k logits are not finite .* logits_dtype='float16'"):
        TeacherCache.build(loud, data, args, num_views=2, top_k=3)
    exact = TeacherCache.build(loud, data, args, num_views=2, logits_dtype="float32")
    assert torch.isfinite(exact.tensors()["logits"]).all() and exact.tensors()["logits"].abs().max() > 65504


def test_the_trainer_takes_a_declared_teacher_source_and_the_card_names_the_cache(tmp_path):
    from hf_kdsearch import TeacherSource

    data, (_, student) = bright_data(), models()
    args = fast_args(tmp_path / "run", augment_padding=2, check_teacher_accuracy=True, max_steps=2)
    cache = TeacherCache.build(Brightness(), data, args, num_views=4, top_k=3)
    assert isinstance(cache, TeacherSource) and not hasattr(cache, "for_trainer")
    with pytest.raises(TypeError, match="teacher_cache= takes a TeacherSource"):
        DistillationTrainer(model=student, teacher_cache=object(), args=args, train_dataset=data)
    trainer = DistillationTrainer(
        model=student, teacher_cache=cache, args=args, train_dataset=data, data_collator=DeviceImageDataset.collate
    )
    trainer.train()
    assert trainer.teacher_accuracy == 1.0  # the trainer's own check, on the stored views of the first step
    card = trainer.distillation_card()
    assert card["teacher"] == "brightness" and card["teacher_cache"]["num_views"] == 4
    assert card["teacher_cache"]["top_k"] == 3 and card["teacher_cache"]["teacher_accuracy"] == 1.0
    assert "from a teacher cache of 4 stored views per image" in card["method"]
    trainer.create_model_card()
    text = (tmp_path / "run" / "README.md").read_text()
    assert "| Teacher | brightness |" in text and "CachedTeacher" not in text
    assert "a teacher cache: R = 4 stored views per image, top-3 logits (float16)" in text


def test_build_or_load_builds_once_reuses_without_a_teacher_forward_and_refuses_a_foreign_cache(tmp_path):
    data, (_, init) = bright_data(), models()
    path = tmp_path / "cache"
    args = fast_args(tmp_path / "run", augment_padding=2, check_teacher_accuracy=True, max_steps=4)
    teacher = Brightness()
    calls = count_forwards(teacher)
    runs = []
    for _ in range(2):
        calls.clear()
        cache = TeacherCache.build_or_load(path, teacher, data, args, num_views=4, top_k=3, student=init)
        student = copy.deepcopy(init)
        trainer = DistillationTrainer(
            model=student, teacher_cache=cache, args=args, train_dataset=data, data_collator=DeviceImageDataset.collate
        )
        trainer.train()
        runs.append((sum(calls), cache.info["teacher_accuracy"], trainer.teacher_accuracy, student.state_dict()))
    (built, acc0, first0, weights0), (reused, acc1, first1, weights1) = runs
    assert built == 32 * 4 and reused == 0  # the teacher ran once, on every view, then never again
    assert acc0 == acc1 == 1.0 and first0 == first1 == 1.0
    for name, value in weights0.items():
        assert torch.equal(value, weights1[name]), name  # the reused cache trains the same student
    assert sorted(os.listdir(tmp_path)) == ["cache", "run"]  # written once, atomically: no temporary folder left
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}

    foreign = {
        "num_views: the cache has 4, this run 2": dict(num_views=2),
        "top_k: the cache has 3, this run 5": dict(top_k=5),
        "top_k: the cache has 3, this run None": dict(top_k=None),
        "logits_dtype: the cache has 'float16', this run 'float32'": dict(logits_dtype="float32"),
        "teacher_fingerprint: the cache has 'sha256:": dict(teacher=Brightness(shift=1)),
        "dataset_fingerprint: the cache has 'sha256:": dict(train_dataset=bright_data(seed=1)),
        "num_samples: the cache has 32, this run 30": dict(train_dataset=bright_data(30)),
        "augmentation: the cache has {'padding': 2, 'flip': True}, this run {'padding': 4": dict(
            args=fast_args(tmp_path / "run", check_teacher_accuracy=True)
        ),
    }
    for message, change in foreign.items():
        settings = {"teacher": teacher, "train_dataset": data, "args": args, "num_views": 4, "top_k": 3, **change}
        calls.clear()
        with pytest.raises(TeacherCacheError, match="was built for another run.*" + re.escape(message)):
            TeacherCache.build_or_load(path, **settings)
        assert calls == []
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
