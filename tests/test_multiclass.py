"""CSI's unlabeled multi-class setting: the out-of-distribution loaders on tiny files in their
distributed layouts (checked against torchvision's own readers, which CSI uses), ``interp``
against a direct computation, the flags, and train.py -> eval.py -> reproduce.py end to end on
``digits`` (all ten classes normal) against out-of-distribution sets generated here."""
import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import eval as eval_program
import train as train_program
from cli.args import parse_args
from common.errors import UserError
from datasets import get_dataset
from datasets import ood as ood_module
from datasets import load_ood_set
from datasets.ood import InterpDataset, with_interp
from helpers import CSI, TINY_MULTICLASS, write_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- files in the distributed layouts


def noise_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_svhn_mat(root, images_hwc, labels):
    """torchvision's SVHN file: ``X`` 32 x 32 x 3 x N (uint8), ``y`` N x 1 with 10 for the digit 0."""
    from scipy.io import savemat

    x = np.ascontiguousarray(np.stack(images_hwc, axis=3).astype(np.uint8))
    savemat(os.path.join(root, "test_32x32.mat"), {"X": x, "y": np.asarray(labels, np.uint8).reshape(-1, 1)})


def house_numbers(n, seed=0):
    """Generated 'house numbers': 1-3 digits in a random colour on a contrasting random background."""
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for _ in range(n):
        bg = rng.integers(0, 256, 3)
        fg = (bg + 128 + rng.integers(-40, 40, 3)) % 256
        img = Image.new("RGB", (32, 32), tuple(int(v) for v in bg))
        text = "".join(str(d) for d in rng.integers(0, 10, rng.integers(1, 4)))
        ImageDraw.Draw(img).text((int(rng.integers(2, 12)), int(rng.integers(6, 16))), text,
                                 fill=tuple(int(v) for v in fg))
        out.append(np.asarray(img))
        labels.append(int(text[0]) or 10)
    return out, labels


def write_tissue_folder(folder, n, seed=0):
    """Generated textures (the synth_lesion tissue) as 32-px PNGs, flat, as CSI's *_fix scripts write them."""
    from datasets.synth_lesion import generate_synth_lesion

    images, _ = generate_synth_lesion(n, 0, seed=seed, split_id=3)
    for i in range(n):
        write_png(os.path.join(folder, f"correct_resize_{i}.png"), images[i].permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------- loaders


def test_svhn_is_read_as_torchvision_reads_it(tmp_path, monkeypatch):
    import torchvision
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    images = [noise_image(rng, 32, 32) for _ in range(5)]
    labels = [10, 1, 2, 9, 10]
    write_svhn_mat(str(tmp_path), images, labels)
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)  # no md5 of a tiny file
    ref = torchvision.datasets.SVHN(str(tmp_path), split="test", download=False)
    for hw in ((32, 32), (40, 24)):
        ds = load_ood_set("svhn", str(tmp_path), hw)
        x, y = ds.get_batch(torch.arange(5))
        assert y.tolist() == [0, 1, 2, 9, 0] == [ref[i][1] for i in range(5)]
        for i in range(5):  # CSI: transforms.Resize((H, W)) then ToTensor on torchvision's image
            expected = T.ToTensor()(T.Resize(hw)(ref[i][0]))
            assert torch.equal(x[i], expected), (hw, i)
    assert torch.equal(ds.get_uint8([0]).permute(0, 2, 3, 1)[0], torch.from_numpy(
        np.array(Image.fromarray(images[0]).resize((24, 40), Image.BILINEAR))))


def test_cifar100_test_split_is_read_as_torchvision_reads_it(tmp_path):
    from datasets.cifar import LocalCIFAR100  # torchvision's reader without its md5 checks

    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    for name, n in (("train", 2), ("test", 6)):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data[:n], "fine_labels": list(range(n)), "coarse_labels": [0] * n,
                         "filenames": [f"{i}.png" for i in range(n)]}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, fh)
    ref = LocalCIFAR100(str(tmp_path), train=False, download=False)
    ds = load_ood_set("cifar100", str(tmp_path), (32, 32))
    assert len(ds) == 6 and ds.labels.tolist() == list(range(6))
    x = ds.get_uint8(torch.arange(6))
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(ref.data))


