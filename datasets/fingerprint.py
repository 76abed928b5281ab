"""What a run was trained on, in a small record: the fingerprint of its data and of its files.

A run records the fingerprint of the dataset it read (:func:`data_fingerprint`) and the content
hash of the dissolver file it used (:func:`file_sha256`); resuming it, evaluating it and a
study's rerun compare them with the data and the file as they are now, so that images added,
removed or rewritten, class folders renamed (an index then names another class) or a dissolver
retrained in place are never passed over in silence (:func:`check_same_data`,
:func:`check_same_file`: one line that says what changed and how to go on).

The data's record is cheap, whatever the size of the data:

* image files (folder datasets): each file's path relative to the data root, its size and its
  modification time (``os.stat`` only; nothing is read), with its label;
* images held in memory (MedMNIST, CIFAR, digits, the synthetic sets): a hash of their bytes
  when they are at most :data:`CONTENT_HASH_LIMIT` bytes, else their shape; and a hash of the
  labels;
* the class names, whose positions are the labels: a renamed class folder moves them;
* per split and class, how many images (so that a change can be said in numbers).

``digest`` sums up the whole record (data root left out: a moved data tree is the same data).

:func:`data_tree` and :func:`check_outside_data` keep a program's outputs out of the folder its
data comes from, where they would be read as images by later runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

from common.errors import UserError

FINGERPRINT_VERSION = 1
CONTENT_HASH_LIMIT = 512 * 2 ** 20  # bytes of in-memory images hashed whole; above it, their shape only
ACCEPT_FLAG = "--accept_changed_data"


def _name_bytes(name: str) -> bytes:
    """A file name as bytes, whatever it holds (names that are not valid UTF-8 included)."""
    return str(name).encode("utf-8", "surrogateescape")


def _class_label(label: int, class_names: Sequence[str]) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else f"label {label}"


def _split_record(dataset, class_names: Sequence[str]) -> dict:
    """One split's record: counts per class, and the digests of its list and of its contents."""
    labels = [int(v) for v in dataset.labels.tolist()]
    names = list(dataset.names)
    per_class: Dict[str, int] = {}
    for label in labels:
        key = _class_label(label, class_names)
        per_class[key] = per_class.get(key, 0) + 1
    listing = hashlib.sha256()
    for name, label in zip(names, labels):
        listing.update(_name_bytes(name) + b"\0" + str(label).encode() + b"\n")
    record = {"n": len(labels), "per_class": per_class, "list": listing.hexdigest()}
    store = getattr(dataset, "_store", None)
    index = getattr(dataset, "_index", None)
    paths = getattr(store, "paths", None)
    if paths is not None and index is not None:
        stats = hashlib.sha256()
        total = 0
        for name, i in zip(names, index.tolist()):
            try:
                st = os.stat(paths[i])
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # gone since the dataset was listed: recorded as missing
                size, mtime = -1, -1
            total += max(size, 0)
            stats.update(_name_bytes(name) + f"\0{size}\0{mtime}\n".encode())
        record.update(kind="files", bytes=total, stats=stats.hexdigest())
        return record
    images = getattr(store, "images", None)
    if images is None or index is None:  # an unknown store: its list is all that is known
        record.update(kind="unknown")
        return record
    selected = images.index_select(0, index) if len(index) != images.shape[0] else images
    shape = [int(v) for v in selected.shape]
    record.update(kind="arrays", shape=shape)
    nbytes = selected.numel() * selected.element_size()
    if nbytes <= CONTENT_HASH_LIMIT:
        record["content"] = hashlib.sha256(selected.contiguous().numpy().tobytes()).hexdigest()
    return record


