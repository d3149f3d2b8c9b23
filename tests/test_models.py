"""The CIFAR and MNIST families registered with timm: sizes, configs, and rebuilding from model_args."""

import pytest
import timm
import torch

from hf_kdsearch.models.cifar import CIFAR100_MEAN, CIFAR100_STD

# Parameter counts (docs/methods.md) at 100 classes with option-B shortcuts.
PARAMS = {
    "cifar_resnet20": 278_324,
    "cifar_resnet56": 861_620,
    "cifar_resnet110": 1_736_564,
    "cifar_resnet8x4": 1_233_540,
    "cifar_resnet32x4": 7_433_860,
}
ALL = [
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet8x4",
    "cifar_resnet32x4",
    "cifar_wrn_16_2",
    "cifar_wrn_40_2",
]


@pytest.mark.parametrize("name, expected", PARAMS.items())
def test_parameter_counts_match_the_papers(name, expected):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", ALL)
def test_registered_with_cifar_pretrained_cfg(name):
    assert name in timm.list_models("cifar_*")
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 100
    assert tuple(cfg["mean"]) == CIFAR100_MEAN and tuple(cfg["std"]) == CIFAR100_STD


def test_depths_follow_6n_plus_2():
    for depth in (20, 32, 44, 56, 110):
        model = timm.create_model(f"cifar_resnet{depth}")
        convs = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n]
        assert len(convs) + 1 == depth  # 3x3 convs plus the classifier


def test_wrn_widths_and_forward_shape():
    model = timm.create_model("cifar_wrn_40_2", num_classes=10).eval()
    assert model.num_features == 128
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("cifar_resnet20", {"block_widths": [[4, 16, 8], [32, 1, 9], [64, 3, 2]], "removed_blocks": ["1.2", (2, 0)]}),
        ("cifar_wrn_16_2", {"block_widths": [[3, 32], [64, 5], [7, 128]], "removed_blocks": ["0.1"]}),
        ("mnist_mlp", {"hidden_dims": [31, 17]}),
        ("mnist_cnn", {"widths": [3, 5, 7, 9]}),
    ],
)
def test_model_args_rebuild_the_same_shapes(name, kwargs):
    model = timm.create_model(name, num_classes=10, **kwargs)
    rebuilt = timm.create_model(name, num_classes=10, **model.model_args)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())


def test_removed_block_keeps_only_its_shortcut():
    model = timm.create_model("cifar_resnet20", removed_blocks=["0.1"]).eval()
    block = model.stages[0][1]
    assert not block.has_branch and not hasattr(block, "conv1")
    x = torch.rand(1, 16, 32, 32)  # post-ReLU input: the block is then the identity
    torch.testing.assert_close(block(x), x)


def test_bad_widths_are_refused_with_the_values():
    with pytest.raises(ValueError, match=r"block_widths \[\[16\]\]"):
        timm.create_model("cifar_resnet20", block_widths=[[16]])
    with pytest.raises(ValueError, match="remove the block instead"):
        timm.create_model("cifar_resnet8", block_widths=[[0], [32], [64]])
    with pytest.raises(ValueError, match="hidden_dims"):
        timm.create_model("mnist_mlp", hidden_dims=[])


def test_other_channel_counts_get_a_matching_pretrained_cfg():
    from hf_kdsearch import count_flops

    model = timm.create_model("cifar_resnet8", in_chans=1, num_classes=10)
    assert model.pretrained_cfg["input_size"] == (1, 32, 32) and len(model.pretrained_cfg["mean"]) == 1
    assert count_flops(model, model.pretrained_cfg["input_size"]) > 0
    mnist = timm.create_model("cifar_resnet8", in_chans=1, pretrained_cfg_overlay={"mean": (0.1307,), "std": (0.3081,)})
    assert mnist.pretrained_cfg["mean"] == (0.1307,) and mnist.pretrained_cfg["input_size"] == (1, 32, 32)


@pytest.mark.parametrize("name", ["mnist_mlp", "cifar_resnet20"])
def test_timm_logit_distillation_task_runs_on_our_students(name, tmp_path):
    """timm's own distillation task reads `student.in_chans` to build a teacher by name; ours carry it."""
    from safetensors.torch import save_file
    from timm.task import LogitDistillationTask

    in_chans = 1
    student = timm.create_model(name, num_classes=10, in_chans=in_chans)
    teacher = timm.create_model(name, num_classes=10, in_chans=in_chans).eval()
    assert student.in_chans == teacher.in_chans == in_chans
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    task = LogitDistillationTask(
        student, name, teacher_pretrained_path=str(tmp_path / "teacher.safetensors"), temperature=4.0, verbose=False
    )
    assert task.teacher.model.in_chans == in_chans
    x, y = torch.randn(4, in_chans, 28, 28), torch.randint(0, 10, (4,))
    torch.testing.assert_close(task.teacher(x), teacher(x))  # the teacher was built with in_chans and the file
    out = task(x, y)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and out["kd_loss"] > 0


def test_input_size_of_takes_the_given_size_else_the_pretrained_cfg():
    import timm

    from hf_kdsearch.flops import input_size_of

    model = timm.create_model("mnist_mlp", hidden_dims=[8], img_size=8)
    assert input_size_of(model) == tuple(model.pretrained_cfg["input_size"])
    assert input_size_of(model, [3, 4, 5]) == (3, 4, 5)
    with pytest.raises(ValueError, match=r"pretrained_cfg\['input_size'\]; pass GateSearchCallback\(input_size"):
        input_size_of(torch.nn.Linear(2, 2), hint="GateSearchCallback(input_size=(C, H, W))")
