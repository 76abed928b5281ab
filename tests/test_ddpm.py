"""The dissolver DDPM: config, L1 loss, checkpoints and their errors, and the training script."""
import argparse
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import utils

from common.errors import UserError
from diffusion_models import ddpm
from diffusion_models.ddpm import (build_diffusion, ddpm_config, load_dissolver, read_dissolver_checkpoint,
                                   save_dissolver)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "diffusion_models", "train_eval_ddpm.py")
TINY = ["--unet_dim", "8", "--dim_mults", "1", "2", "--batch_size", "8", "--no_progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**kw):
    return ddpm_config(**dict(dict(unet_dim=8, dim_mults=(1, 2), sampling_timesteps=10), **kw))


def tiny_diffusion(seed=0, **kw):
    torch.manual_seed(seed)
    return build_diffusion(tiny_config(**kw))


def save_tiny(path, seed=0, **kw):
    d, e = tiny_diffusion(seed, **kw), tiny_diffusion(seed + 1, **kw)
    save_dissolver(path, d, e, tiny_config(**kw), {"dataset": "synth_lesion", "one_class_idx": 0, "epochs": 1,
                                                   "steps": 7})
    return d, e


def assert_one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip()
    for n in needles:
        assert n in msg, msg


# --------------------------------------------------------------------------- model


def test_config_is_the_papers():
    c = ddpm_config()
    assert (c["image_size"], c["unet_dim"], c["dim_mults"], c["timesteps"], c["sampling_timesteps"]) == \
        (32, 64, [1, 2, 4, 8], 1000, 250)
    assert (c["objective"], c["beta_schedule"], c["loss_type"]) == ("pred_noise", "cosine", "l1")


def test_build_sets_objective_and_schedule():
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import cosine_beta_schedule

    d = tiny_diffusion()
    assert d.objective == "pred_noise" and d.loss_type == "l1"
    assert torch.allclose(d.betas, cosine_beta_schedule(1000).float())
    assert tuple(d.image_size) == (32, 32) and d.num_timesteps == 1000
    assert isinstance(d, ddpm.DissolverDiffusion)


@pytest.mark.parametrize("kw, needle", [(dict(image_size=31), "divisible"), (dict(objective="x"), "objective"),
                                        (dict(beta_schedule="x"), "schedule"), (dict(loss_type="x"), "loss"),
                                        (dict(sampling_timesteps=2000), "sampling_timesteps")])
def test_bad_config_is_user_error(kw, needle):
    with pytest.raises(UserError) as e:
        tiny_config(**kw)
    assert_one_line(e, needle)


def test_l1_loss_is_mean_abs_error():
    d = tiny_diffusion()
    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 3, 32, 32, generator=g)
    noise = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([5, 300, 999])
    loss = d(img, times=t, noise=noise)  # forward normalises [0, 1] -> [-1, 1]
    x0 = img * 2 - 1
    ac = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    with torch.no_grad():
        hand = (d.model(x_t, t) - noise).abs().mean()
    assert torch.allclose(loss.detach(), hand, atol=1e-6)
    # l2 defers to the package (MSE)
    d2 = tiny_diffusion(loss_type="l2")
    loss2 = d2(img, times=t, noise=noise)
    with torch.no_grad():
        hand2 = F.mse_loss(d2.model(x_t, t), noise)
    assert torch.allclose(loss2.detach(), hand2, atol=1e-6)
    loss.backward()  # trainable
    assert d.model.final_conv.weight.grad is not None


# --------------------------------------------------------------------------- checkpoints


