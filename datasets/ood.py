"""Out-of-distribution sets of CSI's unlabeled multi-class setting, read as they are distributed.

In that setting the whole training set is normal, the whole in-distribution test set is the
normal test set, and each ``--ood_dataset`` is scored as the anomalies. CSI reads every set
below its data folder; here that folder is ``--data_root``:

=================  ==========================================  ==========================================
name               under ``--data_root``                       images used
=================  ==========================================  ==========================================
``svhn``           ``test_32x32.mat``                          the SVHN test split (torchvision's file)
``lsun_resize``    ``LSUN_resize/``                            all (32 px as distributed)
``imagenet_resize````Imagenet_resize/``                        all
``lsun_fix``       ``LSUN_fix/``                               all
``imagenet_fix``   ``Imagenet_fix/``                           all
``cifar100``       ``cifar-100-python/test``                   the CIFAR-100 test split
``cub``            ``cub200/``                                 3000 (see below)
``stanford_dogs``  ``stanford_dogs/``                          3000
``flowers102``     ``flowers102/``                             3000
``places365``      ``places365/``                              3000
``food_101``       ``food-101/images/`` (``hot_dog`` left out)  3000
``caltech_256``    ``caltech-256/``                            3000
``dtd``            ``dtd/images/``                             3000
``pets``           ``pets/``                                   3000
``interp``         made from the in-distribution test set      one per test image
other names        a dataset of this project (``digits``, ``cifar10``, ``imagenet`` ...): its test split
=================  ==========================================  ==========================================

Folders are read in the order of torchvision's ``ImageFolder`` (class sub-folders sorted, the
files below each found by ``sorted(os.walk(...))`` and sorted names, torchvision's image
extensions); a folder without class sub-folders (as CSI's ``*_fix`` scripts write them) gives
the image files directly inside it, sorted. Hidden entries are skipped.

Sizes follow CSI's transforms: every set is resized (PIL bilinear) to the in-distribution
size ``(H, W)``, as ``transforms.Resize((H, W))`` does; the eight ImageNet-30 sets (and
``imagenet``) are, for a 224-px model, ``Resize(256)`` then ``CenterCrop(224)``, CSI's test
transform. Those eight sets are cut to 3000 images as CSI's ``get_subset_with_len`` does: the
first 3000 of ``numpy`` seed 0's shuffle of the indices, in that order.

``interp`` is CSI's: in-distribution test images in batches of ``--test_batch_size`` ``B``;
image ``n >= B`` becomes ``(x[n] + x[n - B]) / 2`` (the image at the same place of the previous
batch, weights 1/2), and the first ``B`` images stay as they are.

Missing data is one :class:`~common.errors.UserError` naming the path and where the data comes from.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.io import loadmat

from common.errors import UserError

from .base import (ArrayStore, DatasetInfo, FolderStore, ImageDataset, _reason, check_image_files, is_hidden,
                   is_image_file, native_kind_for)
from .cifar import cifar100_test_split
from .names import ALL_DATASET_NAMES

INTERP = "interp"
CIFAR10_OOD = ("svhn", "lsun_resize", "imagenet_resize", "lsun_fix", "imagenet_fix", "cifar100", INTERP)
IMAGENET30_OOD = ("cub", "stanford_dogs", "flowers102", "places365", "food_101", "caltech_256", "dtd", "pets")
# CSI's eval.py defaults; its train.py evaluates ImageNet-30 against the first three only
DEFAULT_OOD = {"cifar10": CIFAR10_OOD, "imagenet": IMAGENET30_OOD}
TRAIN_DEFAULT_OOD = {"cifar10": CIFAR10_OOD, "imagenet": IMAGENET30_OOD[:3]}

SUBSET_LEN = 3000      # CSI's get_subset_with_len(..., length=3000, shuffle=True)
RESIZE_SHORT, CROP = 256, 224

_SOURCES = {
    "svhn": "the SVHN test split, test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ (the file "
            "torchvision's SVHN(split='test') reads), placed directly in --data_root",
    "lsun_resize": "LSUN_resize.tar.gz (CSI's README: https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz), "
                   "extracted into --data_root",
    "imagenet_resize": "Imagenet_resize.tar.gz (CSI's README: "
                       "https://www.dropbox.com/s/kp3my3412u5k9rl/Imagenet_resize.tar.gz), extracted into --data_root",
    "lsun_fix": "CSI's LSUN_fix (Google Drive link in CSI's README, or its datasets/lsun_fix_preprocess.py), "
                "extracted into --data_root",
    "imagenet_fix": "CSI's Imagenet_fix (Google Drive link in CSI's README, or its "
                    "datasets/imagenet_fix_preprocess.py), extracted into --data_root",
    "cifar100": "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted into --data_root",
    "cub": "CUB-200-2011 (http://www.vision.caltech.edu/visipedia/CUB-200-2011.html), extracted into cub200/",
    "stanford_dogs": "Stanford Dogs (http://vision.stanford.edu/aditya86/ImageNetDogs/), its images in stanford_dogs/",
    "flowers102": "Oxford 102 Flowers (https://www.robots.ox.ac.uk/~vgg/data/flowers/), its images in flowers102/",
    "places365": "the Places-365 validation images (http://data.csail.mit.edu/places/places365/val_256.tar), "
                 "extracted into places365/",
    "food_101": "Food-101 (https://www.kaggle.com/dansbecker/food-101), food-101/images/<class>/",
    "caltech_256": "Caltech-256 (https://www.kaggle.com/jessicali9530/caltech256), its class folders in caltech-256/",
    "dtd": "the Describable Textures Dataset (https://www.robots.ox.ac.uk/~vgg/data/dtd/), dtd/images/<class>/",
    "pets": "Oxford-IIIT Pets (https://www.robots.ox.ac.uk/~vgg/data/pets/), its images in pets/",
}
# name -> (folder under --data_root, one of the ImageNet-30 sets: 3000 images, 224-px crop)
FOLDER_SETS: Dict[str, Tuple[str, bool]] = {
    "lsun_resize": ("LSUN_resize", False), "imagenet_resize": ("Imagenet_resize", False),
    "lsun_fix": ("LSUN_fix", False), "imagenet_fix": ("Imagenet_fix", False),
    "cub": ("cub200", True), "stanford_dogs": ("stanford_dogs", True), "flowers102": ("flowers102", True),
    "places365": ("places365", True), "food_101": (os.path.join("food-101", "images"), True),
    "caltech_256": ("caltech-256", True), "dtd": (os.path.join("dtd", "images"), True), "pets": ("pets", True),
}
LEFT_OUT_CLASSES = {"food_101": ("hot_dog",)}   # CSI's README: "For Food-101, remove hotdog class"
CSI_OOD_NAMES = ("svhn", "cifar100", INTERP) + tuple(FOLDER_SETS)
IMAGENET30_SOURCE = ("CSI's ImageNet-30 (one_class_train.tar and one_class_test.tar, Google Drive links in CSI's "
                     "README), extracted into ImageNet/ under --data_root")


def default_ood_names(dataset: str, program: str = "eval") -> Tuple[str, ...]:
    """CSI's default ``--ood_dataset`` for ``dataset`` (empty when it has none)."""
    return tuple((TRAIN_DEFAULT_OOD if program == "train" else DEFAULT_OOD).get(dataset, ()))


