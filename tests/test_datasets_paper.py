"""Datasets as the paper evaluates them: APTOS's grade-1-only test set, BreaKHis, high-bit-depth
medical images, and the load-time check of every image file. Files are built in ``tmp_path``."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.base as dbase
from cli.args import build_parser
from common.errors import UserError
from datasets import DATASET_NAMES, get_dataset, one_class_split
from datasets.base import FolderStore, high_bit_to_unit
from datasets.registry import APTOS_ALL_NOTE, APTOS_PAPER_NOTE, pick_normal_class
from helpers import write_image


def solid(path, value, size=(6, 5)):
    """A solid RGB PNG (``size`` = (width, height)) whose red channel is ``value``."""
    write_image(path, (value, 50, 60), size)


def red_of(x):
    """The red value (0..255) of a solid float image 3 x H x W."""
    return int(round(float(x[0].mean()) * 255))


# ----------------------------------------------------------------------------- APTOS
TRAIN_COUNTS = {"0": 3, "1": 2, "2": 2, "3": 1, "4": 1}
TEST_COUNTS = {"0": 2, "1": 3, "2": 1, "3": 2, "4": 1}


def make_aptos(root):
    """``APTOS2019/split/{train,test}/<grade>/``; an image's red value is 10 * grade + its number."""
    for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
        for grade, n in counts.items():
            for i in range(n):
                solid(os.path.join(root, "APTOS2019", "split", split, grade, f"g{grade}_{i}.png"),
                      10 * int(grade) + i)


def test_aptos_default_is_the_papers_grade0_against_grade1(tmp_path, capsys):
    make_aptos(tmp_path)
    train, test, info = get_dataset("aptos", str(tmp_path))
    assert capsys.readouterr().out.splitlines() == [APTOS_PAPER_NOTE]
    assert APTOS_PAPER_NOTE.startswith("aptos: as the paper, anomalies are grade 1 only (grades 2-4 left out)")
    assert info.n_classes == 2 and info.class_names == ["grade_0", "grade_1"]
    assert info.image_size == (224, 224, 3) and info.native_kind == "large224"
    # test set: the 2 grade-0 and 3 grade-1 images only, labelled by grade
    assert [n.split("/")[3] for n in test.names] == ["0", "0", "1", "1", "1"]
    assert test.labels.tolist() == [0, 0, 1, 1, 1]
    x, _ = test.get_batch(torch.arange(5))
    assert [red_of(v) for v in x] == [0, 1, 10, 11, 12]
    # training split: every grade, labelled by grade (grades 2-4 serve only as contamination)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4]

    # --one_class_idx 0: the normal training set is grade 0 only (the paper's get_subclass_dataset)
    normal, test_out = one_class_split(train, test, info, 0)
    assert test_out is test
    assert [n.split("/")[3] for n in normal.names] == ["0", "0", "0"]
    assert [red_of(v) for v in normal.get_batch(torch.arange(3))[0]] == [0, 1, 2]
    # --one_class_idx 1: grade 1 is normal, grade 0 the anomaly
    normal1, _ = one_class_split(train, test, info, 1)
    assert [n.split("/")[3] for n in normal1.names] == ["1", "1"]
    assert int((test.labels == 1).sum()) == 3 and int((test.labels != 1).sum()) == 2
    # contamination draws from all other training grades, as the paper's does: 0.5 -> 3 of the 6 others
    mixed, _ = one_class_split(train, test, info, 0, contamination_ratio=0.5, seed=0)
    assert len(mixed) == 6 and mixed.labels[:3].tolist() == [0, 0, 0]
    assert set(mixed.labels[3:].tolist()) <= {1, 2, 3, 4}
    with pytest.raises(UserError, match="0..1"):
        one_class_split(train, test, info, 2)


def test_aptos_all_grades_flag_scores_every_grade(tmp_path, capsys):
    make_aptos(tmp_path)
    train, test, info = get_dataset("aptos", str(tmp_path), aptos_all_grades=True)
    assert capsys.readouterr().out.splitlines() == [APTOS_ALL_NOTE]
    assert info.n_classes == 2 and info.class_names == ["grade_0", "grades_1-4"]
    assert [n.split("/")[3] for n in test.names] == ["0", "0", "1", "1", "1", "2", "3", "3", "4"]
    assert test.labels.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert [red_of(v) for v in test.get_batch(torch.arange(9))[0]] == [0, 1, 10, 11, 12, 20, 30, 31, 40]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    normal, _ = one_class_split(train, test, info, 0)
    assert [n.split("/")[3] for n in normal.names] == ["0", "0", "0"]   # the same normal set either way


