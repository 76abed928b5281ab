"""Dissolving as a shift transformation: timesteps, samplers, the DDPM step, the factory (blurs: test_blur.py)."""
import dataclasses
import types

import numpy as np
import pytest
import torch

import train as train_program
from cli.args import parse_args
from common.errors import SettingError, UserError
from diffusion_models.ddpm import build_diffusion, save_dissolver
from helpers import random_images, tiny_ddpm_config, tiny_diffusion
from models.blur import BlurShift
from datasets.resolution import to_dissolve_resolution
from models.dissolve import (DissolveSettings, Dissolver, StepSampler, beta_by_epoch_params, make_dissolve_fn,
                             timestep)
from models.strategies import DissolveStrategy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def diffusion():
    return tiny_diffusion(0).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, diffusion):
    path = tmp_path_factory.mktemp("dissolver") / "tiny.pt"
    cfg = tiny_ddpm_config()
    save_dissolver(path, diffusion, diffusion, cfg, {"dataset": "synth_lesion", "one_class_idx": 0})
    return str(path)


# --------------------------------------------------------------------------- timesteps and samplers


def test_timestep_formula_by_hand():
    assert timestep(0.0, 0.3, 1.0) == 30
    assert timestep(0.5, 0.0, 1.0) == 50
    assert timestep(0.25, 0.2, 1.0) == 40      # 100 * (0.2 + 0.25 * 0.8)
    assert timestep(0.999, 0.3, 1.0) == 99     # int() truncates 99.93
    assert timestep(1.0, 0.3, 1.0) == 100
    assert timestep(0.7, 0.0, 0.0) == 0        # the paper's eval setting
    assert timestep(0.5, 0.1, 0.5, step_scale=1000) == 300


def test_beta_by_epoch_parameters_by_hand():
    # step = 2 * (20 - 2) / 30 = 1.2
    assert beta_by_epoch_params(0) == (20, 2)
    assert beta_by_epoch_params(14) == pytest.approx((20, 2 + 1.2 * 14))     # (20, 18.8)
    assert beta_by_epoch_params(15) == pytest.approx((2 + 1.2 * 14, 20))     # (18.8, 20)
    assert beta_by_epoch_params(29) == (2, 20)
    assert beta_by_epoch_params(30) == beta_by_epoch_params(0)               # 30-epoch cycle
    assert beta_by_epoch_params(14, reversed_=True) == pytest.approx((18.8, 20))
    assert StepSampler("beta_by_epoch_reversed").params(0) == (2, 20)
    assert StepSampler("beta_skewed").params() == (1.0, 1.7)
    assert StepSampler("beta_skewed_reversed").params() == (1.7, 1.0)


@pytest.mark.parametrize("name, epoch, mean", [
    ("uniform", 0, 0.5), ("beta_skewed", 0, 1 / 2.7), ("beta_skewed_reversed", 0, 1.7 / 2.7),
    ("beta_by_epoch", 0, 20 / 22), ("beta_by_epoch", 29, 2 / 22), ("beta_by_epoch_reversed", 0, 2 / 22),
    ("beta_by_epoch", 14, 20 / 38.8)])
def test_sampler_range_and_mean(name, epoch, mean):
    s = StepSampler(name, generator=123)
    u = np.array([s.sample(epoch) for _ in range(3000)])
    assert u.min() >= 0.0 and u.max() <= 1.0
    assert abs(u.mean() - mean) < 0.03
    ts = [timestep(x, 0.3, 1.0) for x in u]
    assert min(ts) >= 30 and max(ts) <= 100


def test_sampler_is_deterministic():
    a = [StepSampler("beta_skewed", 7).sample() for _ in range(3)]
    s1, s2 = StepSampler("uniform", 7), StepSampler("uniform", 7)
    assert [s1.sample() for _ in range(5)] == [s2.sample() for _ in range(5)]
    assert len(set(a)) == 1
    np.random.seed(3)
    g1 = [StepSampler("uniform").sample() for _ in range(4)]
    np.random.seed(3)
    assert g1 == [StepSampler("uniform").sample() for _ in range(4)]
    with pytest.raises(UserError):
        StepSampler("linear")
    with pytest.raises(SettingError) as e:  # named as the argument: what a program words in its flag
        StepSampler("linear")
    assert str(e.value).startswith("unknown scheduler 'linear'") and e.value.settings == ("scheduler",)


# --------------------------------------------------------------------------- the DDPM step


def test_dissolving_is_deterministic_and_changes_the_image(diffusion):
    d = Dissolver(diffusion, "small32")
    x = random_images(4)
    a, b = d(x, [50]), d(x, [50])
    assert torch.equal(a, b)
    assert (a - x).abs().mean() > 1e-3 and (a - x).abs().max() > 0.02
    assert not torch.equal(d(x, [30]), a)
    assert a.min() >= -1 and a.max() <= 1 and not a.requires_grad


