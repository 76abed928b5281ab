"""Datasets of DIA: the paper's medical sets, CIFAR, and two offline sets (digits, synth_lesion).

    train_set, test_set, info = get_dataset(name, data_root, image_size=None, seed=0,
                                            aptos_all_grades=False)
    normal_train, test_set = one_class_split(train_set, test_set, info, one_class_idx,
                                             contamination_ratio=0.0, seed=0)

Every set is an :class:`ImageDataset` of RGB images in [0, 1] (``get_batch`` for training
loops). Nothing is downloaded; missing or bad data is a ``common.errors.UserError`` (folder
datasets: every file is checked when loaded, all bad files named in one error). APTOS is the
paper's grade 0 against grade 1 unless ``aptos_all_grades``.

``one_class_idx=None`` is CSI's unlabeled multi-class setting (the whole training set is
normal); its out-of-distribution sets come from ``datasets.load_ood_sets``.
"""
from .base import DatasetInfo, ImageDataset
from .registry import ALL_DATASET_NAMES, DATASET_NAMES, get_dataset, load_ood_set, load_ood_sets
from .split import one_class_split

__all__ = ["ALL_DATASET_NAMES", "DATASET_NAMES", "DatasetInfo", "ImageDataset", "get_dataset", "load_ood_set", "load_ood_sets",
           "one_class_split"]