def test_aptos_needs_grade_folders_0_and_1(tmp_path):
    for split in ("train", "test"):
        for grade in ("0", "2"):
            solid(str(tmp_path / "APTOS2019" / "split" / split / grade / "a.png"), 5)
    with pytest.raises(UserError) as exc:
        get_dataset("aptos", str(tmp_path))
    msg = str(exc.value)
    assert "lacks the class folder(s) 1" in msg and str(tmp_path / "APTOS2019" / "split" / "train") in msg
    train, test, info = get_dataset("aptos", str(tmp_path), aptos_all_grades=True)   # grade 2 is an anomaly
    assert test.labels.tolist() == [0, 1]


def test_aptos_all_grades_flag_reaches_the_loader(tmp_path, monkeypatch, capsys):
    import train as train_program

    assert build_parser("train").parse_args([]).aptos_all_grades is False
    assert build_parser("eval").parse_args(["--aptos_all_grades"]).aptos_all_grades is True
    assert "breakhis" in build_parser("train").format_help()
    seen = []

    def spy(name, data_root, **kwargs):
        seen.append((name, kwargs.get("aptos_all_grades")))
        raise UserError("stop here")

    monkeypatch.setattr(train_program, "get_dataset", spy)  # the loader train.py calls
    for split in ("train", "test"):  # the class folders the normal class is chosen from (grade_0 = folder 0)
        for grade in ("0", "1"):
            os.makedirs(tmp_path / "APTOS2019" / "split" / split / grade)
    for flags, expected in (([], False), (["--aptos_all_grades"], True)):
        with pytest.raises(SystemExit) as exc:
            train_program.main(["--dataset", "aptos", "--data_root", str(tmp_path), "--mode", "simclr_CSI",
                                "--shift_trans_type", "rotation", "--logdir", str(tmp_path / "run"),
                                "--device", "cpu"] + flags)
        assert exc.value.code == 2 and "stop here" in capsys.readouterr().err
        assert seen[-1] == ("aptos", expected)


# ----------------------------------------------------------------------------- BreaKHis
def test_breakhis_sorted_folders_224px_normal_is_benign(tmp_path):
    assert "breakhis" in DATASET_NAMES
    base = tmp_path / "BreaKHis400X"
    for split, n in (("train", 2), ("test", 1)):
        for cls, red in (("malignant", 200), ("benign", 100)):      # written in reverse order
            for i in range(n):
                solid(str(base / split / cls / f"SOB_{i}.png"), red + i, size=(7, 4))
    train, test, info = get_dataset("breakhis", str(tmp_path))
    assert info.name == "breakhis" and info.class_names == ["benign", "malignant"]
    assert info.image_size == (224, 224, 3) and info.native_kind == "large224" and info.n_classes == 2
    assert train.names == ["BreaKHis400X/train/benign/SOB_0.png", "BreaKHis400X/train/benign/SOB_1.png",
                           "BreaKHis400X/train/malignant/SOB_0.png", "BreaKHis400X/train/malignant/SOB_1.png"]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    normal, _ = one_class_split(train, test, info, 0)
    x, _ = normal.get_batch([0, 1])
    assert x.shape == (2, 3, 224, 224) and [red_of(v) for v in x] == [100, 101]
    assert get_dataset("breakhis", str(tmp_path), image_size=32)[0].get_batch([0])[0].shape == (1, 3, 32, 32)
    assert pick_normal_class("breakhis", str(tmp_path)) == (0, "benign")  # benign is normal, as the paper


def test_breakhis_missing_data_names_path_and_source(tmp_path):
    with pytest.raises(UserError) as exc:
        get_dataset("breakhis", str(tmp_path))
    msg = str(exc.value)
    assert f"folder {tmp_path / 'BreaKHis400X'} does not exist" in msg
    assert "BreaKHis" in msg and "400X" in msg and "--data_root" in msg and "download" in msg