def valid_ood_names() -> Tuple[str, ...]:
    return CSI_OOD_NAMES + tuple(n for n in ALL_DATASET_NAMES if n not in CSI_OOD_NAMES)


def check_ood_names(names: Sequence[str], dataset: str) -> List[str]:
    """``names`` without repeats; an unknown name, or the in-distribution dataset itself, is a UserError."""
    valid = valid_ood_names()
    out = []
    for name in names:
        if name not in valid:
            raise UserError(f"--ood_dataset {name!r} is not an out-of-distribution set this code reads; valid names: "
                            f"{', '.join(valid)}")
        if name == dataset:
            raise UserError(f"--ood_dataset {name} is the in-distribution dataset itself; name other sets")
        if name not in out:
            out.append(name)
    return out


# --------------------------------------------------------------------------- folders


def imagefolder_listing(folder: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """``(classes, [(path, class index), ...])`` of ``folder`` in torchvision ``ImageFolder``'s order.

    Classes are the sub-folders holding images, sorted; each one's files come from
    ``sorted(os.walk(class_dir))`` with sorted names. Without such sub-folders, the images
    directly in ``folder`` (sorted) form one class named after it.
    """
    classes, samples = [], []
    subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))
    for c in subdirs:
        cdir = os.path.join(folder, c)
        found = []
        for root, _, fnames in sorted(os.walk(cdir, followlinks=True)):
            rel = os.path.relpath(root, cdir)
            if rel != "." and any(is_hidden(part) for part in rel.split(os.sep)):
                continue
            found.extend(os.path.join(root, f) for f in sorted(fnames) if not is_hidden(f) and is_image_file(f))
        if found:
            samples.extend((p, len(classes)) for p in found)
            classes.append(c)
    if not samples:
        flat = sorted(e.name for e in os.scandir(folder) if e.is_file() and not is_hidden(e.name) and is_image_file(e.name))
        if flat:
            classes = [os.path.basename(os.path.normpath(folder))]
            samples = [(os.path.join(folder, f), 0) for f in flat]
    return classes, samples