def data_fingerprint(dataset_name: str, train_set, test_set, info) -> dict:
    """The fingerprint of a loaded dataset (``datasets.get_dataset``'s three results): a dict of
    numbers and text that a checkpoint's ``meta``, a JSON file or a study's settings can hold."""
    class_names = [str(c) for c in info.class_names]
    record = {
        "version": FINGERPRINT_VERSION, "dataset": str(dataset_name), "class_names": class_names,
        "classes": {name: i for i, name in enumerate(class_names)},
        "splits": {"train": _split_record(train_set, class_names), "test": _split_record(test_set, class_names)},
    }
    record["digest"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return record


def short(digest: Optional[str]) -> str:
    return (digest or "none")[:12]


def _count_changes(split: str, old: dict, new: dict) -> List[str]:
    before, after = old.get("per_class") or {}, new.get("per_class") or {}
    out = []
    for cls in list(dict.fromkeys(list(before) + list(after))):
        a, b = int(before.get(cls, 0)), int(after.get(cls, 0))
        if a != b:
            out.append(f"{split}/{cls} {b} images (was {a})")
    return out


def data_changes(saved: Optional[dict], now: dict) -> List[str]:
    """What differs between a recorded fingerprint and today's, in words ([] when the same; a
    record without a fingerprint, written before runs recorded one, compares as the same)."""
    if not saved or not isinstance(saved, dict) or "digest" not in saved:
        return []
    if saved.get("digest") == now.get("digest"):
        return []
    out = []
    if saved.get("dataset") != now.get("dataset"):
        out.append(f"dataset {now.get('dataset')} (was {saved.get('dataset')})")
    old_names, new_names = list(saved.get("class_names") or []), list(now.get("class_names") or [])
    if old_names != new_names:
        moved = [f"class {i} is {new_names[i] if i < len(new_names) else 'gone'} (was {n})"
                 for i, n in enumerate(old_names) if i >= len(new_names) or new_names[i] != n]
        added = [f"class {i} {n} is new" for i, n in enumerate(new_names) if i >= len(old_names)]
        out.append("the classes changed (class folders renamed, added or removed, so an index names another "
                   "class): " + ", ".join(moved + added))
    for split in ("train", "test"):
        old, new = (saved.get("splits") or {}).get(split) or {}, (now.get("splits") or {}).get(split) or {}
        if old == new:
            continue
        counts = _count_changes(split, old, new)
        if counts:
            out.extend(counts)
        elif old.get("list") != new.get("list"):
            out.append(f"{split}: other files than before (same numbers per class: renamed or replaced)"
                       if new.get("kind") == "files" else f"{split}: other images or labels (same numbers per class)")
        elif old.get("kind") != new.get("kind"):
            out.append(f"{split}: stored as {new.get('kind')} (was {old.get('kind')})")
        elif old.get("stats") != new.get("stats"):
            out.append(f"{split}: the same files, but sizes or modification times changed (files rewritten, or "
                       f"copied without their times)")
        elif old.get("content") != new.get("content") or old.get("shape") != new.get("shape"):
            out.append(f"{split}: the same number of images, with other content")
    return out or [f"the data's fingerprint is {short(now.get('digest'))} (was {short(saved.get('digest'))})"]


def check_same_data(saved: Optional[dict], now: dict, what: str, accept: bool, where: str = "",
                    advice: str = "") -> List[str]:
    """Refuse data that changed since ``what`` (a run, a model) recorded ``saved`` (one line:
    what changed and how to go on), unless ``accept`` (:data:`ACCEPT_FLAG` given): then the
    changes are returned, for the caller to record. ``where``: the data's location, for the
    message; ``advice``: the other way on (e.g. "train a new run in another --logdir")."""
    changes = data_changes(saved, now)
    if not changes or accept:
        return changes
    text = "; ".join(changes)
    if len(text) > 400:
        text = text[:400] + " ..."
    other = f"{advice}, " if advice else ""
    raise UserError(f"{what} was made on other data than {where or 'the data'} holds now: {text}. Restore the data, "
                    f"{other}or pass {ACCEPT_FLAG} to go on with the data as it is (the change is recorded)")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (a UserError of one line when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    return h.hexdigest()


def check_same_file(saved_sha: Optional[str], now_sha: str, what: str, path: str, accept: bool,
                    advice: str = "") -> bool:
    """Refuse a file (a dissolver) whose content changed since ``what`` recorded ``saved_sha``,
    unless ``accept``; returns whether it changed (a record without a hash compares as the same)."""
    if not saved_sha or saved_sha == now_sha:
        return False
    if accept:
        return True
    other = f"{advice}, " if advice else ""
    raise UserError(f"{what} was made with another {path}: its content changed since (SHA-256 {short(now_sha)}, "
                    f"was {short(saved_sha)}: retrained or replaced in place). Restore that file, {other}or pass "
                    f"{ACCEPT_FLAG} to go on with the file as it is (the change is recorded)")


# --------------------------------------------------------------------------- outputs outside the data


def data_tree(*sets) -> Optional[str]:
    """The folder that holds every image file of ``sets`` (the deepest common one), or None
    for data held in memory."""
    folders = set()
    for dataset in sets:
        store, index = getattr(dataset, "_store", None), getattr(dataset, "_index", None)
        paths = getattr(store, "paths", None)
        if paths is None or index is None:
            continue
        folders.update(os.path.dirname(os.path.abspath(paths[i])) for i in index.tolist())
    if not folders:
        return None
    try:
        return os.path.commonpath(sorted(folders))
    except ValueError:  # different drives (Windows)
        return None


def _inside(path: str, folder: str) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_outside_data(outputs, tree: Optional[str], dataset: str) -> None:
    """Refuse an output (``(flag, path)`` pairs; empty paths skipped) inside the folder of a
    dataset's files (:func:`data_tree`): what is written there would be read as data later."""
    if not tree:
        return
    for flag, path in outputs:
        if path and _inside(path, tree):
            raise UserError(f"{flag} {path} lies inside the folder of dataset '{dataset}' ({tree}): what is written "
                            f"there could be read as its images by later runs; choose a {flag} outside it")