# ----------------------------------------------------------------------------- high bit depth
# 16-bit values and their hand-computed 8-bit results round(255 * v / 65535):
# 0 -> 0; 65535 -> 255; 13107 = 65535/5 -> 51; 52428 -> 203.997 -> 204; 1000 -> 3.89 -> 4; 32768 -> 127.502 -> 128
VALUES16 = np.array([[0, 65535, 13107], [52428, 1000, 32768]], dtype=np.uint16)
EXPECTED8 = [[0, 255, 51], [204, 4, 128]]


def one_image_folder(tmp_path, write):
    """``imagefolder`` layout with one image per split, written by ``write(path)``."""
    for split in ("train", "test"):
        d = tmp_path / split / "c"
        os.makedirs(d)
        write(str(d))
    return tmp_path


def load_uint8(tmp_path, size):
    train, _, _ = get_dataset("imagefolder", str(tmp_path), image_size=size)
    img = train.get_uint8([0])[0]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])   # grey -> 3 equal channels
    return img[0].tolist(), train


@pytest.mark.parametrize("dtype, fmt, mode", [("<u2", "PNG", "I;16"), (">u2", "TIFF", "I;16B")])
def test_16bit_image_is_scaled_by_65535_not_clipped(tmp_path, dtype, fmt, mode):
    ext = "png" if fmt == "PNG" else "tif"
    one_image_folder(tmp_path, lambda d: Image.fromarray(VALUES16.astype(dtype)).save(f"{d}/a.{ext}", format=fmt))
    with Image.open(tmp_path / "train" / "c" / f"a.{ext}") as im:
        assert im.mode == mode and np.asarray(im).tolist() == VALUES16.tolist()
        assert np.asarray(im.convert("RGB"))[0, 2, 0] == 255          # what plain convert('RGB') does
    got, train = load_uint8(tmp_path, (2, 3))
    assert got == EXPECTED8
    x, _ = train.get_batch([0])
    assert abs(float(x[0, 0, 1, 2]) - 128 / 255) < 1e-7


def test_16bit_image_is_resized_in_float(tmp_path):
    # a constant 13107 image resized 2x2 -> 5x5 stays 13107/65535*255 = 51 everywhere
    one_image_folder(tmp_path, lambda d: Image.fromarray(np.full((2, 2), 13107, np.uint16)).save(f"{d}/a.png"))
    got, _ = load_uint8(tmp_path, 5)
    assert got == [[51] * 5] * 5


def test_32bit_int_and_float_images_follow_the_documented_rule(tmp_path):
    # mode 'I' within 0..65535: the 16-bit rule
    one_image_folder(tmp_path / "a", lambda d: Image.fromarray(VALUES16.astype(np.int32)).save(f"{d}/a.tif"))
    assert load_uint8(tmp_path / "a", (2, 3))[0] == EXPECTED8
    # mode 'I' with negative values (CT numbers): min -> 0, max -> 1; (v + 1000) / 4000 * 255
    ct = np.array([[-1000, 3000], [0, 2000]], dtype=np.int32)      # -> 0, 255, 63.75 -> 64, 191.25 -> 191
    one_image_folder(tmp_path / "b", lambda d: Image.fromarray(ct).save(f"{d}/a.tif"))
    assert load_uint8(tmp_path / "b", 2)[0] == [[0, 255], [64, 191]]
    # mode 'F' within [0, 1] is kept: 0.2 -> 51, 0.6 -> 153; outside: stretched (2 -> 0, 6 -> 255, 3 -> 63.75)
    f01 = np.array([[0.0, 0.2], [0.6, 1.0]], dtype=np.float32)
    one_image_folder(tmp_path / "c", lambda d: Image.fromarray(f01).save(f"{d}/a.tif"))
    assert load_uint8(tmp_path / "c", 2)[0] == [[0, 51], [153, 255]]
    f26 = np.array([[2.0, 6.0], [3.0, 2.0]], dtype=np.float32)
    one_image_folder(tmp_path / "d", lambda d: Image.fromarray(f26).save(f"{d}/a.tif"))
    assert load_uint8(tmp_path / "d", 2)[0] == [[0, 255], [64, 0]]


