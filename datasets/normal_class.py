"""Which class is normal: chosen by index, by folder name, or by the rules for folder datasets.

One-class anomaly detection trains on one class. The paper's commands name it by index
(``--one_class_idx``); a folder of one's own images names it by folder (``--normal_class``).
Without either, a folder dataset takes the class folder named ``good`` or ``normal`` (any
case: MVTec AD's and the usual medical naming), else the only class folder of its training
split; if neither decides, the choice is refused with the list of classes. Indices come from
sorted folder names, so a silent default index could name an anomalous class; that is why
folder datasets never fall back to index 0. The other datasets (arrays with fixed classes)
keep the paper's default, class 0.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from common.errors import UserError

NORMAL_FOLDER_NAMES = ("good", "normal")


def class_list(class_names: Sequence[str]) -> str:
    """``0=bad, 1=good`` for messages."""
    return ", ".join(f"{i}={n}" for i, n in enumerate(class_names))


def choose_normal_class(dataset: str, class_names: Sequence[str], train_classes: Sequence[str],
                        one_class_idx: Optional[int] = None, normal_class: Optional[str] = None,
                        folder_dataset: bool = True, default: int = 0, healthy: str = "") -> int:
    """The index of the normal class in ``class_names``.

    ``one_class_idx`` and ``normal_class`` (a class name) are the user's choice; given both, they
    must name the same class. Neither: for a folder dataset (``folder_dataset``) the class named
    ``healthy`` (a dataset's own healthy class, e.g. APTOS's grade_0), else the class named
    ``good``/``normal`` (any case), else the only class of ``train_classes``, else a UserError
    listing the classes; for the other datasets ``default`` (the paper's class 0).
    """
    names = [str(n) for n in class_names]
    listed = class_list(names)
    by_name = None
    if normal_class is not None:
        if normal_class in names:
            by_name = names.index(normal_class)
        else:
            folded = [i for i, n in enumerate(names) if n.lower() == str(normal_class).lower()]
            hint = f" (did you mean {names[folded[0]]}?)" if len(folded) == 1 else ""
            raise UserError(f"--normal_class {normal_class}: dataset '{dataset}' has no class of that name{hint}; "
                            f"its classes: {listed}")
    if one_class_idx is not None:
        if isinstance(one_class_idx, bool) or not isinstance(one_class_idx, int) \
                or not 0 <= one_class_idx < len(names):
            raise UserError(f"--one_class_idx {one_class_idx!r} is out of range for dataset '{dataset}': use "
                            f"0..{len(names) - 1} ({listed})")
        if by_name is not None and by_name != one_class_idx:
            raise UserError(f"--one_class_idx {one_class_idx} is class {names[one_class_idx]}, but --normal_class "
                            f"names {normal_class} (index {by_name}): give one of the two")
        return int(one_class_idx)
    if by_name is not None:
        return by_name
    if not folder_dataset:
        return int(default)
    if healthy in names:
        return names.index(healthy)
    named = [i for i, n in enumerate(names) if n.lower() in NORMAL_FOLDER_NAMES]
    if len(named) == 1:
        return named[0]
    trained = [n for n in dict.fromkeys(train_classes) if n in names]
    if len(trained) == 1:
        return names.index(trained[0])
    raise UserError(f"dataset '{dataset}': which class is normal? No class folder is named good or normal and the "
                    f"training split has {len(trained)} class folders ({', '.join(trained)}); name it with "
                    f"--normal_class NAME (classes: {listed})")


def normal_class_line(dataset: str, class_names: Sequence[str], idx: Optional[int]) -> str:
    """The console line every program prints when it starts: the class, by name and index."""
    if idx is None:
        return f"{dataset}: unlabeled multi-class setting, every training class is normal ({class_list(class_names)})"
    return (f"{dataset}: normal class {class_names[idx]} (index {idx}); the other classes are the anomalies "
            f"({class_list(class_names)})")


def check_recorded_class(dataset: str, class_names: Sequence[str], recorded_name: str, recorded_idx: int,
                         what: str) -> None:
    """Refuse data whose classes moved since ``what`` (a model, a run) was trained on class
    ``recorded_name`` at index ``recorded_idx``: the name is gone, or now has another index
    (class folders renamed, added or removed), so the index would name another class."""
    names = [str(n) for n in class_names]
    if recorded_name in names and names.index(recorded_name) == recorded_idx:
        return
    now = (f"{recorded_name} is now index {names.index(recorded_name)}" if recorded_name in names
           else f"there is no class {recorded_name} now")
    raise UserError(f"{what} was trained with normal class {recorded_name} (index {recorded_idx}), but the classes of "
                    f"dataset '{dataset}' are now {class_list(names)}: {now}. The class folders changed since "
                    f"training; restore them, or train a new run on the data as it is")


def recorded_class(meta) -> Optional[Tuple[Optional[str], int]]:
    """``(class name, index)`` of the normal class a checkpoint's ``meta`` records (train.py's
    ``normal_class`` or ``class_names[one_class_idx]``; the name ``None`` when it records only
    the index), or ``None`` for the multi-class setting or a file that records no class."""
    meta = meta or {}
    idx = meta.get("one_class_idx")
    if isinstance(idx, bool) or not isinstance(idx, int):
        return None
    name = meta.get("normal_class")
    names = meta.get("class_names") or []
    if name is None and 0 <= idx < len(names):
        name = names[idx]
    return (None if name is None else str(name)), idx
