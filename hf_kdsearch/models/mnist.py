"""Small models for the bundled MNIST digits, registered with timm.

They are the models of the offline quickstart and of the evidence runs on real data: an MLP (Hinton et al.'s setting)
and a plain CNN whose every channel can be gated. Widths are constructor arguments, so a searched or thinned student
is the same class with other numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

__all__ = ["MLP", "SmallCNN", "MNIST_MEAN", "MNIST_STD"]


class MLP(nn.Module):
    """Flatten, then `Linear -> ReLU -> Dropout` for each hidden width, then a linear head."""

    def __init__(
        self,
        hidden_dims: Sequence[int] = (512, 512),
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        drop_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        if not hidden_dims or any(int(h) < 1 for h in hidden_dims):
            raise ValueError(f"MLP: hidden_dims must be a non-empty list of positive widths, got {hidden_dims}")
        self.num_classes = num_classes
        self.in_chans = int(in_chans)
        # The arguments that rebuild this exact shape; hub.save_student writes them into the config.
        self.model_args = {"hidden_dims": [int(h) for h in hidden_dims], "in_chans": in_chans, "img_size": img_size}
        layers, width = [], in_chans * img_size * img_size
        for h in hidden_dims:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(drop_rate)]
            width = int(h)
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.num_features = self.head_hidden_size = width
        self.fc = nn.Linear(width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SmallCNN(nn.Module):
    """`conv3x3 -> BN -> ReLU` per width, with 2x2 max-pooling after every `pool_every` convs, then average pooling.

    No residual sums tie channels together, so every output channel of every conv can be gated and removed.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 32, 64, 64),
        pool_every: int = 2,
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"SmallCNN: widths must be a non-empty list of positive widths, got {widths}")
        self.num_classes = num_classes
        self.in_chans = int(in_chans)
        self.drop_rate = drop_rate
        self.model_args = {"widths": [int(w) for w in widths], "pool_every": pool_every, "in_chans": in_chans}
        layers, chs = [], in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(chs, int(w), 3, 1, 1, bias=False), nn.BatchNorm2d(int(w)), nn.ReLU()]
            if (i + 1) % pool_every == 0 and i + 1 < len(widths):
                layers.append(nn.MaxPool2d(2))
            chs = int(w)
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs, num_classes)

    get_classifier = MLP.get_classifier
    reset_classifier = MLP.reset_classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "classifier": "fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {"mnist_mlp.untrained": _cfg(first_conv=None), "mnist_cnn.untrained": _cfg(first_conv="features.0")}
)


@register_model
def mnist_mlp(pretrained: bool = False, **kwargs) -> MLP:
    """MLP for 28x28 digits; `hidden_dims=(1200, 1200)` is Hinton et al.'s teacher, `(800, 800)` their student."""
    return build_model_with_cfg(MLP, "mnist_mlp", pretrained, **kwargs)


@register_model
def mnist_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """Plain CNN for 28x28 digits with per-layer `widths`."""
    return build_model_with_cfg(SmallCNN, "mnist_cnn", pretrained, **kwargs)