def csi_subset_order(n: int, length: int | None = None) -> np.ndarray:
    """The indices CSI's ``get_subset_with_len(dataset, length, shuffle=True)`` keeps, in its order:
    numpy's global generator seeded with 0 shuffles ``arange(n)``, the first ``length`` stay
    (all of them when the set is smaller)."""
    index = np.arange(n)
    np.random.RandomState(0).shuffle(index)  # the legacy generator np.random.seed(0) sets up
    return index[:SUBSET_LEN if length is None else length]


def decode_resize_crop(path: str, short: int = RESIZE_SHORT, crop: int = CROP) -> torch.Tensor:
    """CSI's ImageNet test transform on one file: RGB, ``Resize(short)`` (the shorter side, PIL
    bilinear) then ``CenterCrop(crop)``; ``uint8 3 x crop x crop``. A bad file is a UserError."""
    try:
        with Image.open(path) as img:
            img = TF.center_crop(TF.resize(img.convert("RGB"), short), [crop, crop])
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        err = UserError(f"image file {path} has disappeared since the dataset was listed; restore it")
        err.reason = "the file has disappeared"
        raise err from None
    except Exception as exc:  # PIL raises many kinds
        err = UserError(f"cannot read image file {path} ({_reason(exc)}); the file is corrupt or not an image: "
                        f"replace or delete it")
        err.reason = _reason(exc)
        raise err from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class CropFolderStore(FolderStore):
    """A :class:`FolderStore` whose files are decoded by :func:`decode_resize_crop` (CSI's
    ``Resize(256)`` + ``CenterCrop(224)``) instead of a plain resize."""

    def __init__(self, paths, crop: int = CROP, short: int = RESIZE_SHORT, **kwargs):
        self.short = int(short)
        super().__init__(paths, (crop, crop), **kwargs)

    def _load(self, i: int):
        try:
            self._cache[i] = decode_resize_crop(self.paths[i], self.short, self.size_hw[0])
        except UserError as exc:
            return exc
        return None


def _store(paths, hw, imagenet_style: bool, what: str, check: bool = True):
    if imagenet_style and tuple(hw) == (CROP, CROP):
        return CropFolderStore(paths, CROP, check=check, what=what)
    return FolderStore(paths, hw, check=check, what=what)