def test_folder_sets_in_imagefolder_order_and_resized_as_csi(tmp_path):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(2)
    root = tmp_path / "data"
    # LSUN_resize as its tarball extracts: a folder in the folder; some files not 32 px; noise to skip
    for i in (3, 1, 10, 2):
        write_png(str(root / "LSUN_resize" / "LSUN_resize" / f"{i}.jpg.png"), noise_image(rng, 36, 30))
    write_png(str(root / "LSUN_resize" / "LSUN_resize" / "sub" / "0.png"), noise_image(rng, 32, 32))
    (root / "LSUN_resize" / "LSUN_resize" / "readme.txt").write_text("not an image")
    write_png(str(root / "LSUN_resize" / ".hidden" / "x.png"), noise_image(rng, 32, 32))
    ds = load_ood_set("lsun_resize", str(root), (32, 32))
    folder = str(root / "LSUN_resize")
    samples = [p for p, _ in ImageFolder(folder).samples if "/.hidden/" not in p]
    assert [str(root / n) for n in ds.names] == samples and len(ds) == 5
    for i, path in enumerate(samples):
        expected = T.ToTensor()(T.Resize((32, 32))(Image.open(path).convert("RGB")))
        assert torch.equal(ds.get_batch([i])[0][0], expected), path
    # LSUN_fix as CSI's lsun_fix_preprocess.py writes it: PNGs directly in the folder, sorted
    write_tissue_folder(str(root / "LSUN_fix"), 3)
    fix = load_ood_set("lsun_fix", str(root), (32, 32))
    assert fix.names == [f"LSUN_fix/correct_resize_{i}.png" for i in range(3)]


def test_imagenet30_sets_keep_csis_3000_subset_and_224_crop(tmp_path, monkeypatch):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    monkeypatch.setattr(ood_module, "SUBSET_LEN", 5)  # CSI keeps 3000; the rule is the same
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    for c, n in (("b_class", 4), ("a_class", 3), ("hot_dog", 2), ("c_class", 5)):
        for i in range(n):
            write_png(str(root / "food-101" / "images" / c / f"{i}.jpg.png"), noise_image(rng, 40 + 9 * i, 50))
    ds = load_ood_set("food_101", str(root), (224, 224))
    listed = [p for p, _ in ImageFolder(str(root / "food-101" / "images")).samples if "/hot_dog/" not in p]
    np.random.seed(0)  # CSI's get_subset_with_len: set_random_seed(0), then numpy's global shuffle
    index = np.arange(len(listed))
    np.random.shuffle(index)
    expected_paths = [listed[i] for i in index[:5]]
    assert [str(root / n) for n in ds.names] == expected_paths
    crop = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    x, _ = ds.get_batch(torch.arange(5))
    assert x.shape == (5, 3, 224, 224)
    for i, path in enumerate(expected_paths):
        assert torch.equal(x[i], crop(Image.open(path).convert("RGB"))), path
    # the same set for a 32-px model: a plain resize
    small = load_ood_set("food_101", str(root), (32, 32))
    assert small.get_batch([0])[0].shape == (1, 3, 32, 32)


def test_imagenet30_dataset_layout(tmp_path):
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(4)
    base = tmp_path / "data" / "ImageNet"
    for split, n in (("one_class_train", 3), ("one_class_test", 2)):
        for c in ("acorn", "airliner", "zebra"):
            for i in range(n):
                write_png(str(base / split / c / "sub" / f"{i}.png"), noise_image(rng, 260, 300))
    train, test, info = get_dataset("imagenet", str(tmp_path / "data"))
    assert (info.n_classes, info.image_size, info.native_kind) == (3, (224, 224, 3), "large224")
    assert info.class_names == ["acorn", "airliner", "zebra"]
    ref = ImageFolder(str(base / "one_class_test"))
    assert test.labels.tolist() == ref.targets and [str(tmp_path / "data" / n) for n in test.names] == \
        [p for p, _ in ref.samples]
    assert len(train) == 9 and train.get_batch([0])[0].shape == (1, 3, 224, 224)


