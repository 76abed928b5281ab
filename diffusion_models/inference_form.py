"""A frozen 0.27.12 ``Unet`` rewritten for inference: the same function, computed faster.

Dissolving calls a frozen UNet once per training step. Two of the library's layers redo work
on every call that a frozen network only needs once, or do it slowly:

- ``WeightStandardizedConv2d`` standardises its weight (``(w - mean) / sqrt(var + eps)`` per
  output channel) at every call. Frozen, the standardised weight is a constant: we compute it
  once, with the library's formula and its fp32 ``eps = 1e-5``, into a plain ``Conv2d``.
- The library's ``LayerNorm`` (over the channel dimension of an ``N x C x H x W`` map) is
  written with ``torch.var`` and ``torch.mean`` over dim 1, which runs at about a tenth of the
  speed of ``F.layer_norm`` on this CPU. :class:`ChannelLayerNorm` computes the same
  normalisation with ``F.layer_norm`` over the last dimension of the channels-last view.

Under autocast, a third saving: :class:`AutocastWeights` keeps the frozen convolutions' and
linear layers' weights in the precision autocast computes them in, so that they are not cast
again at every call (the same bits: autocast's cast is the same rounding, done once).

In fp32 the result equals the library's network to float rounding (tests check 1e-5). Under
bf16 autocast it is *closer* to the fp32 network than the library's own layers are: they switch
to ``eps = 1e-3`` whenever their input is not fp32, which autocast makes it for some layers and
not others; the rewritten layers keep the fp32 network's ``1e-5`` whatever the precision. Its
speed and its distance to the fp32 output are measured in ``benchmarks/README.md``.
"""

import copy

import torch
import torch.nn.functional as F
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import LayerNorm, WeightStandardizedConv2d

FP32_EPS = 1e-5  # the library's eps for fp32 inputs, in both layers


class ChannelLayerNorm(torch.nn.Module):
    """``(x - mean_c) / sqrt(var_c + eps) * g`` over the channels of each pixel (biased var).

    ``share=False``: a frozen copy of ``g``; ``True``: ``g`` itself (the training form's)."""

    def __init__(self, g, eps=FP32_EPS, share=False):
        super().__init__()
        self.g = g if share else torch.nn.Parameter(g.detach().clone(), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=self.eps).permute(0, 3, 1, 2)
        return y * self.g


def standardised_conv(conv, eps=FP32_EPS):
    """A plain ``Conv2d`` holding ``conv``'s weight standardised as the library does per call.

    ``mean`` and ``var`` are taken apart, as the library takes them: ``torch.var_mean`` gives the
    same numbers to float rounding but not the same bits, and every dissolver measured in
    ``benchmarks/README.md`` dissolves with these bits."""
    w = conv.weight.detach()
    dims = tuple(range(1, w.dim()))
    mean = w.mean(dim=dims, keepdim=True)
    var = w.var(dim=dims, unbiased=False, keepdim=True)
    plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode,
                            device=w.device, dtype=w.dtype)
    with torch.no_grad():
        plain.weight.copy_((w - mean) * (var + eps).rsqrt())
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain


def swap_package_layers(net, conv_for, norm_for):
    """Replace, in place, each of ``net``'s ``WeightStandardizedConv2d`` by ``conv_for(layer)`` and
    each channel ``LayerNorm`` by ``norm_for(layer)``; returns how many were replaced."""
    swapped = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, WeightStandardizedConv2d):
                setattr(module, name, conv_for(child))
            elif isinstance(child, LayerNorm):
                setattr(module, name, norm_for(child))
            else:
                continue
            swapped += 1
    return swapped


def inference_form(unet):
    """A frozen copy of ``unet`` (eval mode, no gradients) with both layers rewritten.

    ``unet`` itself is left as it was. Returns the copy and the number of layers rewritten.
    """
    net = copy.deepcopy(unet).eval().requires_grad_(False)
    rewritten = swap_package_layers(net, standardised_conv, lambda ln: ChannelLayerNorm(ln.g))
    return net.requires_grad_(False), rewritten


class AutocastWeights:
    """Keeps a frozen network's ``Conv2d`` and ``Linear`` weights in the dtype autocast runs them in.

    Autocast casts an fp32 weight to bf16 (or fp16) at every call of a frozen layer (it caches
    casts only of weights that require gradients): for the dim-64 UNet, 36 M parameters per call.
    :meth:`match` (before each call) casts them once, when the autocast state of the network's
    device asks for another dtype than they have, from fp32 copies kept here, and back to fp32
    when autocast is off. The result is the same bits as autocast's own cast; other layers (the
    norms) keep their fp32 parameters, as autocast runs them in fp32 (timings in
    ``benchmarks/README.md``).
    """

    def __init__(self, net):
        self.net = net
        self.dtype = torch.float32
        self.masters = None  # fp32 (weight, bias) of each layer, taken at the first cast

    def _layers(self):
        return [m for m in self.net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def match(self, device_type):
        want = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
        if want == self.dtype:
            return
        layers = self._layers()
        if self.masters is None:
            self.masters = [(m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                            for m in layers]
        for m, (w, b) in zip(layers, self.masters):
            m.weight.data = w.to(m.weight.device, want).contiguous(memory_format=_format_of(m.weight))
            if b is not None:
                m.bias.data = b.to(m.bias.device, want)
        self.dtype = want


def _format_of(w):
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
