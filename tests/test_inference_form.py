"""The frozen UNet's inference form: the library's function, by an independent path."""
import pytest
import torch
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import LayerNorm, WeightStandardizedConv2d

from diffusion_models.ddpm import build_diffusion
from diffusion_models.inference_form import AutocastWeights, ChannelLayerNorm, inference_form, standardised_conv
from helpers import tiny_ddpm_config
from models.dissolve import Dissolver

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unet(dim=8, seed=0):
    torch.manual_seed(seed)
    return build_diffusion(tiny_ddpm_config(unet_dim=dim)).model.eval()


def test_standardised_weight_by_hand():
    torch.manual_seed(1)
    conv = WeightStandardizedConv2d(4, 3, 3, padding=1)
    plain = standardised_conv(conv)
    w = conv.weight.detach().double()
    for o in range(3):  # per output channel, by the textbook formula in float64
        flat = w[o].flatten()
        mean = flat.sum() / flat.numel()
        var = ((flat - mean) ** 2).sum() / flat.numel()
        expect = (w[o] - mean) / torch.sqrt(var + 1e-5)
        assert torch.allclose(plain.weight[o].double(), expect, atol=1e-6)
    assert torch.equal(plain.bias, conv.bias)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(plain(x), conv(x), atol=1e-5)  # the library's per-call standardisation, fp32


def test_channel_layer_norm_equals_the_librarys():
    torch.manual_seed(2)
    ln = LayerNorm(6)
    with torch.no_grad():
        ln.g.copy_(torch.randn(1, 6, 1, 1))
    x = torch.randn(3, 6, 4, 5) * 3 + 1
    ours = ChannelLayerNorm(ln.g)
    assert torch.allclose(ours(x), ln(x), atol=1e-5)
    assert torch.allclose(ours(x.contiguous(memory_format=torch.channels_last)), ln(x), atol=1e-5)


def test_inference_form_computes_the_same_network_and_leaves_the_original():
    net = unet()
    fast, n = inference_form(net)
    ws = sum(isinstance(m, WeightStandardizedConv2d) for m in net.modules())
    lns = sum(isinstance(m, LayerNorm) for m in net.modules())
    assert n == ws + lns and ws > 0 and lns > 0
    assert not any(isinstance(m, (WeightStandardizedConv2d, LayerNorm)) for m in fast.modules())
    assert sum(isinstance(m, WeightStandardizedConv2d) for m in net.modules()) == ws  # original kept
    assert all(p.requires_grad for p in net.parameters()) and not any(p.requires_grad for p in fast.parameters())
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    t = torch.tensor([0, 30, 50, 99, 500, 999])
    with torch.no_grad():
        assert torch.allclose(fast(x, t), net(x, t), atol=1e-5)


def test_under_bf16_the_inference_form_stays_closer_to_fp32_than_the_library():
    """The library switches to eps 1e-3 for non-fp32 inputs; the inference form keeps 1e-5."""
    net = unet(dim=16, seed=3)
    fast, _ = inference_form(net)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    t = torch.full((8,), 60)
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lib, ours = net(x, t).float(), fast(x, t).float()
    assert (ours - ref).abs().mean() < 0.5 * (lib - ref).abs().mean()


def test_dissolver_uses_the_inference_form_and_matches_p_sample():
    diffusion = build_diffusion(tiny_ddpm_config())
    d = Dissolver(diffusion, "small32")
    assert not any(isinstance(m, WeightStandardizedConv2d) for m in d.diffusion.modules())
    assert diffusion.training and any(isinstance(m, WeightStandardizedConv2d) for m in diffusion.modules())
    x = torch.rand(8, 3, 32, 32)
    ts = [30, 47, 81, 99]
    with torch.no_grad():
        separate = torch.cat([diffusion.p_sample(c, t)[1] for c, t in zip(x.chunk(4), ts)])
    assert torch.allclose(d(x, ts), separate, atol=1e-5)


def test_autocast_weights_cast_once_give_autocasts_own_bits_and_come_back_to_fp32():
    fast, _ = inference_form(unet(dim=16, seed=4))
    fast = fast.to(memory_format=torch.channels_last)
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([10, 60, 200, 700])
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in fast.modules() if isinstance(m, (ChannelLayerNorm, torch.nn.GroupNorm))]
    fp32 = [m.weight.detach().clone() for m in convs]
    with torch.no_grad():
        ref32 = fast(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = fast(x, t)  # autocast casting the fp32 weights at every call
            weights = AutocastWeights(fast)
            weights.match("cpu")
            assert all(m.weight.dtype == torch.bfloat16 for m in convs)
            assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # run in fp32
            ours16 = fast(x, t)
        weights.match("cpu")  # autocast off: back to the fp32 weights, bit for bit
        assert all(torch.equal(m.weight, w) for m, w in zip(convs, fp32))
        ours32 = fast(x, t)
    assert torch.equal(ours16, ref16) and (ref16.float() - ref32).abs().max() > 1e-4  # bf16 did differ
    assert torch.equal(ours32, ref32)


def test_dissolver_under_bf16_then_fp32_keeps_both_results():
    diffusion = build_diffusion(tiny_ddpm_config())
    d = Dissolver(diffusion, "small32")
    x = torch.rand(8, 3, 32, 32)
    ts = [30, 47, 81, 99]
    before = d(x, ts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = d(x, ts)
    assert next(m for m in d.diffusion.model.modules() if isinstance(m, torch.nn.Conv2d)).weight.dtype == torch.bfloat16
    assert torch.equal(d(x, ts), before) and (low - before).abs().max() > 1e-4
