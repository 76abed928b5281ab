"""Multiply-accumulates of the dissolver's UNet per image and dissolving call, counted with thop.

thop hooks modules by their exact type, so its default count skips the package's
``WeightStandardizedConv2d`` (a ``Conv2d`` subclass): that count is the one the paper's table
reports, added to a ResNet-18's at 224 px (:func:`resnet18_macs`). :func:`unet_macs` gives it and
the count with those convolutions added; attention products are counted by neither.
"""
import warnings

import torch
import torchvision
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import WeightStandardizedConv2d

from diffusion_models.ddpm import build_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # thop compares versions with distutils when imported
    import thop
    from thop.vision.basic_hooks import count_convNd


def unet_macs(unet, size, channels=3):
    """``(as_paper, all_convs)`` multiply-accumulates of one ``unet`` call on one
    ``channels x size x size`` image: thop's default count, and that count plus the
    weight-standardised convolutions."""
    x, t = torch.randn(1, channels, size, size), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        as_paper = thop.profile(unet, inputs=(x, t), verbose=False)[0]
        every = thop.profile(unet, inputs=(x, t), verbose=False,
                             custom_ops={WeightStandardizedConv2d: count_convNd})[0]
    for m in unet.modules():  # thop leaves its counters on the modules
        for name in ("total_ops", "total_params"):
            if name in m._buffers:
                del m._buffers[name]
    return as_paper, every


def config_macs(config):
    """:func:`unet_macs` of the UNet that ``config`` (``diffusion_models.ddpm.ddpm_config``)
    describes, at its resolution and channels."""
    unet = build_unet(config).eval()
    return unet_macs(unet, config["image_size"], config["channels"])


def resnet18_macs():
    """thop's count of torchvision's ResNet-18 on one 224-px image, which the paper's table adds to
    the UNet's."""
    with torch.no_grad():
        return thop.profile(torchvision.models.resnet18(weights=None), verbose=False,
                            inputs=(torch.randn(1, 3, 224, 224),))[0]