def _names(paths, data_root):
    root = os.path.abspath(data_root)
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def load_folder_set(name: str, data_root: str, hw: Tuple[int, int]) -> ImageDataset:
    """One of :data:`FOLDER_SETS`, its images resized as CSI resizes them for a model of ``hw``."""
    rel, imagenet_style = FOLDER_SETS[name]
    folder = os.path.abspath(os.path.join(data_root, rel))
    if not os.path.isdir(folder):
        raise UserError(f"out-of-distribution set '{name}': folder {folder} not found; it comes from "
                        f"{_SOURCES[name]} (automatic downloads are off)")
    classes, samples = imagefolder_listing(folder)
    left_out = [c for c in LEFT_OUT_CLASSES.get(name, ()) if c in classes]
    if left_out:
        gone = {classes.index(c) for c in left_out}
        samples = [s for s in samples if s[1] not in gone]
        print(f"note: out-of-distribution set '{name}': class folder(s) {', '.join(left_out)} left out, as CSI's "
              f"README asks (they overlap the in-distribution classes)", flush=True)
    if not samples:
        raise UserError(f"out-of-distribution set '{name}': folder {folder} holds no images (extensions .jpg .jpeg "
                        f".png .ppm .bmp .pgm .tif .tiff .webp, in it or in class sub-folders); it comes from "
                        f"{_SOURCES[name]}")
    paths = [p for p, _ in samples]
    if imagenet_style:
        paths = [paths[i] for i in csi_subset_order(len(paths))]
    store = _store(paths, hw, imagenet_style, f"out-of-distribution set '{name}'")
    return ImageDataset(store, torch.zeros(len(paths), dtype=torch.long), _names(paths, data_root))


def resize_uint8(images: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``uint8 N x 3 x h x w`` -> ``N x 3 x H x W`` by PIL's bilinear resize (``transforms.Resize``)."""
    if tuple(images.shape[-2:]) == tuple(hw):
        return images

    h, w = hw
    out = [np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR))
           for img in images]
    if not out:
        return torch.zeros(0, 3, h, w, dtype=torch.uint8)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def load_svhn(data_root: str, hw: Tuple[int, int]) -> ImageDataset:
    """The SVHN test split from torchvision's ``test_32x32.mat`` (``X``: 32 x 32 x 3 x N, ``y``)."""
    path = os.path.join(os.path.abspath(data_root), "test_32x32.mat")
    if not os.path.isfile(path):
        raise UserError(f"out-of-distribution set 'svhn': {path} not found; it comes from {_SOURCES['svhn']} "
                        f"(automatic downloads are off)")
    try:
        mat = loadmat(path)
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except Exception as exc:  # scipy raises ValueError, MatReadError, KeyError ...
        raise UserError(f"out-of-distribution set 'svhn': cannot read {path} ({_reason(exc)}); replace it with the "
                        f"original file ({_SOURCES['svhn']})") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape[0] != x.shape[3]:
        raise UserError(f"out-of-distribution set 'svhn': {path} holds X of shape {x.shape} and {y.shape[0]} labels; "
                        f"SVHN's test_32x32.mat holds X 32 x 32 x 3 x N and N labels")
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)).astype(np.uint8)))
    images = resize_uint8(images, hw)
    labels = torch.from_numpy((y.astype(np.int64) % 10))  # torchvision: label 10 is the digit 0
    return ImageDataset(ArrayStore(images), labels, [f"svhn/test/{i}" for i in range(images.shape[0])])


def load_cifar100_test(data_root: str, hw: Tuple[int, int]) -> ImageDataset:
    """The CIFAR-100 test split with its fine labels (``datasets.cifar.cifar100_test_split``), resized to ``hw``."""
    images, labels = cifar100_test_split(data_root, "out-of-distribution set 'cifar100'")
    images = resize_uint8(images, hw)
    return ImageDataset(ArrayStore(images), labels, [f"cifar100/test/{i}" for i in range(images.shape[0])])


def with_interp(ood_sets: Dict[str, object], test_set, batch_size: int) -> Dict[str, object]:
    """``ood_sets`` with the :data:`INTERP` marker replaced by :class:`InterpDataset` of ``test_set``."""
    return {n: (InterpDataset(test_set, batch_size) if isinstance(d, str) else d) for n, d in ood_sets.items()}