@pytest.mark.parametrize("name, expected, source", [
    ("svhn", "test_32x32.mat", "ufldl.stanford.edu"),
    ("lsun_resize", "LSUN_resize", "LSUN_resize.tar.gz"),
    ("imagenet_fix", "Imagenet_fix", "imagenet_fix_preprocess.py"),
    ("cifar100", os.path.join("cifar-100-python", "test"), "cs.toronto.edu"),
    ("cub", "cub200", "CUB-200-2011"),
    ("dtd", os.path.join("dtd", "images"), "robots.ox.ac.uk"),
    ("imagenet", os.path.join("ImageNet", "one_class_train"), "one_class_train.tar"),
])
def test_missing_set_is_one_error_naming_path_and_source(tmp_path, name, expected, source):
    with pytest.raises(UserError) as exc:
        load_ood_set(name, str(tmp_path), (32, 32) if name != "imagenet" else (224, 224))
    msg = str(exc.value)
    assert str(tmp_path / expected) in msg and source in msg and "\n" not in msg


# ----------------------------------------------------------------------------- interp


def test_interp_is_csis_mix_of_each_batch_with_the_previous_one():
    _, test, _ = get_dataset("digits", "../data")
    for n, batch in ((30, 10), (23, 10), (7, 1)):
        base = test.subset(torch.arange(n))
        got, _ = InterpDataset(base, batch).get_batch(torch.arange(n))
        x, _ = base.get_batch(torch.arange(n))
        for i in range(n):  # the definition, image by image
            want = x[i] if i < batch else (x[i] + x[i - batch]) / 2
            assert torch.equal(got[i], want), (n, batch, i)
        if n % batch == 0:  # CSI's own loop over its test loader's batches (equal sizes, as CSI assumes)
            parts, last = [], None
            for k, chunk in enumerate(x.split(batch)):
                parts.append((chunk + last) / 2 if k > 0 else chunk)
                last = chunk
            assert torch.equal(got, torch.cat(parts))
    mixed = InterpDataset(test.subset(torch.arange(30)), 10)
    assert mixed.partners().tolist() == [-1] * 10 + list(range(20))
    # in any order and batch composition, and as a subset (train.py's capped evaluation)
    idx = torch.tensor([25, 3, 14])
    assert torch.equal(mixed.get_batch(idx)[0], mixed.get_batch(torch.arange(30))[0][idx])
    part = mixed.subset(idx)
    assert torch.equal(part.get_batch(torch.arange(3))[0], mixed.get_batch(idx)[0])
    assert part.partners().tolist() == [15, -1, 4] and part.names == ["interp/25", "interp/3", "interp/14"]


# ----------------------------------------------------------------------------- flags


