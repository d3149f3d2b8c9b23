"""`kdsearch_resnet`: a timm ResNet with per-block inner widths and removed residual branches, registered with timm.

timm's `ResNet` has one width per stage, so a student found by gate search in, say, `resnet18` cannot be described by
timm's own arguments. This entrypoint builds the base model (`base="resnet18"`, any timm ResNet with plain
`BasicBlock` or `Bottleneck` blocks) and then resizes each block's inner convolutions to `block_widths` and drops the
branches named in `removed_blocks`. The residual stream, stem, shortcuts and head keep the base model's shapes. The
arguments travel in `model.model_args`, so `timm.create_model("kdsearch_resnet", **model_args)`, a `local-dir:` or
`hf-hub:` folder saved by `hub.save_student`, and `AutoModelForImageClassification` (after `import hf_kdsearch`)
rebuild the exact shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

__all__ = ["ShortcutBlock", "resnet_block_widths", "resize_resnet_blocks"]


class ShortcutBlock(nn.Module):
    """What is left of a timm ResNet block whose residual branch was removed: `act(downsample(x))`.

    It keeps the block's `downsample` under the same name, so the shortcut's weights keep their state-dict keys.
    """

    def __init__(self, downsample: nn.Module | None, act: nn.Module):
        super().__init__()
        self.downsample = downsample
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x if self.downsample is None else self.downsample(x))


def _stages(model: ResNet) -> list[nn.Sequential]:
    return [getattr(model, f"layer{i}") for i in range(1, 5)]


def resnet_block_widths(model: ResNet) -> list[list[list[int]]]:
    """The inner widths of every block of a timm ResNet: `[conv1.out]` for a basic block, `[conv1.out, conv2.out]`
    for a bottleneck, and `[]` for a removed one; one list per stage."""
    widths = []
    for stage in _stages(model):
        widths.append(
            [
                []
                if isinstance(b, ShortcutBlock)
                else [b.conv1.out_channels]
                if isinstance(b, BasicBlock)
                else [b.conv1.out_channels, b.conv2.out_channels]
                for b in stage
            ]
        )
    return widths


def _conv_like(old: nn.Conv2d, in_chs: int, out_chs: int) -> nn.Conv2d:
    conv = nn.Conv2d(
        in_chs,
        out_chs,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
    )
    # timm's ResNet.init_weights, for a model built to be trained from scratch.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _bn_like(old: nn.BatchNorm2d, chs: int) -> nn.BatchNorm2d:
    return type(old)(chs, eps=old.eps, momentum=old.momentum, affine=old.affine)


def resize_resnet_blocks(model: ResNet, block_widths: Sequence[Sequence[Sequence[int]]], removed_blocks) -> ResNet:
    """Resize the inner convolutions of a timm ResNet's blocks in place and replace removed blocks by their shortcut.

    Args:
        model: a timm `ResNet` of `BasicBlock` or `Bottleneck` blocks.
        block_widths: per stage, per block, the inner widths (see `resnet_block_widths`); removed blocks may give `[]`.
        removed_blocks: `"stage.block"` keys (0-based) whose residual branch is dropped.
    """
    removed = {r if isinstance(r, str) else f"{r[0]}.{r[1]}" for r in removed_blocks or ()}
    stages = _stages(model)
    if len(block_widths) != len(stages) or any(len(w) != len(s) for w, s in zip(block_widths, stages)):
        raise ValueError(
            f"block_widths {block_widths} must have one entry per block of the base model "
            f"({[len(s) for s in stages]} blocks per stage)"
        )
    for i, (stage, widths) in enumerate(zip(stages, block_widths)):
        for j, (block, w) in enumerate(zip(stage, widths)):
            if f"{i}.{j}" in removed:
                if not isinstance(block, ShortcutBlock):
                    act = block.act2 if isinstance(block, BasicBlock) else block.act3
                    stage[j] = ShortcutBlock(block.downsample, act)
                continue
            if isinstance(block, ShortcutBlock):
                raise ValueError(f"block {i}.{j} was removed in the base model and cannot be given widths {w}")
            w = [int(x) for x in w]
            if any(x < 1 for x in w):
                raise ValueError(f"block {i}.{j}: widths must be >= 1 (remove the block instead), got {w}")
            if isinstance(block, BasicBlock):
                if len(w) != 1:
                    raise ValueError(f"block {i}.{j} is a BasicBlock and takes one inner width, got {w}")
                block.conv1 = _conv_like(block.conv1, block.conv1.in_channels, w[0])
                block.bn1 = _bn_like(block.bn1, w[0])
                block.conv2 = _conv_like(block.conv2, w[0], block.conv2.out_channels)
            elif isinstance(block, Bottleneck):
                if len(w) != 2:
                    raise ValueError(f"block {i}.{j} is a Bottleneck and takes two inner widths, got {w}")
                block.conv1 = _conv_like(block.conv1, block.conv1.in_channels, w[0])
                block.bn1 = _bn_like(block.bn1, w[0])
                block.conv2 = _conv_like(block.conv2, w[0], w[1])
                block.bn2 = _bn_like(block.bn2, w[1])
                block.conv3 = _conv_like(block.conv3, w[1], block.conv3.out_channels)
            else:
                raise ValueError(f"layer{i + 1}.{j} is a {type(block).__name__}; only BasicBlock/Bottleneck resize")
    return model


def _build(
    base: str = "resnet18",
    block_widths: Sequence[Sequence[Sequence[int]]] | None = None,
    removed_blocks: Sequence | None = None,
    **kwargs,
) -> ResNet:
    model = timm.create_model(base, pretrained=False, **kwargs)
    if not isinstance(model, ResNet):
        raise ValueError(f"kdsearch_resnet needs a timm ResNet as base, but {base!r} builds {type(model).__name__}")
    removed = sorted({r if isinstance(r, str) else f"{r[0]}.{r[1]}" for r in removed_blocks or ()})
    if block_widths is not None:
        resize_resnet_blocks(model, block_widths, removed)
    elif removed:
        resize_resnet_blocks(model, resnet_block_widths(model), removed)
    # The arguments that rebuild this exact shape; hub.save_student writes them into the config.
    model.model_args = {
        "base": base,
        "block_widths": resnet_block_widths(model),
        "removed_blocks": removed,
        "in_chans": int(model.in_chans),
    }
    return model


default_cfgs = generate_default_cfgs(
    {
        "kdsearch_resnet.untrained": {
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "first_conv": "conv1",
            "classifier": "fc",
            "license": "apache-2.0",
        }
    }
)


@register_model
def kdsearch_resnet(pretrained: bool = False, **kwargs) -> ResNet:
    """A timm ResNet (`base=`, default `resnet18`) with per-block inner `block_widths` and `removed_blocks`."""
    return build_model_with_cfg(_build, "kdsearch_resnet", pretrained, **kwargs)
