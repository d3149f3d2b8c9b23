"""TeacherCache: training from stored teacher outputs on replayed views equals online KD on the same views; bad caches
are refused before anything is trained or written; the cache survives disk and a (loopback) Hub round trip."""

from __future__ import annotations

import copy
import json
import os
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
from hf_kdsearch.teacher_cache import INFO_FILE, CachedTeacher, TeacherCacheError

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
    trainer.train()
    logs = [h for h in trainer.state.log_history if "flops_ratio" in h]
    assert len(logs) == 4 and all(h["loss_kd"] > 0 for h in logs) and logs[-1]["flops_ratio"] < 1.0


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