def test_batched_chunks_equal_separate_p_sample_calls(diffusion):
    d = Dissolver(diffusion, "small32")
    chunks = [random_images(3, seed=s) for s in range(4)]
    ts = [30, 47, 81, 99]
    batched = d(torch.cat(chunks), ts)
    separate = torch.cat([diffusion.p_sample(c, t)[1] for c, t in zip(chunks, ts)])
    assert torch.allclose(batched, separate, atol=1e-5)


@pytest.mark.slow
def test_dissolving_a_few_images_at_a_time_gives_the_one_call_images(diffusion):
    """On CPU the UNet takes chunk_pixels pixels per call. Calls of 5 images straddle the chunks'
    timesteps and the last is short: the one-call images to float rounding. Calls of 32 images
    (the default at 32 px) under bf16: the same bits."""
    x = random_images(12, seed=3)
    ts = [30, 47, 81, 99]
    whole, parts = Dissolver(diffusion, "small32", chunk_pixels=0), Dissolver(diffusion, "small32",
                                                                             chunk_pixels=5 * 32 * 32)
    calls = []
    hook = parts.diffusion.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    a, b = whole(x, ts), parts(x, ts)
    hook.remove()
    assert calls == [5, 5, 2]
    assert torch.allclose(a, b, atol=1e-5)
    assert (a[:3] - a[3:6]).abs().max() > 1e-2  # the chunks' timesteps differ, so a misplaced one would show

    x = random_images(128, seed=4)
    default = Dissolver(diffusion, "small32")
    calls = []
    hook = default.diffusion.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = whole(x, ts), default(x, ts)
    hook.remove()
    assert calls == [32, 32, 32, 32]
    assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_dissolver_dissolves_as_the_eager_one():
    """--compile_dissolver: torch.compile of the UNet gives the eager network's images."""
    torch.manual_seed(0)
    eager = build_diffusion(tiny_ddpm_config()).eval()
    compiled = build_diffusion(tiny_ddpm_config()).eval()
    compiled.load_state_dict(eager.state_dict())
    a, b = Dissolver(eager, "small32"), Dissolver(compiled, "small32", compile=True)
    assert type(b.diffusion.model).__name__ == "OptimizedModule" and type(a.diffusion.model).__name__ == "Unet"
    x = random_images(8)
    ts = [30, 47, 81, 99]
    assert torch.allclose(a(x, ts), b(x, ts), atol=1e-4)


def test_output_usable_in_autograd(diffusion):
    d = Dissolver(diffusion, "small32")
    w = torch.ones(1, requires_grad=True)
    (d(random_images(2), [40]) * w).sum().backward()  # not an inference-mode tensor
    assert w.grad is not None
    d.train()
    assert not d.diffusion.training  # the network stays frozen in eval mode


def test_dissolve_chunks_draws_one_timestep_per_chunk(diffusion):
    d = Dissolver(diffusion, "small32", scheduler=StepSampler("uniform", 5))
    chunks = [random_images(2, seed=s) for s in range(4)]
    out = d.dissolve_chunks(chunks, epoch=3)
    ref_sampler = StepSampler("uniform", 5)
    ts = [timestep(ref_sampler.sample(3), 0.3, 1.0) for _ in range(4)]
    assert len(out) == 4 and all(o.shape == c.shape for o, c in zip(out, chunks))
    assert torch.equal(torch.cat(out), d(torch.cat(chunks), ts))


@pytest.mark.parametrize("kind, size", [("medmnist28", 28), ("small32", 32), ("large224", 224)])
def test_pre_and_post_processing_shapes(diffusion, kind, size):
    x = random_images(2, size)
    y, undo = to_dissolve_resolution(x, kind, 32)
    assert y.shape == (2, 3, 32, 32)
    out = Dissolver(diffusion, kind)(x, [40])
    assert out.shape == x.shape
    if kind != "large224":  # pad / crop and identity are exact
        assert torch.equal(undo(y), x)
    if kind == "medmnist28":
        assert torch.equal(y[..., 2:30, 2:30], x) and y[..., :2, :].abs().sum() == 0


@pytest.mark.parametrize("kind, size", [("small32", 32), ("large224", 224)])
def test_range_correct_relation(diffusion, kind, size):
    x = random_images(3, size)
    default = Dissolver(diffusion, kind)
    correct = Dissolver(diffusion, kind, range_correct=True)
    assert torch.allclose(correct(x, [60]), (default(x * 2 - 1, [60]) + 1) / 2, atol=1e-5)


