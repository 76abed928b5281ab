"""What the test modules share: the repository root, each program's tiniest flags, the check of a
refused command, synthetic images, and reading what reproduce.py writes.

Test modules import it as ``helpers`` (tests/ is on ``sys.path``: conftest.py puts it there);
fixtures live in conftest.py.
"""
import contextlib
import csv
import io
import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- the tiniest flags of each program

# train.py on synth_lesion: ResNet width 8, batches of 8, 2 steps an epoch (the paper's rule: an epoch stops
# after the batch numbered --max_batches_per_epoch, counted from 0: batches 0 and 1), saved and logged every
# epoch/step; no scoring reference (last.scoring.pt: tests/test_score_folder.py trains its own)
TINY_TRAIN = ["--dataset", "synth_lesion", "--resnet_width", "8", "--batch_size", "8", "--max_batches_per_epoch", "1",
              "--simclr_dim", "16", "--warmup", "1", "--save_step", "1", "--log_every", "1", "--scoring_samples", "0"]
# the same on digits (10 classes: one_class_mean differs from pooled)
TINY_TRAIN_DIGITS = [a if a != "synth_lesion" else "digits" for a in TINY_TRAIN]
# the same on digits: the multi-class and OOD-set runs
TINY_MULTICLASS = TINY_TRAIN_DIGITS
# train.py on synth_lesion for one epoch of 2 steps (batches 0 and 1) without evaluation: the dissolving-shift
# pipeline
TINY_TRAIN_NO_EVAL = ["--dataset", "synth_lesion", "--resnet_width", "8", "--batch_size", "8",
                      "--max_batches_per_epoch", "1", "--simclr_dim", "16", "--warmup", "1", "--epochs", "1",
                      "--no_eval", "--scoring_samples", "0"]
# CSI's shift: train.py's simclr_CSI with rotation
CSI = ["--mode", "simclr_CSI", "--shift_trans_type", "rotation"]

# the dissolver's trainer (diffusion_models/train_eval_ddpm.py): UNet dim 8, batches of 8, no progress bar
TINY_DDPM = ["--unet_dim", "8", "--dim_mults", "1", "2", "--batch_size", "8", "--grad_accum", "1", "--no_progress"]


def tiny_ddpm_config(**kw):
    """The dissolver's configuration at its tiniest (UNet dim 8, two levels, 10 sampling steps), with ``kw`` over it."""
    from diffusion_models.ddpm import ddpm_config

    return ddpm_config(**dict(dict(unet_dim=8, dim_mults=(1, 2), sampling_timesteps=10), **kw))


def tiny_diffusion(seed=0, **kw):
    """A freshly initialised diffusion model of ``tiny_ddpm_config(**kw)``, its weights drawn after ``seed``."""
    from diffusion_models.ddpm import build_diffusion

    torch.manual_seed(seed)
    return build_diffusion(tiny_ddpm_config(**kw))

# reproduce.py: synth_lesion class 0, seed 0, 2 training steps, a dissolver of 2 steps measured on 16 images, on
# the CPU
TINY_STUDY = ["--dataset", "synth_lesion", "--one_class_idx", "0", "--seeds", "0",
              "--resnet_width", "8", "--batch_size", "8", "--epochs", "1", "--max_steps", "2", "--log_every", "1",
              "--ood_samples", "1", "--selection_samples", "1", "--device", "cpu",
              "--ddpm_unet_dim", "8", "--ddpm_train_steps", "2", "--ddpm_batch_size", "8", "--ddpm_grad_accum", "1",
              "--dissolver_quality_images", "16"]


# --------------------------------------------------------------------------- a refused command


def expect_error(main, argv, capsys, *fragments, alone=False):
    """``main(argv)`` refuses: exit status 2, no traceback, and the last non-blank line of stderr is its
    only line "error: ...", holding every one of ``fragments``. With ``alone``, stderr holds nothing
    else but lines "warning: ...". Returns the error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = [ln for ln in stderr.splitlines() if ln.strip()]
    assert err and err[-1].startswith("error: "), err
    assert [ln for ln in err if ln.startswith("error: ")] == [err[-1]], err
    assert "Traceback" not in stderr
    if alone:
        assert [ln for ln in stderr.strip().splitlines() if not ln.startswith("warning: ")] == [err[-1]], err
    for frag in fragments:
        assert frag in err[-1], err[-1]
    return err[-1]


# --------------------------------------------------------------------------- tensors and checkpoints


def load(path):
    """A checkpoint as train.py and the DDPM trainer write it (pickled metadata included)."""
    return torch.load(path, weights_only=False)


def random_images(n, size=32, seed=0, channels=3):
    """``n`` images ``channels`` x ``size`` x ``size`` of uniform noise in [0, 1), seeded."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- image files


def write_image(path, rgb, size=(12, 10), mode="RGB", fmt=None):
    """A solid-colour image file (``size`` is (width, height)); ``mode`` "L" takes one grey value."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "L":
        img = Image.new("L", size, int(rgb))
    else:
        img = Image.new("RGB", size, tuple(int(v) for v in rgb))
    img.save(path, format=fmt)


def write_png(path, arr):
    """An H x W x 3 (or H x W) array of 0..255 values as a PNG file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def make_folder_dataset(root, classes, per_class=2, colours=None, splits=("train", "test")):
    """``root/{split}/<class>/img_<i>.png``; class ``c`` gets a solid colour (its index * 40)."""
    for split in splits:
        for ci, c in enumerate(classes):
            colour = colours[c] if colours else (ci * 40, 100, 200 - ci * 40)
            for i in range(per_class):
                write_image(os.path.join(root, split, c, f"img_{i}.png"), colour)


# --------------------------------------------------------------------------- reproduce.py in this process


def run_reproduce(argv, one_thread=False):
    """reproduce.main in this process, without a DIA_FAULT from the environment (and with
    ``one_thread``, its steps with one torch thread): (exit status, stdout, stderr, seconds)."""
    import reproduce

    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if one_thread:
            mp.setenv("OMP_NUM_THREADS", "1")
            mp.setenv("MKL_NUM_THREADS", "1")
        mp.delenv("DIA_FAULT", raising=False)
        try:
            rc = reproduce.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue(), time.time() - t0


def run_dir(out, transformation, seed=0):
    """The folder of one synth_lesion class-0 run at 32 px in a reproduce.py --out folder."""
    return os.path.join(out, "synth_lesion", "class_0", f"{transformation}_32px", f"seed_{seed}")


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def md_tables(path):
    """The markdown tables of results.md as lists of rows (lists of cells), header first."""
    tables, current = [], []
    with open(path) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("|"):
                if not re.fullmatch(r"\|(-+\|)+", line):
                    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                    current.append(cells)
            elif current:
                tables.append(current)
                current = []
    if current:
        tables.append(current)
    return tables
