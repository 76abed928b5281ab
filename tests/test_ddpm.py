"""The dissolver DDPM: config, L1 loss, checkpoints and their errors, the training script, the
dissolving grid (eval_dissolver.py) and the MAC counts."""
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
from diffusion_models.ddpm import ddpm_config, load_dissolver, read_dissolver_checkpoint, save_dissolver
from helpers import ROOT, TINY_DDPM, tiny_ddpm_config, tiny_diffusion

SCRIPT = os.path.join(ROOT, "diffusion_models", "train_eval_ddpm.py")
EVAL_SCRIPT = os.path.join(ROOT, "eval_dissolver.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny(path, seed=0, **kw):
    d, e = tiny_diffusion(seed, **kw), tiny_diffusion(seed + 1, **kw)
    save_dissolver(path, d, e, tiny_ddpm_config(**kw), {"dataset": "synth_lesion", "one_class_idx": 0, "steps": 7})
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


def test_build_is_the_papers_package_network():
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import cosine_beta_schedule

    assert ddpm.package_version() == "0.27.12"
    d = tiny_diffusion()
    assert type(d) is GaussianDiffusion and type(d.model) is Unet
    assert d.objective == "pred_noise" and d.loss_type == "l1"
    assert torch.allclose(d.betas, cosine_beta_schedule(1000).float())
    assert d.image_size == 32 and d.num_timesteps == 1000 and d.sampling_timesteps == 10
    # the paper's UNet: 36.25 M parameters, strided 4x4 convolutions between stages
    assert round(ddpm.unet_parameter_count(ddpm_config()) / 1e6, 2) == 36.25
    down = d.model.downs[0][3]
    assert isinstance(down, torch.nn.Conv2d) and down.kernel_size == (4, 4) and down.stride == (2, 2)


def test_other_package_version_is_refused(monkeypatch):
    monkeypatch.setattr(ddpm, "package_version", lambda: "2.1.1")
    with pytest.raises(UserError) as e:
        tiny_diffusion()
    assert_one_line(e, "0.27.12", "2.1.1", "setup.sh")


@pytest.mark.parametrize("kw, needle", [(dict(image_size=31), "divisible"), (dict(objective="x"), "objective"),
                                        (dict(beta_schedule="x"), "schedule"), (dict(loss_type="x"), "loss"),
                                        (dict(sampling_timesteps=2000), "sampling_timesteps")])
def test_bad_config_is_user_error(kw, needle):
    with pytest.raises(UserError) as e:
        tiny_ddpm_config(**kw)
    assert_one_line(e, needle)


def test_l1_loss_is_mean_abs_error():
    d = tiny_diffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([5, 300, 999])
    loss = d.p_losses(x0, t, noise=noise)
    ac = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    with torch.no_grad():
        hand = (d.model(x_t, t) - noise).abs().mean()
    assert torch.allclose(loss.detach(), hand, atol=1e-6)
    d2 = tiny_diffusion(loss_type="l2")
    loss2 = d2.p_losses(x0, t, noise=noise)
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
    assert torch.equal(_predict(loaded, x), _predict(online, x))  # online weights by default, as the paper
    assert not torch.equal(_predict(loaded, x), _predict(ema, x))
    averaged, _ = load_dissolver(path, torch.device("cpu"), weights="ema")
    assert torch.equal(_predict(averaged, x), _predict(ema, x))
    assert info["config"] == tiny_ddpm_config() and info["format"] == "ours" and info["weights"] == "online"
    meta = info["meta"]
    assert (meta["dataset"], meta["one_class_idx"], meta["steps"]) == ("synth_lesion", 0, 7)
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

    trainer = tmp_path / "trainer.pt"  # a Trainer-shaped file whose 'model' is not the 0.27.12 network
    torch.save({"step": 5, "model": {"w": torch.zeros(2)}, "ema": {}, "opt": {}, "scaler": None}, trainer)
    with pytest.raises(UserError) as e:
        load_dissolver(trainer, "cpu")
    assert_one_line(e, "Trainer checkpoint", "0.27.12")

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
    old = tmp_path / "old.pt"  # format 1 held the 2.x network
    torch.save(dict(ck, format_version=1), old)
    with pytest.raises(UserError) as e:
        load_dissolver(old, "cpu")
    assert_one_line(e, "format version 1", "2.x network", "retrain")

    nan = tmp_path / "nan.pt"  # a diverged file written by older code is refused, not used
    poisoned = dict(ck["model_state"])
    poisoned["model.final_conv.weight"] = poisoned["model.final_conv.weight"] * float("nan")
    torch.save(dict(ck, model_state=poisoned), nan)
    with pytest.raises(UserError) as e:
        load_dissolver(nan, "cpu")
    assert_one_line(e, "NaN or infinity", "model.final_conv.weight")

    damaged = tmp_path / "damaged.pt"
    torch.save({k: v for k, v in ck.items() if k != "ema_state"}, damaged)
    with pytest.raises(UserError) as e:
        load_dissolver(damaged, "cpu")
    assert_one_line(e, "missing ema_state")

    wrong = tmp_path / "wrong.pt"  # config says one net, weights are of another
    torch.save(dict(ck, config=tiny_ddpm_config(unet_dim=16)), wrong)
    with pytest.raises(UserError) as e:
        load_dissolver(wrong, "cpu")
    assert_one_line(e, "do not fit")


def test_built_from_stored_config(tmp_path):
    path = tmp_path / "d64.pt"
    save_tiny(path, image_size=64, dim_mults=(1, 2, 2))
    d, info = load_dissolver(path, "cpu", expect_resolution=64)
    assert d.image_size == 64 and len(d.model.downs) == 3


def test_non_finite_state_is_never_written(tmp_path):
    d, e = tiny_diffusion(), tiny_diffusion(1)
    with torch.no_grad():
        e.model.final_conv.bias.fill_(float("inf"))
    path = tmp_path / "d.pt"
    with pytest.raises(UserError) as exc:
        save_dissolver(path, d, e, tiny_ddpm_config(), {"dataset": "synth_lesion"})
    assert_one_line(exc, "NaN or infinity", "final_conv.bias")
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- the script


def _run(args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_script_train_resume_eval(tmp_path):
    import eval_dissolver
    from diffusion_models import train_eval_ddpm as script

    # train, run from inside diffusion_models/ as the paper's README does
    ckpt = tmp_path / "ck" / "synth.pt"
    r = _run(["train_eval_ddpm.py", "--mode", "train", "--dataset", "synth_lesion", "--train_steps", "3",
              "--save_every", "2", "--save_path", str(ckpt), *TINY_DDPM],
             cwd=os.path.join(ROOT, "diffusion_models"))
    assert r.returncode == 0, r.stderr
    assert "milestone: step 2" in r.stdout and "final: step 3" in r.stdout, r.stdout
    d, info = load_dissolver(ckpt, "cpu", expect_resolution=32)
    assert info["meta"]["steps"] == 3 and info["meta"]["dataset"] == "synth_lesion"
    assert info["config"]["unet_dim"] == 8 and info["meta"]["images_seen"] == 3 * 8
    ts = read_dissolver_checkpoint(ckpt)["train_state"]
    assert (ts["step"], ts["epoch"], ts["pos"]) == (3, 0, 3)

    # --resume continues by steps (in-process: same code path, no interpreter start-up)
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "5", "--save_every", "2",
                 "--save_path", str(ckpt), "--resume", *TINY_DDPM])
    resumed = read_dissolver_checkpoint(ckpt)
    assert resumed["train_state"]["step"] == 5 and resumed["meta"]["steps"] == 5

    # ... and exactly: 3 + 2 steps equal 5 uninterrupted steps
    straight = tmp_path / "straight.pt"
    script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "5", "--save_path",
                 str(straight), *TINY_DDPM])
    ref = read_dissolver_checkpoint(straight)
    for key in ("model_state", "ema_state"):
        for name, tensor in ref[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)

    # a resume that would change the recipe is refused, and the file is left alone
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        script.main(["--mode", "train", "--dataset", "synth_lesion", "--train_steps", "6", "--save_path", str(ckpt),
                     "--resume", *TINY_DDPM, "--lr", "1e-3"])
    assert e.value.code == 2 and ckpt.read_bytes() == before

    # an existing checkpoint is not overwritten by accident
    with pytest.raises(SystemExit) as e:
        script.main(["--mode", "train", "--dataset", "synth_lesion", "--save_path", str(ckpt), *TINY_DDPM])
    assert e.value.code == 2

    # eval_dissolver.py writes a readable, labelled PNG grid: input row + one row per timestep
    png = tmp_path / "grid.png"
    eval_dissolver.main(["--dataset", "synth_lesion", "--diffusion_model_path", str(ckpt),
                         "--timesteps_to_show", "10", "50", "--n_show", "4", "--out", str(png)])
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        # 4 images per row, 3 rows, 32-px images drawn about 96 px wide, with the row and column labels around
        assert im.format == "PNG" and im.size[0] > 4 * 96 and im.size[1] > 3 * 96
    assert sorted(os.listdir(tmp_path)) == ["ck", "grid.json", "grid.png", "straight.pt"]
    import json

    quality = json.loads((tmp_path / "grid.json").read_text())
    assert quality["grid"] == {"n_normal": 2, "n_anomalous": 2, "timesteps": [10, 50]}
    assert [r["t"] for r in quality["timesteps"]] == [10, 50] and quality["n_images"] == 256
    for row in quality["timesteps"]:
        assert -1e3 < row["hf_removed"] <= 1 and row["lf_change"] >= 0 and row["n_images"] == 256
        assert "removal_ratio" in row and "tissue_change" in row


