"""The 0.27.12 ``Unet`` made ready to train under bf16: the fp32 network's function at every precision.

The package's ``WeightStandardizedConv2d`` and ``LayerNorm`` take ``eps = 1e-5`` when their input
is fp32 and ``1e-3`` otherwise. Under bf16 autocast some of them receive bf16 inputs (after a
convolution) and others fp32 (after a GroupNorm), so a dissolver trained that way learns a
network that is neither the fp32 one nor a consistent bf16 one, while dissolving
(``diffusion_models.inference_form``) computes the fp32 network's ``1e-5`` at every precision.

:func:`training_form` swaps, in place, each of those layers for one holding *the same parameter
tensors under the same names* that always computes the fp32 formula with ``eps = 1e-5`` (the
standardisation in fp32, the channel norm with ``F.layer_norm``, which is also faster on CPU).
The optimiser, the EMA, DDP and the checkpoints therefore see the package's network: a saved
state dict loads into the package's ``Unet`` unchanged. In fp32 the function is the package's to
float rounding (tested); its speed is measured by ``benchmarks/bench_ddpm.py``.
"""

import torch
import torch.nn.functional as F

from diffusion_models.inference_form import FP32_EPS, ChannelLayerNorm, swap_package_layers


class StandardisedConv2d(torch.nn.Conv2d):
    """A convolution whose weight is standardised per output channel at each call, in fp32 with
    ``eps``: ``(w - mean) / sqrt(var + eps)`` (biased variance), the package's formula."""

    eps = FP32_EPS

    def forward(self, x):
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) * (var + self.eps).rsqrt(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _standardised_like(conv):
    new = StandardisedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                             bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
    new.weight = conv.weight  # the same Parameter objects: nothing copied, nothing renamed
    new.bias = conv.bias
    return new


def training_form(unet):
    """Swap ``unet``'s eps-switching layers in place (see the module's text); returns how many."""
    return swap_package_layers(unet, _standardised_like, lambda ln: ChannelLayerNorm(ln.g, share=True))
