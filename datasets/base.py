"""The one dataset type every loader returns, and the facts that travel with it.

Images are kept as ``uint8`` (``C x H x W``, always 3 channels) in a *store*; an
:class:`ImageDataset` is a view on a store: which store items it holds, in which order, and
their (possibly relabelled) labels. Subsets share the store, so an image decoded once for
one view is decoded for all of them.

Two stores exist:

* :class:`ArrayStore`: everything already in one ``uint8`` tensor (MedMNIST, CIFAR, digits,
  synth_lesion).
* :class:`FolderStore`: image files decoded with PIL on first access (:func:`decode_image`:
  bilinear resize to the target size, 3 channels) and kept in memory, so later epochs never
  decode again. Every file is checked once when the store is made (:func:`check_image_files`),
  so a corrupt file stops the run before training, with all bad files named at once.

High-bit-depth images (medical PNG/TIFF) are scaled to their full range before they become
8-bit, never clipped (see :func:`high_bit_to_unit`).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.errors import UserError

NATIVE_KINDS = ("medmnist28", "small32", "large224")
# the files read as images, in every folder this project reads: torchvision ImageFolder's extensions
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS)


def is_hidden(name: str) -> bool:
    """Entries every folder listing skips: hidden files and folders, macOS archive leftovers."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class DatasetInfo:
    """What the rest of the program needs to know about a dataset.

    ``image_size`` is ``(H, W, C)`` of the images the dataset returns. ``native_kind`` tells
    the dissolver how to reach its resolution: ``'medmnist28'`` (pad 2 px each side to 32),
    ``'small32'`` (already 32 px) or ``'large224'`` (resize to ``--diff_resolution`` and back;
    used for every size other than 28 and 32).
    """

    name: str
    image_size: Tuple[int, int, int]
    n_classes: int
    class_names: List[str] = field(default_factory=list)
    native_kind: str = "large224"
    # folder datasets: the class folders found under train/ (the others appear in the test split only)
    train_classes: List[str] = field(default_factory=list)
    # folder datasets: the files' own sizes, (height, width) of each, as found when they were checked
    original_hw: List[Tuple[int, int]] = field(default_factory=list)


def native_kind_for(height: int, width: int) -> str:
    """The dissolver kind for images of ``height x width`` pixels."""
    if (height, width) == (28, 28):
        return "medmnist28"
    if (height, width) == (32, 32):
        return "small32"
    return "large224"


def _as_index_tensor(indices, length: int) -> torch.Tensor:
    """``indices`` (int sequence, numpy array, tensor, or bool mask) as a LongTensor, bounds-checked."""
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().cpu()
    else:
        idx = torch.as_tensor(np.asarray(indices))
    if idx.dtype == torch.bool:
        if idx.numel() != length:
            raise IndexError(f"boolean mask has {idx.numel()} entries, dataset has {length}")
        return torch.nonzero(idx, as_tuple=False).flatten()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"indices must be integers, got {idx.dtype}")
    idx = idx.to(torch.long).flatten()
    if int(idx.min()) < -length or int(idx.max()) >= length:
        raise IndexError(f"index out of range for a dataset of {length} images")
    return torch.where(idx < 0, idx + length, idx)


