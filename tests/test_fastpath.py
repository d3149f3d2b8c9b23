"""The GPU data path, tested through its CPU fallback: the same code on CPU tensors.

- `random_crop_flip` against its definition (every output is one crop of the padded input, maybe mirrored) and its
  distribution;
- `normalize_images` / `DeviceAugment` against the formula, in both memory formats;
- `DistillationTrainer` with `device_augment` trains exactly like the same trainer fed pre-normalised floats;
- the settings checks; and the throughput benchmark's smoke run.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import tiny_args

from hf_kdsearch import DistillationArguments, DistillationCallback, DistillationTrainer
from hf_kdsearch.data import TensorImageDataset
from hf_kdsearch.fastpath import DeviceAugment, DeviceImageDataset, normalize_images, random_crop_flip
from hf_kdsearch.models.cifar import CIFAR100_MEAN, CIFAR100_STD

ROOT = Path(__file__).resolve().parents[1]


def uint8_images(n, c=3, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def crop_candidates(image: torch.Tensor, padding: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def test_random_crop_flip_outputs_a_padded_crop_or_its_mirror():
    # Distinct values per pixel, so exactly one (offset, flip) can explain each output.
    images = torch.randperm(4 * 3 * 6 * 6).reshape(4, 3, 6, 6).float() + 1
    torch.manual_seed(0)
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    for image, got in zip(images, out):
        matches = [(dy, dx, f) for dy, dx, f, crop in crop_candidates(image, 2) if torch.equal(crop, got)]
        assert len(matches) == 1, matches


def test_random_crop_flip_offsets_and_flips_are_uniform():
    n, padding = 9000, 1
    # Pixel (y, x) holds 1 + 5y + x, padding holds 0. The centre pixel of a 5x5 crop is the same with or without the
    # mirror, so it tells the offsets; the first and last columns tell the mirror.
    images = (torch.arange(25).float() + 1).view(1, 1, 5, 5).expand(n, 1, 5, 5).contiguous()
    torch.manual_seed(1)
    out = random_crop_flip(images, padding=padding)
    flipped = out[:, 0, 2, 0] > out[:, 0, 2, -1]
    assert 0.47 < flipped.float().mean() < 0.53
    centre = out[:, 0, 2, 2].long() - 1
    dy, dx = centre // 5 - 2 + padding, centre % 5 - 2 + padding
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=2 * padding + 1).float()
        assert len(counts) == 3 and torch.all((counts / n - 1 / 3).abs() < 0.03), counts


def test_random_crop_flip_identity_and_mirror_only():
    images = uint8_images(16)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)
    mirrored = random_crop_flip(images, padding=0, flip=True)
    same = (mirrored == images).flatten(1).all(1)
    flipped = (mirrored == images.flip(-1)).flatten(1).all(1)
    assert torch.all(same | flipped) and flipped.any() and same.any()


def test_random_crop_flip_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_crop_flip(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        random_crop_flip(uint8_images(2), padding=-1)


def test_random_crop_flip_is_reproducible_from_the_generator():
    images = uint8_images(8)
    a = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_images_matches_the_formula(channels_last):
    images = uint8_images(4, h=5, w=7)
    out = normalize_images(images, CIFAR100_MEAN, CIFAR100_STD, channels_last=channels_last)
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_normalize_images_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(torch.zeros(1, 3, 4, 4), CIFAR100_MEAN, CIFAR100_STD, channels_last=False)
    with pytest.raises(ValueError, match="1/1 channels but the images 3"):
        normalize_images(uint8_images(1), (0.5,), (0.2,), channels_last=False)


def test_device_augment_trains_on_crops_and_evaluates_on_normalised_images():
    augment = DeviceAugment(CIFAR100_MEAN, CIFAR100_STD, padding=2, flip=True, channels_last=True)
    images, labels = uint8_images(32), torch.arange(32)
    evaluated = augment({"pixel_values": images, "labels": labels}, train=False)
    assert torch.equal(
        evaluated["pixel_values"], normalize_images(images, CIFAR100_MEAN, CIFAR100_STD, channels_last=False)
    )
    assert evaluated["labels"] is labels
    torch.manual_seed(0)
    trained = augment({"pixel_values": images, "labels": labels}, train=True)["pixel_values"]
    assert trained.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(trained, evaluated["pixel_values"])
    # Same draws, same arithmetic as the two public functions in a row.
    torch.manual_seed(0)
    expected = normalize_images(random_crop_flip(images, padding=2), CIFAR100_MEAN, CIFAR100_STD, channels_last=False)
    torch.testing.assert_close(trained, expected)


def test_device_augment_rejects_float_batches_and_bad_statistics():
    augment = DeviceAugment(CIFAR100_MEAN, CIFAR100_STD, padding=4, flip=True, channels_last=False)
    with pytest.raises(TypeError, match="uint8 .* got torch.float32 of shape"):
        augment({"pixel_values": torch.zeros(2, 3, 8, 8)}, train=True)
    with pytest.raises(ValueError, match="std must be > 0"):
        DeviceAugment((0.5, 0.5), (0.2, 0.0), padding=4, flip=True, channels_last=False)
    with pytest.raises(ValueError, match="one value per channel"):
        DeviceAugment((0.5, 0.5), (0.2,), padding=4, flip=True, channels_last=False)


def test_device_augment_from_args_defaults_to_the_models_statistics(tmp_path):
    model = timm.create_model("cifar_resnet8")
    off = DistillationArguments(output_dir=str(tmp_path), report_to="none")
    assert DeviceAugment.from_args(off, model) is None
    on = DistillationArguments(output_dir=str(tmp_path), report_to="none", device_augment=True, augment_padding=2)
    augment = DeviceAugment.from_args(on, model)
    assert augment.mean == CIFAR100_MEAN and augment.std == CIFAR100_STD and augment.padding == 2
    given = DistillationArguments(
        output_dir=str(tmp_path), report_to="none", device_augment=True, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    assert DeviceAugment.from_args(given, model).std == (0.25,) * 3
    with pytest.raises(ValueError, match="carries no pretrained_cfg mean/std; pass image_mean"):
        DeviceAugment.from_args(on, torch.nn.Linear(2, 2))


def test_distillation_arguments_check_the_fast_path_fields(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match="augment_padding must be an integer >= 0, got augment_padding=-1"):
        DistillationArguments(**base, augment_padding=-1)
    with pytest.raises(ValueError, match="image_mean and image_std go together"):
        DistillationArguments(**base, image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"image_std must be > 0 in every channel, got image_std=\[0.2, 0.0\]"):
        DistillationArguments(**base, image_mean=[0.5, 0.5], image_std=[0.2, 0.0])
    # Pinned batches then reach the device with non-blocking copies: no host sync per step.
    assert DistillationArguments(**base, device_augment=True).accelerator_config.non_blocking
    assert not DistillationArguments(**base).accelerator_config.non_blocking


def test_device_image_dataset_gathers_batches_on_its_device():
    images, labels = uint8_images(10), torch.arange(10)
    ds = DeviceImageDataset(images, labels, pin_memory=True)
    assert ds.device.type == "cpu"
    batch = ds.__getitems__([7, 2, 7])
    assert torch.equal(batch["pixel_values"], images[[7, 2, 7]]) and batch["labels"].tolist() == [7, 2, 7]
    assert DeviceImageDataset.collate(batch) == batch
    single = DeviceImageDataset.collate([ds[1], ds[4]])
    assert torch.equal(single["pixel_values"], images[[1, 4]])
    moved = DeviceImageDataset.from_dataset(TensorImageDataset(images, labels), device="cpu")
    assert torch.equal(moved.images, images)


class RecordBatch(DistillationCallback):
    def __init__(self):
        self.batches = []

    def on_distill_batch(self, trainer, model, inputs):
        self.batches.append(inputs["pixel_values"].detach().clone())


def fast_args(tmp_path, **overrides):
    fast = dict(
        max_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        check_teacher_finite=False,
    )
    return tiny_args(tmp_path, **{**fast, **overrides})


def cifar_pair(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("cifar_resnet8", num_classes=10), timm.create_model("cifar_resnet8", num_classes=10)


def test_trainer_fast_path_trains_like_the_float_path(tmp_path):
    """device_augment without crop and flip must give the student exactly the updates of pre-normalised floats."""
    images, labels = uint8_images(32, h=32, w=32), torch.randint(0, 10, (32,), generator=torch.Generator())
    floats = normalize_images(images, CIFAR100_MEAN, CIFAR100_STD, channels_last=False)

    student_a, teacher_a = cifar_pair()
    fast = DistillationTrainer(
        model=student_a,
        teacher_model=teacher_a,
        args=fast_args(tmp_path / "a", device_augment=True, augment_padding=0, augment_flip=False),
        train_dataset=DeviceImageDataset(images, labels),
        data_collator=DeviceImageDataset.collate,
    )
    fast.train()
    student_b, teacher_b = cifar_pair()
    plain = DistillationTrainer(
        model=student_b,
        teacher_model=teacher_b,
        args=fast_args(tmp_path / "b"),
        train_dataset=DeviceImageDataset(floats, labels),
        data_collator=DeviceImageDataset.collate,
    )
    plain.train()
    for (name, a), b in zip(student_a.state_dict().items(), student_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(student_a.fc.weight, cifar_pair()[0].fc.weight)  # it did train


def test_trainer_fast_path_augments_in_training_and_uses_channels_last(tmp_path):
    images, labels = uint8_images(32, h=32, w=32), torch.randint(0, 10, (32,), generator=torch.Generator())
    student, teacher = cifar_pair()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    record = RecordBatch()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=fast_args(tmp_path, device_augment=True, channels_last=True),
        train_dataset=DeviceImageDataset(images, labels),
        eval_dataset=DeviceImageDataset(images, labels),
        data_collator=DeviceImageDataset.collate,
        callbacks=[record],
    )
    assert student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train()
    assert len(record.batches) == 2
    for batch in record.batches:
        assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
    # Training batches are augmented: some pixel sits in the zero padding, whose normalised value is -mean/std.
    pad_value = torch.tensor([-m / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)]).view(1, 3, 1, 1)
    padded = torch.isclose(record.batches[0], pad_value.expand_as(record.batches[0]), atol=1e-5).all(1)
    assert padded.any()
    metrics = trainer.evaluate()
    assert metrics["eval_loss_kd"] >= 0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_fast_path_refuses_the_column_filter_for_whole_batches(tmp_path):
    student, teacher = cifar_pair()
    with pytest.raises(ValueError, match="set remove_unused_columns=False"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=fast_args(tmp_path, device_augment=True, remove_unused_columns=True),
            train_dataset=DeviceImageDataset(uint8_images(8), torch.zeros(8, dtype=torch.long)),
        )


def test_throughput_benchmark_smoke(tmp_path):
    """The CPU smoke run of benchmarks/throughput.py: every path measured, CUDA-only rows marked as such."""
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["images_per_s"]
    assert {k[:3] for k in rows} == {"(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(h)"}
    assert sum(k.startswith("(f)") for k in rows) == 3 and sum(k.startswith("(h)") for k in rows) == 2
    for label, row in rows.items():
        (value,) = row.values()
        if "CUDA graph" in label:
            assert value == "n/a (needs CUDA)"
        else:
            assert isinstance(value, float) and value > 0, (label, value)
    assert result["environment"]["device"].startswith("cpu")