def _predict(d, x, t=40):
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.no_grad():
        return d.model_predictions(x, tt, clip_x_start=True).pred_x_start


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "sub" / "d.pt"
    online, ema = save_tiny(path)
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    loaded, info = load_dissolver(path, "cpu", expect_resolution=32, expect_channels=3)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(_predict(loaded, x), _predict(ema, x))  # EMA weights by default
    assert not torch.equal(_predict(loaded, x), _predict(online, x))
    raw, _ = load_dissolver(path, torch.device("cpu"), use_ema=False)
    assert torch.equal(_predict(raw, x), _predict(online, x))
    assert info["config"] == tiny_config() and info["format_version"] == 1
    meta = info["meta"]
    assert (meta["dataset"], meta["one_class_idx"], meta["epochs"], meta["steps"]) == ("synth_lesion", 0, 1, 7)
    assert meta["package_version"] == ddpm.package_version()
    ck = read_dissolver_checkpoint(path)
    assert ck["kind"] == "dia_dissolver" and ck["train_state"] is None


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "d.pt"
    path.write_bytes(b"old")

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        utils.atomic_write(path, boom)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["d.pt"]


class _Foreign:
    pass


def test_every_bad_checkpoint_is_one_line(tmp_path):
    good = tmp_path / "good.pt"
    save_tiny(good)

    with pytest.raises(UserError) as e:  # missing
        load_dissolver(tmp_path / "none.pt", "cpu")
    assert_one_line(e, "no dissolver checkpoint", "train_eval_ddpm.py --mode train")

    with pytest.raises(UserError) as e:  # a directory
        load_dissolver(tmp_path, "cpu")
    assert_one_line(e, "directory")

    trunc = tmp_path / "trunc.pt"  # corrupt: truncated
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UserError) as e:
        load_dissolver(trunc, "cpu")
    assert_one_line(e, "truncated or damaged", "train_eval_ddpm.py --mode train")

    junk = tmp_path / "junk.pt"  # corrupt: not a torch file at all
    junk.write_bytes(b"GIF89a not a checkpoint" * 20)
    with pytest.raises(UserError) as e:
        load_dissolver(junk, "cpu")
    assert_one_line(e, "not a torch checkpoint")

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_dissolver(empty, "cpu")
    assert_one_line(e, "empty")

    resnet = tmp_path / "resnet.pt"  # another network's checkpoint
    torch.save({"state_dict": torch.nn.Linear(4, 2).state_dict(), "epoch": 3}, resnet)
    with pytest.raises(UserError) as e:
        load_dissolver(resnet, "cpu")
    assert_one_line(e, "not a dissolver checkpoint", "state_dict")

    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Conv2d(3, 3, 1).state_dict(), bare)
    with pytest.raises(UserError) as e:
        load_dissolver(bare, "cpu")
    assert_one_line(e, "not a dissolver checkpoint")

    trainer = tmp_path / "trainer.pt"  # the package Trainer's own format
    torch.save({"step": 5, "model": {}, "ema": {}, "opt": {}, "version": "2.3.4"}, trainer)
    with pytest.raises(UserError) as e:
        load_dissolver(trainer, "cpu")
    assert_one_line(e, "Trainer checkpoint")

    pick = tmp_path / "obj.pkl"  # a pickle of arbitrary Python objects
    with open(pick, "wb") as fh:
        pickle.dump({"kind": _Foreign()}, fh)
    with pytest.raises(UserError) as e:
        load_dissolver(pick, "cpu")
    assert_one_line(e, "plain Python pickle")

    objs = tmp_path / "objs.pt"  # a torch file holding arbitrary Python objects
    torch.save({"kind": "dia_dissolver", "args": argparse.Namespace(lr=0.1)}, objs)
    with pytest.raises(UserError) as e:
        load_dissolver(objs, "cpu")
    assert_one_line(e, "not a dissolver checkpoint", "argparse.Namespace")

    with pytest.raises(UserError) as e:  # resolution mismatch
        load_dissolver(good, "cpu", expect_resolution=64)
    assert_one_line(e, "32 px", "--diff_resolution asks for 64", "--diff_resolution 32")

    with pytest.raises(UserError) as e:  # channel mismatch
        load_dissolver(good, "cpu", expect_channels=1)
    assert_one_line(e, "3-channel", "1 channels")

    ck = torch.load(good, weights_only=True)
    future = tmp_path / "future.pt"
    torch.save(dict(ck, format_version=99), future)
    with pytest.raises(UserError) as e:
        load_dissolver(future, "cpu")
    assert_one_line(e, "format version 99")

    damaged = tmp_path / "damaged.pt"
    torch.save({k: v for k, v in ck.items() if k != "ema_state"}, damaged)
    with pytest.raises(UserError) as e:
        load_dissolver(damaged, "cpu")
    assert_one_line(e, "missing ema_state")

    wrong = tmp_path / "wrong.pt"  # config says one net, weights are of another
    torch.save(dict(ck, config=tiny_config(unet_dim=16)), wrong)
    with pytest.raises(UserError) as e:
        load_dissolver(wrong, "cpu")
    assert_one_line(e, "do not fit")


