"""``one_class_split``: the normal-class training set of one-class anomaly detection (or, with no
class, the whole training set of CSI's unlabeled multi-class setting)."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Tuple

import numpy as np
import torch

from common.errors import UserError

from .base import DatasetInfo, ImageDataset


def n_contaminating(n_normal: int, contamination_ratio: float) -> int:
    """How many other-class images make ``contamination_ratio`` of the training set."""
    r = float(contamination_ratio)
    return int(round(r / (1.0 - r) * n_normal))


def check_test_split(test_set: ImageDataset, info: DatasetInfo, idx: int) -> None:
    """A one-class test split needs images of the normal class and of at least one other:
    otherwise no AUROC exists (a UserError saying which side is missing)."""
    labels = test_set.labels
    n_normal = int((labels == idx).sum())
    n_other = len(labels) - n_normal
    name = info.class_names[idx]
    if n_normal == 0:
        raise UserError(f"dataset '{info.name}': the test split has no images of the normal class {name}, so "
                        f"nothing can be scored against the anomalies; add some (for a folder dataset: "
                        f"test/{name}/)")
    if n_other == 0:
        raise UserError(f"dataset '{info.name}': the test split has only images of the normal class {name}, so "
                        f"no anomaly can be found; add anomalous images (for a folder dataset: test/<anomaly>/)")


def one_class_split(train_set: ImageDataset, test_set: ImageDataset, info: DatasetInfo, one_class_idx: int,
                    contamination_ratio: float = 0.0, seed: int = 0) -> Tuple[ImageDataset, ImageDataset]:
    """Training images of class ``one_class_idx`` (plus optional contamination) and the full test set.

    ``one_class_idx=None`` is CSI's unlabeled multi-class setting: every training image is
    normal, so the whole training set is returned (no contamination possible).

    With ``contamination_ratio`` r in [0, 1), ``round(r / (1 - r) * n_normal)`` training images
    of other classes, chosen by ``numpy.random.RandomState(seed)``, are appended (normal
    images first), keeping their own labels. The result shares storage with ``train_set``.
    """
    if one_class_idx is None:
        if contamination_ratio:
            raise UserError(f"--contamination_ratio {contamination_ratio!r} needs a normal class: in the "
                            f"multi-class setting every training image is normal (give --one_class_idx)")
        return train_set, test_set
    names = ", ".join(f"{i}={n!r}" for i, n in enumerate(info.class_names))
    if isinstance(one_class_idx, bool) or not isinstance(one_class_idx, Integral) \
            or not 0 <= int(one_class_idx) < info.n_classes:
        raise UserError(f"--one_class_idx {one_class_idx!r} is out of range for dataset '{info.name}': "
                        f"use 0..{info.n_classes - 1} ({names})")
    idx = int(one_class_idx)
    if isinstance(contamination_ratio, bool) or not isinstance(contamination_ratio, Real) \
            or math.isnan(float(contamination_ratio)) or not 0.0 <= float(contamination_ratio) < 1.0:
        raise UserError(f"--contamination_ratio {contamination_ratio!r} is out of range: use a number in [0, 1) "
                        f"(the share of other-class images in the training set; 0 = clean)")

    labels = train_set.labels
    normal = torch.nonzero(labels == idx, as_tuple=False).flatten()
    if normal.numel() == 0:
        raise UserError(f"dataset '{info.name}': the training split has no images of class {idx} "
                        f"({info.class_names[idx]!r}); pick another --one_class_idx ({names})")
    check_test_split(test_set, info, idx)
    n_extra = n_contaminating(normal.numel(), contamination_ratio)
    if n_extra == 0:
        return train_set.subset(normal), test_set
    others = torch.nonzero(labels != idx, as_tuple=False).flatten().numpy()
    if n_extra > others.size:
        raise UserError(f"--contamination_ratio {contamination_ratio} needs {n_extra} other-class training images "
                        f"but dataset '{info.name}' has only {others.size}; use a smaller ratio")
    rng = np.random.RandomState(seed)
    chosen = np.sort(rng.choice(others, size=n_extra, replace=False))
    order = torch.cat([normal, torch.from_numpy(chosen.astype(np.int64))])
    return train_set.subset(order), test_set
