"""The paper's pipeline on the built-in dataset: tiny DDPM -> simclr_DIA -> eval.py."""
import json

import pytest
import torch

import eval as eval_program
import train as train_program
from cli.args import parse_args
from datasets import get_dataset
from helpers import TINY_TRAIN_NO_EVAL

pytestmark = pytest.mark.slow  # every test needs the trained tiny dissolver; most train a DIA model with it
from models.resnet import build_model
from training.config import TrainConfig
from training.trainer import Trainer


def evaluate(load_path, out):
    eval_program.main(["--mode", "ood_pre", "--dataset", "synth_lesion", "--model", "resnet18", "--ood_score", "CSI",
                       "--shift_trans_type", "rotation", "--print_score", "--diffusion_upper_offset", "0.",
                       "--diffusion_offset", "0.", "--ood_samples", "1", "--resize_factor", "0.54", "--resize_fix",
                       "--one_class_idx", "0", "--load_path", str(load_path), "--save_results", str(out),
                       "--ood_batch_size", "500"])
    return json.loads(out.read_text())


def test_diffusion_rotation_end_to_end(tiny_dissolver, tmp_path):
    logdir = tmp_path / "dia"
    summary = train_program.main(TINY_TRAIN_NO_EVAL + ["--mode", "simclr_DIA", "--shift_trans_type",
                                                       "diffusion_rotation", "--diff_resolution", "32",
                                                       "--diffusion_model_path", str(tiny_dissolver),
                                                       "--logdir", str(logdir)])
    assert summary["step"] == 2
    ckpt = torch.load(logdir / "last.model", weights_only=False)
    assert ckpt["meta"]["args"]["shift_trans_type"] == "diffusion_rotation"
    # the dissolver's weights stay out of the contrastive model's checkpoint
    assert not any("diffusion" in k or "unet" in k.lower() for k in ckpt["model"])
    res = evaluate(logdir / "last.model", tmp_path / "res.json")
    for v in res["auroc"].values():
        assert 0.0 <= v <= 1.0


def test_dissolved_views_are_the_third_chunk(tiny_dissolver):
    """make_views puts K dissolved, shifted views after the 2K ordinary ones."""
    P = parse_args("train", TINY_TRAIN_NO_EVAL + ["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation",
                                                  "--diffusion_model_path", str(tiny_dissolver)])
    _, _, info = get_dataset("synth_lesion", "../data")
    dev = torch.device("cpu")
    model = build_model("resnet18", 2, simclr_dim=16, n_shifts=4, width=8)
    trainer = Trainer(TrainConfig.from_flags(vars(P)), model, dev, dissolve=train_program.build_dissolve(P, dev, info))
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(0)
    views, chunks = trainer.make_views(x)
    assert chunks == 3 and views.shape == (3 * 4 * 3, 3, 32, 32)
    v1 = views[:12]
    # chunk 1, block k is a rotation by k of a (possibly flipped) copy of x
    for k in range(4):
        back = torch.rot90(v1[3 * k:3 * k + 3], -k, dims=(2, 3))
        for i in range(3):
            assert torch.equal(back[i], x[i]) or torch.equal(back[i], x[i].flip(2))
    # the paper's input range: the dissolved chunk holds network outputs in [-1, 1], not copies of x
    v3 = views[24:]
    assert v3.min() >= -1 and v3.max() <= 1
    assert not torch.allclose(torch.rot90(v3[:3], 0, dims=(2, 3)), x, atol=1e-3)


@pytest.mark.parametrize("shift,extra", [
    ("blurgaussian_rotation", ["--kernel_size", "3"]),
    ("blurmedian_cutperm", ["--resize_to_constant", "--diff_resolution", "16"]),
    ("diffusion_cutperm", ["--diffusion_range_correct", "--loss_mode", "naive", "--diffusion_scheduler",
                           "beta_by_epoch"]),
])
def test_other_shift_types_train(tiny_dissolver, tmp_path, shift, extra):
    args = TINY_TRAIN_NO_EVAL + ["--mode", "simclr_DIA", "--shift_trans_type", shift, "--logdir", str(tmp_path / shift),
                                 *extra]
    if shift.startswith("diffusion"):
        args += ["--diffusion_model_path", str(tiny_dissolver)]
    summary = train_program.main(args)
    assert summary["step"] == 2
    ckpt = torch.load(tmp_path / shift / "last.model", weights_only=False)
    assert torch.isfinite(torch.cat([v.float().flatten() for v in ckpt["model"].values()])).all()


def test_wrong_resolution_dissolver_is_one_line(tiny_dissolver, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_program.main(TINY_TRAIN_NO_EVAL + ["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation",
                                                 "--diffusion_model_path", str(tiny_dissolver), "--diff_resolution",
                                                 "64", "--logdir", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "32" in err and "64" in err
    assert not (tmp_path / "x").exists()
