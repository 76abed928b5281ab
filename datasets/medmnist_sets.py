"""MedMNIST datasets (PneumoniaMNIST, BreastMNIST, ChestMNIST) through the ``medmnist`` package.

The file is ``{data_root}/<name>.npz`` (28 px), exactly as medmnist stores it; downloads are
never attempted. Images (28 x 28 grey) become 3-channel RGB. Labels are medmnist's own,
except ChestMNIST, whose 14 multi-label findings collapse to 0 = no finding, 1 = any finding.
BreastMNIST keeps medmnist's order: 0 = malignant, 1 = normal/benign.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch

from common.errors import UserError

from .base import ArrayStore, DatasetInfo, ImageDataset

MEDMNIST_NAMES = ("pneumoniamnist", "breastmnist", "chestmnist")


def _import_medmnist():
    try:
        import medmnist
    except ImportError as exc:  # pragma: no cover - medmnist is a requirement
        raise UserError(f"the 'medmnist' package is needed for MedMNIST datasets ({exc}); "
                        f"install it with: pip install medmnist") from None
    return medmnist


def _to_rgb_uint8(imgs: np.ndarray, path: str) -> torch.Tensor:
    imgs = np.asarray(imgs)
    if imgs.ndim == 3:
        imgs = np.repeat(imgs[:, None, :, :], 3, axis=1)
    elif imgs.ndim == 4 and imgs.shape[-1] in (1, 3):
        imgs = imgs.transpose(0, 3, 1, 2)
        if imgs.shape[1] == 1:
            imgs = np.repeat(imgs, 3, axis=1)
    else:
        raise UserError(f"MedMNIST file {path} holds images of shape {imgs.shape}; expected N x 28 x 28 "
                        f"(grey) or N x 28 x 28 x 3. Replace it with the file from medmnist (zenodo).")
    if imgs.dtype != np.uint8:
        imgs = np.clip(imgs, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(imgs))


def load_medmnist(name: str, data_root: str) -> Tuple[ImageDataset, ImageDataset, DatasetInfo]:
    medmnist = _import_medmnist()
    flag_info = medmnist.INFO[name]
    cls = getattr(medmnist, flag_info["python_class"])
    path = os.path.abspath(os.path.join(data_root, f"{name}.npz"))
    hint = (f"It is the 28-px file '{name}.npz' of the medmnist package (zenodo, "
            f"https://medmnist.com/); automatic downloads are off, so download it yourself and put it "
            f"at that path, or point --data_root at the folder that holds it.")
    if not os.path.isfile(path):
        raise UserError(f"dataset '{name}': file {path} not found. {hint}")

    sets = []
    for split in ("train", "test"):
        try:
            ds = cls(split=split, root=os.path.abspath(data_root), download=False, size=28)
        except RuntimeError as exc:
            raise UserError(f"dataset '{name}': medmnist could not open {path} ({exc}). {hint}") from None
        except KeyError as exc:
            raise UserError(f"dataset '{name}': file {path} lacks the array {exc}; it is not a MedMNIST "
                            f"file. {hint}") from None
        except Exception as exc:
            raise UserError(f"dataset '{name}': cannot read {path} ({type(exc).__name__}: {exc}). "
                            f"{hint}") from None
        images = _to_rgb_uint8(ds.imgs, path)
        labels = np.asarray(ds.labels)
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.shape[0] != images.shape[0]:
            raise UserError(f"dataset '{name}': {path} has {images.shape[0]} {split} images but "
                            f"{labels.shape[0]} labels; replace the file with medmnist's.")
        if name == "chestmnist":
            labels = (labels != 0).any(axis=1).astype(np.int64)
        else:
            if labels.shape[1] != 1:
                raise UserError(f"dataset '{name}': {path} has {labels.shape[1]} labels per image, "
                                f"expected 1; replace the file with medmnist's.")
            labels = labels[:, 0].astype(np.int64)
        n = images.shape[0]
        sets.append(ImageDataset(ArrayStore(images), torch.from_numpy(labels),
                                 [f"{split}/{i}" for i in range(n)]))

    if name == "chestmnist":
        class_names = ["normal", "abnormal"]
    else:
        lab = flag_info["label"]
        class_names = [lab[str(i)] for i in range(len(lab))]
    for ds, split in zip(sets, ("train", "test")):
        bad = (ds.labels < 0) | (ds.labels >= len(class_names))
        if bool(bad.any()):
            raise UserError(f"dataset '{name}': {path} has {split} labels outside 0..{len(class_names) - 1}; "
                            f"replace the file with medmnist's.")
    h, w = sets[0].image_size[:2]
    if (h, w) != (28, 28):
        raise UserError(f"dataset '{name}': {path} holds {h}x{w} images; the 28-px file is expected.")
    info = DatasetInfo(name=name, image_size=(28, 28, 3), n_classes=len(class_names),
                       class_names=class_names, native_kind="medmnist28")
    return sets[0], sets[1], info
