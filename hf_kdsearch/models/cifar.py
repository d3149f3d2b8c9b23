"""CIFAR ResNet and Wide-ResNet families, registered with timm.

The definitions follow the CIFAR models used by RepDistiller (He et al. 2016; Zagoruyko & Komodakis 2016) with
"option B" shortcuts: a 1x1 conv + BN projection wherever the stride or the width changes.

Every width is a constructor argument, so a student found by gate search (`gates.extract_student`) or exported from an
online ensemble (`ensemble.export_student`) is the same class with other numbers. Those numbers travel in timm's
`model_args`, and `timm.create_model` or `AutoModelForImageClassification` rebuild the student from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .mnist import SmallCNN

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

__all__ = ["CifarResNet", "CifarWideResNet", "CIFAR100_MEAN", "CIFAR100_STD"]


def _block_key(stage: int, block: int) -> str:
    return f"{stage}.{block}"


def _normalise_removed(removed: Sequence | None) -> set[str]:
    """Accept ["0.1", (1, 2), [2, 0]] and return {"0.1", "1.2", "2.0"}."""
    keys = set()
    for item in removed or ():
        keys.add(item if isinstance(item, str) else _block_key(*item))
    return keys


def _check_widths(name: str, stage_widths: Sequence[int], layers: Sequence[int], block_widths) -> list[list[int]]:
    if len(stage_widths) != len(layers):
        raise ValueError(f"{name}: stage_widths {list(stage_widths)} must have one entry per stage {list(layers)}")
    if block_widths is None:
        return [[w] * n for w, n in zip(stage_widths, layers)]
    block_widths = [list(map(int, s)) for s in block_widths]
    if [len(s) for s in block_widths] != list(layers):
        raise ValueError(f"{name}: block_widths {block_widths} must match blocks per stage {list(layers)}")
    if any(w < 1 for s in block_widths for w in s):
        raise ValueError(f"{name}: every block width must be >= 1 (remove the block instead), got {block_widths}")
    return block_widths


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    `mid_chs` is the width of conv1's output, the block's private channels; `out_chs` is the residual stream.
    With `has_branch=False` the block keeps only its shortcut (the branch was removed by depth search).
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 1, has_branch: bool = True):
        super().__init__()
        self.has_branch = has_branch
        if has_branch:
            self.conv1 = nn.Conv2d(in_chs, mid_chs, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid_chs)
            self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x)
        if self.has_branch:
            out = out + self.branch(x)
        return torch.relu(out)


class _CifarNet(nn.Module):
    """What the two CIFAR families share: the shape arguments, a 3x3 stem, stages of residual blocks, and timm's
    classifier API. ResNets have a BN after the stem; pre-activation WRNs a final BN after the last stage instead."""

    block: type[nn.Module]
    default_layers: tuple[int, ...]
    default_stage_widths: tuple[int, ...]

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        stem_width: int = 16,
        stage_widths: Sequence[int] | None = None,
        block_widths: Sequence[Sequence[int]] | None = None,
        removed_blocks: Sequence | None = None,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        layers = self.default_layers if layers is None else layers
        stage_widths = self.default_stage_widths if stage_widths is None else stage_widths
        self._build(self.block, layers, stem_width, stage_widths, block_widths, removed_blocks, num_classes, in_chans)
        self.drop_rate = drop_rate

    def _build(self, block, layers, stem_width, stage_widths, block_widths, removed_blocks, num_classes, in_chans):
        block_widths = _check_widths(type(self).__name__, stage_widths, layers, block_widths)
        removed = _normalise_removed(removed_blocks)
        # The arguments that rebuild this exact shape; hub.save_student writes them into the config.
        self.model_args = _model_args(layers, stem_width, stage_widths, block_widths, removed, in_chans)
        self.num_classes = num_classes
        self.in_chans = int(in_chans)
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False)
        if block is BasicBlock:
            self.bn1 = nn.BatchNorm2d(stem_width)
        stages, in_chs = [], stem_width
        for i, (width, mids) in enumerate(zip(stage_widths, block_widths)):
            blocks = []
            for j, mid in enumerate(mids):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_chs, mid, width, stride, has_branch=_block_key(i, j) not in removed))
                in_chs = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        if block is not BasicBlock:
            self.bn_final = nn.BatchNorm2d(in_chs)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        _init_weights(self)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # timm's head API, the same as the MNIST CNN's: pool, optional dropout, linear head.
    forward_head = SmallCNN.forward_head
    forward = SmallCNN.forward


class CifarResNet(_CifarNet):
    """ResNet for 32x32 inputs: a 3x3 stem, stages of basic blocks, global average pooling and a linear head.

    Args:
        layers: blocks per stage, e.g. `(3, 3, 3)` for resnet20.
        stem_width: channels of the stem conv.
        stage_widths: residual-stream channels of each stage.
        block_widths: optional per-block inner widths (conv1 outputs), one list per stage; defaults to the stage width.
        removed_blocks: blocks whose residual branch is removed, as `"stage.block"` strings or pairs.
        num_classes: size of the classifier; 0 gives pooled features.
        in_chans: input channels.
    """

    block, default_layers, default_stage_widths = BasicBlock, (3, 3, 3), (16, 32, 64)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.forward_stem(x))


class WideBasicBlock(nn.Module):
    """Pre-activation WRN block (Zagoruyko & Komodakis): conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut.

    When the width or stride changes, the shortcut is a 1x1 conv applied to the pre-activated input, as in the
    reference code.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 1, has_branch: bool = True):
        super().__init__()
        self.has_branch = has_branch
        self.equal_in_out = in_chs == out_chs and stride == 1
        self.bn1 = nn.BatchNorm2d(in_chs)
        if has_branch:
            self.conv1 = nn.Conv2d(in_chs, mid_chs, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid_chs)
            self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, 1, 1, bias=False)
        self.shortcut = nn.Identity() if self.equal_in_out else nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def branch(self, act: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn2(self.conv1(act))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn1(x))
        out = x if self.equal_in_out else self.shortcut(act)
        if self.has_branch:
            out = out + self.branch(act)
        return out