class ArrayStore:
    """All images in one ``uint8`` tensor ``N x 3 x H x W``."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ArrayStore wants uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def hw(self) -> Tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images.index_select(0, idx)


# Pillow modes that hold more than 8 bits per pixel (one channel): 16-bit unsigned in
# several byte orders, 32-bit signed integers, 32-bit floats.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F")


def high_bit_to_unit(arr: np.ndarray) -> np.ndarray:
    """A one-channel high-bit-depth image as ``float32`` in [0, 1], by a fixed rule.

    * integer data whose values all lie in 0..65535 (every 16-bit image, and 16-bit data that
      Pillow hands over as 32-bit mode ``'I'``): ``value / 65535``;
    * other integer data (negative values, or above 65535, e.g. CT numbers): stretched from
      the image's own minimum (-> 0) to its maximum (-> 1);
    * float data (mode ``'F'``): kept when within [0, 1], otherwise stretched min -> max.

    A constant image that has to be stretched becomes 0. NaN or infinite values are a ValueError.
    """
    a = np.asarray(arr).astype(np.float64)
    if a.size and not np.isfinite(a).all():
        raise ValueError("the image holds NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.issubdtype(np.asarray(arr).dtype, np.integer):
        if lo >= 0.0 and hi <= 65535.0:
            return (a / 65535.0).astype(np.float32)
    elif lo >= 0.0 and hi <= 1.0:
        return a.astype(np.float32)
    if hi > lo:
        return ((a - lo) / (hi - lo)).astype(np.float32)
    return np.zeros(a.shape, dtype=np.float32)


def _to_rgb_uint8(img, size_hw: Tuple[int, int] | None) -> np.ndarray:
    """An open PIL image as ``uint8 H x W x 3`` at ``size_hw`` (bilinear; ``None``: its own size)."""
    h, w = (img.size[1], img.size[0]) if size_hw is None else size_hw
    if img.mode in HIGH_BIT_MODES:
        # full range -> [0, 1] in float, resized in float, then quantised once: nothing saturates
        unit = Image.fromarray(high_bit_to_unit(np.asarray(img)))      # mode 'F'
        if unit.size != (w, h):
            unit = unit.resize((w, h), Image.BILINEAR)
        grey = np.clip(np.rint(np.asarray(unit, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_image(path: str, size_hw: Tuple[int, int] | None, shown_name: str | None = None) -> torch.Tensor:
    """Decode one file into ``uint8 3 x H x W`` (bilinear resize to ``size_hw``, ``None`` keeps
    the file's own size); a bad file is a UserError.

    8-bit images go through ``convert('RGB')``; high-bit-depth ones (:data:`HIGH_BIT_MODES`)
    through :func:`high_bit_to_unit`, then ``round(255 * v)``, grey copied to 3 channels.
    """
    try:
        with Image.open(path) as img:
            arr = _to_rgb_uint8(img, size_hw)
    except FileNotFoundError:
        err = UserError(f"image file {path} has disappeared since the dataset was listed; "
                        f"restore it or remove it from the dataset folder")
        err.reason = "the file has disappeared"
        raise err from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        err = UserError(f"cannot read image file {path} ({_reason(exc)}); "
                        f"the file is corrupt or not an image: replace or delete it")
        err.reason = _reason(exc)
        raise err from None
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - both paths give H x W x 3
        raise UserError(f"image file {path} did not decode to an RGB image")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _reason(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jpeg_ends_cleanly(path: str) -> bool:
    """True when the file's last two bytes are the JPEG end-of-image marker FF D9."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 4:
            return False
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def check_image_file(path: str) -> str | None:
    """``None`` when ``path`` looks like a readable image, else the reason (one short line).

    Cheaper than decoding: PNG files have every chunk's CRC checked (``Image.verify``), which
    finds truncated and damaged files; a JPEG has its header parsed and must end with the
    end-of-image marker (if it does not, it is decoded at 1/8 scale, so a truncated file is
    found and a file with trailing bytes still passes); other formats are decoded fully.
    """
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()
            elif img.format == "JPEG":
                if not _jpeg_ends_cleanly(path):
                    w, h = img.size
                    img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                    img.load()
            else:
                img.load()
    except Exception as exc:  # anything PIL raises means the file will not decode
        return _reason(exc)
    return None


def _check_and_measure(path: str) -> Tuple[str | None, Tuple[int, int]]:
    """``(reason or None, (height, width))`` of the file at ``path``: :func:`check_image_file`,
    then the size from the file's header (``(0, 0)`` when it cannot be read)."""
    reason = check_image_file(path)
    try:
        with Image.open(path) as img:
            return reason, (img.size[1], img.size[0])
    except Exception:  # the reason above already says why
        return reason, (0, 0)


def check_image_files(paths: Sequence[str], what: str = "the dataset", workers: int | None = None,
                      shown: int = 5) -> List[Tuple[int, int]]:
    """Check every file (:func:`check_image_file`, a few threads) and return each one's own
    ``(height, width)``; all bad files make one UserError.

    The message gives the count and the first ``shown`` paths with their reasons.
    """
    paths = list(paths)
    if not paths:
        return []
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
            checked = list(pool.map(_check_and_measure, paths))
    else:
        checked = [_check_and_measure(p) for p in paths]
    bad = [(p, r) for p, (r, _) in zip(paths, checked) if r is not None]
    if bad:
        _raise_bad_files(bad, len(paths), what, shown,
                         "(every file is checked when the data is loaded, before any training)")
    return [hw for _, hw in checked]


def _raise_bad_files(bad, n_total: int, what: str, shown: int = 5, note: str = ""):
    listed = "; ".join(f"{p} ({r})" for p, r in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    raise UserError(f"{len(bad)} of {n_total} image files of {what} cannot be read (corrupt, truncated or not "
                    f"images): {listed}{more}. Replace or delete these files and run again {note}".rstrip())


class FolderStore:
    """Image files, decoded on first access and cached (``uint8``) for the life of the store.

    ``paths`` are absolute file paths. The cache is a list with one slot per file, shared by
    every dataset view built on this store. Decoding of a batch with several new files runs
    on a small thread pool (PIL releases the GIL while decoding and resizing). With ``check``
    (the default) every file is checked when the store is made (:func:`check_image_files`);
    a file that passes the check yet fails to decode is reported, with any other failure of
    the same batch, in one UserError.
    """

    def __init__(self, paths: Sequence[str], size_hw: Tuple[int, int], workers: int | None = None,
                 check: bool = True, what: str = "the image folder"):
        self.paths = list(paths)
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self._cache: List[torch.Tensor | None] = [None] * len(self.paths)
        self._lock = threading.Lock()
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        self.workers = max(1, int(workers))
        if check:  # every file once, now: a corrupt file stops the run before any training
            check_image_files(self.paths, what, workers=self.workers)

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):
        # picklable for DataLoader workers started with 'spawn': the lock is recreated there
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def hw(self) -> Tuple[int, int]:
        return self.size_hw

    @property
    def n_cached(self) -> int:
        return sum(1 for c in self._cache if c is not None)

    def _load(self, i: int) -> UserError | None:
        try:
            self._cache[i] = decode_image(self.paths[i], self.size_hw)
        except UserError as exc:
            return exc
        return None

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        ids = idx.tolist()
        missing = sorted({i for i in ids if self._cache[i] is None})
        if missing:
            with self._lock:
                missing = [i for i in missing if self._cache[i] is None]
                if len(missing) > 1 and self.workers > 1:
                    with ThreadPoolExecutor(max_workers=min(self.workers, len(missing))) as pool:
                        errors = list(pool.map(self._load, missing))
                else:
                    errors = [self._load(i) for i in missing]
            failed = [(i, e) for i, e in zip(missing, errors) if e is not None]
            if len(failed) == 1:
                raise failed[0][1]
            if failed:
                _raise_bad_files([(self.paths[i], getattr(e, "reason", str(e))) for i, e in failed],
                                 len(missing), "a batch", note="(they passed the quick check at load time)")
        if not ids:
            h, w = self.size_hw
            return torch.zeros(0, 3, h, w, dtype=torch.uint8)
        return torch.stack([self._cache[i] for i in ids])


class ImageDataset(Dataset):
    """A labelled set of RGB images; items are ``(FloatTensor 3 x H x W in [0, 1], int label)``.

    Attributes: ``labels`` (LongTensor ``(N,)``), ``names`` (per-item identifiers),
    ``image_size`` (``(H, W, C)``). ``get_batch`` is the fast path for training loops;
    ``subset`` gives a view that shares the image store (and its decode cache).
    """

    def __init__(self, store, labels, names: Sequence[str], index: torch.Tensor | None = None):
        self._store = store
        if index is None:
            index = torch.arange(len(store), dtype=torch.long)
        self._index = index.to(torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long).flatten().clone()
        self.names = list(names)
        n = self._index.numel()
        if self.labels.numel() != n or len(self.names) != n:
            raise ValueError(f"ImageDataset: {n} images but {self.labels.numel()} labels and {len(self.names)} names")
        h, w = store.hw
        self.image_size = (h, w, 3)

    # -- torch Dataset protocol -------------------------------------------------------
    def __len__(self) -> int:
        return self._index.numel()

    def __getitem__(self, i):
        n = len(self)
        i = int(i)
        if i < -n or i >= n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        i %= n
        img = self._store.fetch(self._index[i : i + 1])[0]
        return img.float().div_(255.0), int(self.labels[i])

    # -- fast paths ---------------------------------------------------------------------
    def get_batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images ``N x 3 x H x W`` float in [0, 1] and labels ``(N,)`` for dataset positions ``indices``."""
        idx = _as_index_tensor(indices, len(self))
        raw = self._store.fetch(self._index.index_select(0, idx))
        return raw.float().div_(255.0), self.labels.index_select(0, idx)

    def get_uint8(self, indices) -> torch.Tensor:
        """Like :meth:`get_batch` but the raw ``uint8`` images (no labels)."""
        idx = _as_index_tensor(indices, len(self))
        return self._store.fetch(self._index.index_select(0, idx))

    def subset(self, indices) -> "ImageDataset":
        """The items at dataset positions ``indices`` (order kept), sharing storage and cache."""
        idx = _as_index_tensor(indices, len(self))
        view = ImageDataset.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._index = self._index.index_select(0, idx)
        view.labels = self.labels.index_select(0, idx)
        view.names = [self.names[j] for j in idx.tolist()]
        return view

    @staticmethod
    def concat(parts: Sequence["ImageDataset"]) -> "ImageDataset":
        """Join views of the same store (e.g. a normal subset and contaminating images)."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one dataset")
        store = parts[0]._store
        if any(p._store is not store for p in parts):
            raise ValueError("concat joins only views of the same dataset (same store)")
        view = ImageDataset.__new__(type(parts[0]))
        view.__dict__.update(parts[0].__dict__)
        view._index = torch.cat([p._index for p in parts])
        view.labels = torch.cat([p.labels for p in parts])
        view.names = [n for p in parts for n in p.names]
        return view

    def cache_all(self) -> "ImageDataset":
        """Decode every image of this view now (no-op for in-memory datasets); returns self."""
        chunk = 256
        for s in range(0, len(self), chunk):
            self._store.fetch(self._index[s : s + chunk])
        return self

    # -- conveniences -------------------------------------------------------------------
    @property
    def targets(self) -> List[int]:
        """CSI-style list of labels."""
        return self.labels.tolist()

    def shares_storage_with(self, other: "ImageDataset") -> bool:
        return self._store is other._store

    def __repr__(self) -> str:
        h, w, c = self.image_size
        counts = torch.bincount(self.labels).tolist() if len(self) else []
        return f"{type(self).__name__}(n={len(self)}, size={h}x{w}x{c}, per-class={counts})"