def test_setting_follows_csi_and_keeps_todays_one_class_default(tmp_path, capsys):
    def parse(program, *argv):
        extra = CSI if program == "train" else ["--load_path", "x.model"]
        return parse_args(program, list(argv) + extra)

    P = parse("eval", "--dataset", "cifar10")
    assert P.one_class_idx is None and P.ood_dataset == ["svhn", "lsun_resize", "imagenet_resize", "lsun_fix",
                                                         "imagenet_fix", "cifar100", "interp"]
    assert parse("eval", "--dataset", "imagenet").ood_dataset == ["cub", "stanford_dogs", "flowers102", "places365",
                                                                  "food_101", "caltech_256", "dtd", "pets"]
    assert parse("train", "--dataset", "imagenet").ood_dataset == ["cub", "stanford_dogs", "flowers102"]
    assert parse("train", "--dataset", "cifar10", "--one_class_idx", "3").one_class_idx == 3
    assert parse("eval", "--dataset", "digits").one_class_idx == 0  # no out-of-distribution sets: as today
    assert parse("eval", "--dataset", "synth_lesion").one_class_idx == 0
    P = parse("eval", "--dataset", "digits", "--ood_dataset", "svhn", "svhn", "interp")
    assert P.one_class_idx is None and P.ood_dataset == ["svhn", "interp"]
    P = parse("train", "--dataset", "digits", "--one_class_idx", "None", "--no_eval")
    assert P.one_class_idx is None and P.one_class_given
    assert train_program.default_logdir(parse("train", "--dataset", "cifar10")) == os.path.join(
        "logs", "cifar10_resnet18_simclr_CSI_rotation_seed0")
    assert train_program.default_logdir(parse("train", "--dataset", "cifar10", "--one_class_idx", "2")) == \
        os.path.join("logs", "cifar10_resnet18_simclr_CSI_rotation_one_class_2_seed0")
    for argv, fragment in ((["--dataset", "digits", "--one_class_idx", "1", "--ood_dataset", "svhn"], "leave out"),
                           (["--dataset", "digits", "--ood_dataset", "mnist"], "'mnist'"),
                           (["--dataset", "digits", "--ood_dataset", "digits"], "in-distribution"),
                           (["--dataset", "cifar10", "--contamination_ratio", "0.1"], "--contamination_ratio"),
                           (["--dataset", "digits", "--one_class_idx", "None"], "--ood_dataset")):
        with pytest.raises(UserError, match=fragment):
            parse("train", *argv)
    with pytest.raises(SystemExit):
        parse("eval", "--one_class_idx", "zero")
    capsys.readouterr()


# ----------------------------------------------------------------------------- end to end on digits


@pytest.fixture(scope="module")
def ood_root(tmp_path_factory):
    """A data root holding two generated out-of-distribution sets in CSI's layouts: textures as
    LSUN_fix (far) and coloured house numbers as SVHN's test_32x32.mat (near)."""
    root = tmp_path_factory.mktemp("data")
    write_tissue_folder(str(root / "LSUN_fix"), 120)
    write_svhn_mat(str(root), *house_numbers(120))
    return root