class CifarWideResNet(_CifarNet):
    """Wide ResNet WRN-depth-k for 32x32 inputs; `layers` blocks per stage, `(depth - 4) / 6` in the paper."""

    block, default_layers, default_stage_widths = WideBasicBlock, (2, 2, 2), (32, 64, 128)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn_final(self.stages(self.forward_stem(x))))


def _model_args(layers, stem_width, stage_widths, block_widths, removed, in_chans) -> dict:
    return {
        "layers": [int(n) for n in layers],
        "stem_width": int(stem_width),
        "stage_widths": [int(w) for w in stage_widths],
        "block_widths": block_widths,
        "removed_blocks": sorted(removed),
        "in_chans": int(in_chans),
    }


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


_RESNETS = {
    # name: (blocks per stage, stem width, stage widths)
    "cifar_resnet8": ((1, 1, 1), 16, (16, 32, 64)),
    "cifar_resnet20": ((3, 3, 3), 16, (16, 32, 64)),
    "cifar_resnet32": ((5, 5, 5), 16, (16, 32, 64)),
    "cifar_resnet44": ((7, 7, 7), 16, (16, 32, 64)),
    "cifar_resnet56": ((9, 9, 9), 16, (16, 32, 64)),
    "cifar_resnet110": ((18, 18, 18), 16, (16, 32, 64)),
    "cifar_resnet8x4": ((1, 1, 1), 32, (64, 128, 256)),
    "cifar_resnet32x4": ((5, 5, 5), 32, (64, 128, 256)),
}
_WRNS = {
    "cifar_wrn_16_2": ((2, 2, 2), 16, (32, 64, 128)),
    "cifar_wrn_40_2": ((6, 6, 6), 16, (32, 64, 128)),
    "cifar_wrn_16_1": ((2, 2, 2), 16, (16, 32, 64)),
    "cifar_wrn_40_1": ((6, 6, 6), 16, (16, 32, 64)),
}
ARCHITECTURES = {
    **{k: (CifarResNet, *v) for k, v in _RESNETS.items()},
    **{k: (CifarWideResNet, *v) for k, v in _WRNS.items()},
}

default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg() for name in ARCHITECTURES})


def _create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    cls, layers, stem, widths = ARCHITECTURES[name]
    model_args = {"layers": layers, "stem_width": stem, "stage_widths": widths, **kwargs}
    in_chans = kwargs.get("in_chans", 3)
    if in_chans != 3:
        # The CIFAR statistics have 3 channels; another channel count gets their mean in every channel and an input
        # size that count_flops and exports can trust. pretrained_cfg_overlay=dict(mean=..., std=...) overrides them.
        mean, std = sum(CIFAR100_MEAN) / 3, sum(CIFAR100_STD) / 3
        defaults = {"input_size": (in_chans, 32, 32), "mean": (mean,) * in_chans, "std": (std,) * in_chans}
        model_args["pretrained_cfg_overlay"] = {**defaults, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build_model_with_cfg(cls, name, pretrained, **model_args)


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {ARCHITECTURES[name][0].__name__} with blocks {ARCHITECTURES[name][1]}."
    return entrypoint


for _name in ARCHITECTURES:
    globals()[_name] = register_model(_make_entrypoint(_name))