def test_optimiser_step_accumulates_and_clips():
    """Two micro-batches, clipping at 0.05: against a hand computation of the same step."""
    from diffusion_models.trainer import accumulate_and_step

    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(3, 3, 32, 32, generator=g) for _ in range(2)]
    d = tiny_diffusion(5)
    ref = tiny_diffusion(5)
    opt = torch.optim.SGD(d.parameters(), lr=0.5)
    torch.manual_seed(11)
    loss, norm = accumulate_and_step(d, opt, batches, grad_clip=0.05)

    torch.manual_seed(11)  # the same t and noise draws, in the same order
    grads = [torch.zeros_like(p) for p in ref.parameters()]
    total = 0.0
    for x in batches:
        ref.zero_grad()
        lo = ref(x)
        lo.backward()
        total += lo.item() / 2
        for acc, p in zip(grads, ref.parameters()):
            acc += p.grad / 2
    hand_norm = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)).item()
    assert hand_norm > 0.05  # clipping is active
    assert abs(norm - hand_norm) < 1e-4 * hand_norm and abs(loss - total) < 1e-6
    scale = 0.05 / (hand_norm + 1e-6)
    with torch.no_grad():
        for p, q, gr in zip(d.parameters(), ref.parameters(), grads):
            assert torch.allclose(p, q - 0.5 * scale * gr, atol=1e-6)


