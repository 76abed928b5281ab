"""One's own images: the folder layouts researchers have, the normal class chosen by name (never a
silent index 0), the size images are read at, and class folders renamed after training, all on
real image files."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_main
import train as train_main
from common.errors import UserError
from datasets import get_dataset, one_class_split
from datasets.base import decode_image
from datasets.normal_class import choose_normal_class
from datasets.registry import pick_normal_class
from diffusion_models.ddpm_data import ddpm_training_images
from helpers import expect_error, write_image

# normal images: bluish grey; anomalies: red (crack) or green (scratch); every image a shade of its own
COLOURS = {"normal": (50, 100, 150), "crack": (200, 40, 40), "scratch": (30, 190, 40)}
TINY = ["--mode", "simclr_CSI", "--shift_trans_type", "rotation", "--resnet_width", "8", "--simclr_dim", "16",
        "--batch_size", "8", "--epochs", "1", "--img_size", "16", "--ood_samples", "1", "--log_every", "1"]
EVAL_TINY = ["--resnet_width", "8", "--simclr_dim", "16", "--img_size", "16", "--ood_samples", "1"]


def write_class(folder, kind, n, size=(12, 10)):
    for i in range(n):
        write_image(os.path.join(folder, f"{i:03d}.png"), tuple(c + 3 * i for c in COLOURS[kind]), size=size)


def mvtec_tree(root, good="good"):
    """MVTec AD's layout: train/good, test/good, test/<defect>, and ground_truth/<defect> masks."""
    write_class(os.path.join(root, "train", good), "normal", 10)
    write_class(os.path.join(root, "test", good), "normal", 4)
    write_class(os.path.join(root, "test", "crack"), "crack", 3)
    write_class(os.path.join(root, "test", "scratch"), "scratch", 3)
    for i in range(3):  # masks are images too: they must never be read as data
        write_image(os.path.join(root, "ground_truth", "crack", f"{i:03d}_mask.png"), (255, 255, 255))
    return str(root)


def two_class_tree(root, normal, anomalous, train_anomalous=0):
    """``train/<normal>/`` (and ``train/<anomalous>/`` when ``train_anomalous``), ``test/`` with both."""
    write_class(os.path.join(root, "train", normal), "normal", 10)
    if train_anomalous:
        write_class(os.path.join(root, "train", anomalous), "crack", train_anomalous)
    write_class(os.path.join(root, "test", normal), "normal", 4)
    write_class(os.path.join(root, "test", anomalous), "crack", 4)
    return str(root)


# --------------------------------------------------------------------------- layouts


def test_mvtec_layout_reads_train_good_and_every_defect(tmp_path):
    root = mvtec_tree(tmp_path / "bottle")
    train, test, info = get_dataset("imagefolder", root, image_size=16)
    assert info.class_names == ["crack", "good", "scratch"]
    assert info.train_classes == ["good"]
    assert len(train) == 10 and set(train.labels.tolist()) == {1}
    assert sorted(test.labels.tolist()) == [0] * 3 + [1] * 4 + [2] * 3
    assert not any("ground_truth" in n for n in list(train.names) + list(test.names))
    idx, name = pick_normal_class("imagefolder", root)
    assert (idx, name) == (1, "good")
    normal, test = one_class_split(train, test, info, idx)
    assert len(normal) == 10


def test_normal_only_training_split(tmp_path):
    root = two_class_tree(tmp_path / "d", "healthy", "bleed")
    train, test, info = get_dataset("imagefolder", root, image_size=16)
    assert info.class_names == ["bleed", "healthy"] and info.train_classes == ["healthy"]
    # no folder is named good or normal: the only training class is the normal one
    assert pick_normal_class("imagefolder", root) == (1, "healthy")


def test_anomalous_folder_sorting_first_is_never_the_silent_default(tmp_path):
    # abnormal sorts before normal: index 0 would train on the anomalies
    root = two_class_tree(tmp_path / "a", "normal", "abnormal", train_anomalous=3)
    assert pick_normal_class("imagefolder", root) == (1, "normal")
    # no folder named good/normal and two training classes: refused, the classes listed
    root = two_class_tree(tmp_path / "b", "healthy", "bleed", train_anomalous=3)
    with pytest.raises(UserError) as exc:
        pick_normal_class("imagefolder", root)
    assert "--normal_class" in str(exc.value) and "0=bleed, 1=healthy" in str(exc.value)
    assert pick_normal_class("imagefolder", root, normal_class="healthy") == (1, "healthy")
    with pytest.raises(UserError, match="did you mean healthy"):
        pick_normal_class("imagefolder", root, normal_class="Healthy")
    with pytest.raises(UserError, match="give one of the two"):
        pick_normal_class("imagefolder", root, one_class_idx=0, normal_class="healthy")


def test_choose_normal_class_rules():
    assert choose_normal_class("d", ["Bad", "GOOD"], ["Bad", "GOOD"]) == 1          # any case
    assert choose_normal_class("d", ["a", "b"], ["a", "b"], one_class_idx=0) == 0   # the paper's index
    assert choose_normal_class("d", ["a", "b"], ["a", "b"], folder_dataset=False) == 0  # arrays: class 0
    with pytest.raises(UserError, match="out of range"):
        choose_normal_class("d", ["a", "b"], ["a"], one_class_idx=2)


