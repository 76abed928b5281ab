"""Datasets stored as ``<root>/{train,test}/<class>/<images>`` folders.

Classes are the sub-folders of a split, sorted by name (Python string order, as
torchvision's ImageFolder). ``imagefolder`` (your own images) takes the classes of both splits
together, so its training split may hold the normal class alone, as in MVTec AD
(``train/good/``, ``test/good/``, ``test/<defect>/``; a ``ground_truth/`` folder beside them
is not read). Files are found recursively below each class folder, sorted,
hidden entries skipped; the extensions accepted are :data:`datasets.base.IMAGE_EXTENSIONS` (any case).
Every file of both splits is checked once when the dataset is loaded (all bad files are
named in one UserError); images are then decoded lazily and cached by
:class:`~datasets.base.FolderStore`.

APTOS comes in two forms (:func:`folder_spec`): the paper's (test set = grade 0 against
grade 1 only) and, on request, every grade 1-4 as an anomaly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from common.errors import UserError

from .base import (IMAGE_EXTENSIONS, DatasetInfo, FolderStore, ImageDataset, check_image_files, is_hidden,
                   is_image_file, native_kind_for)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class FolderSpec:
    """Where a folder dataset lives under ``data_root`` and how its folders become labels.

    ``relabel`` maps the sorted class-folder names of both splits to ``(folder -> label dict,
    class_names)``; ``None`` means label = position in the sorted class folders: of both splits
    together with ``union_classes``, else of the training split, and the test split must then
    have the same class folders. ``test_classes``, when not empty, are the
    only class folders of the test split that are used (the others are left out).
    """

    name: str
    subdir: str                       # relative to data_root ('' for the generic imagefolder)
    source: str                       # where the data comes from, for error messages
    required_classes: Tuple[str, ...] = ()
    relabel: Optional[Callable[[Sequence[str]], Tuple[Dict[str, int], List[str]]]] = None
    test_classes: Tuple[str, ...] = ()
    union_classes: bool = False       # classes = both splits' folders (train/ may hold the normal class alone)
    healthy: str = ""                 # the class that is normal when none is named (besides good/normal)


def _binary_relabel(normal_folder: str, normal_name: str, other_name: str = "abnormal"):
    def relabel(folders: Sequence[str]):
        return {f: (0 if f == normal_folder else 1) for f in folders}, [normal_name, other_name]

    return relabel


def _aptos_paper_relabel(folders: Sequence[str]):
    """The paper's APTOS classes: grade folder '0' is class 0, '1' is class 1.

    The other grade folders keep labels of their own (2, 3, ... in sorted order), outside
    the two classes: they never enter the test set, and in training they are only
    ``--contamination_ratio`` material, as the paper's raw ImageFolder indices are.
    """
    others = [f for f in sorted(folders) if f not in ("0", "1")]
    mapping = {"0": 0, "1": 1, **{f: 2 + i for i, f in enumerate(others)}}
    return mapping, ["grade_0", "grade_1"]


_APTOS_SOURCE = ("Kaggle competition 'aptos2019-blindness-detection' (images sorted by you into grade "
                 "folders 0..4 from train.csv's diagnosis column, under split/train and split/test)")


FOLDER_SPECS: Dict[str, FolderSpec] = {
    "covid": FolderSpec(
        "covid", "covid",
        "Kaggle dataset 'plameneduardo/sarscov2-ctscan-dataset' (folders COVID/ and non-COVID/, "
        "split by you into train/ and test/)"),
    "kvasir": FolderSpec(
        "kvasir", "kvasir-anomaly-polyps",
        "the Kvasir dataset (https://datasets.simula.no/kvasir/), arranged as normal/polyp class "
        "folders under train/ and test/"),
    "retina": FolderSpec(
        "retina", "OCT2017",
        "Kaggle dataset 'paultimothymooney/kermany2018' (its OCT2017 folder with train/ and test/, "
        "class folders CNV DME DRUSEN NORMAL)",
        required_classes=("NORMAL",), relabel=_binary_relabel("NORMAL", "NORMAL")),
    # as the paper's code evaluates it: grade 0 against grade 1, grades 2-4 left out of the test set
    "aptos": FolderSpec(
        "aptos", os.path.join("APTOS2019", "split"), _APTOS_SOURCE,
        required_classes=("0", "1"), relabel=_aptos_paper_relabel, test_classes=("0", "1"), healthy="grade_0"),
    "chestxray": FolderSpec(
        "chestxray", "chest_xray",
        "Kaggle dataset 'paultimothymooney/chest-xray-pneumonia' (chest_xray/ with train/ and "
        "test/, class folders NORMAL and PNEUMONIA)",
        required_classes=("NORMAL", "PNEUMONIA")),
    "breakhis": FolderSpec(
        "breakhis", "BreaKHis400X",
        "the BreaKHis database (https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-"
        "database-breakhis/), its 400X images arranged by you as class folders (e.g. benign, malignant) "
        "under train/ and test/", healthy="benign"),
    "imagefolder": FolderSpec(
        "imagefolder", "",
        "your own images: train/<normal class>/ (other class folders allowed) and test/<class>/ for every "
        "class, or MVTec AD's train/good/, test/good/, test/<defect>/", union_classes=True),
}


# --aptos_all_grades: every grade 1-4 is an anomaly (one class 'grades_1-4')
APTOS_ALL_GRADES = FolderSpec(
    "aptos", os.path.join("APTOS2019", "split"), _APTOS_SOURCE,
    required_classes=("0",), relabel=_binary_relabel("0", "grade_0", "grades_1-4"), healthy="grade_0")


def folder_spec(name: str, aptos_all_grades: bool = False) -> FolderSpec:
    """The :class:`FolderSpec` of folder dataset ``name`` (APTOS: the paper's, or all grades)."""
    if name == "aptos" and aptos_all_grades:
        return APTOS_ALL_GRADES
    return FOLDER_SPECS[name]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _list_images(class_dir: str, others: Sequence[str] = ()) -> List[str]:
    """All image files below ``class_dir`` (absolute paths), sorted by relative path.

    Symbolic links are followed, each folder at most once: a link back to a folder above (a
    loop) or to one already listed is not entered again, and each file is counted once, by its
    real path. A file whose real path lies in one of ``others`` (the split's other class
    folders) belongs to that class, not to this one."""
    top = os.path.realpath(class_dir)
    other_real = [os.path.realpath(o) for o in others if os.path.realpath(o) != top]
    seen_dirs = {top}
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if not is_hidden(d)):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen_dirs or _inside(top, real):  # listed already, or a loop back up
                continue
            seen_dirs.add(real)
            kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            if not is_hidden(f) and is_image_file(f):
                found.append(os.path.join(dirpath, f))
    chosen = {}  # real path -> the path it is listed by: one without links where there is one
    for path in sorted(found, key=lambda p: os.path.relpath(p, class_dir).replace(os.sep, "/")):
        real = os.path.realpath(path)
        if any(_inside(real, o) for o in other_real):
            continue
        if real not in chosen or (os.path.abspath(path) == real != os.path.abspath(chosen[real])):
            chosen[real] = path
    return sorted(chosen.values(), key=lambda p: os.path.relpath(p, class_dir).replace(os.sep, "/"))


