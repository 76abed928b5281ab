"""ResNets with the three heads CSI puts on the penultimate feature.

The backbones are torchvision's; the CIFAR-style variants replace the 7x7 stride-2 stem
and the max-pool by a 3x3 stride-1 convolution, which is the layout CSI trains at 32 px.
"""
import torch
import torch.nn as nn
import torchvision

from common.errors import UserError

_ARCHS = {
    "resnet18": ("resnet18", True),
    "resnet34": ("resnet34", True),
    "resnet50": ("resnet50", True),
    "resnet18_imagenet": ("resnet18", False),
    "resnet50_imagenet": ("resnet50", False),
}


class ContrastiveResNet(nn.Module):
    """Backbone + ``linear`` (classes), ``simclr_layer`` (projection), ``shift_cls_layer`` (K shifts)."""

    def __init__(self, arch="resnet18", n_classes=2, simclr_dim=128, n_shifts=4):
        super().__init__()
        if arch not in _ARCHS:
            raise UserError(f"unknown --model {arch}; choose one of {', '.join(_ARCHS)}")
        tv_name, cifar_stem = _ARCHS[arch]
        backbone = getattr(torchvision.models, tv_name)(weights=None)
        if cifar_stem:
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        last_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.arch = arch
        self.backbone = backbone
        self.last_dim = last_dim
        self.linear = nn.Linear(last_dim, n_classes)
        self.simclr_layer = nn.Sequential(
            nn.Linear(last_dim, last_dim), nn.ReLU(), nn.Linear(last_dim, simclr_dim))
        self.shift_cls_layer = nn.Linear(last_dim, n_shifts)

    def penultimate(self, x):
        # the inputs are [0, 1] images; the network sees them centred as CSI does
        return self.backbone((x - 0.5) / 0.5)

    def forward(self, x, penultimate=False, simclr=False, shift=False):
        h = self.penultimate(x)
        out = self.linear(h)
        if not (penultimate or simclr or shift):
            return out
        aux = {}
        if penultimate:
            aux["penultimate"] = h
        if simclr:
            aux["simclr"] = self.simclr_layer(h)
        if shift:
            aux["shift"] = self.shift_cls_layer(h)
        return out, aux


def build_model(arch, n_classes, simclr_dim=128, n_shifts=4):
    return ContrastiveResNet(arch, n_classes=n_classes, simclr_dim=simclr_dim, n_shifts=n_shifts)
