"""scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download), as 32 px RGB.

1797 images, grey levels 0..16 scaled to 0..255, upscaled 8 -> 32 with bilinear
interpolation, repeated to 3 channels. The train/test split is stratified 70/30 and fixed
(``random_state=0``), so every run sees the same test set whatever its seed.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import ArrayStore, DatasetInfo, ImageDataset

SPLIT_SEED = 0
TEST_FRACTION = 0.3


def load_digits_dataset() -> Tuple[ImageDataset, ImageDataset, DatasetInfo]:
    # scikit-learn's loaders take about a second to import: only a digits run pays for them
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]   # N x 1 x 8 x 8
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).repeat(1, 3, 1, 1).contiguous()
    y = np.asarray(bunch.target, dtype=np.int64)
    all_idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(all_idx, test_size=TEST_FRACTION, stratify=y,
                                           random_state=SPLIT_SEED)
    sets = []
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        t = torch.from_numpy(idx)
        sets.append(ImageDataset(ArrayStore(x.index_select(0, t)), torch.from_numpy(y[idx]),
                                 [f"{split}/{i}" for i in range(len(idx))]))
    info = DatasetInfo(name="digits", image_size=(32, 32, 3), n_classes=10,
                       class_names=[str(d) for d in range(10)], native_kind="small32")
    return sets[0], sets[1], info
