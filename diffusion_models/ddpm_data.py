"""The DDPM's training images, prepared as the paper's dissolver training prepares them.

The paper's DDPM reads the normal class of the training split and applies, per image:
to tensor -> random horizontal flip -> bilinear resize to the dissolving resolution without
antialiasing (MedMNIST: pad 2 to 32 instead; 32-px sets: as they are). For folder datasets
that resize starts from the *original* file, not from the 224-px copy the ResNet sees.

Flipping and a bilinear resize with ``align_corners=False`` commute, so the images are
resized once here and flipped per batch by the training loop.

The paper's DDPM script also has its own names for some datasets and its own default normal
class; both are here, for the dissolver's training and its dissolving grid.
"""
import torch
import torch.nn.functional as F

from common.errors import UserError
from datasets.base import decode_image
from datasets.registry import pick_normal_class
from datasets.resolution import to_dissolve_resolution

# The paper's DDPM script names some datasets differently.
PAPER_DATASET_NAMES = {"sars-covid": "covid", "pneumonia": "pneumoniamnist", "breast": "breastmnist",
                       "chest": "chestmnist"}


def paper_dataset_name(name):
    """Our name of a dataset that the paper's DDPM script names differently, else ``name``."""
    return PAPER_DATASET_NAMES.get(name, name)


def default_one_class_idx(dataset):
    """The DDPM script's normal class: folder class 1 ('non-COVID') for covid, else 0."""
    return 1 if dataset == "covid" else 0


def dissolver_class(dataset, data_root, one_class_idx=None, normal_class=None, recorded=None):
    """``(index, name or None)`` of the class a dissolver learns or is shown on.

    ``--one_class_idx`` / ``--normal_class`` when given; else ``recorded`` (the checkpoint's
    ``(name, index)`` when it was trained on ``dataset``); else the paper's DDPM script's
    default for covid (:func:`default_one_class_idx`); else ``datasets.normal_class``'s rules
    (a folder dataset's good/normal or only training folder, class 0 for the others).
    """
    if one_class_idx is None and normal_class is None:
        if recorded is not None:
            one_class_idx = recorded[1]
        elif dataset == "covid":
            one_class_idx = default_one_class_idx(dataset)
    return pick_normal_class(dataset, data_root, one_class_idx, normal_class)


def check_normal_class(idx, info):
    """Refuse a normal class ``idx`` that ``info`` (a ``datasets.DatasetInfo``) does not have."""
    n = len(info.class_names)
    if not 0 <= idx < n:
        raise UserError(f"--one_class_idx {idx} is out of range: this dataset has {n} classes "
                        f"({', '.join(map(str, info.class_names))}); use 0..{n - 1}")


def _folder_paths(dataset):
    """The original file of each item of a folder-backed dataset view, or None."""
    store = getattr(dataset, "_store", None)
    paths = getattr(store, "paths", None)
    if paths is None:
        return None
    return [paths[i] for i in dataset._index.tolist()]


def ddpm_training_images(dataset, native_kind, resolution, progress=None):
    """``N x 3 x resolution x resolution`` float images in [0, 1] of ``dataset`` (one class).

    Folder datasets: each original file decoded (``datasets.base.decode_image`` at its own
    size) and resized bilinearly without antialiasing. In-memory datasets: the stored images
    through :func:`datasets.resolution.to_dissolve_resolution` (MedMNIST pad 2, 32 px as is).
    ``progress`` wraps the per-file iterable (e.g. ``tqdm``).
    """
    size = (int(resolution), int(resolution))
    paths = _folder_paths(dataset)
    if paths is None:
        out = []
        for s in range(0, len(dataset), 1024):
            x, _ = dataset.get_batch(torch.arange(s, min(s + 1024, len(dataset))))
            out.append(to_dissolve_resolution(x.float(), native_kind, resolution)[0])
        if not out:
            return torch.zeros(0, 3, *size)
        return torch.cat(out)
    out = torch.empty(len(paths), 3, *size)
    it = paths if progress is None else progress(paths)
    for i, path in enumerate(it):
        img = decode_image(path, None).float().div_(255.0)[None]
        if tuple(img.shape[-2:]) != size:
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=False)
        out[i] = img[0]
    return out
