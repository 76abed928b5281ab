"""The dissolver's training form (fixed fp32 epsilons under bf16) and train_eval_ddpm.py --amp."""
import pytest
import torch
import torch.nn.functional as F
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import LayerNorm, WeightStandardizedConv2d

from diffusion_models.ddpm import read_dissolver_checkpoint
from diffusion_models.inference_form import ChannelLayerNorm
from diffusion_models.training_form import StandardisedConv2d, training_form
from helpers import TINY_DDPM, tiny_diffusion

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_same_parameters_same_names_same_loss_and_gradients_in_fp32():
    package, ours = tiny_diffusion(), tiny_diffusion()
    names = [n for n, _ in package.named_parameters()]
    before = dict(ours.named_parameters())
    n = training_form(ours.model)
    assert n == sum(isinstance(m, (WeightStandardizedConv2d, LayerNorm)) for m in package.modules()) > 0
    assert not any(isinstance(m, (WeightStandardizedConv2d, LayerNorm)) for m in ours.modules())
    after = dict(ours.named_parameters())
    assert list(after) == names and all(after[k] is before[k] for k in names)  # the very same tensors
    assert list(ours.state_dict()) == list(package.state_dict())

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 40, 200, 900])
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    losses = []
    for d in (package, ours):
        loss = d.p_losses(x * 2 - 1, t, noise=noise)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    grads = {k: p.grad for k, p in package.named_parameters()}
    for k, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads[k], atol=1e-5, rtol=1e-4), k


def test_bf16_inputs_keep_the_fp32_epsilon():
    """The package's layer switches to eps 1e-3 for a bf16 input; ours keeps 1e-5. A weight of tiny
    spread (variance 1e-4) makes the two visibly different."""
    torch.manual_seed(3)
    package = WeightStandardizedConv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        package.weight.mul_(0.01 / package.weight.std())
    holder = torch.nn.Sequential(WeightStandardizedConv2d(4, 3, 3, padding=1))
    holder[0].load_state_dict(package.state_dict())
    training_form(holder)
    ours = holder[0]
    assert type(ours) is StandardisedConv2d
    x = torch.randn(2, 4, 6, 6)
    w = package.weight.detach().double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    expect = F.conv2d(x.double(), (w - mean) / torch.sqrt(var + 1e-5), package.bias.detach().double(), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x.to(torch.bfloat16)).double()
        theirs = package(x.to(torch.bfloat16)).double()

    def err(y):
        return float((y.detach() - expect).abs().mean() / expect.abs().mean())

    assert err(got) < 0.01  # bf16 rounding
    assert err(theirs) > 0.2  # sqrt(1e-4 + 1e-3) against sqrt(1e-4 + 1e-5): outputs about 3x smaller


def test_shared_channel_norm_trains_the_package_parameter():
    ln = LayerNorm(5)
    ours = ChannelLayerNorm(ln.g, share=True)
    assert ours.g is ln.g and ours.g.requires_grad
    x = torch.randn(2, 5, 3, 3) * 2 + 1
    ours(x).square().sum().backward()
    ref_g = ln.g.detach().clone().requires_grad_(True)
    y = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5) * ref_g
    y.square().sum().backward()
    assert torch.allclose(ln.g.grad, ref_g.grad, atol=1e-4)
    frozen = ChannelLayerNorm(ln.g)
    assert frozen.g is not ln.g and not frozen.g.requires_grad


@pytest.mark.slow
def test_script_records_each_segments_precision_and_a_resume_may_change_it(tmp_path, capsys):
    from diffusion_models import train_eval_ddpm as script

    ckpt, same = tmp_path / "d.pt", tmp_path / "same.pt"
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "2", "--save_path", str(ckpt),
                 "--amp", "on", *TINY_DDPM])
    stored = read_dissolver_checkpoint(ckpt)
    assert stored["train_state"]["precision"] == [{"step": 0, "device": "cpu", "precision": "bf16"}]
    assert stored["meta"]["precision"].startswith("bf16")
    out = capsys.readouterr().out
    assert "precision: bf16 autocast (fp32 weights) (--amp on: bf16 " in out and "changes" not in out
    same.write_bytes(ckpt.read_bytes())
    # a resume in another precision (another device, or another --amp): one line, and a new segment
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "3", "--save_path", str(ckpt),
                 "--resume", "--amp", "off", *TINY_DDPM])
    out = capsys.readouterr().out
    assert "precision changes on resume: bf16 (on cpu) up to step 2, fp32 (on cpu) from here" in out, out
    stored = read_dissolver_checkpoint(ckpt)
    assert stored["train_state"]["step"] == 3 and stored["meta"]["precision"] == "fp32"
    assert stored["train_state"]["precision"] == [{"step": 0, "device": "cpu", "precision": "bf16"},
                                                  {"step": 2, "device": "cpu", "precision": "fp32"}]
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "3", "--save_path", str(same),
                 "--resume", "--amp", "on", *TINY_DDPM])
    assert "precision changes" not in capsys.readouterr().out

    # bf16 training is not fp32 training: the same recipe in fp32 gives other weights
    fp32 = tmp_path / "f.pt"
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "3", "--save_path", str(fp32),
                 "--amp", "off", *TINY_DDPM])
    a, b = read_dissolver_checkpoint(same)["model_state"], read_dissolver_checkpoint(fp32)["model_state"]
    assert read_dissolver_checkpoint(fp32)["meta"]["precision"] == "fp32"
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)  # three small Adam steps apart


@pytest.mark.slow
def test_checkpoint_without_precision_segments_resumes_in_either_precision(tmp_path, capsys):
    from diffusion_models import train_eval_ddpm as script
    from utils import atomic_torch_save

    ckpt = tmp_path / "old.pt"
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "2", "--save_path", str(ckpt),
                 "--amp", "on", *TINY_DDPM])
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    del raw["train_state"]["precision"]  # a checkpoint that records its precision in the recipe alone
    raw["train_state"]["recipe"]["amp"] = True
    atomic_torch_save(raw, ckpt)
    capsys.readouterr()
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "3", "--save_path", str(ckpt),
                 "--resume", "--amp", "off", *TINY_DDPM])
    assert "precision changes on resume: bf16 up to step 2, fp32 (on cpu) from here" in capsys.readouterr().out
    stored = read_dissolver_checkpoint(ckpt)["train_state"]
    assert stored["step"] == 3 and [s["precision"] for s in stored["precision"]] == ["bf16", "fp32"]
