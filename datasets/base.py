"""The one dataset type every loader returns, and the facts that travel with it.

Images are kept as ``uint8`` (``C x H x W``, always 3 channels) in a *store*; an
:class:`ImageDataset` is a view on a store: which store items it holds, in which order, and
their (possibly relabelled) labels. Subsets share the store, so an image decoded once for
one view is decoded for all of them.

Two stores exist:

* :class:`ArrayStore`: everything already in one ``uint8`` tensor (MedMNIST, CIFAR, digits,
  synth_lesion).
* :class:`FolderStore`: image files decoded with PIL on first access (``convert('RGB')``,
  bilinear resize to the target size) and kept in memory, so later epochs never decode again.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UserError

NATIVE_KINDS = ("medmnist28", "small32", "large224")


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


def decode_image(path: str, size_hw: Tuple[int, int], shown_name: str | None = None) -> torch.Tensor:
    """Decode one file into ``uint8 3 x H x W`` (RGB, bilinear resize); a bad file is a UserError."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            h, w = size_hw
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image file {path} has disappeared since the dataset was listed; "
                        f"restore it or remove it from the dataset folder") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise UserError(f"cannot read image file {path} ({type(exc).__name__}: {exc}); "
                        f"the file is corrupt or not an image: replace or delete it") from None
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - convert('RGB') guarantees this
        raise UserError(f"image file {path} did not decode to an RGB image")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class FolderStore:
    """Image files, decoded on first access and cached (``uint8``) for the life of the store.

    ``paths`` are absolute file paths. The cache is a list with one slot per file, shared by
    every dataset view built on this store. Decoding of a batch with several new files runs
    on a small thread pool (PIL releases the GIL while decoding and resizing).
    """

    def __init__(self, paths: Sequence[str], size_hw: Tuple[int, int], workers: int | None = None):
        self.paths = list(paths)
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self._cache: List[torch.Tensor | None] = [None] * len(self.paths)
        self._lock = threading.Lock()
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        self.workers = max(1, int(workers))

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

    def _load(self, i: int) -> torch.Tensor:
        img = decode_image(self.paths[i], self.size_hw)
        self._cache[i] = img
        return img

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        ids = idx.tolist()
        missing = sorted({i for i in ids if self._cache[i] is None})
        if missing:
            with self._lock:
                missing = [i for i in missing if self._cache[i] is None]
                if len(missing) > 1 and self.workers > 1:
                    with ThreadPoolExecutor(max_workers=min(self.workers, len(missing))) as pool:
                        list(pool.map(self._load, missing))
                else:
                    for i in missing:
                        self._load(i)
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