def test_built_from_stored_config(tmp_path):
    path = tmp_path / "d64.pt"
    save_tiny(path, image_size=64, dim_mults=(1, 2, 2))
    d, info = load_dissolver(path, "cpu", expect_resolution=64)
    assert tuple(d.image_size) == (64, 64) and len(d.model.downs) == 3


# --------------------------------------------------------------------------- the script


def _run(args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_script_train_resume_eval(tmp_path):
    from diffusion_models import train_eval_ddpm as script

    # train, run from inside diffusion_models/ as the paper's README does
    ckpt = tmp_path / "ck" / "synth.pt"
    r = _run(["train_eval_ddpm.py", "--mode", "train", "--dataset", "synth_lesion", "--max_steps", "3",
              "--save_path", str(ckpt), *TINY], cwd=os.path.join(ROOT, "diffusion_models"))
    assert r.returncode == 0, r.stderr
    d, info = load_dissolver(ckpt, "cpu", expect_resolution=32)
    assert info["meta"]["steps"] == 3 and info["meta"]["dataset"] == "synth_lesion"
    assert info["config"]["unet_dim"] == 8
    ts = read_dissolver_checkpoint(ckpt)["train_state"]
    assert (ts["step"], ts["epoch"], ts["batch_in_epoch"]) == (3, 0, 3)

    # --resume continues from the saved step (in-process: same code path, no interpreter start-up)
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--max_steps", "5", "--save_path", str(ckpt),
                 "--resume", *TINY])
    resumed = read_dissolver_checkpoint(ckpt)
    assert resumed["train_state"]["step"] == 5 and resumed["meta"]["steps"] == 5

    # ... and exactly: 3 + 2 steps equal 5 uninterrupted steps
    straight = tmp_path / "straight.pt"
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--max_steps", "5", "--save_path",
                 str(straight), *TINY])
    ref = read_dissolver_checkpoint(straight)
    for key in ("model_state", "ema_state"):
        for name, tensor in ref[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)

    # an existing checkpoint is not overwritten by accident
    with pytest.raises(SystemExit) as e:
        script.main(["--mode", "train", "--dataset", "synth_lesion", "--save_path", str(ckpt), *TINY])
    assert e.value.code == 2

    # eval writes a readable PNG grid: input row + one row per timestep
    png = tmp_path / "grid.png"
    script.main(["--mode", "eval", "--dataset", "synth_lesion", "--diffusion_model_path", str(ckpt),
                 "--timesteps_to_show", "10", "50", "--n_show", "4", "--out", str(png)])
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        # 4 images per row, 3 rows, 32-px images enlarged 3x to 96 px, 2-px padding
        assert im.size == (2 + 4 * 98, 2 + 3 * 98)
    assert sorted(os.listdir(tmp_path)) == ["ck", "grid.png", "straight.pt"]


def test_script_bad_input_is_one_line(tmp_path):
    r = _run([SCRIPT, "--mode", "eval", "--dataset", "synth_lesion", "--diffusion_model_path",
              str(tmp_path / "missing.pt")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--mode train" in r.stderr
    r = _run([SCRIPT, "--mode", "train", "--dataset", "no_such_set", "--save_path", str(tmp_path / "x.pt")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unknown dataset" in r.stderr
    assert not os.listdir(tmp_path)  # nothing half-written