def test_dissolver_settings_checked(diffusion):
    with pytest.raises(UserError):
        Dissolver(diffusion, "small32", diff_resolution=64)
    torch.manual_seed(0)
    short = build_diffusion(tiny_ddpm_config(timesteps=50))
    with pytest.raises(UserError) as e:
        Dissolver(short, "small32", offset=0.3, upper=1.0)
    assert "0..49" in str(e.value)
    assert str(e.value).startswith("offset 0.3 / upper 1.0 give timesteps 30..100") and e.value.settings == (
        "offset", "upper")
    Dissolver(short, "small32", offset=0.0, upper=0.4)
    with pytest.raises(UserError):
        Dissolver(diffusion, "huge")


# --------------------------------------------------------------------------- factory


FLAGS = ["--mode", "simclr_DIA", "--shift_trans_type", "blurnone_rotation", "--batch_size", "32", "--kernel_size", "3"]


def _flags(*extra):
    return parse_args("train", FLAGS + list(extra))


def _settings(*extra):
    """The dissolving settings of train.py's command line with ``extra`` flags, as train.py takes them."""
    return DissolveSettings.from_flags(vars(_flags(*extra)))


def test_factory(ckpt):
    # the library names its arguments; train.py words them in its flags
    with pytest.raises(SettingError) as e:
        make_dissolve_fn("diffusion_rotation", _settings(), "cpu", "small32")
    assert str(e.value).startswith("shift_trans_type diffusion_rotation needs a dissolver: give diffusion_model_path")
    P = _flags()
    P.shift_trans_type, P.dissolve_type = "diffusion_rotation", "diffusion"  # what the parser itself refuses
    with pytest.raises(UserError) as e:
        train_program.build_dissolve(P, "cpu", types.SimpleNamespace(native_kind="small32"))
    assert "--diffusion_model_path" in str(e.value)
    with pytest.raises(UserError) as e:
        make_dissolve_fn("diffusion_rotation", _settings("--diffusion_model_path", ckpt, "--diff_resolution", "64"),
                         "cpu", "small32")
    assert "--diff_resolution" in str(e.value)
    d = make_dissolve_fn("diffusion_cutperm", _settings("--diffusion_model_path", ckpt, "--diffusion_scheduler",
                                                        "beta_skewed"), "cpu", "large224")
    assert isinstance(d, Dissolver) and d.sampler.name == "beta_skewed" and d.native_kind == "large224"
    assert (d.offset, d.upper, d.range_correct) == (0.3, 1.0, False)
    g = make_dissolve_fn("blurgaussian_rotation", _settings("--kernel_size", "5"), "cpu", "small32")
    assert isinstance(g, BlurShift) and (g.blur, g.kernel_size) == ("gaussian", 5)
    assert make_dissolve_fn("blurmedian_cutperm", _settings(), "cpu", "small32").blur == "median"
    assert make_dissolve_fn("blurnone_rotation", _settings("--resize_to_constant"), "cpu", "small32").blur == "none"
    assert make_dissolve_fn("rotation", _settings(), "cpu", "small32") is None
    # what the training step reads of a strategy, stated by both
    assert isinstance(d, DissolveStrategy) and isinstance(g, DissolveStrategy)
    assert (d.applies_to, d.shift_inside, d.info["path"]) == ((2,), False, ckpt)
    assert (g.applies_to, g.shift_inside, g.info) == ((0, 1, 2), True, None)
    third = make_dissolve_fn("blurnone_rotation", _settings("--blur_third_chunk_only"), "cpu", "small32")
    assert third.third_chunk_only and third.applies_to == (2,)


def test_factory_names_the_settings_and_train_py_the_flags(ckpt):
    """A setting the dissolver refuses is named by the DissolveSettings field it came from, and
    by its flag in train.py's message."""
    with pytest.raises(SettingError) as e:
        make_dissolve_fn("diffusion_rotation", _settings("--diffusion_model_path", ckpt, "--diffusion_upper_offset",
                                                         "20"), "cpu", "small32")
    assert e.value.settings == ("diffusion_offset", "diffusion_upper_offset")
    assert str(e.value).startswith("diffusion_offset 0.3 / diffusion_upper_offset 20.0 give timesteps 30..2000")
    unknown = dataclasses.replace(_settings("--diffusion_model_path", ckpt), diffusion_scheduler="linear")
    with pytest.raises(SettingError) as e:
        make_dissolve_fn("diffusion_rotation", unknown, "cpu", "small32")
    assert str(e.value).startswith("unknown diffusion_scheduler 'linear'")
    P = _flags("--diffusion_model_path", ckpt, "--diffusion_upper_offset", "20")
    P.shift_trans_type, P.dissolve_type = "diffusion_rotation", "diffusion"
    with pytest.raises(UserError) as e:
        train_program.build_dissolve(P, "cpu", types.SimpleNamespace(native_kind="small32"))
    assert str(e.value).startswith("--diffusion_offset 0.3 / --diffusion_upper_offset 20.0 give timesteps 30..2000")
    assert DissolveSettings.flag_name("range_correct") == "diffusion_range_correct"
    assert DissolveSettings.flag_name("third_chunk_only") == "blur_third_chunk_only"
