"""hf_kdsearch.loading: one loader behind load_teacher and load_student; each name resolves once, errors say why.

Hub repos (timm and transformers format, and one that does not exist) are covered through the loopback Hub in
tests/test_hub.py::test_push_then_pull_through_loopback_hub, since `huggingface_hub` reads `HF_ENDPOINT` at import.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from huggingface_hub import constants
from transformers import ResNetConfig, ResNetForImageClassification

from hf_kdsearch import TeacherLoadError, load_student, load_teacher, save_student
from hf_kdsearch.loading import HubUnavailableError, ModelLoadError, ModelNotFoundError, load_model


def timm_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("mnist_cnn", widths=(6, 11, 9)).eval()


def transformers_resnet(seed: int = 0) -> ResNetForImageClassification:
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    torch.manual_seed(seed)
    return ResNetForImageClassification(config).eval()


def test_both_wrappers_load_a_timm_folder_and_a_transformers_folder(tmp_path):
    student = timm_student()
    folder = save_student(student, tmp_path / "timm")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    hf = transformers_resnet()
    hf.save_pretrained(tmp_path / "transformers")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for load in (load_teacher, load_student, load_model):
            assert torch.equal(load(str(folder)).eval()(x), student(x))
            assert torch.equal(load(f"local-dir:{folder}").eval()(x), student(x))
            # load_student used to fail here with a bare KeyError: 'architecture'.
            loaded = load(tmp_path / "transformers").eval()
            assert isinstance(loaded, ResNetForImageClassification), load.__name__
            assert torch.equal(loaded(pixel_values=pixels).logits, hf(pixel_values=pixels).logits)


def test_a_typo_in_a_relative_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_student(timm_student(), "out/student")
    # "out/studnet" reads like a Hub id "user/name"; the error says the folder is missing and suggests the right one.
    with pytest.raises(FileNotFoundError, match=r"no student folder at 'out/studnet' \(did you mean 'out/student'\?\)"):
        load_student("out/studnet")
    with pytest.raises(TeacherLoadError, match=r"no teacher folder at 'out/studnet' \(did you mean 'out/student'\?\)"):
        load_teacher("out/studnet")
    with pytest.raises(ModelNotFoundError, match=r"the folder 'out' exists, but holds no 'xyz'.*HF_HUB_OFFLINE"):
        load_student("out/xyz")
    with pytest.raises(
        ModelNotFoundError, match=r"no student folder at './out/studnet' \(did you mean './out/student'"
    ):
        load_student("./out/studnet")
    # A name that is no local folder at all is still a Hub id, and offline that is what the error says.
    with pytest.raises(HubUnavailableError, match=r"'someone/model': HF_HUB_OFFLINE is set.*not in the local cache"):
        load_student("someone/model")


def test_folders_the_loader_cannot_read_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="student folder .*empty' has no config.json"):
        load_student(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="neither a timm config .* nor a transformers config"):
        load_student(tmp_path / "odd")
    with pytest.raises(TeacherLoadError, match="neither a timm config"):
        load_teacher(str(tmp_path / "odd"))
    with pytest.raises(ModelNotFoundError, match="no model folder at"):
        load_model(f"local-dir:{tmp_path / 'missing'}")


def test_a_timm_name_without_weights_is_refused_for_both(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="timm has no pretrained weights for 'cifar_resnet56'.*student"):
        load_student("cifar_resnet56")
    with pytest.raises(TeacherLoadError, match="timm has no pretrained weights for 'mnist_mlp'.*teacher"):
        load_teacher("mnist_mlp")
    # A timm name with weights is fetched from the Hub, so offline and not cached it is a Hub error.
    with pytest.raises(HubUnavailableError, match="'resnet18.a1_in1k': HF_HUB_OFFLINE is set"):
        load_model("resnet18.a1_in1k")