def _layout_text(spec: FolderSpec, base: str) -> str:
    if spec.union_classes:
        return (f"{base}{os.sep}train{os.sep}<normal class>{os.sep}<images> and {base}{os.sep}test{os.sep}<class>"
                f"{os.sep}<images> (one folder per class; MVTec AD's train/good, test/good, test/<defect> too)")
    return f"{base}{os.sep}{{train,test}}{os.sep}<class>{os.sep}<images>"


def _datasets_below(base: str) -> List[str]:
    """Sub-folders of ``base`` that are datasets of their own (hold a ``train`` folder), e.g. the
    categories of MVTec AD when ``--data_root`` names the collection instead of one category."""
    if not os.path.isdir(base):
        return []
    return sorted(e.name for e in os.scandir(base)
                  if e.is_dir() and not is_hidden(e.name) and os.path.isdir(os.path.join(e.path, "train")))


def split_classes(spec: FolderSpec, data_root: str, split: str) -> Tuple[str, List[str]]:
    """The folder of one split and its class folders (sorted; every file left unread); a layout
    that is not the expected one is a UserError saying what was found and what is expected.

    In the test split of a spec with ``test_classes`` only those folders are returned.
    """
    base = os.path.abspath(os.path.join(data_root, spec.subdir))
    split_dir = os.path.join(base, split)
    layout = _layout_text(spec, base)
    if not os.path.isdir(base):
        raise UserError(
            f"dataset '{spec.name}': folder {base} does not exist. Expected the layout {layout}, "
            f"from {spec.source}. Put the data there or point --data_root at the folder that holds it "
            f"(automatic downloads are off).")
    if not os.path.isdir(split_dir):
        inner = _datasets_below(base)
        if inner:
            raise UserError(
                f"dataset '{spec.name}': {base} holds several datasets ({', '.join(inner[:8])}"
                f"{', ...' if len(inner) > 8 else ''}), each with its own train/ folder: point --data_root at "
                f"one of them, e.g. --data_root {os.path.join(base, inner[0])}")
        raise UserError(
            f"dataset '{spec.name}': split folder {split_dir} does not exist. Expected the layout "
            f"{layout}, from {spec.source}.")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name))
    if not classes:
        loose = any(e.is_file() and is_image_file(e.name) for e in os.scandir(split_dir))
        where = (" Its images lie directly in it: move them into a class folder, e.g. "
                 f"{os.path.join(split_dir, 'normal')}{os.sep}." if loose else "")
        raise UserError(
            f"dataset '{spec.name}': split folder {split_dir} has no class sub-folders. Expected one "
            f"folder of images per class, e.g. {os.path.join(split_dir, '<class>', 'image.png')}.{where}")
    missing = [c for c in spec.required_classes if c not in classes]
    if missing:
        raise UserError(
            f"dataset '{spec.name}': split folder {split_dir} lacks the class folder(s) "
            f"{', '.join(missing)} (found: {', '.join(classes)}); data from {spec.source}.")
    if split == "test" and spec.test_classes:
        classes = [c for c in classes if c in spec.test_classes]
    return split_dir, classes