class InterpDataset:
    """CSI's ``interp`` set: the in-distribution test images mixed with the image ``batch_size``
    places earlier (the same place in the previous batch of CSI's test loader), weights 1/2;
    the first ``batch_size`` images are the test images themselves, as in CSI's code.
    Images are made on request (float, so the halves are exact); ``get_batch`` and ``subset``
    as :class:`ImageDataset` (``index``: which interp images this view holds)."""

    def __init__(self, base, batch_size: int, index=None):
        if int(batch_size) < 1:
            raise ValueError("interp needs a batch size of at least 1")
        self.base, self.batch_size = base, int(batch_size)
        self._index = torch.arange(len(base)) if index is None else torch.as_tensor(index, dtype=torch.long)
        self.labels = torch.zeros(len(self._index), dtype=torch.long)
        self.names = [f"interp/{i}" for i in self._index.tolist()]
        self.image_size = base.image_size

    def __len__(self) -> int:
        return len(self._index)

    def partners(self) -> torch.Tensor:
        """Test-set index of the image each one is mixed with (-1: none)."""
        back = self._index - self.batch_size
        return torch.where(back >= 0, back, torch.full_like(back, -1))

    def get_batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        pos = self._index.index_select(0, idx)
        x, _ = self.base.get_batch(pos)
        back = pos - self.batch_size
        mixed = back >= 0
        if bool(mixed.any()):
            prev, _ = self.base.get_batch(back[mixed])
            x[mixed] = (x[mixed] + prev) / 2
        return x, self.labels.index_select(0, idx)

    def subset(self, indices) -> "InterpDataset":
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        return InterpDataset(self.base, self.batch_size, self._index.index_select(0, idx))


# --------------------------------------------------------------------------- ImageNet-30


def imagenet30_base(data_root: str) -> str:
    """Where ImageNet-30 lies: ``<data_root>/ImageNet`` (CSI's IMAGENET_PATH), or ``<data_root>``
    itself when ``one_class_train/`` is there."""
    root = os.path.abspath(data_root)
    csi = os.path.join(root, "ImageNet")
    if not os.path.isdir(os.path.join(csi, "one_class_train")) and os.path.isdir(os.path.join(root, "one_class_train")):
        return root
    return csi


def load_imagenet30(data_root: str, hw: Tuple[int, int] = (CROP, CROP)):
    """ImageNet-30 (CSI's ``imagenet``): ``one_class_train/`` and ``one_class_test/``, 30 class
    folders each, read as ``ImageFolder`` reads them; images ``Resize(256)`` + ``CenterCrop(224)``
    (CSI's test transform; another ``hw``: a plain resize)."""
    base = imagenet30_base(data_root)
    listed, classes = [], None
    for split in ("one_class_train", "one_class_test"):
        folder = os.path.join(base, split)
        if not os.path.isdir(folder):
            raise UserError(f"dataset 'imagenet' (ImageNet-30): folder {folder} not found; it comes from "
                            f"{IMAGENET30_SOURCE} (automatic downloads are off)")
        found, samples = imagefolder_listing(folder)
        if not samples or found == [os.path.basename(folder)]:
            raise UserError(f"dataset 'imagenet' (ImageNet-30): {folder} holds no class folders with images; "
                            f"expected {folder}{os.sep}<class>{os.sep}<images>, from {IMAGENET30_SOURCE}")
        if classes is not None and found != classes:
            raise UserError(f"dataset 'imagenet' (ImageNet-30): one_class_train and one_class_test under {base} have "
                            f"different class folders ({len(classes)} and {len(found)}); labels come from the sorted "
                            f"folder names, so both need the same ones")
        classes = found
        listed.append(samples)
    check_image_files([p for samples in listed for p, _ in samples], "dataset 'imagenet' (ImageNet-30)")
    sets = []
    for samples in listed:
        paths = [p for p, _ in samples]
        store = _store(paths, hw, True, "dataset 'imagenet'", check=False)
        sets.append(ImageDataset(store, torch.tensor([c for _, c in samples], dtype=torch.long),
                                 _names(paths, data_root)))

    info = DatasetInfo(name="imagenet", image_size=(hw[0], hw[1], 3), n_classes=len(classes),
                       class_names=list(classes), native_kind=native_kind_for(*hw))
    if len(classes) != 30:
        print(f"note: dataset 'imagenet': {len(classes)} class folders under {base} (ImageNet-30 has 30)",
              file=sys.stderr, flush=True)
    return sets[0], sets[1], info
