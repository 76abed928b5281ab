"""Scoring new images with one command: ``eval.py --load_path MODEL --score_folder DIR
--save_scores_csv OUT`` takes everything else from the run and its scoring reference
(``last.scoring.pt``, written by train.py), with the training data moved away; on real PNG files."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as eval_program
import train as train_program
from datasets import get_dataset, one_class_split
from evals.ood_pre import csi_scores, csi_train_scores_loo, extract_features
from datasets.base import ArrayStore, ImageDataset
from evals.scoring_reference import (DEFAULT_QUANTILE, KIND, ScoringProtocol, compute_reference, model_digest,
                                     reference_path, score_images, threshold_of)
from helpers import ROOT, expect_error, load, read_csv, write_png
from models.resnet import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--dataset", "imagefolder", "--img_size", "16", "--mode", "simclr_CSI", "--shift_trans_type", "rotation",
        "--resnet_width", "8", "--simclr_dim", "16", "--batch_size", "8", "--epochs", "1", "--no_eval",
        "--log_every", "1", "--scoring_samples", "2"]
SAMPLES = 2  # --scoring_samples above: the features of the reference and of eval.py's comparison


def picture(rng, anomalous):
    """A 16 x 16 RGB image: a smooth gradient with noise; anomalies carry a bright square."""
    y, x = np.mgrid[0:16, 0:16]
    base = 80 + 4 * x + 2 * y + rng.integers(0, 40, (16, 16))
    img = np.stack([base, base * 0.8, 255 - base], axis=-1)
    if anomalous:
        r, c = rng.integers(2, 10, 2)
        img[r:r + 5, c:c + 5] = (255, 255, 40)
    return np.clip(img, 0, 255)


def image_tree(root, n_train, n_test=4, seed=0):
    """``train/normal/`` only (the normal class by its folder's name), ``test/{normal,abnormal}/``."""
    rng = np.random.default_rng(seed)
    for split, kind, n in (("train", "normal", n_train), ("test", "normal", n_test), ("test", "abnormal", n_test)):
        for i in range(n):
            write_png(os.path.join(root, split, kind, f"{i:03d}.png"), picture(rng, kind == "abnormal"))
    return str(root)


def train_run(root, logdir, *extra):
    train_program.main(TINY + ["--data_root", str(root), "--logdir", str(logdir), *extra])
    return os.path.join(logdir, "last.model")


def model_of(path):
    ckpt = load(path)
    meta = ckpt["meta"]
    model = build_model(meta["arch"], n_classes=meta["n_classes"], simclr_dim=meta["simclr_dim"],
                        n_shifts=meta["n_shifts"], width=meta["resnet_width"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on 20 normal images; what eval.py and an independent computation give while the
    data are there; then the data folder is renamed."""
    base = tmp_path_factory.mktemp("own")
    root = image_tree(base / "data", n_train=20)
    model_path = train_run(root, base / "run")
    test_csv = base / "test_scores.csv"
    # eval.py with the data there, --dataset and the class from the run: the test set's per-image scores
    eval_program.main(["--load_path", model_path, "--ood_samples", str(SAMPLES), "--resize_factor", "0.54",
                       "--resize_fix", "--save_scores_csv", str(test_csv)])
    # an independent computation of the threshold: the leave-one-out scores of the normal training images
    model, _ = model_of(model_path)
    train_set, test_set, info = get_dataset("imagefolder", root, image_size=16)
    normal = one_class_split(train_set, test_set, info, info.class_names.index("normal"))[0]
    precision = torch.load(reference_path(model_path), weights_only=True)["protocol"]["amp"]  # as trained
    feats = extract_features(model, normal, "rotation", SAMPLES, torch.device("cpu"), batch_size=100,
                             resize_factor=0.54, resize_fix=True, amp=precision)
    loo = csi_train_scores_loo(feats, 4, "CSI").numpy()
    new = base / "new_images"
    shutil.copytree(os.path.join(root, "test"), new)  # the test images, as new images to score
    os.rename(root, str(root) + "_moved")
    return {"base": base, "model": model_path, "test_csv": test_csv, "loo": loo, "new": new,
            "moved": str(root) + "_moved", "feats": feats}


def score(model, folder, out, *extra):
    return eval_program.main(["--load_path", str(model), "--score_folder", str(folder), "--save_scores_csv", str(out),
                              *extra])


def test_score_folder_with_only_three_flags_and_the_data_gone(run, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    res = score(run["model"], run["new"], out)
    printed = capsys.readouterr()
    rows = read_csv(out)
    assert list(rows[0]) == ["index", "name", "label", "normal", "score_CSI", "anomaly_score", "anomalous",
                             "threshold", "anomaly_threshold"]
    assert [r["name"] for r in rows] == [f"{k}/{i:03d}.png" for k in ("abnormal", "normal") for i in range(4)]
    assert [int(r["index"]) for r in rows] == list(range(8))
    assert all(r["label"] == "" and r["normal"] == "" for r in rows)
    # the same numbers as eval.py's scores of those images as the test set, computed with the data there
    test_rows = {r["name"]: r for r in read_csv(run["test_csv"])}
    for r in rows:
        assert r["score_CSI"] == test_rows["test/" + r["name"]]["score_CSI"]
        assert float(r["anomaly_score"]) == -float(r["score_CSI"])
    # the threshold: the 5% quantile of the normal training images' leave-one-out scores
    ref = torch.load(reference_path(run["model"]), weights_only=True)
    assert ref["kind"] == KIND and ref["n_train"] == 20 and ref["threshold_quantile"] == DEFAULT_QUANTILE == 0.05
    assert ref["protocol"] == {"shift": "rotation", "samples": SAMPLES, "resize_factor": 0.54, "resize_fix": True,
                               "batch_size": 100, "amp": ref["protocol"]["amp"]}
    assert ref["model_digest"] == model_digest(load(run["model"])["model"])
    np.testing.assert_allclose(ref["train_scores"]["CSI"].numpy(), run["loo"], rtol=1e-6)
    thr = float(np.quantile(run["loo"], 0.05))
    assert res["threshold"] == pytest.approx(thr, rel=1e-6)
    assert {r["threshold"] for r in rows} == {f"{res['threshold']:.6f}"}
    assert {r["anomaly_threshold"] for r in rows} == {f"{-res['threshold']:.6f}"}
    for r in rows:
        assert int(r["anomalous"]) == int(float(r["score_CSI"]) < res["threshold"])
    assert res["n_flagged"] == sum(int(r["anomalous"]) for r in rows)
    assert f"threshold {res['threshold']:.6f}" in printed.out and "normal class normal" in printed.out
    assert "new images read at 16x16 px" in printed.out
    assert "warning" not in printed.err  # 20 normal images: no warning
    # another quantile is taken over the stored scores
    res2 = score(run["model"], run["new"], tmp_path / "q.csv", "--threshold_quantile", "0.5")
    assert res2["threshold"] == pytest.approx(float(np.quantile(run["loo"], 0.5)), rel=1e-6)


def test_flags_that_contradict_the_run_are_refused(run, tmp_path, capsys):
    out = str(tmp_path / "x.csv")
    base = ["--load_path", run["model"], "--score_folder", str(run["new"]), "--save_scores_csv", out]
    expect_error(eval_program.main, base + ["--dataset", "synth_lesion"], capsys, "--dataset imagefolder")
    expect_error(eval_program.main, base + ["--one_class_idx", "0"], capsys, "normal class normal",
                 "--one_class_idx 0")
    expect_error(eval_program.main, base + ["--normal_class", "abnormal"], capsys, "--normal_class abnormal")
    expect_error(eval_program.main, base + ["--img_size", "32"], capsys, "16-px")
    expect_error(eval_program.main, base + ["--ood_samples", "3"], capsys, "2 sample(s)", "--ood_samples")
    assert not os.path.exists(out)
    # given and agreeing with the run: accepted
    res = eval_program.main(base + ["--dataset", "imagefolder", "--normal_class", "normal", "--one_class_idx", "1"])
    assert res["n_scored"] == 8 and len(read_csv(out)) == 8


def test_a_model_without_its_reference(run, tmp_path, capsys):
    """A model file without a reference (e.g. best_CSI.model) with the data gone: one line saying
    what to do; with the data found again (--data_root), the reference is computed and kept; a
    reference of other weights is never used."""
    other = os.path.join(run["base"], "copy", "other.model")
    os.makedirs(os.path.dirname(other), exist_ok=True)
    shutil.copy(run["model"], other)
    out = tmp_path / "o.csv"
    expect_error(eval_program.main, ["--load_path", other, "--score_folder", str(run["new"]), "--save_scores_csv",
                                     str(out)], capsys, "other.scoring.pt does not exist", "--data_root")
    assert not out.exists() and not os.path.exists(reference_path(other))
    res = score(other, run["new"], out, "--data_root", run["moved"], "--ood_samples", str(SAMPLES))
    assert os.path.isfile(reference_path(other)) and "computing the scoring reference" in capsys.readouterr().out
    assert read_csv(out) == read_csv(_scored(run, tmp_path))  # the same weights: the same numbers
    again = score(other, run["new"], tmp_path / "o2.csv")  # now without the data: the kept reference
    assert again["threshold"] == res["threshold"]
    # other weights under the same name: the kept reference is refused, the data are needed again
    ckpt = load(other)
    ckpt["model"]["simclr_layer.0.weight"] = ckpt["model"]["simclr_layer.0.weight"] * 1.5
    torch.save(ckpt, other)
    expect_error(eval_program.main, ["--load_path", other, "--score_folder", str(run["new"]), "--save_scores_csv",
                                     str(tmp_path / "o3.csv")], capsys, "belongs to other weights")


def _scored(run, tmp_path):
    out = tmp_path / "last.csv"
    score(run["model"], run["new"], out)
    return out


def test_few_normal_images_warn_and_one_is_an_error(tmp_path, capsys):
    """A threshold on fewer than 20 normal images is a warning; on fewer than 2 an error. A model
    trained with --mode simclr (one shift) is scored with the simclr score."""
    few = train_run(image_tree(tmp_path / "few", n_train=5), tmp_path / "few_run", "--mode", "simclr",
                    "--shift_trans_type", "none")
    shutil.rmtree(tmp_path / "few")
    capsys.readouterr()
    new = tmp_path / "imgs"
    write_png(str(new / "a.png"), picture(np.random.default_rng(1), False))
    res = score(few, new, tmp_path / "few.csv")
    err = capsys.readouterr().err
    assert "only 5 normal training images" in err and "fewer than 20" in err
    rows = read_csv(tmp_path / "few.csv")
    assert list(rows[0])[4:6] == ["score_simclr", "anomaly_score"] and res["score"] == "simclr"
    one = train_run(image_tree(tmp_path / "one", n_train=1), tmp_path / "one_run")
    shutil.rmtree(tmp_path / "one")
    ref = torch.load(reference_path(one), weights_only=True)
    assert ref["n_train"] == 1 and ref["train_scores"] == {} and ref["threshold"] == {}
    expect_error(eval_program.main, ["--load_path", one, "--score_folder", str(new), "--save_scores_csv",
                                     str(tmp_path / "one.csv")], capsys, "at least 2 normal training images")
    assert not (tmp_path / "one.csv").exists()


def test_reference_threshold_rules_on_real_features():
    """compute_reference on real features of a tiny network: the stored statistics score images as
    csi_scores does; thresholds and the n < 2 / n < 20 rules."""
    torch.manual_seed(0)
    model = build_model("resnet18", n_classes=2, simclr_dim=8, n_shifts=4, width=8).eval()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageDataset(ArrayStore(images), torch.zeros(6), [str(i) for i in range(6)])
    protocol = ScoringProtocol(samples=2, batch_size=4)
    ref = compute_reference(model, data, torch.device("cpu"), protocol, {"model_digest": "d"})
    feats = extract_features(model, data, "rotation", 2, torch.device("cpu"), batch_size=4)
    assert torch.equal(score_images(ref, feats, "CSI"), csi_scores(feats, feats, 4, "CSI"))
    assert torch.equal(ref["train_scores"]["simclr"], csi_train_scores_loo(feats, 4, "simclr"))
    thr, q, n = threshold_of(ref, "CSI")
    assert (q, n) == (0.05, 6) and thr == float(np.quantile(ref["train_scores"]["CSI"].numpy(), 0.05))
    assert threshold_of(ref, "CSI", 0.5)[0] == float(np.quantile(ref["train_scores"]["CSI"].numpy(), 0.5))


@pytest.mark.slow
def test_reference_under_torchrun_is_that_of_one_process(tmp_path):
    """Two CPU processes (torchrun): the ranks share the extraction and rank 0 writes
    last.scoring.pt, which equals the reference one process computes for the saved model."""
    root = image_tree(tmp_path / "data", n_train=12)
    logdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *TINY,
           "--data_root", root, "--logdir", str(logdir), "--device", "cpu", "--batch_size", "4",
           "--test_batch_size", "5"]  # 3 batches of the 12 images: rank 0 takes two, rank 1 one
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(logdir / "last.scoring.pt", weights_only=True)
    model, ckpt = model_of(logdir / "last.model")
    assert ckpt["meta"]["world_size"] == 2 and ref["model_digest"] == model_digest(ckpt["model"])
    train_set, test_set, info = get_dataset("imagefolder", root, image_size=16)
    normal = one_class_split(train_set, test_set, info, info.class_names.index("normal"))[0]
    protocol = ScoringProtocol.from_dict(ref["protocol"])
    assert protocol == ScoringProtocol(samples=SAMPLES, batch_size=5, amp=ref["protocol"]["amp"])
    one = compute_reference(model, normal, torch.device("cpu"), protocol, {})
    for key in ("axis", "w_sim", "w_shi"):
        assert torch.equal(ref["statistics"][key], one["statistics"][key]), key
    assert torch.equal(ref["train_scores"]["CSI"], one["train_scores"]["CSI"])
    assert ref["threshold"] == one["threshold"]