@pytest.fixture(scope="module")
def multi_run(ood_root, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("run") / "multi"
    # no warm-up: its 4 steps train at the peak rate (with the paper's warm-up over cut 2-step epochs of
    # 158-batch passes they would all run near --lr_init and leave the model hardly trained)
    summary = train_program.main(TINY_MULTICLASS + CSI + [
        "--data_root", str(ood_root), "--logdir", str(logdir), "--epochs", "2", "--warmup", "0", "--ood_dataset",
        "lsun_fix", "svhn", "interp", "--ood_samples", "1", "--eval_max_train", "200", "--eval_max_test", "60",
        "--error_step", "2"])
    return logdir, summary


@pytest.mark.slow
def test_multiclass_training_uses_every_class_and_selects_on_the_ood_mean(multi_run):
    logdir, summary = multi_run
    ckpt = torch.load(logdir / "last.model", weights_only=False)
    meta = ckpt["meta"]
    assert meta["one_class_idx"] is None and meta["setting"] == "multi_class"
    assert meta["ood_dataset"] == ["lsun_fix", "svhn", "interp"]
    assert "1257 training images of all 10 classes" in (logdir / "log.txt").read_text()
    selection = json.loads((logdir / "selection.json").read_text())
    best = selection["best_CSI.model"]
    assert best["metric"] == "auroc_CSI_ood_mean" and best["protocol"]["n_ood"] == {
        "lsun_fix": 60, "svhn": 60, "interp": 60}
    ev = selection["evaluations"][-1]
    per_set = [ev[f"auroc_CSI_{n}"] for n in ("lsun_fix", "svhn", "interp")]
    assert ev["auroc_CSI_ood_mean"] == pytest.approx(np.mean(per_set), abs=1e-12)
    assert summary["best"]["best_CSI.model"]["value"] == pytest.approx(ev["auroc_CSI_ood_mean"])


@pytest.mark.slow
def test_multiclass_eval_reports_one_auroc_per_set(multi_run, ood_root, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    logdir, _ = multi_run
    out, scores = tmp_path / "res.json", tmp_path / "scores.csv"
    capsys.readouterr()
    res = eval_program.main(["--mode", "ood_pre", "--dataset", "digits", "--model", "resnet18", "--ood_score", "CSI",
                             "--shift_trans_type", "rotation", "--ood_samples", "1", "--resize_factor", "0.54",
                             "--resize_fix", "--ood_dataset", "lsun_fix", "svhn", "interp",
                             "--data_root", str(ood_root), "--load_path", str(logdir / "last.model"),
                             "--save_results", str(out), "--save_scores_csv", str(scores), "--print_score"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["auroc"]) == {"lsun_fix", "svhn", "interp", "ood_mean"} and data == json.loads(json.dumps(res))
    assert data["ood_dataset"] == ["lsun_fix", "svhn", "interp"] and data["setting"] == "multi_class"
    assert data["one_class_idx"] is None and data["n_normal"] == 540 and data["n_ood"] == {
        "lsun_fix": 120, "svhn": 120, "interp": 540}
    assert data["auroc"]["ood_mean"] == pytest.approx(np.mean([data["auroc"][k] for k in ("lsun_fix", "svhn",
                                                                                            "interp")]), abs=1e-12)
    for name in ("lsun_fix", "svhn", "interp", "ood_mean"):
        assert f"[{name} CSI {data['auroc'][name]:.4f}] [{name} best {data['auroc'][name]:.4f}]" in printed
    # every AUROC is the AUROC of the written per-image scores
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == 540 + 120 + 120 + 540 and rows[0]["set"] == "digits" and rows[-1]["set"] == "interp"
    normal = np.array([float(r["score_CSI"]) for r in rows if r["set"] == "digits"])
    for name in ("lsun_fix", "svhn", "interp"):
        other = np.array([float(r["score_CSI"]) for r in rows if r["set"] == name])
        y = np.r_[np.ones(len(normal)), np.zeros(len(other))]
        assert roc_auc_score(y, np.r_[normal, other]) == pytest.approx(data["auroc"][name], abs=1e-5)
    # interp's first 100 images (--test_batch_size) are the test images themselves: identical scores
    interp = np.array([float(r["score_CSI"]) for r in rows if r["set"] == "interp"])
    assert np.array_equal(interp[:100], normal[:100]) and not np.array_equal(interp[100:200], normal[100:200])
    # textures are far from handwritten digits even for a barely trained model
    assert data["auroc"]["lsun_fix"] > 0.9


@pytest.mark.slow
def test_multiclass_simple_scores_and_refusals(multi_run, ood_root, tmp_path, capsys):
    logdir, _ = multi_run
    out = tmp_path / "ood.json"
    eval_program.main(["--mode", "ood", "--ood_score", "baseline", "clean_norm", "--dataset", "digits",
                       "--data_root", str(ood_root), "--ood_dataset", "svhn", "--load_path",
                       str(logdir / "last.model"), "--save_results", str(out)])
    data = json.loads(out.read_text())
    assert set(data["auroc_by_score"]) == {"baseline", "clean_norm"}
    assert set(data["auroc_by_score"]["clean_norm"]) == {"svhn", "ood_mean"}

    def refused(argv, *fragments):
        with pytest.raises(SystemExit) as exc:
            eval_program.main(argv)
        assert exc.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        for frag in fragments:
            assert frag in line, line

    model = str(logdir / "last.model")
    refused(["--dataset", "digits", "--load_path", model], "multi-class", "--ood_dataset", "lsun_fix svhn interp")
    refused(["--dataset", "digits", "--one_class_idx", "3", "--load_path", model], "multi-class")
    ckpt = torch.load(model, weights_only=False)
    ckpt["meta"]["one_class_idx"] = 4  # as if trained on class 4
    torch.save(ckpt, tmp_path / "class4.model")
    refused(["--dataset", "digits", "--ood_dataset", "svhn", "--load_path", str(tmp_path / "class4.model")],
            "--one_class_idx 4")
    refused(["--dataset", "digits", "--data_root", str(tmp_path), "--ood_dataset", "lsun_resize",
             "--load_path", model], str(tmp_path / "LSUN_resize"))


@pytest.mark.slow
def test_dissolver_on_all_classes_and_dia_multiclass(ood_root, tmp_path):
    from diffusion_models import train_eval_ddpm

    ckpt = tmp_path / "digits_all.pt"
    train_eval_ddpm.main(["--mode", "train", "--dataset", "digits", "--all_classes", "--unet_dim", "8",
                          "--train_steps", "1", "--save_every", "1", "--batch_size", "8", "--grad_accum", "1",
                          "--save_path", str(ckpt), "--no_progress", "--device", "cpu"])
    meta = torch.load(ckpt, weights_only=False)["meta"]
    assert meta["one_class_idx"] is None and meta["normal_train_images"] == 1257
    assert train_eval_ddpm.default_save_path("digits", None, 32).endswith("digits_all_32px.pt")
    logdir = tmp_path / "dia"
    train_program.main(TINY_MULTICLASS + ["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation",
                                          "--diffusion_model_path", str(ckpt), "--one_class_idx", "None", "--no_eval",
                                          "--max_steps", "1", "--epochs", "1", "--logdir", str(logdir)])
    assert torch.load(logdir / "last.model", weights_only=False)["meta"]["one_class_idx"] is None
    with pytest.raises(SystemExit):
        train_eval_ddpm.main(["--mode", "train", "--dataset", "digits", "--all_classes", "--one_class_idx", "0",
                              "--save_path", str(tmp_path / "x.pt")])


@pytest.mark.slow
def test_reproduce_writes_csis_table(ood_root, tmp_path):
    import reproduce

    out = tmp_path / "out"
    rc = reproduce.main(["--dataset", "digits", "--data_root", str(ood_root), "--ood_dataset", "lsun_fix", "interp",
                         "--shift_trans_type", "rotation", "--seeds", "0", "--resnet_width", "8", "--batch_size", "8",
                         "--epochs", "1", "--max_steps", "1", "--ood_samples", "1", "--selection_samples", "1",
                         "--selection_max_images", "40", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    run = out / "digits" / "multi_class" / "rotation_32px" / "seed_0"
    res = json.loads((run / "results.json").read_text())
    assert set(res["auroc"]) == {"lsun_fix", "interp", "ood_mean"}
    cmd = json.loads((run / "run.json").read_text())["eval_command"]
    assert cmd[cmd.index("--one_class_idx") + 1] == "None" and cmd[cmd.index("--ood_dataset") + 1] == "lsun_fix"
    row = list(csv.DictReader((out / "results.csv").open()))[0]
    assert row["one_class_idx"] == "None" and float(row["auroc_ood_mean"]) == pytest.approx(res["auroc"]["ood_mean"])
    text = (out / "results.md").read_text()
    assert "## Different transformations" not in text  # no one-class run
    header = "| Dataset | Transformation | lsun_fix | interp | mean |"
    assert text.count(header) == 2  # last.model and best on test
    a = res["auroc"]
    assert (f"| digits | rotation | {a['lsun_fix']:.3f} ± 0.000 (1) | {a['interp']:.3f} ± 0.000 (1) | "
            f"{a['ood_mean']:.3f} ± 0.000 (1) |") in text
    assert (out / "digits_multi_class_roc.png").stat().st_size > 0 and (run / "roc.png").stat().st_size > 0
