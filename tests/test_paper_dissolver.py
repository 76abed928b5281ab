"""The paper's dissolver: a ``model-<milestone>.pt`` written by the package's own ``Trainer``
loads, and dissolves exactly as the paper's shift layer does (pre-process, ``p_sample(x, t)[1]``,
post-process) for 32-, 28- and 224-px images; ``train.py`` trains with it."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from common.errors import UserError
from diffusion_models.ddpm import load_dissolver
from datasets.resolution import to_dissolve_resolution
from models.dissolve import Dissolver

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def paper_ckpt(tmp_path_factory):
    """``model-5.pt`` saved by denoising_diffusion_pytorch 0.27.12's Trainer, online and EMA weights differing."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    root = tmp_path_factory.mktemp("paper")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=32, timesteps=1000,
                                  sampling_timesteps=250, loss_type="l1")
    trainer = Trainer(diffusion, str(folder), train_batch_size=2, train_num_steps=1, results_folder=str(root / "out"),
                      ema_update_every=1)
    trainer.ema.update()  # the EMA starts as a copy of the online weights ...
    with torch.no_grad():  # ... which then move on
        for p in diffusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.step = 156_250
    trainer.save(5)
    path = root / "out" / "model-5.pt"
    assert path.exists()
    return path, diffusion, trainer.ema.ema_model


def paper_dissolve(diffusion, x, t, kind):
    """What the paper's shift layer computes for one chunk: pre -> p_sample(x, t)[1] -> post."""
    if kind == "small32":
        pre, post = torch.nn.Identity(), torch.nn.Identity()
    elif kind == "medmnist28":
        pre, post = T.Pad(2), T.CenterCrop(28)
    else:  # torchvision Resize on tensors, antialias off as in the paper's torchvision
        pre, post = T.Resize((32, 32), antialias=False), T.Resize((224, 224), antialias=False)
    with torch.no_grad():
        return post(diffusion.p_sample(pre(x), t)[1])


@pytest.mark.parametrize("kind, size", [("small32", 32), ("medmnist28", 28), ("large224", 224)])
def test_trainer_checkpoint_dissolves_as_the_paper(paper_ckpt, kind, size, capsys):
    path, online, ema = paper_ckpt
    online.eval()
    d = Dissolver.from_checkpoint(path, device="cpu", native_kind=kind, diff_resolution=32)
    note = capsys.readouterr().err
    assert "does not describe itself" in note and "paper's settings" in note and "online" in note
    assert d.info["format"] == "paper_trainer" and d.info["meta"]["steps"] == 156_250
    assert d.info["config"]["unet_dim"] == 8 and d.info["config"]["dim_mults"] == [1, 2]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, size, size, generator=g)
    ts = [12, 87]  # two chunks of three images, each with its own timestep
    out = d(x, ts)
    ref = torch.cat([paper_dissolve(online, x[:3], 12, kind), paper_dissolve(online, x[3:], 87, kind)])
    assert out.shape == x.shape
    assert (out - ref).abs().max().item() < 1e-4
    # the EMA weights, on request
    e = Dissolver.from_checkpoint(path, native_kind=kind, weights="ema")
    ref_ema = paper_dissolve(ema.eval(), x[:3], 12, kind)
    assert (e(x[:3], [12]) - ref_ema).abs().max().item() < 1e-4
    assert (ref_ema - ref[:3]).abs().max().item() > 1e-3  # the two weight sets really differ


def test_resize_has_no_antialiasing():
    x = torch.rand(2, 3, 224, 224)
    y, undo = to_dissolve_resolution(x, "large224", 32)
    assert torch.equal(y, F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False))
    assert not torch.allclose(y, F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True), atol=1e-3)
    z = torch.rand(2, 3, 32, 32)
    assert torch.equal(undo(z), F.interpolate(z, size=(224, 224), mode="bilinear", align_corners=False,
                                              antialias=False))


@pytest.mark.slow
def test_trainer_checkpoint_in_eval_dissolver(paper_ckpt, tmp_path):
    import eval_dissolver

    path, _, _ = paper_ckpt
    png = tmp_path / "grid.png"
    eval_dissolver.main(["--dataset", "synth_lesion", "--diffusion_model_path", str(path),
                         "--timesteps_to_show", "10", "--n_show", "2", "--out", str(png)])
    with Image.open(png) as im:  # 2 images, 2 rows, drawn about 96 px wide, labelled
        assert im.format == "PNG" and im.size[0] > 2 * 96 and im.size[1] > 2 * 96


@pytest.mark.slow
def test_trainer_checkpoint_trains_a_dia_model(paper_ckpt, tmp_path):
    import train

    path, _, _ = paper_ckpt
    logdir = tmp_path / "run"
    summary = train.main(["--dataset", "synth_lesion", "--mode", "simclr_DIA", "--shift_trans_type",
                          "diffusion_rotation", "--diffusion_model_path", str(path), "--resnet_width", "8",
                          "--batch_size", "4", "--epochs", "1", "--max_steps", "2", "--no_eval", "--scoring_samples", "0",
                          "--logdir", str(logdir), "--device", "cpu"])
    assert summary["step"] == 2 and os.path.isfile(logdir / "last.model")


def test_trainer_checkpoint_without_ema_asks_for_online(tmp_path, paper_ckpt):
    path, _, _ = paper_ckpt
    ck = torch.load(path, weights_only=True)
    bare = tmp_path / "model-1.pt"
    torch.save(dict(ck, ema={}), bare)
    with pytest.raises(UserError) as e:
        load_dissolver(bare, "cpu", weights="ema")
    assert "online" in str(e.value) and "\n" not in str(e.value)
    load_dissolver(bare, "cpu", quiet=True)  # the online weights still load


def test_ddpm_images_come_from_the_original_files(tmp_path):
    """Folder data: each original file resized to 32 px without antialiasing (not the 224-px copy)."""
    from datasets import get_dataset, one_class_split
    from diffusion_models.ddpm_data import ddpm_training_images

    rng = np.random.default_rng(4)
    originals = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)  # larger than 224, not square
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
                if split == "train" and cls == "a":
                    originals[f"{i}.png"] = arr
    train_set, test_set, info = get_dataset("imagefolder", str(tmp_path))
    normal, _ = one_class_split(train_set, test_set, info, 0)
    got = ddpm_training_images(normal, info.native_kind, 32)
    want = torch.stack([F.interpolate(torch.from_numpy(originals[f"{i}.png"]).permute(2, 0, 1)[None].float() / 255,
                                      size=(32, 32), mode="bilinear", align_corners=False, antialias=False)[0]
                        for i in range(2)])
    assert got.shape == (2, 3, 32, 32)
    assert (got - want).abs().max().item() < 1e-6
    via_224 = to_dissolve_resolution(normal.get_batch(torch.arange(2))[0], "large224", 32)[0]
    assert (via_224 - want).abs().max().item() > 1e-2  # the 224-px copy would give other images
    # in-memory data: the stored images through the dissolving pre-processing (MedMNIST: pad 2)
    x = torch.rand(3, 3, 28, 28)

    class Mem:
        def __len__(self):
            return 3

        def get_batch(self, idx):
            return x[idx], torch.zeros(len(idx))

    assert torch.equal(ddpm_training_images(Mem(), "medmnist28", 32), F.pad(x, (2, 2, 2, 2)))
