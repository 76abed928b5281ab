"""A run knows its inputs (issue 24, item 1) and its outputs never land among them (item 3).

Real folder datasets and real runs: the fingerprint of a folder dataset follows its files, not
their place; a resume, an evaluation and the dissolver's resume refuse changed data (or a
dissolver retrained in place) in one line, go on with ``--accept_changed_data`` and record it;
outputs inside a dataset's folder are refused; symbolic links never multiply images.
"""
import hashlib
import json
import os
import shutil

import pytest

import eval as eval_program
import train as train_program
from datasets import get_dataset
from datasets.fingerprint import data_changes, data_fingerprint
from diffusion_models import train_eval_ddpm
from helpers import TINY_DDPM, TINY_TRAIN, expect_error, load, make_folder_dataset, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# train.py on a folder dataset of 32-px images: ResNet width 8, batches of 4, 2 steps an epoch
FOLDER = ["--dataset", "imagefolder", "--img_size", "32", "--normal_class", "good", "--resnet_width", "8",
          "--batch_size", "4", "--max_batches_per_epoch", "1", "--simclr_dim", "16", "--warmup", "1",
          "--save_step", "1", "--log_every", "1", "--mode", "simclr_CSI", "--shift_trans_type", "rotation",
          "--ood_samples", "1", "--scoring_samples", "0", "--device", "cpu"]
