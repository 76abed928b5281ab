"""CIFAR-10 and CIFAR-100 (20 superclasses) through torchvision's classes, never downloading.

torchvision verifies the md5 of every batch file; the subclasses here check only that the
files are present (the files are read right after, so a damaged one still fails, as a
UserError). CIFAR-100 labels are the 20 coarse labels stored in the same pickles
(``coarse_labels``), class names from the ``meta`` file's ``coarse_label_names``.
"""
from __future__ import annotations

import os
import pickle
from typing import List, Tuple

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from common.errors import UserError

from .base import ArrayStore, DatasetInfo, ImageDataset

CIFAR_SOURCE = ("https://www.cs.toronto.edu/~kriz/cifar.html ({archive}, extracted into --data_root); "
                "automatic downloads are off")


def _read_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


class _PresentFilesMixin:
    """Replace torchvision's md5 checks by a presence check (the data is parsed right after)."""

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"metadata file {path} not found")
        self.classes = list(_read_pickle(path)[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class LocalCIFAR10(_PresentFilesMixin, CIFAR10):
    """torchvision CIFAR10 reading ``{root}/cifar-10-batches-py`` without md5 checks or downloads."""


class LocalCIFAR100(_PresentFilesMixin, CIFAR100):
    """torchvision CIFAR100 reading ``{root}/cifar-100-python`` without md5 checks or downloads."""


def _open(cls, name: str, data_root: str, train: bool):
    root = os.path.abspath(data_root)
    folder = os.path.join(root, cls.base_folder)
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    archive = cls.filename
    where = CIFAR_SOURCE.format(archive=archive)
    if not os.path.isdir(folder):
        raise UserError(f"dataset '{name}': folder {folder} not found. Expected it with the files "
                        f"{' '.join(files)}, from {where}.")
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"dataset '{name}': {', '.join(os.path.join(folder, f) for f in missing)} not found. "
                        f"Expected the folder {folder} with the files {' '.join(files)}, from {where}.")
    try:
        return cls(root=root, train=train, download=False)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"dataset '{name}': cannot read the CIFAR files in {folder} "
                        f"({type(exc).__name__}: {exc}); replace them with the ones from {where}.") from None


def _coarse_labels(ds: LocalCIFAR100, name: str) -> Tuple[np.ndarray, List[str]]:
    folder = os.path.join(ds.root, ds.base_folder)
    files = ds.train_list if ds.train else ds.test_list
    labels = []
    try:
        for f, _ in files:
            labels.extend(_read_pickle(os.path.join(folder, f))["coarse_labels"])
        names = list(_read_pickle(os.path.join(folder, ds.meta["filename"]))["coarse_label_names"])
    except (KeyError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"dataset '{name}': the CIFAR-100 files in {folder} lack the coarse (superclass) "
                        f"labels ({type(exc).__name__}: {exc}); use the original python-version files.") from None
    return np.asarray(labels, dtype=np.int64), names


def load_cifar(name: str, data_root: str) -> Tuple[ImageDataset, ImageDataset, DatasetInfo]:
    cls = LocalCIFAR10 if name == "cifar10" else LocalCIFAR100
    sets = []
    class_names: List[str] = []
    for split, train in (("train", True), ("test", False)):
        ds = _open(cls, name, data_root, train)
        data = np.asarray(ds.data)
        if data.ndim != 4 or data.shape[1:] != (32, 32, 3):
            raise UserError(f"dataset '{name}': images of shape {data.shape[1:]} in "
                            f"{os.path.join(ds.root, ds.base_folder)}; CIFAR images are 32x32x3.")
        images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
        if name == "cifar10":
            labels = np.asarray(ds.targets, dtype=np.int64)
            class_names = list(ds.classes)
        else:
            labels, class_names = _coarse_labels(ds, name)
        if labels.shape[0] != images.shape[0]:
            raise UserError(f"dataset '{name}': {images.shape[0]} {split} images but {labels.shape[0]} labels "
                            f"in {os.path.join(ds.root, ds.base_folder)}; the files are damaged.")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise UserError(f"dataset '{name}': {split} labels outside 0..{len(class_names) - 1} in "
                            f"{os.path.join(ds.root, ds.base_folder)}; the files are damaged.")
        sets.append(ImageDataset(ArrayStore(images), torch.from_numpy(labels),
                                 [f"{split}/{i}" for i in range(images.shape[0])]))
    info = DatasetInfo(name=name, image_size=(32, 32, 3), n_classes=len(class_names),
                       class_names=class_names, native_kind="small32")
    return sets[0], sets[1], info


def cifar100_test_split(data_root: str, what: str = "dataset 'cifar100'") -> Tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR-100 test file alone (``cifar-100-python/test``: ``data`` N x 3072, ``fine_labels``),
    as the out-of-distribution set of CSI's CIFAR-10 benchmark reads it: uint8 images N x 3 x 32 x 32
    and the fine labels."""
    path = os.path.join(os.path.abspath(data_root), LocalCIFAR100.base_folder, "test")
    where = CIFAR_SOURCE.format(archive=LocalCIFAR100.filename)
    if not os.path.isfile(path):
        raise UserError(f"{what}: {path} not found; it comes from {where}")
    try:
        entry = _read_pickle(path)
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry.get("fine_labels", np.zeros(len(data))), dtype=np.int64)
    except Exception as exc:
        raise UserError(f"{what}: cannot read {path} ({type(exc).__name__}: {exc}); replace it with the original "
                        f"file ({where})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape[0] != data.shape[0]:
        raise UserError(f"{what}: {path} holds data of shape {data.shape}; CIFAR-100's test file holds N x 3072 "
                        f"bytes and N labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