def test_high_bit_to_unit_rule():
    assert high_bit_to_unit(np.array([0, 65535, 13107], np.uint16)).tolist() == pytest.approx([0.0, 1.0, 0.2])
    assert high_bit_to_unit(np.array([70000, 80000, 75000], np.int32)).tolist() == [0.0, 1.0, 0.5]
    assert high_bit_to_unit(np.array([-5, -5], np.int32)).tolist() == [0.0, 0.0]       # constant: 0
    assert high_bit_to_unit(np.array([0.25, 0.5], np.float32)).tolist() == [0.25, 0.5]
    with pytest.raises(ValueError, match="NaN"):
        high_bit_to_unit(np.array([0.0, np.nan], np.float32))


def test_8bit_images_are_unchanged(tmp_path):
    one_image_folder(tmp_path, lambda d: Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(f"{d}/a.png"))
    assert load_uint8(tmp_path, (1, 3))[0] == [[0, 77, 255]]


# ----------------------------------------------------------------------------- corrupt files
def good_tree(root, per_class=2):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(per_class):
                solid(os.path.join(root, split, cls, f"ok_{i}.png"), 30 * i)


def truncated_png(path):
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_two_corrupt_files_give_one_error_naming_both_before_any_decoding(tmp_path, monkeypatch):
    good_tree(tmp_path)
    junk = tmp_path / "train" / "a" / "junk.png"
    junk.write_bytes(np.random.RandomState(0).randint(0, 256, 300, dtype=np.uint8).tobytes())
    cut = tmp_path / "test" / "b" / "cut.png"
    truncated_png(str(cut))
    decoded = []
    monkeypatch.setattr(dbase, "decode_image", lambda *a, **k: decoded.append(a) or None)
    with pytest.raises(UserError) as exc:
        get_dataset("imagefolder", str(tmp_path), image_size=8)
    msg = str(exc.value)
    assert msg.startswith("2 of 10 image files of dataset 'imagefolder' cannot be read")
    assert str(junk) in msg and str(cut) in msg and "\n" not in msg
    assert "Replace or delete" in msg and "before any training" in msg
    assert decoded == []                               # found by the check at load time, not by decoding


def test_many_corrupt_files_are_counted_and_the_first_five_named(tmp_path):
    good_tree(tmp_path, per_class=1)
    bad = []
    for i in range(7):
        p = tmp_path / "train" / "b" / f"bad_{i}.png"
        p.write_bytes(b"garbage %d" % i)
        bad.append(str(p))
    with pytest.raises(UserError) as exc:
        get_dataset("imagefolder", str(tmp_path), image_size=8)
    msg = str(exc.value)
    assert msg.startswith("7 of 11 image files") and "; and 2 more." in msg
    assert [p in msg for p in bad] == [True] * 5 + [False] * 2


def test_jpeg_with_trailing_bytes_passes_and_score_folder_store_is_checked(tmp_path):
    good_tree(tmp_path, per_class=1)
    path = tmp_path / "train" / "a" / "tail.jpg"
    Image.new("RGB", (16, 16), (120, 120, 120)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes() + b"trailing camera data")   # decodes fine: no false alarm
    train, _, _ = get_dataset("imagefolder", str(tmp_path), image_size=8)
    assert abs(red_of(train[train.names.index("train/a/tail.jpg")][0]) - 120) <= 2
    # a FolderStore made directly (eval.py --score_folder) checks its files too
    bad = tmp_path / "loose.png"
    bad.write_bytes(b"nope")
    ok = str(tmp_path / "train" / "a" / "ok_0.png")
    with pytest.raises(UserError) as exc:
        FolderStore([ok, str(bad)], (8, 8))
    assert str(exc.value).startswith("1 of 2 image files of the image folder") and str(bad) in str(exc.value)
    assert len(FolderStore([ok], (8, 8))) == 1


def test_decode_image_keeps_own_size_with_none(tmp_path):
    p = str(tmp_path / "x.png")
    Image.fromarray(VALUES16).save(p)
    img = dbase.decode_image(p, None)
    assert img.shape == (3, 2, 3) and img[0].tolist() == EXPECTED8
