"""Data that used to be damaged or fail without a word: 16-bit images, string labels, truncated files, a teacher's
class names in another order, labels outside the label set or classes without a training example."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import ResNetConfig, ResNetForImageClassification

from hf_kdsearch import checks, data, save_student
from hf_kdsearch.data import (
    ImageClassificationTransform,
    class_names,
    find_columns,
    load_image_dataset,
    to_uint8_tensors,
)
from hf_kdsearch.teacher import load_teacher

#: A 16-bit ramp: every value of 0..65535 that is a multiple of 4369 (= 17 * 257), so x / 257 is an integer.
RAMP16 = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))


# ---- 16-bit images ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_modes_are_scaled_to_8_bits_not_clipped(mode):
    if mode == "I;16B":
        image = Image.frombytes("I;16B", (4, 4), RAMP16.astype(">u2").tobytes())
    else:
        image = Image.fromarray(RAMP16 if mode == "I;16" else RAMP16.astype(np.int32))
    assert image.mode == mode
    expected = (RAMP16 // 257).astype(np.uint8)  # 0, 17, 34, ..., 255
    assert np.array_equal(pixels(data.to_mode(image, "L")), expected)
    assert np.array_equal(pixels(data.to_mode(image, "RGB")), np.repeat(expected[..., None], 3, axis=2))
    # What Pillow's own conversion does: every value above 255 becomes 255.
    assert (pixels(image.convert("L")) == 255).sum() == 15


def test_a_32_bit_image_outside_16_bits_is_scaled_by_its_own_range():
    image = Image.fromarray(np.array([[-1000, 0], [100000, 200000]], dtype=np.int32))
    assert pixels(data.to_mode(image, "L")).tolist() == [[0, 1], [128, 255]]


def sixteen_bit_dataset() -> datasets.Dataset:
    images = [Image.fromarray(np.roll(RAMP16, k)) for k in range(3)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}, features=features)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_fast_path_scales_16_bit_pngs(channels):
    ds = sixteen_bit_dataset()
    assert ds[0]["image"].mode == "I;16"  # stored as a 16-bit PNG
    tensors, names = to_uint8_tensors(ds, channels=channels)
    expected = torch.from_numpy((np.stack([np.roll(RAMP16, k) for k in range(3)]) // 257).astype(np.uint8))
    assert tensors.images.shape == (3, channels, 4, 4) and names == ["a", "b"]
    for c in range(channels):
        assert torch.equal(tensors.images[:, c], expected)


@pytest.mark.parametrize("raw", [False, True])
def test_the_transform_path_scales_16_bit_pngs(raw):
    ds = sixteen_bit_dataset()
    ds = data.undecoded(ds, "image") if raw else ds  # decoded by datasets (today's recipe) or by the transform
    batch = ds.with_transform(ImageClassificationTransform(as_tensor, "image", "label", "L"))[:3]
    expected = torch.from_numpy((np.stack([np.roll(RAMP16, k) for k in range(3)]) // 257).astype(np.uint8))
    assert torch.equal(torch.stack(batch["pixel_values"]), expected)
    assert [int(y) for y in batch["labels"]] == [0, 1, 0]


# ---- string labels ----------------------------------------------------------------------------------------------
def string_label_splits():
    image = Image.new("L", (4, 4), 7)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    train = datasets.Dataset.from_dict({"image": [image] * 4, "label": ["dog", "cat", "dog", "cat"]}, features=features)
    evaluation = datasets.Dataset.from_dict({"image": [image] * 3, "label": ["eel", "cat", "dog"]}, features=features)
    return train, evaluation


def test_string_labels_become_class_labels_with_the_same_names_in_every_split():
    train, evaluation = string_label_splits()
    assert find_columns(train.features) == ("image", "label")  # found by name although it holds strings
    train, evaluation = data.encode_labels([train, evaluation], "label")
    assert class_names(train.features, "label") == class_names(evaluation.features, "label") == ["cat", "dog", "eel"]
    assert train["label"] == [1, 0, 1, 0] and evaluation["label"] == [2, 0, 1]
    tensors, names = to_uint8_tensors(train, channels=1)
    assert tensors.labels.tolist() == [1, 0, 1, 0] and names == ["cat", "dog", "eel"]
    as_dict = data.encode_labels(datasets.DatasetDict(train=string_label_splits()[0]), "label")
    assert isinstance(as_dict, datasets.DatasetDict) and as_dict["train"]["label"] == [1, 0, 1, 0]


def test_unencoded_string_labels_are_one_line_errors_naming_the_column():
    train, _ = string_label_splits()
    for call in (
        lambda: class_names(train.features, "label"),
        lambda: to_uint8_tensors(train, label_column="label"),
        lambda: data.encode_labels([train.to_iterable_dataset()], "label"),
    ):
        with pytest.raises(data.LabelError) as info:
            call()
        assert "'label'" in str(info.value) and "--label_column" in str(info.value) and "\n" not in str(info.value)


# ---- unreadable images ------------------------------------------------------------------------------------------
@pytest.fixture
def folder_with_a_truncated_png(tmp_path) -> tuple[Path, Path]:
    for split in ("train", "test"):
        for label in ("0", "1"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    bad = tmp_path / "train" / "1" / "1.png"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.resize((8, 8)).save(buffer, "PNG")
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return tmp_path, bad


def test_a_truncated_image_is_named_by_its_path_on_both_paths(folder_with_a_truncated_png):
    root, bad = folder_with_a_truncated_png
    train = load_image_dataset(path=str(root))["train"]
    with pytest.raises(data.ImageDecodeError, match=f"cannot read the image file '{bad}'"):
        to_uint8_tensors(train, channels=1)
    ds = data.undecoded(train, "image").with_transform(ImageClassificationTransform(as_tensor, "image", "label", "L"))
    with pytest.raises(data.ImageDecodeError, match=f"cannot read the image file '{bad}'"):
        ds[: len(ds)]


def test_a_truncated_image_stored_as_bytes_is_named_by_its_index_and_column():
    good, bad = io.BytesIO(), io.BytesIO()
    Image.new("L", (8, 8), 3).save(good, "PNG")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(bad, "PNG")
    items = [{"bytes": good.getvalue(), "path": None}] * 3 + [{"bytes": bad.getvalue()[:40], "path": None}]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
    ds = datasets.Dataset.from_dict({"img": items, "label": [0] * 4}, features=features)
    with pytest.raises(data.ImageDecodeError, match="image stored as bytes in column 'img' \\(example 3\\)"):
        to_uint8_tensors(ds, channels=1, batch_size=2)


# ---- the teacher's class names ----------------------------------------------------------------------------------
DIGITS = [str(i) for i in range(10)]


def timm_teacher(tmp_path, names) -> torch.nn.Module:
    torch.manual_seed(0)
    folder = save_student(
        timm.create_model("mnist_mlp", hidden_dims=(5,)), tmp_path / "teacher", card={"label_names": names}
    )
    return load_teacher(str(folder))


def test_a_teacher_saved_with_the_classes_in_another_order_is_refused(tmp_path):
    swapped = ["0", "1", "2", "5", "4", "3", "6", "7", "8", "9"]  # 3 and 5 swapped
    teacher = timm_teacher(tmp_path, swapped)
    assert checks.model_label_names(teacher) == swapped
    with pytest.raises(checks.LabelNamesError) as info:
        checks.check_label_names(teacher, DIGITS, teacher_name="the teacher 'out/teacher'")
    message = str(info.value)
    assert "3: teacher '5', dataset '3'" in message and "5: teacher '3', dataset '5'" in message
    assert "'out/teacher'" in message and "\n" not in message
    assert checks.check_label_names(timm_teacher(tmp_path / "ok", DIGITS), DIGITS) == DIGITS


def test_a_transformers_teacher_is_compared_by_its_id2label():
    def teacher(names):
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=len(names))
        if names:
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
        return ResNetForImageClassification(config)

    with pytest.raises(checks.LabelNamesError, match="0: teacher 'dog', dataset 'cat'"):
        checks.check_label_names(teacher(["dog", "cat", "eel"]), ["cat", "dog", "eel"])
    assert checks.check_label_names(teacher(["Cat", "dog", "electric_eel"]), ["cat", "dog", "electric eel"]) is not None
    placeholders = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    assert checks.model_label_names(placeholders) is None  # LABEL_0, LABEL_1: no names, nothing to compare
    assert checks.check_label_names(placeholders, ["cat", "dog"]) is None


def test_other_class_names_are_a_warning_naming_them(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_kdsearch.checks"):
        checks.check_label_names(["airplane", "automobile", "bird"], ["0", "1", "2"])
    assert "0: teacher 'airplane', dataset '0'" in caplog.text


# ---- classes without a training example -------------------------------------------------------------------------
def test_one_outlier_label_that_would_make_a_58_class_model_is_an_error_naming_it():
    labels = [d for d in range(10) for _ in range(30)] + [57]
    with pytest.raises(data.LabelError) as info:
        data.check_labels(labels, max(labels) + 1, inferred=True, column="label")
    message = str(info.value)
    assert "58 outputs" in message and "47 of those classes have no training example: 10, 11" in message
    assert "labels 57 are rare" in message and "--num_labels" in message


def test_labels_outside_the_names_are_an_error_and_empty_named_classes_a_warning(caplog):
    names = [f"class{i}" for i in range(5)]
    with pytest.raises(
        data.LabelError, match="training split's label column 'y' holds labels outside 0..4: 7 \\(1 example\\)"
    ):
        data.check_labels([0, 1, 2, 3, 4, 7], 5, class_names=names, column="y")
    with pytest.raises(data.LabelError, match="evaluation split.*-1 \\(2 examples\\)"):
        data.check_labels([0, 1, 2, 3, 4], 5, eval_labels=[-1, -1, 0], column="y")
    with caplog.at_level(logging.WARNING, logger="hf_kdsearch.data"):
        assert data.check_labels([0, 1, 1, 4], 5, class_names=names, column="y") == [2, 3]
    assert "2 of the 5 classes of 'y' have no training example: 2 (class2), 3 (class3)" in caplog.text
    assert data.check_labels(torch.tensor([0, 1, 2]), 3) == []


def test_a_stream_decoded_by_the_transform_scales_16_bit_images_and_names_a_truncated_file(
    folder_with_a_truncated_png,
):
    transform = ImageClassificationTransform(as_tensor, "image", "label", "L")
    stream = data.undecoded(sixteen_bit_dataset().to_iterable_dataset(num_shards=1), "image")
    first = next(iter(stream.map(transform, batched=True, remove_columns=["image", "label"])))
    assert torch.equal(first["pixel_values"], torch.from_numpy((RAMP16 // 257).astype(np.uint8)))
    root, bad = folder_with_a_truncated_png
    stream = data.undecoded(load_image_dataset(path=str(root), streaming=True)["train"], "image")
    with pytest.raises(data.ImageDecodeError, match=f"cannot read the image file '{bad}'"):
        list(stream.map(transform, batched=True, remove_columns=["image", "label"]))


def int_label_split(labels, names=None) -> datasets.Dataset:
    label = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    return datasets.Dataset.from_dict({"image": [Image.new("L", (2, 2))] * len(labels), "label": labels}, features)


def test_prepare_labels_gives_the_checked_label_set_of_both_splits(caplog):
    train, evaluation = string_label_splits()
    train, evaluation, num, names = data.prepare_labels(train, evaluation, "label")
    assert (num, names, train["label"], evaluation["label"]) == (3, ["cat", "dog", "eel"], [1, 0, 1, 0], [2, 0, 1])

    digits = [d for d in range(10) for _ in range(3)]
    with pytest.raises(data.LabelError, match="58 outputs.*47 of those classes have no training example"):
        data.prepare_labels(int_label_split(digits + [57]), int_label_split(digits), "label")
    with caplog.at_level(logging.WARNING, logger="hf_kdsearch.data"):
        *_, num, names = data.prepare_labels(
            int_label_split(digits + [57]), int_label_split([1]), "label", num_labels=58
        )
    assert (num, names) == (58, None) and "47 of the 58 classes of 'label' have no training example" in caplog.text
    assert data.prepare_labels(int_label_split(digits), int_label_split([0, 9]), "label")[2] == 10

    with pytest.raises(data.LabelError, match=r"evaluation split.*-1 \(2 examples\).*--eval_split"):
        data.prepare_labels(int_label_split(digits), int_label_split([-1, -1, 3]), "label")
    with pytest.raises(data.LabelError, match="--num_labels 5 but 'label' names 10 classes"):
        data.prepare_labels(int_label_split(digits, DIGITS), int_label_split([0], DIGITS), "label", num_labels=5)
    with pytest.raises(data.LabelError, match=r"holds labels outside 0..9: 12"):
        data.prepare_labels(int_label_split(digits + [12]), int_label_split([0]), "label", num_labels=10)
    stream = int_label_split(digits).to_iterable_dataset()
    with pytest.raises(data.LabelError, match="stream's largest label is unknown.*--num_labels"):
        data.prepare_labels(stream, int_label_split([0]), "label")
    assert data.prepare_labels(stream, int_label_split([0]), "label", num_labels=10)[2] == 10


@pytest.mark.parametrize("offline", [True, False])
def test_a_dataset_missing_offline_names_the_reason_huggingface_hub_reads(offline, monkeypatch):
    from huggingface_hub import constants

    from hf_kdsearch.data import DatasetLoadError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment is read once, by huggingface_hub; not here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetLoadError) as info:
        load_image_dataset(name="someone/no-such-dataset-xyz")
    assert ("HF_HUB_OFFLINE is set" in str(info.value)) == offline
