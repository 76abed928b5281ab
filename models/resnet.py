"""ResNets with the three heads CSI puts on the penultimate feature.

The ImageNet-style backbones are torchvision's; the CIFAR-style ones are assembled from
torchvision's residual blocks with a 3x3 stride-1 stem and no max-pool (CSI's layout at
32 px) and an adjustable width, since torchvision fixes the widths of its networks.
"""
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.errors import UserError

_ARCHS = {
    "resnet18": ("resnet18", True),
    "resnet34": ("resnet34", True),
    "resnet50": ("resnet50", True),
    "resnet18_imagenet": ("resnet18", False),
    "resnet50_imagenet": ("resnet50", False),
}
# the networks build_model builds (--model chooses one)
MODEL_NAMES = tuple(_ARCHS)


def cifar_resnet(block, layers, width=64):
    """CSI's CIFAR-style ResNet (3x3 stride-1 stem, no max-pool) from torchvision's blocks,
    with the stage widths ``width * (1, 2, 4, 8)`` (64 is the standard network)."""
    stem = [nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True)]
    stages, inplanes = [], width
    for i, n in enumerate(layers):
        planes, stride = width * 2 ** i, (1 if i == 0 else 2)
        blocks = []
        for j in range(n):
            downsample = None
            if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            blocks.append(block(inplanes, planes, stride if j == 0 else 1, downsample))
            inplanes = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    net = nn.Sequential(*stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = inplanes
    return net


_CIFAR = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
          "resnet50": (Bottleneck, [3, 4, 6, 3])}


class ContrastiveResNet(nn.Module):
    """Backbone + ``linear`` (classes), ``simclr_layer`` (projection), ``shift_cls_layer`` (K shifts)."""

    def __init__(self, arch="resnet18", n_classes=2, simclr_dim=128, n_shifts=4, width=64):
        super().__init__()
        if arch not in _ARCHS:
            raise UserError(f"unknown --model {arch}; choose one of {', '.join(_ARCHS)}")
        tv_name, cifar_stem = _ARCHS[arch]
        if cifar_stem:
            backbone = cifar_resnet(*_CIFAR[arch], width=width)
            last_dim = backbone.out_dim
        else:
            if width != 64:
                raise UserError(f"--resnet_width applies to the CIFAR-style models, not {arch}")
            backbone = getattr(torchvision.models, tv_name)(weights=None)
            last_dim = backbone.fc.in_features
            backbone.fc = nn.Identity()
        self.arch = arch
        self.backbone = backbone
        self.last_dim = last_dim
        self.linear = nn.Linear(last_dim, n_classes)
        self.simclr_layer = nn.Sequential(
            nn.Linear(last_dim, last_dim), nn.ReLU(), nn.Linear(last_dim, simclr_dim))
        self.shift_cls_layer = nn.Linear(last_dim, n_shifts)
        self.memory_format = torch.channels_last  # build_model lays the weights out so too

    def penultimate(self, x):
        # the inputs are [0, 1] images; the network sees them centred as CSI does, laid out
        # channels-last (faster convolutions on CPU and on CUDA under mixed precision)
        x = ((x - 0.5) / 0.5).contiguous(memory_format=self.memory_format)
        return self.backbone(x)

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


def build_model(arch, n_classes, simclr_dim=128, n_shifts=4, width=64):
    model = ContrastiveResNet(arch, n_classes=n_classes, simclr_dim=simclr_dim, n_shifts=n_shifts, width=width)
    return model.to(memory_format=torch.channels_last)