def scan_split(spec: FolderSpec, data_root: str, split: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """Class folders (sorted) of one split and their image files; every problem is a UserError.

    In the test split of a spec with ``test_classes`` only those folders are returned.
    """
    split_dir, classes = split_classes(spec, data_root, split)
    files = {}
    for c in classes:
        cdir = os.path.join(split_dir, c)
        imgs = _list_images(cdir, [os.path.join(split_dir, o) for o in classes if o != c])
        if not imgs:
            raise UserError(
                f"dataset '{spec.name}': class folder {cdir} contains no images (accepted extensions: "
                f"{' '.join(IMAGE_EXTENSIONS)}). Add its images or remove the empty folder.")
        files[c] = imgs
    return classes, files


def class_mapping(spec: FolderSpec, data_root: str, train_classes: Sequence[str],
                  test_classes: Sequence[str]) -> Tuple[Dict[str, int], List[str]]:
    """``(class folder -> label, class names)`` of a folder dataset whose splits hold these
    class folders.

    ``union_classes`` (imagefolder): the classes are the sorted union of both splits' folders,
    so a training split may hold the normal class alone. Otherwise (no ``relabel``) both
    splits must hold the same folders, labelled by sorted position.
    """
    if spec.relabel is not None:
        return spec.relabel(sorted(set(train_classes) | set(test_classes)))
    if spec.union_classes:
        names = sorted(set(train_classes) | set(test_classes))
        return {c: i for i, c in enumerate(names)}, names
    if list(test_classes) != list(train_classes):
        base = os.path.abspath(os.path.join(data_root, spec.subdir))
        raise UserError(
            f"dataset '{spec.name}': train and test have different class folders under {base} "
            f"(train: {', '.join(train_classes)}; test: {', '.join(test_classes)}); labels come from "
            f"the sorted folder names, so both splits need the same class folders.")
    return {c: i for i, c in enumerate(train_classes)}, list(train_classes)


def folder_classes(spec: FolderSpec, data_root: str) -> Tuple[List[str], List[str]]:
    """``(class names, class folders of the training split)`` of a folder dataset, from its
    folders alone (no image is read): what the normal class is chosen from."""
    train_classes = split_classes(spec, data_root, "train")[1]
    test_classes = split_classes(spec, data_root, "test")[1]
    mapping, names = class_mapping(spec, data_root, train_classes, test_classes)
    return names, [names[mapping[c]] for c in train_classes if mapping[c] < len(names)]


def load_folder_dataset(spec: FolderSpec, data_root: str,
                        size_hw: Tuple[int, int]) -> Tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Train and test :class:`ImageDataset` of a folder dataset, images resized to ``size_hw``."""
    root_abs = os.path.abspath(data_root)
    scanned = {split: scan_split(spec, data_root, split) for split in SPLITS}
    train_classes = scanned["train"][0]
    mapping, class_names = class_mapping(spec, data_root, train_classes, scanned["test"][0])

    listed = []
    for split in SPLITS:
        classes, files = scanned[split]
        paths, labels = [], []
        for c in classes:
            paths.extend(files[c])
            labels.extend([mapping[c]] * len(files[c]))
        listed.append((paths, labels))
    # every file of both splits once, now: all bad files in one error, before any training
    original_hw = check_image_files([p for paths, _ in listed for p in paths], f"dataset '{spec.name}'")
    sets = []
    for paths, labels in listed:
        names = [os.path.relpath(p, root_abs).replace(os.sep, "/") for p in paths]
        store = FolderStore(paths, size_hw, check=False)
        sets.append(ImageDataset(store, torch.tensor(labels, dtype=torch.long), names))
    h, w = size_hw
    info = DatasetInfo(name=spec.name, image_size=(h, w, 3), n_classes=len(class_names),
                       class_names=class_names, native_kind=native_kind_for(h, w),
                       train_classes=[class_names[mapping[c]] for c in train_classes if mapping[c] < len(class_names)],
                       original_hw=original_hw)
    return sets[0], sets[1], info