@pytest.mark.parametrize("make, fragment", [
    (lambda r: mvtec_tree(r / "bottle") and mvtec_tree(r / "cable") and str(r), "point --data_root at one of them"),
    (lambda r: [write_class(str(r / "train"), "normal", 2), write_class(str(r / "test" / "x"), "normal", 2)]
     and str(r), "move them into a class folder"),
])
def test_layout_mistakes_get_one_line_saying_what_to_do(tmp_path, make, fragment):
    root = make(tmp_path)
    with pytest.raises(UserError) as exc:
        get_dataset("imagefolder", root, image_size=16)
    assert fragment in str(exc.value)


def test_a_test_split_without_anomalies_is_refused(tmp_path):
    root = tmp_path / "d"
    write_class(str(root / "train" / "good"), "normal", 4)
    write_class(str(root / "test" / "good"), "normal", 2)
    train, test, info = get_dataset("imagefolder", str(root), image_size=16)
    with pytest.raises(UserError, match="no anomaly can be found"):
        one_class_split(train, test, info, 0)


# --------------------------------------------------------------------------- the programs


def test_train_prints_class_and_size_and_eval_takes_the_run_class(tmp_path, capsys):
    root = two_class_tree(tmp_path / "data", "normal", "abnormal", train_anomalous=3)
    run = tmp_path / "run"
    summary = train_main.main(["--dataset", "imagefolder", "--data_root", root, "--logdir", str(run), *TINY])
    out = capsys.readouterr()
    assert "imagefolder: normal class normal (index 1)" in out.out
    assert "images read at 16x16 px (the files: median 10x12 px)" in out.out
    # 10x12-px files read at 16 px: upsampled, and the warning names the size that avoids it
    assert "21 of 21 images of imagefolder are smaller than 16x16 px and are upsampled; pass --img_size 10" in out.err
    assert "10 training images of class 1 (normal)" in (run / "log.txt").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["one_class_idx"] == 1 and config["normal_class"] == "normal"
    assert summary["best"]["best_CSI.model"]["value"] > 0.5  # the anomalies score as anomalies

    # eval.py with no class flag: the class the model was trained on, by name
    res = eval_main.main(["--dataset", "imagefolder", "--data_root", root, "--load_path", str(run / "last.model"),
                          *EVAL_TINY])
    assert res["one_class_idx"] == 1 and res["n_normal"] == 4 and res["n_anomalous"] == 4
    assert res["auroc"]["pooled"] > 0.5


def test_class_folders_renamed_after_training_are_refused(tmp_path, capsys):
    root = two_class_tree(tmp_path / "data", "good", "bad")
    run = tmp_path / "run"
    train_main.main(["--dataset", "imagefolder", "--data_root", root, "--logdir", str(run), *TINY])
    # renamed: 'good' -> 'ok' sorts after 'bad' still, but the name is gone; 'a_good' would move it to index 0
    for split in ("train", "test"):
        os.rename(os.path.join(root, split, "good"), os.path.join(root, split, "ok"))
    capsys.readouterr()
    err = expect_error(eval_main.main, ["--dataset", "imagefolder", "--data_root", root, "--load_path",
                                        str(run / "last.model"), *EVAL_TINY], capsys,
                       "trained with normal class good (index 1)", "there is no class good now")
    assert "0=bad, 1=ok" in err
    longer = [v if v != "1" or TINY[i - 1] != "--epochs" else "2" for i, v in enumerate(TINY)]
    expect_error(train_main.main, ["--dataset", "imagefolder", "--data_root", root, "--resume_path", str(run),
                                   *longer], capsys, "there is no class good now")
    for split in ("train", "test"):  # 'good' back, 'bad' now sorting after it: good's index moved from 1 to 0
        os.rename(os.path.join(root, split, "ok"), os.path.join(root, split, "good"))
    os.rename(os.path.join(root, "test", "bad"), os.path.join(root, "test", "zz_bad"))
    expect_error(eval_main.main, ["--dataset", "imagefolder", "--data_root", root, "--one_class_idx", "1",
                                  "--load_path", str(run / "last.model"), *EVAL_TINY], capsys,
                 "good is now index 0")


def test_the_dissolver_learns_from_the_original_files(tmp_path):
    # a 64-px original with one-pixel stripes: read at 16 px for the model, its dissolver images at
    # 32 px come from the file itself, not from the 16-px copy
    root = tmp_path / "d"
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, ::2] = 255
    for split, cls in (("train", "good"), ("test", "good"), ("test", "bad")):
        os.makedirs(root / split / cls, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / cls / "x.png")
    train, test, info = get_dataset("imagefolder", str(root), image_size=16)
    normal, _ = one_class_split(train, test, info, 1)
    got = ddpm_training_images(normal, info.native_kind, 32)
    original = decode_image(str(root / "train" / "good" / "x.png"), None).float()[None] / 255
    want = F.interpolate(original, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(got, want, atol=1e-6)
    via_copy = F.interpolate(normal.get_batch([0])[0].float(), size=(32, 32), mode="bilinear", align_corners=False)
    assert not torch.allclose(got, via_copy, atol=1e-2)
