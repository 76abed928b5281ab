"""``get_dataset``: one entry point for every dataset the programs know."""
from __future__ import annotations

import difflib
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from common.errors import UserError

from .base import ArrayStore, DatasetInfo, ImageDataset
from .cifar import load_cifar
from .digits import load_digits_dataset
from .folders import FOLDER_SPECS, folder_classes, folder_spec, load_folder_dataset
from .medmnist_sets import MEDMNIST_NAMES, load_medmnist
from .names import ALL_DATASET_NAMES, DATASET_NAMES, EXTRA_DATASET_NAMES  # noqa: F401 (re-exported)
from .normal_class import choose_normal_class
from .ood import FOLDER_SETS, INTERP, load_cifar100_test, load_folder_set, load_imagenet30, load_svhn, resize_uint8
from .synth_lesion import load_synth_lesion

FOLDER_SIZE = 224                      # the paper's 224-px datasets
_NATIVE_SIZE = {**{n: FOLDER_SIZE for n in ("covid", "kvasir", "retina", "aptos", "breakhis", "chestxray")},
                **{n: 28 for n in MEDMNIST_NAMES},
                "cifar10": 32, "cifar100": 32, "digits": 32, "imagenet": FOLDER_SIZE,
                **{n: 32 for n in ("synth_lesion", "synth_lesion_half", "synth_streak", "synth_streak_half")}}


def _parse_size(name: str, image_size) -> Tuple[int, int]:
    """``image_size`` (int, (H, W) or (H, W, C)) as ``(H, W)``; anything else is a UserError."""
    if isinstance(image_size, bool):
        raise UserError(f"dataset '{name}': image size {image_size!r} is not a size; give a positive integer")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) in (2, 3) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in image_size):
        if len(image_size) == 3 and image_size[2] != 3:
            raise UserError(f"dataset '{name}': image size {tuple(image_size)} has {image_size[2]} channels; "
                            f"images are always RGB (3 channels)")
        hw = (image_size[0], image_size[1])
    else:
        raise UserError(f"dataset '{name}': image size {image_size!r} is not a size; give a positive integer "
                        f"or (height, width)")
    if min(hw) < 1 or max(hw) > 4096:
        raise UserError(f"dataset '{name}': image size {hw[0]}x{hw[1]} is out of range; use 1..4096 pixels")
    return hw


APTOS_PAPER_NOTE = ("aptos: as the paper, anomalies are grade 1 only (grades 2-4 left out); "
                    "--aptos_all_grades scores every grade")
APTOS_ALL_NOTE = ("aptos: --aptos_all_grades, anomalies are grades 1-4 (the paper's code scores grade 1 only)")