EVAL = ["--ood_samples", "1", "--device", "cpu"]


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def snapshot(folder):
    """{name: sha256} of every file of a run folder (what must survive a refused command)."""
    return {n: digest(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def fingerprint(root):
    train, test, info = get_dataset("imagefolder", root, image_size=32)
    return data_fingerprint("imagefolder", train, test, info)


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    make_folder_dataset(root, ["bad", "good"], per_class=4)
    return root


@pytest.fixture
def trained(data, tmp_path, capsys):
    """A run of one epoch on ``data``."""
    logdir = str(tmp_path / "run")
    assert train_program.main(FOLDER + ["--data_root", data, "--epochs", "1", "--logdir", logdir]) is not None
    capsys.readouterr()
    return logdir


# --------------------------------------------------------------------------- the record


def test_fingerprint_follows_the_files_not_their_place(data, tmp_path):
    before = fingerprint(data)
    assert before["class_names"] == ["bad", "good"] and before["classes"] == {"bad": 0, "good": 1}
    assert before["splits"]["train"]["per_class"] == {"bad": 4, "good": 4}
    assert before["splits"]["train"]["kind"] == "files"
    moved = str(tmp_path / "moved")
    shutil.copytree(data, moved)  # copy2: sizes and modification times kept
    assert fingerprint(moved)["digest"] == before["digest"]

    write_image(os.path.join(data, "train", "good", "new.png"), (1, 2, 3))
    assert data_changes(before, fingerprint(data)) == ["train/good 5 images (was 4)"]
    os.remove(os.path.join(data, "train", "good", "new.png"))
    assert data_changes(before, fingerprint(data)) == []

    write_image(os.path.join(data, "test", "bad", "img_0.png"), (9, 9, 9), size=(20, 20))  # rewritten in place
    assert data_changes(before, fingerprint(data)) == [
        "test: the same files, but sizes or modification times changed (files rewritten, or copied without their "
        "times)"]

    for split in ("train", "test"):
        os.rename(os.path.join(moved, split, "bad"), os.path.join(moved, split, "aaa"))
    changes = data_changes(before, fingerprint(moved))
    assert changes[0].startswith("the classes changed") and "class 0 is aaa (was bad)" in changes[0]
    assert data_changes(None, before) == []  # a record made before fingerprints: nothing to compare


def test_in_memory_data_are_fingerprinted_by_content():
    loaded = get_dataset("synth_lesion", seed=0)
    a, b = data_fingerprint("synth_lesion", *loaded), data_fingerprint("synth_lesion", *loaded)
    c = data_fingerprint("synth_lesion", *get_dataset("synth_lesion", seed=1))
    assert a["splits"]["train"]["kind"] == "arrays" and len(a["splits"]["train"]["content"]) == 64
    assert a["digest"] == b["digest"] != c["digest"]
    assert data_changes(a, c)
    json.dumps(a)  # a record a checkpoint's meta and a JSON file hold


# --------------------------------------------------------------------------- train.py


def test_resume_on_changed_data_is_refused_then_accepted_and_recorded(data, trained, capsys):
    before = snapshot(trained)
    step = load(os.path.join(trained, "last.model"))["step"]
    write_image(os.path.join(data, "train", "good", "added.png"), (200, 10, 10))
    resume = FOLDER + ["--data_root", data, "--epochs", "2", "--resume_path", trained]
    expect_error(train_program.main, resume, capsys, "the run was made on other data", "train/good 5 images (was 4)",
                 "--accept_changed_data")
    assert snapshot(trained) == before  # nothing written, nothing rewound

    assert train_program.main(resume + ["--accept_changed_data"]) is not None
    meta = load(os.path.join(trained, "last.model"))["meta"]
    assert meta["accepted_changes"] == [{"epoch": 1, "step": step, "flag": "--accept_changed_data",
                                         "changes": ["train/good 5 images (was 4)"]}]
    assert meta["data"]["splits"]["train"]["per_class"] == {"bad": 4, "good": 5}
    with open(os.path.join(trained, "log.txt")) as fh:
        assert (f"--accept_changed_data: going on from epoch 1 (step {step}) with changed inputs: train/good 5 "
                f"images (was 4)") in fh.read()


def test_eval_refuses_renamed_class_folders(data, trained, tmp_path, capsys):
    """Renamed class folders: the model's classes are not the data's any more (an AUROC of 1.0
    would become its complement): one line, no results; accepted, the results say so."""
    model = os.path.join(trained, "last.model")
    results = str(tmp_path / "results.json")
    for split in ("train", "test"):
        os.rename(os.path.join(data, split, "bad"), os.path.join(data, split, "abnormal"))
    argv = ["--load_path", model, "--data_root", data, "--save_results", results] + EVAL
    expect_error(eval_program.main, argv, capsys, "the classes changed", "class 0 is abnormal (was bad)",
                 "--accept_changed_data")
    assert not os.path.exists(results)
    out = eval_program.main(argv + ["--accept_changed_data"])
    with open(results) as fh:
        doc = json.load(fh)
    assert doc["data_changed_since_training"][0].startswith("the classes changed") and "auroc" in doc
    assert out["auroc"] == doc["auroc"]


@pytest.mark.slow
def test_resume_with_the_dissolver_retrained_in_place_is_refused(tiny_dissolver, tmp_path, capsys):
    dissolver = str(tmp_path / "dissolver.pt")
    shutil.copy(tiny_dissolver, dissolver)
    logdir = str(tmp_path / "run")
    dia = TINY_TRAIN + ["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation", "--no_eval",
                        "--diffusion_model_path", dissolver, "--logdir", logdir, "--device", "cpu"]
    assert train_program.main(dia + ["--epochs", "1"]) is not None
    recorded = load(os.path.join(logdir, "last.model"))["meta"]["dissolver"]
    assert recorded["sha256"] == digest(dissolver)
    # retrained in place: one more step of the dissolver's own training
    train_eval_ddpm.main(["--mode", "train", "--dataset", "synth_lesion", *TINY_DDPM, "--train_steps", "3",
                          "--save_path", dissolver, "--resume"])
    capsys.readouterr()
    before = snapshot(logdir)
    resume = dia + ["--epochs", "2", "--resume_path", logdir]
    expect_error(train_program.main, resume, capsys, f"was made with another {dissolver}", "retrained or replaced",
                 "--accept_changed_data")
    assert snapshot(logdir) == before
    assert train_program.main(resume + ["--accept_changed_data"]) is not None
    meta = load(os.path.join(logdir, "last.model"))["meta"]
    assert meta["dissolver"]["sha256"] == digest(dissolver)
    assert "changed" in meta["accepted_changes"][-1]["changes"][0] and "dissolver" in \
           meta["accepted_changes"][-1]["changes"][0]


def test_dissolver_resume_on_changed_data_is_refused(data, tmp_path, capsys):
    ckpt = str(tmp_path / "d.pt")
    base = ["--mode", "train", "--dataset", "imagefolder", "--data_root", data, "--normal_class", "good",
            *TINY_DDPM, "--save_every", "1", "--save_path", ckpt, "--device", "cpu"]
    train_eval_ddpm.main(base + ["--train_steps", "1"])
    assert load(ckpt)["meta"]["data_fingerprint"]["splits"]["train"]["per_class"] == {"bad": 4, "good": 4}
    write_image(os.path.join(data, "train", "good", "added.png"), (200, 10, 10))
    capsys.readouterr()
    before = digest(ckpt)
    expect_error(train_eval_ddpm.main, base + ["--train_steps", "2", "--resume"], capsys, "--resume:",
                 "made on other data", "train/good 5 images (was 4)")
    assert digest(ckpt) == before
    train_eval_ddpm.main(base + ["--train_steps", "2", "--resume", "--accept_changed_data"])
    meta = load(ckpt)["meta"]
    assert meta["accepted_changes"] == [{"step": 1, "flag": "--accept_changed_data",
                                         "changes": ["train/good 5 images (was 4)"]}]


# --------------------------------------------------------------------------- outputs outside the data


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_outputs_inside_the_dataset_folder_are_refused(data, trained, capsys):
    files = listing(data)
    inside = os.path.join(data, "train", "good", "run")
    expect_error(train_program.main, FOLDER + ["--data_root", data, "--epochs", "1", "--logdir", inside], capsys,
                 f"--logdir {inside} lies inside the folder of dataset 'imagefolder' ({data})")
    expect_error(eval_program.main, ["--load_path", os.path.join(trained, "last.model"), "--data_root", data,
                                     "--save_results", os.path.join(data, "test", "r.json")] + EVAL, capsys,
                 "--save_results", "lies inside the folder of dataset")
    expect_error(train_eval_ddpm.main, ["--mode", "train", "--dataset", "imagefolder", "--data_root", data,
                                        "--normal_class", "good", *TINY_DDPM, "--train_steps", "1",
                                        "--save_path", os.path.join(data, "d.pt")], capsys,
                 "--save_path", "lies inside the folder of dataset")
    assert listing(data) == files and not os.path.exists(inside)


def test_symbolic_links_are_followed_once_and_never_pull_other_classes_in(data):
    good = os.path.join(data, "train", "good")
    os.symlink("..", os.path.join(good, "up"))             # a loop: the split, and good itself again
    os.symlink("../bad", os.path.join(good, "bads"))       # another class's folder
    os.symlink(os.path.join(good, "img_0.png"), os.path.join(good, "again.png"))  # a file counted twice
    train, test, info = get_dataset("imagefolder", data, image_size=32)
    names = [n for n, y in zip(train.names, train.labels.tolist()) if info.class_names[y] == "good"]
    assert sorted(names) == [f"train/good/img_{i}.png" for i in range(4)]
    assert train.labels.tolist().count(0) == 4 and len(train) == 8
