"""Tests of ``datasets``: every layout is built as tiny files under ``tmp_path`` and loaded back."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.base as dbase
from common.errors import UserError
from datasets import DATASET_NAMES, ImageDataset, get_dataset, one_class_split
from datasets.synth_lesion import generate_synth_lesion
from helpers import make_folder_dataset, write_image


# ----------------------------------------------------------------------------- helpers
def colour_of(x):
    """The solid colour (0..255 ints) of a float image 3 x H x W."""
    return tuple(int(round(v)) for v in (x.mean(dim=(1, 2)) * 255).tolist())


# ----------------------------------------------------------------------------- names & errors
def test_dataset_names_are_the_documented_ones():
    assert set(DATASET_NAMES) == {"covid", "kvasir", "retina", "aptos", "breakhis", "chestxray",
                                  "pneumoniamnist", "breastmnist", "chestmnist", "cifar10", "cifar100",
                                  "imagefolder", "digits", "synth_lesion", "synth_lesion_half", "synth_streak",
                                  "synth_streak_half"}
    assert len(DATASET_NAMES) == 17


def test_unknown_dataset_name_lists_valid_names(tmp_path):
    with pytest.raises(UserError) as exc:
        get_dataset("mnist", str(tmp_path))
    msg = str(exc.value)
    assert "'mnist'" in msg and "covid" in msg and "synth_lesion" in msg


@pytest.mark.parametrize("name, expected", [
    ("covid", "covid"), ("kvasir", "kvasir-anomaly-polyps"), ("retina", "OCT2017"),
    ("aptos", os.path.join("APTOS2019", "split")), ("breakhis", "BreaKHis400X"), ("chestxray", "chest_xray"),
    ("pneumoniamnist", "pneumoniamnist.npz"), ("cifar10", "cifar-10-batches-py"),
    ("cifar100", "cifar-100-python"), ("imagefolder", "")])
def test_missing_data_root_names_the_exact_path(tmp_path, name, expected):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as exc:
        get_dataset(name, str(missing))
    assert str(missing / expected).rstrip(os.sep) in str(exc.value)


# ----------------------------------------------------------------------------- folder datasets
def test_covid_classes_sorted_names_and_pixels(tmp_path):
    root = tmp_path / "data"
    colours = {"COVID": (200, 10, 10), "non-COVID": (10, 200, 10)}
    make_folder_dataset(root / "covid", ["COVID", "non-COVID"], per_class=3, colours=colours)
    # noise that must be skipped: hidden file, non-image file
    (root / "covid" / "train" / "COVID" / ".DS_Store").write_bytes(b"junk")
    (root / "covid" / "train" / "COVID" / "notes.txt").write_text("not an image")
    # upper-case extension, JPEG, grayscale source, nested sub-folder
    write_image(str(root / "covid" / "train" / "non-COVID" / "sub" / "x.JPEG"), 77, mode="L", fmt="JPEG")

    train, test, info = get_dataset("covid", str(root))
    assert info.name == "covid"
    assert info.class_names == ["COVID", "non-COVID"]
    assert info.n_classes == 2 and info.image_size == (224, 224, 3) and info.native_kind == "large224"
    assert isinstance(train, ImageDataset) and isinstance(test, ImageDataset)
    assert len(train) == 7 and len(test) == 6
    assert train.labels.dtype == torch.long
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert train.names == ["covid/train/COVID/img_0.png", "covid/train/COVID/img_1.png",
                           "covid/train/COVID/img_2.png", "covid/train/non-COVID/img_0.png",
                           "covid/train/non-COVID/img_1.png", "covid/train/non-COVID/img_2.png",
                           "covid/train/non-COVID/sub/x.JPEG"]
    assert train.image_size == (224, 224, 3)

    x, y = train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    assert colour_of(x) == (200, 10, 10)
    x, y = train[3]
    assert colour_of(x) == (10, 200, 10) and y == 1
    xb, yb = train.get_batch(torch.tensor([6, 0]))
    assert xb.shape == (2, 3, 224, 224) and yb.tolist() == [1, 0]
    assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0
    grey = xb[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])   # grey -> 3 equal channels
    assert abs(float(grey.mean()) * 255 - 77) < 3                            # JPEG is lossy, slightly
    assert torch.equal(xb[1], train[0][0])


def test_retina_relabels_normal_to_0_and_the_rest_to_1(tmp_path):
    classes = ["CNV", "DME", "DRUSEN", "NORMAL"]
    make_folder_dataset(tmp_path / "OCT2017", classes, per_class=2)
    train, test, info = get_dataset("retina", str(tmp_path))
    assert info.class_names == ["NORMAL", "abnormal"] and info.n_classes == 2
    by_folder = {n.split("/")[2]: int(l) for n, l in zip(train.names, train.labels)}
    assert by_folder == {"CNV": 1, "DME": 1, "DRUSEN": 1, "NORMAL": 0}
    assert train.labels.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert test.labels.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert train.names[4] == "OCT2017/train/DRUSEN/img_0.png"


def test_chestxray_and_kvasir_use_sorted_folders(tmp_path):
    make_folder_dataset(tmp_path / "chest_xray", ["PNEUMONIA", "NORMAL"], per_class=1)
    os.makedirs(tmp_path / "chest_xray" / "val" / "NORMAL")        # the extra split is ignored
    train, test, info = get_dataset("chestxray", str(tmp_path))
    assert info.class_names == ["NORMAL", "PNEUMONIA"]
    assert [n.split("/")[2] for n in train.names] == ["NORMAL", "PNEUMONIA"]
    assert train.labels.tolist() == [0, 1]

    make_folder_dataset(tmp_path / "kvasir-anomaly-polyps", ["polyps", "normal"], per_class=2)
    train, test, info = get_dataset("kvasir", str(tmp_path))
    assert info.class_names == ["normal", "polyps"] and info.image_size == (224, 224, 3)
    assert train.labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_sizes(tmp_path):
    make_folder_dataset(tmp_path, ["b", "a", "c"], per_class=1)
    train, test, info = get_dataset("imagefolder", str(tmp_path))
    assert info.image_size == (224, 224, 3) and info.class_names == ["a", "b", "c"]
    assert train.names == ["train/a/img_0.png", "train/b/img_0.png", "train/c/img_0.png"]
    train, test, info = get_dataset("imagefolder", str(tmp_path), image_size=32)
    assert info.image_size == (32, 32, 3) and info.native_kind == "small32"
    assert train.get_batch([0, 2])[0].shape == (2, 3, 32, 32)
    train, test, info = get_dataset("imagefolder", str(tmp_path), image_size=(24, 40))
    assert info.image_size == (24, 40, 3) and info.native_kind == "large224"
    assert train[1][0].shape == (3, 24, 40)
    # sorted class 1 is folder 'b', written first (colour of list position 0)
    assert colour_of(train[1][0]) == (0, 100, 200) and train[1][1] == 1
    assert colour_of(train[0][0]) == (40, 100, 160) and train[0][1] == 0
    with pytest.raises(UserError, match="image size"):
        get_dataset("imagefolder", str(tmp_path), image_size=0)


def test_file_order_is_sorted_not_filesystem_order(tmp_path):
    stems = ["k", "b", "x", "a", "q", "c", "z", "m", "e", "t", "d", "y"]
    for split in ("train", "test"):
        for stem in stems:
            write_image(str(tmp_path / split / "only" / f"{stem}.png"), (5, 5, 5))
        write_image(str(tmp_path / split / "only" / "sub" / "0.png"), (5, 5, 5))
    train, test, info = get_dataset("imagefolder", str(tmp_path), image_size=8)
    expected = ["train/only/" + r for r in sorted([f"{s}.png" for s in stems] + ["sub/0.png"])]
    assert expected[7:9] == ["train/only/q.png", "train/only/sub/0.png"]
    assert train.names == expected


def test_fixed_size_datasets_refuse_another_image_size(tmp_path):
    # folder datasets are files: read at the paper's 224 px, or at any size asked for
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"], per_class=1)
    assert get_dataset("covid", str(tmp_path))[2].image_size == (224, 224, 3)
    assert get_dataset("covid", str(tmp_path), image_size=32)[2].image_size == (32, 32, 3)
    # arrays have one size
    assert get_dataset("digits", str(tmp_path), image_size=32)[2].image_size == (32, 32, 3)
    with pytest.raises(UserError) as exc:
        get_dataset("digits", str(tmp_path), image_size=64)
    assert "32x32" in str(exc.value) and "folder datasets only" in str(exc.value)


def test_folder_missing_dataset_folder_names_path_and_source(tmp_path):
    with pytest.raises(UserError) as exc:
        get_dataset("retina", str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path / "OCT2017") in msg and "kermany2018" in msg and "download" in msg


def test_folder_missing_split(tmp_path):
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"], splits=("train",))
    with pytest.raises(UserError) as exc:
        get_dataset("covid", str(tmp_path))
    assert str(tmp_path / "covid" / "test") in str(exc.value)


def test_folder_split_without_classes(tmp_path):
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"], splits=("train",))
    os.makedirs(tmp_path / "covid" / "test")
    (tmp_path / "covid" / "test" / "stray.png").write_bytes(b"")
    with pytest.raises(UserError) as exc:
        get_dataset("covid", str(tmp_path))
    assert "no class sub-folders" in str(exc.value) and str(tmp_path / "covid" / "test") in str(exc.value)


def test_folder_empty_class_folder(tmp_path):
    make_folder_dataset(tmp_path / "chest_xray", ["NORMAL", "PNEUMONIA"])
    empty = tmp_path / "chest_xray" / "test" / "ZEMPTY"
    os.makedirs(empty)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(UserError) as exc:
        get_dataset("chestxray", str(tmp_path))
    assert str(empty) in str(exc.value) and "no images" in str(exc.value)


def test_folder_train_test_class_mismatch(tmp_path):
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"], splits=("train",))
    make_folder_dataset(tmp_path / "covid", ["COVID", "other"], splits=("test",))
    with pytest.raises(UserError, match="different class folders"):
        get_dataset("covid", str(tmp_path))


def test_retina_without_normal_folder(tmp_path):
    make_folder_dataset(tmp_path / "OCT2017", ["CNV", "DME"])
    with pytest.raises(UserError) as exc:
        get_dataset("retina", str(tmp_path))
    assert "NORMAL" in str(exc.value) and "CNV, DME" in str(exc.value)


@pytest.mark.parametrize("payload", [b"this is not a png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_image_is_named_when_the_dataset_is_loaded(tmp_path, payload):
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"])
    bad = tmp_path / "covid" / "train" / "non-COVID" / "img_1.png"
    bad.write_bytes(payload)
    with pytest.raises(UserError) as exc:
        get_dataset("covid", str(tmp_path))
    msg = str(exc.value)
    assert str(bad) in msg and msg.startswith("1 of 8 image files of dataset 'covid' cannot be read")
    assert "\n" not in msg


def test_truncated_jpeg_is_named_when_the_dataset_is_loaded(tmp_path):
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"])
    path = tmp_path / "covid" / "test" / "COVID" / "big.jpg"
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as exc:
        get_dataset("covid", str(tmp_path))
    assert str(path) in str(exc.value) and "truncated" in str(exc.value)


def test_decode_failures_of_one_batch_are_reported_together(tmp_path, monkeypatch):
    # files that slip through the quick load-time check still fail loudly, all at once
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"])
    bad1 = tmp_path / "covid" / "train" / "COVID" / "img_1.png"
    bad2 = tmp_path / "covid" / "train" / "non-COVID" / "img_0.png"
    bad1.write_bytes(b"not an image")
    bad2.write_bytes(b"neither")
    monkeypatch.setattr(dbase, "check_image_file", lambda path: None)
    train, test, info = get_dataset("covid", str(tmp_path))
    assert train.get_batch([0, 3])[0].shape == (2, 3, 224, 224)       # good files still load
    with pytest.raises(UserError) as exc:
        train.get_batch(torch.arange(4))
    msg = str(exc.value)
    assert msg.startswith("2 of 2 image files of a batch cannot be read")  # 0 and 3 were decoded before
    assert str(bad1) in msg and str(bad2) in msg
    with pytest.raises(UserError) as exc:
        train[1]
    assert str(bad1) in str(exc.value) and str(bad2) not in str(exc.value)


def test_folder_images_are_decoded_once_and_cache_is_shared(tmp_path, monkeypatch):
    make_folder_dataset(tmp_path / "covid", ["COVID", "non-COVID"], per_class=3)
    train, test, info = get_dataset("covid", str(tmp_path))
    calls = []
    real = dbase.decode_image

    def counting(path, size_hw, *a, **k):
        calls.append(os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path))
        return real(path, size_hw, *a, **k)

    monkeypatch.setattr(dbase, "decode_image", counting)
    first, _ = train.get_batch(torch.tensor([0, 4, 4]))
    assert sorted(calls) == ["COVID/img_0.png", "non-COVID/img_1.png"]
    again, _ = train.get_batch(torch.tensor([4, 0]))          # second epoch: no decoding
    assert len(calls) == 2 and torch.equal(again[0], first[1])
    sub = train.subset([4, 5])                                 # a view shares the cache
    assert sub.shares_storage_with(train)
    sub.get_batch([0])
    assert len(calls) == 2
    sub.get_batch([1])
    assert calls[-1] == "non-COVID/img_2.png" and len(calls) == 3
    train.get_batch([5])
    assert len(calls) == 3
    # the cache really holds the pixels: the file can go away
    os.remove(tmp_path / "covid" / "train" / "COVID" / "img_0.png")
    assert colour_of(train[0][0]) == colour_of(first[0])
    # picklable (DataLoader workers started with 'spawn'), cache included
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone.get_batch([0, 4])[0], train.get_batch([0, 4])[0])
    assert clone.names == train.names and torch.equal(clone.labels, train.labels)


# ----------------------------------------------------------------------------- MedMNIST
def write_medmnist(root, name, n=(6, 2, 4), label_cols=1, seed=0):
    rng = np.random.RandomState(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.randint(0, 256, (k, 28, 28), dtype=np.uint8)
        if label_cols == 1:
            arrays[f"{split}_labels"] = rng.randint(0, 2, (k, 1)).astype(np.uint8)
        else:
            lab = np.zeros((k, label_cols), dtype=np.uint8)
            for i in range(k):
                if i % 2:                        # odd rows: one or two findings
                    lab[i, rng.randint(0, label_cols, size=1 + i % 3 // 2)] = 1
            arrays[f"{split}_labels"] = lab
    os.makedirs(root, exist_ok=True)
    np.savez(os.path.join(root, f"{name}.npz"), **arrays)
    return arrays


@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist"])
def test_medmnist_single_label(tmp_path, monkeypatch, name):
    import medmnist

    arrays = write_medmnist(str(tmp_path), name)
    cls_name = medmnist.INFO[name]["python_class"]
    real_cls = getattr(medmnist, cls_name)
    seen = []

    class Spy(real_cls):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(medmnist, cls_name, Spy)
    train, test, info = get_dataset(name, str(tmp_path))
    assert [k["split"] for k in seen] == ["train", "test"] and all(k["download"] is False for k in seen)
    assert info.image_size == (28, 28, 3) and info.native_kind == "medmnist28" and info.n_classes == 2
    assert info.class_names == [medmnist.INFO[name]["label"]["0"], medmnist.INFO[name]["label"]["1"]]
    assert len(train) == 6 and len(test) == 4
    assert train.labels.tolist() == arrays["train_labels"][:, 0].tolist()
    assert test.labels.tolist() == arrays["test_labels"][:, 0].tolist()
    x, y = test.get_batch(torch.arange(4))
    assert x.shape == (4, 3, 28, 28)
    expected = torch.from_numpy(arrays["test_images"]).float() / 255
    for c in range(3):
        assert torch.allclose(x[:, c], expected)
    assert train.names[:2] == ["train/0", "train/1"]


def test_chestmnist_any_finding_is_abnormal(tmp_path):
    arrays = write_medmnist(str(tmp_path), "chestmnist", n=(8, 2, 6), label_cols=14)
    train, test, info = get_dataset("chestmnist", str(tmp_path))
    assert info.class_names == ["normal", "abnormal"] and info.n_classes == 2
    assert train.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert arrays["train_labels"][3].sum() >= 1 and arrays["train_labels"][2].sum() == 0
    assert test.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_medmnist_missing_file(tmp_path):
    with pytest.raises(UserError) as exc:
        get_dataset("breastmnist", str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path / "breastmnist.npz") in msg and "medmnist" in msg and "zenodo" in msg


def test_medmnist_file_without_expected_arrays(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError) as exc:
        get_dataset("pneumoniamnist", str(tmp_path))
    assert "train_images" in str(exc.value) and str(tmp_path / "pneumoniamnist.npz") in str(exc.value)


def test_medmnist_refuses_other_image_size(tmp_path):
    write_medmnist(str(tmp_path), "pneumoniamnist")
    with pytest.raises(UserError, match="28x28"):
        get_dataset("pneumoniamnist", str(tmp_path), image_size=64)


# ----------------------------------------------------------------------------- CIFAR
def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, per_file=4):
    folder = os.path.join(root, "cifar-10-batches-py")
    rng = np.random.RandomState(1)
    data = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.randint(0, 256, (per_file, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.randint(0, 10, per_file)]
        dump(os.path.join(folder, f), {"data": x, "labels": y})
        data[f] = (x, y)
    dump(os.path.join(folder, "batches.meta"), {"label_names": [f"c{i}" for i in range(10)]})
    return data


def test_cifar10_local_files_without_md5(tmp_path):
    import torchvision

    data = write_cifar10(str(tmp_path))
    with pytest.raises(RuntimeError):   # the stock class rejects our files (md5) ...
        torchvision.datasets.CIFAR10(root=str(tmp_path), train=True, download=False)
    train, test, info = get_dataset("cifar10", str(tmp_path))   # ... ours reads them
    assert info.image_size == (32, 32, 3) and info.native_kind == "small32" and info.n_classes == 10
    assert info.class_names == [f"c{i}" for i in range(10)]
    assert len(train) == 20 and len(test) == 4
    expected_y = sum((data[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_y
    x, _ = test.get_batch([2])
    raw = data["test_batch"][0][2].reshape(3, 32, 32)
    assert torch.equal((x[0] * 255).round().to(torch.uint8), torch.from_numpy(raw))


def test_cifar100_uses_coarse_superclasses(tmp_path):
    folder = tmp_path / "cifar-100-python"
    rng = np.random.RandomState(2)
    coarse = {"train": [0, 19, 7, 7, 3], "test": [19, 0, 5]}
    for split in ("train", "test"):
        n = len(coarse[split])
        dump(str(folder / split), {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                                   "fine_labels": [int(v) for v in rng.randint(0, 100, n)],
                                   "coarse_labels": coarse[split]})
    dump(str(folder / "meta"), {"fine_label_names": [f"f{i}" for i in range(100)],
                                "coarse_label_names": [f"super{i}" for i in range(20)]})
    train, test, info = get_dataset("cifar100", str(tmp_path))
    assert info.n_classes == 20 and info.class_names[19] == "super19"
    assert train.labels.tolist() == coarse["train"] and test.labels.tolist() == coarse["test"]


def test_cifar_missing_files(tmp_path):
    with pytest.raises(UserError) as exc:
        get_dataset("cifar10", str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cs.toronto.edu" in msg


def test_cifar_one_missing_file(tmp_path):
    write_cifar10(str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(UserError) as exc:
        get_dataset("cifar10", str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_4") in str(exc.value)
    assert "data_batch_3," not in str(exc.value)


def test_cifar_corrupt_file(tmp_path):
    write_cifar10(str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError) as exc:
        get_dataset("cifar10", str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in str(exc.value)


# ----------------------------------------------------------------------------- digits
def test_digits_offline_split():
    train, test, info = get_dataset("digits", "/nonexistent-root-is-fine")
    assert info.image_size == (32, 32, 3) and info.n_classes == 10 and info.native_kind == "small32"
    assert len(train) + len(test) == 1797 and len(test) == 540
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 52 and int(counts.max()) <= 55          # stratified
    x, y = train.get_batch(torch.arange(len(train)))
    assert x.shape == (len(train), 3, 32, 32)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x[:, 0], x[:, 2])
    again, _, _ = get_dataset("digits", "x")
    assert torch.equal(again.get_batch([0, 5, 9])[0], x[[0, 5, 9]])


# ----------------------------------------------------------------------------- synth_lesion
@pytest.fixture(scope="module")
def synth0():
    return get_dataset("synth_lesion", "unused")


@pytest.mark.slow
def test_synth_lesion_splits_and_determinism(synth0):
    train, test, info = synth0
    assert info.image_size == (32, 32, 3) and info.native_kind == "small32"
    assert info.class_names == ["normal", "lesion"]
    assert torch.bincount(train.labels).tolist() == [2000, 500]
    assert torch.bincount(test.labels).tolist() == [500, 500]
    x, y = train.get_batch(torch.arange(len(train)))
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.std()) > 0.02

    # a second, independent generation with the same seed gives identical images
    again, labels_again = generate_synth_lesion(2000, 500, seed=0, split_id=0)
    assert torch.equal((x * 255).round().to(torch.uint8), again) and torch.equal(y, labels_again)
    train1, test1, _ = get_dataset("synth_lesion", "unused", seed=1)
    assert not torch.equal(train1.get_batch(torch.arange(100))[0], x[:100])
    assert not torch.equal(train1.labels, y)
    # train and test are different images
    assert not torch.equal(test.get_batch(torch.arange(100))[0], x[:100])

    # classes differ in fine detail only: per-image global statistics look alike
    xt, yt = test.get_batch(torch.arange(len(test)))
    diff = (xt[yt == 0].mean(0) - xt[yt == 1].mean(0)).abs().mean()
    assert float(diff) < 0.01
    assert abs(float(xt[yt == 0].mean()) - float(xt[yt == 1].mean())) < 0.01


def test_synth_lesion_anomalies_are_small_local_additions():
    images, labels, clean, masks = generate_synth_lesion(300, 300, seed=3, return_parts=True)
    normal, anom = labels == 0, labels == 1
    assert torch.equal(images[normal], clean[normal])
    assert float(masks[normal].abs().sum()) == 0.0
    changed = (images.int() - clean.int()).abs().sum(dim=1) > 0          # N x 32 x 32
    per_image = changed[anom].flatten(1).sum(1)
    assert int(per_image.min()) >= 1                                      # every anomaly shows
    assert int(per_image.max()) <= 60 and float(per_image.float().mean()) < 30   # <= 6% of 1024 px
    assert not bool((changed & (masks[:, 0] == 0)).any())                 # only inside the lesions
    # lesions are visible: the strongest change is large
    strongest = (images.int() - clean.int()).abs().amax(dim=(1, 2, 3))[anom]
    assert float(strongest.float().median()) > 40
    # the same call again gives the same images
    images2, labels2 = generate_synth_lesion(300, 300, seed=3)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("synth_lesion_half", "spot"), ("synth_streak", "streak"),
                                        ("synth_streak_half", "streak")])
def test_synth_variants_share_the_tissue_and_differ_in_lesions(name, shape):
    from datasets.synth_lesion import VARIANTS

    train, test, info = get_dataset(name, "unused")
    assert info.name == name and info.image_size == (32, 32, 3)
    assert torch.bincount(test.labels).tolist() == [500, 500]
    images, labels, clean, masks = generate_synth_lesion(300, 300, seed=3, return_parts=True, variant=name)
    base, base_labels, base_clean, base_masks = generate_synth_lesion(300, 300, seed=3, return_parts=True)
    # the labels and the first chunk's tissue (512 images) come from the same draws as synth_lesion
    assert torch.equal(labels, base_labels) and torch.equal(clean[:512], base_clean[:512])
    anom = labels == 1
    assert torch.equal(images[~anom], clean[~anom])
    area = (masks[anom] > 0).float().mean().item()
    base_area = (base_masks[anom] > 0).float().mean().item()
    assert area < 0.05                                                    # a few percent of the pixels
    if name == "synth_lesion_half":                                       # half the area of synth_lesion's spots
        assert 0.4 < area / base_area < 0.6
    if shape == "streak":                                                 # thin: few pixels wide, long
        big = masks[anom][:, 0] > 0.5
        rows, cols = big.any(dim=2).sum(dim=1).float(), big.any(dim=1).sum(dim=1).float()
        extent = torch.maximum(rows, cols)
        assert float(extent.median()) >= (5 if name == "synth_streak" else 2.5)
    if name == "synth_streak_half":
        full = generate_synth_lesion(300, 300, seed=3, return_parts=True, variant="synth_streak")[3]
        ratio = (masks[anom] > 0).float().mean().item() / (full[anom] > 0).float().mean().item()
        assert 0.4 < ratio < 0.75                                         # the round ends keep some area
    assert set(VARIANTS) >= {"synth_lesion", name}


# ----------------------------------------------------------------------------- one_class_split
def small_digits():
    return get_dataset("digits", "x")


def test_one_class_split_clean():
    train, test, info = small_digits()
    normal, test_out = one_class_split(train, test, info, 3)
    assert test_out is test
    n3 = int((train.labels == 3).sum())
    assert len(normal) == n3 and bool((normal.labels == 3).all())
    assert normal.shares_storage_with(train)
    idx = torch.nonzero(train.labels == 3).flatten()
    assert normal.names == [train.names[i] for i in idx.tolist()]
    assert torch.equal(normal.get_batch(torch.arange(5))[0], train.get_batch(idx[:5])[0])


def test_one_class_split_contamination_count_and_determinism():
    train, test, info = small_digits()
    n3 = int((train.labels == 3).sum())
    for r in (0.05, 0.2, 0.5):
        mixed, _ = one_class_split(train, test, info, 3, contamination_ratio=r, seed=0)
        extra = int(round(r / (1 - r) * n3))
        assert len(mixed) == n3 + extra
        assert int((mixed.labels == 3).sum()) == n3                      # original labels kept
        assert int((mixed.labels != 3).sum()) == extra
        assert len(set(mixed.names)) == len(mixed)                       # no image twice
    a, _ = one_class_split(train, test, info, 3, contamination_ratio=0.2, seed=0)
    b, _ = one_class_split(train, test, info, 3, contamination_ratio=0.2, seed=0)
    c, _ = one_class_split(train, test, info, 3, contamination_ratio=0.2, seed=1)
    assert a.names == b.names and torch.equal(a.labels, b.labels)
    assert a.names != c.names


def test_one_class_split_bad_arguments():
    train, test, info = small_digits()
    with pytest.raises(UserError) as exc:
        one_class_split(train, test, info, 10)
    msg = str(exc.value)
    assert "0..9" in msg and "'digits'" in msg and "9='9'" in msg
    with pytest.raises(UserError):
        one_class_split(train, test, info, -1)
    for r in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(UserError, match=r"\[0, 1\)"):
            one_class_split(train, test, info, 0, contamination_ratio=r)
    with pytest.raises(UserError, match="only"):
        one_class_split(train, test, info, 0, contamination_ratio=0.95)


def test_one_class_split_on_folder_dataset_names_classes(tmp_path):
    make_folder_dataset(tmp_path / "OCT2017", ["CNV", "DME", "DRUSEN", "NORMAL"], per_class=2)
    train, test, info = get_dataset("retina", str(tmp_path))
    normal, _ = one_class_split(train, test, info, 0)
    assert [n.split("/")[2] for n in normal.names] == ["NORMAL", "NORMAL"]
    with pytest.raises(UserError) as exc:
        one_class_split(train, test, info, 2)
    assert "0..1" in str(exc.value) and "NORMAL" in str(exc.value) and "abnormal" in str(exc.value)


# ----------------------------------------------------------------------------- ImageDataset API
def test_image_dataset_views(synth0):
    train, test, info = synth0
    x_all, y_all = train.get_batch(torch.arange(len(train)))
    sub = train.subset(torch.tensor([10, 3, 7]))
    assert len(sub) == 3 and sub.names == ["train/10", "train/3", "train/7"]
    assert torch.equal(sub.get_batch([0, 1, 2])[0], x_all[[10, 3, 7]])
    assert torch.equal(sub.labels, y_all[[10, 3, 7]])
    assert torch.equal(sub[-1][0], x_all[7]) and sub[-1][1] == int(y_all[7])
    subsub = sub.subset(np.array([2]))
    assert subsub.names == ["train/7"]
    joined = ImageDataset.concat([sub, train.subset([0])])
    assert joined.names == ["train/10", "train/3", "train/7", "train/0"]
    assert torch.equal(joined.get_batch(torch.arange(4))[0], x_all[[10, 3, 7, 0]])
    with pytest.raises(ValueError):
        ImageDataset.concat([sub, test.subset([0])])
    with pytest.raises(IndexError):
        sub[3]
    with pytest.raises(IndexError):
        sub.get_batch([5])
    empty = sub.subset([])
    assert len(empty) == 0 and empty.get_batch([])[0].shape == (0, 3, 32, 32)
    x_np, y_np = train.get_batch(np.array([4, 1], dtype=np.int32))
    assert torch.equal(x_np, x_all[[4, 1]]) and y_np.dtype == torch.long
    mask = train.labels == 1
    assert len(train.subset(mask)) == 500
    x, y = test[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert train.targets[:5] == y_all[:5].tolist()