def _spelling(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def closest_dataset_name(name) -> Optional[str]:
    """The dataset name ``name`` most likely meant (the same letters and digits, e.g.
    ``image_folder`` -> ``imagefolder``, else the closest by ``difflib``), or None."""
    if not isinstance(name, str) or not name.strip():
        return None
    by_spelling = {_spelling(n): n for n in ALL_DATASET_NAMES}
    if _spelling(name) in by_spelling:
        return by_spelling[_spelling(name)]
    close = difflib.get_close_matches(_spelling(name), list(by_spelling), n=1, cutoff=0.6)
    return by_spelling[close[0]] if close else None


def check_dataset_name(name) -> None:
    """A UserError unless ``name`` is a dataset the programs know; a near miss gets the name it
    most likely meant (:func:`closest_dataset_name`)."""
    if not isinstance(name, str) or name not in ALL_DATASET_NAMES:
        guess = closest_dataset_name(name)
        hint = f"; did you mean {guess}?" if guess else ""
        raise UserError(f"unknown dataset {name!r}{hint} (valid names: {', '.join(ALL_DATASET_NAMES)})")


def is_folder_dataset(name: str) -> bool:
    """Whether ``name``'s classes are folders (its normal class is chosen by the folder rules)."""
    return name in FOLDER_SPECS


def folder_class_names(name: str, data_root: str, aptos_all_grades: bool = False) -> Optional[List[str]]:
    """The class names of folder dataset ``name`` from its folder names alone; ``None`` for the
    other datasets (their classes are fixed)."""
    if not is_folder_dataset(name):
        return None
    return folder_classes(folder_spec(name, aptos_all_grades), data_root)[0]


def pick_normal_class(name: str, data_root: str, one_class_idx=None, normal_class=None,
                      aptos_all_grades: bool = False, default: int = 0) -> Tuple[int, Optional[str]]:
    """``(index, name)`` of dataset ``name``'s normal class
    (:func:`datasets.normal_class.choose_normal_class`); the name is ``None`` where it is only
    known once the dataset is loaded (arrays, no ``normal_class`` given).

    A folder dataset's classes are read from its folder names alone (no image is opened), so
    the class is known before a run folder or checkpoint is touched. For the other datasets the
    index is ``one_class_idx`` or ``default``; ``normal_class`` there loads the dataset to read
    its class names.
    """
    check_dataset_name(name)
    if is_folder_dataset(name):
        spec = folder_spec(name, aptos_all_grades)
        names, train_classes = folder_classes(spec, data_root)
        idx = choose_normal_class(name, names, train_classes, one_class_idx, normal_class, healthy=spec.healthy)
        return idx, names[idx]
    if normal_class is None:
        return (default if one_class_idx is None else one_class_idx), None
    names = get_dataset(name, data_root)[2].class_names
    idx = choose_normal_class(name, names, names, one_class_idx, normal_class, folder_dataset=False, default=default)
    return idx, names[idx]


def get_dataset(name: str, data_root: str = "../data", image_size=None, seed: int = 0,
                aptos_all_grades: bool = False) -> Tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Train set, test set and :class:`DatasetInfo` of dataset ``name`` (see ``ALL_DATASET_NAMES``;
    ``imagenet`` is CSI's ImageNet-30, ``datasets.ood.load_imagenet30``).

    ``image_size`` is the size folder datasets are read at (default 224, the paper's); the other
    datasets have a fixed size and accept only ``None`` or that size. ``seed`` drives the generator of
    ``synth_lesion`` and its variants (the other datasets are files, or a fixed split for ``digits``).
    ``aptos_all_grades`` (``aptos`` only): every grade 1-4 is an anomaly (labels 0 = grade 0,
    1 = grades 1-4) instead of the paper's grade 0 against grade 1 (grades 2-4 left out of the
    test set; in the training set they keep labels 2-4, for contamination only). Either way
    one line on stdout says which is used.
    Nothing is ever downloaded; a missing or bad dataset is a :class:`UserError`.
    """
    check_dataset_name(name)
    if aptos_all_grades and name != "aptos":
        print(f"warning: --aptos_all_grades applies to --dataset aptos only; ignored for {name}",
              file=sys.stderr, flush=True)

    if name in FOLDER_SPECS:  # files: read at any size (the paper's 224 px unless image_size)
        hw = _parse_size(name, FOLDER_SIZE if image_size is None else image_size)
        loaded = load_folder_dataset(folder_spec(name, aptos_all_grades), data_root, hw)
        if name == "aptos":
            print(APTOS_ALL_NOTE if aptos_all_grades else APTOS_PAPER_NOTE, flush=True)
        return loaded

    native = _NATIVE_SIZE[name]
    if image_size is not None and _parse_size(name, image_size) != (native, native):
        raise UserError(f"dataset '{name}' always has {native}x{native} images; an image size (--img_size) "
                        f"applies to the folder datasets only (leave it unset for '{name}')")
    if name == "imagenet":
        return load_imagenet30(data_root)
    if name in MEDMNIST_NAMES:
        return load_medmnist(name, data_root)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_root)
    if name == "digits":
        return load_digits_dataset()
    return load_synth_lesion(seed=seed, variant=name)


def describe_images(info: DatasetInfo, size_flag: str = "--img_size") -> Tuple[str, Optional[str]]:
    """``(line, warning or None)``: the size the images are read at (with the files' own median
    size for folder datasets) and, when most files are smaller and so upsampled, a warning that
    names ``size_flag`` (``imagefolder``'s image size)."""
    h, w = info.image_size[:2]
    line = f"{info.name}: images read at {h}x{w} px"
    sizes = [hw for hw in info.original_hw if hw[0] > 0]
    if not sizes:
        return line, None
    hs = sorted(hw[0] for hw in sizes)
    ws = sorted(hw[1] for hw in sizes)
    mh, mw = hs[len(hs) // 2], ws[len(ws) // 2]
    line += f" (the files: median {mh}x{mw} px)"
    n_up = sum(1 for oh, ow in sizes if oh < h or ow < w)
    if 2 * n_up <= len(sizes):
        return line, None
    how = (f"pass {size_flag} {min(mh, mw)} to read them at their own size" if info.name == "imagefolder"
           else f"{info.name} is read at the paper's {h} px")
    return line, (f"{n_up} of {len(sizes)} images of {info.name} are smaller than {h}x{w} px and are upsampled; "
                  f"{how}")


def load_dataset_test_split(name: str, data_root: str, hw: Tuple[int, int]) -> ImageDataset:
    """The test split of one of this project's datasets, resized to ``hw`` when its size differs."""
    if name in FOLDER_SPECS:
        return get_dataset(name, data_root, image_size=tuple(hw))[1]
    if name == "imagenet":
        return load_imagenet30(data_root, hw=hw)[1]
    test = get_dataset(name, data_root)[1]
    if tuple(test.image_size[:2]) == tuple(hw):
        return test
    images = resize_uint8(test.get_uint8(torch.arange(len(test))), hw)
    return ImageDataset(ArrayStore(images), test.labels, list(test.names))


def load_ood_set(name: str, data_root: str, hw: Tuple[int, int]) -> ImageDataset:
    """One out-of-distribution set (not ``interp``) with images of ``hw``."""
    if name == "svhn":
        return load_svhn(data_root, hw)
    if name == "cifar100":
        return load_cifar100_test(data_root, hw)
    if name in FOLDER_SETS:
        return load_folder_set(name, data_root, hw)
    return load_dataset_test_split(name, data_root, hw)


def load_ood_sets(names: Sequence[str], data_root: str, info: DatasetInfo) -> Dict[str, object]:
    """``{name: ImageDataset}`` for ``names`` in order, ``interp`` as the marker :data:`INTERP`
    (it is made from whichever in-distribution test set is scored: :func:`with_interp`)."""
    hw = tuple(info.image_size[:2])
    return {name: (INTERP if name == INTERP else load_ood_set(name, data_root, hw)) for name in names}