@pytest.mark.slow
def test_script_bad_input_is_one_line(tmp_path):
    r = _run([EVAL_SCRIPT, "--dataset", "synth_lesion", "--diffusion_model_path", str(tmp_path / "missing.pt")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--mode train" in r.stderr
    r = _run([SCRIPT, "--mode", "train", "--dataset", "no_such_set", "--save_path", str(tmp_path / "x.pt")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unknown dataset" in r.stderr
    assert not os.listdir(tmp_path)  # nothing half-written


def test_macs_split_weight_standardised_convolutions():
    """thop's default count skips the WS convolutions (the paper's figure); the full count adds
    exactly their multiply-accumulates, computed here from hooked output shapes."""
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import WeightStandardizedConv2d

    from diffusion_models.macs import unet_macs

    unet = ddpm.build_unet(tiny_ddpm_config()).eval()
    as_paper, every = unet_macs(unet, 32)
    ws = []

    def hook(m, inp, out):
        ws.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in unet.modules() if type(m) is WeightStandardizedConv2d]
    with torch.no_grad():
        unet(torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    for h in handles:
        h.remove()
    assert len(ws) > 0 and every - as_paper == pytest.approx(sum(ws), rel=1e-6)
    assert "total_ops" not in dict(unet.named_buffers())  # thop's counters removed


def test_macs_table_counts_the_unet_of_the_flags(capsys):
    """benchmarks/dissolver_macs.py: one line per resolution, thop's count beside the full one and
    the paper's figure, the same numbers as diffusion_models.macs."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import dissolver_macs
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    from diffusion_models.macs import config_macs

    dissolver_macs.main(["--image_size", "32", "--unet_dim", "8", "--dim_mults", "1", "2"])
    out = capsys.readouterr().out
    as_paper, every = config_macs(tiny_ddpm_config())
    line = [row for row in out.splitlines() if row.startswith("  32 px:")]
    assert len(line) == 1, out
    assert f"thop {as_paper / 1e9:6.2f} GMACs, all convolutions {every / 1e9:6.2f} GMACs" in line[0]
    assert line[0].endswith("(paper: 2.33 G)")


@pytest.mark.slow
@pytest.mark.parametrize("mode, program", [("eval", "eval_dissolver.py"), ("macs", "dissolver_macs.py")])
def test_other_modes_name_their_program(tmp_path, mode, program):
    """--mode eval and --mode macs: one line naming the program that does that work, with the
    flags given (without --mode), and exit 2; nothing is read or written."""
    r = _run(["train_eval_ddpm.py", "--mode", mode, "--dataset", "synth_lesion", "--diffusion_model_path",
              str(tmp_path / "d.pt"), "--out", str(tmp_path / "grid.png")], cwd=os.path.join(ROOT, "diffusion_models"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    where = "../eval_dissolver.py" if mode == "eval" else "../benchmarks/dissolver_macs.py"
    assert r.stderr.startswith(f"error: --mode {mode}: ") and program in r.stderr, r.stderr
    assert r.stderr.strip().endswith(f"run: python {where} --dataset synth_lesion --diffusion_model_path "
                                     f"{tmp_path / 'd.pt'} --out {tmp_path / 'grid.png'}"), r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unwritable_output_is_found_before_any_work(tmp_path, monkeypatch, mode):
    """/proc cannot hold new files: the DDPM says so before it trains, eval_dissolver.py before it
    draws anything."""
    import eval_dissolver
    from diffusion_models import train_eval_ddpm as script

    ckpt = tmp_path / "d.pt"
    save_tiny(ckpt)
    calls = []
    program, loader = (script, "_load_data") if mode == "train" else (eval_dissolver, "load_test_split")
    monkeypatch.setattr(program, loader, lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    out = "/proc/dia-such.pt" if mode == "train" else "/proc/dia-grid.png"  # as root, os.access(/proc) says yes
    argv = (["--mode", "train", "--dataset", "synth_lesion", "--save_path", out, *TINY_DDPM] if mode == "train" else
            ["--dataset", "synth_lesion", "--diffusion_model_path", str(ckpt), "--out", out])
    with pytest.raises(SystemExit) as e:
        program.main(argv)
    assert e.value.code == 2 and not calls


def test_papers_dataset_names_are_understood(tmp_path, capsys):
    """The paper's DDPM script calls covid 'sars-covid' and the MedMNIST sets 'pneumonia' etc."""
    from diffusion_models import train_eval_ddpm as script

    for paper, ours in (("sars-covid", "covid"), ("pneumonia", "pneumoniamnist")):
        with pytest.raises(SystemExit) as e:  # no data here: the error names our dataset's files
            script.main(["--mode", "train", "--dataset", paper, "--data_root", str(tmp_path),
                         "--save_path", str(tmp_path / "d.pt"), *TINY_DDPM])
        captured = capsys.readouterr()
        assert e.value.code == 2
        assert f"--dataset {paper} is the paper's name for {ours}" in captured.out
        assert "unknown dataset" not in captured.err and ours in captured.err.lower()
