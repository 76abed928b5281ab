"""``synth_lesion``: a procedurally generated, offline, fine-grained anomaly dataset (32 px RGB).

Every image is one piece of pinkish "tissue" built from the same generator:

1. a smooth random field (three octaves of low-resolution Gaussian noise, 4/8/16 px,
   bicubically upsampled to 32 px) mixes a light and a dark tissue colour; both colours get
   a small per-image hue jitter and the whole image a brightness factor in [0.9, 1.08];
2. 6-14 "cell nuclei": soft purple elliptical blobs (sigma 0.9-1.6 px) at random places;
3. the tissue surface: a near-white lumen above a wavy boundary 5-9 px below the top edge
   (so, as in sections, scans and fundus photographs, the images have an up and a down and
   the rotation shift of CSI has something to learn);
4. a faint pixel grain (Gaussian, sigma 0.015).

Class 1 (anomalous) images are produced exactly like class 0 and then receive 1-3 small
*lesions*, each a compact spot (sigma 0.55-0.85 px, cut off where its weight is below 0.05,
so about 5-15 pixels) that is either a dark red haemorrhage or a bright yellowish speck.
Outside the lesion spots an anomalous image is pixel-for-pixel its normal version, so the
anomaly is a small local addition and the classes differ only in fine detail.

Variants (the dataset names; the normal tissue is drawn by the same generator in all):

* ``synth_lesion``: the spots above;
* ``synth_lesion_half``: the same spots with half the area (sigma / sqrt 2, about 0.9% of the
  pixels on average);
* ``synth_streak``: 1-2 thin dark-red streaks instead of spots (flame-shaped haemorrhages:
  a 1-px-wide line, 6-10 px long, about 3.5% of the pixels on average), fine detail with
  sharp edges;
* ``synth_streak_half``: the same streaks at half the length (about 60% of the area: the
  round ends stay).

Generation is vectorised torch code driven by ``torch.Generator`` objects seeded from
``(seed, split)``: the same seed gives identical images, another seed different ones.
Default sizes: train 2000 normal + 500 anomalous, test 500 + 500; about a second on a CPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import ArrayStore, DatasetInfo, ImageDataset

SIZE = 32
# dataset name -> (lesion shape, area factor)
VARIANTS = {
    "synth_lesion": ("spot", 1.0),
    "synth_lesion_half": ("spot", 0.5),
    "synth_streak": ("streak", 1.0),
    "synth_streak_half": ("streak", 0.5),
}
SPLIT_SIZES = {"train": (2000, 500), "test": (500, 500)}   # (normal, anomalous)
CLASS_NAMES = ["normal", "lesion"]
_CHUNK = 512
_MAX_NUCLEI = 14
_MAX_LESIONS = 3
_MAX_STREAKS = 2
_CUTOFF = 0.05


def _generator(seed: int, split_id: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, split_id]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _u(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _spots(g: torch.Generator, n: int, k: int, sig_lo: float, sig_hi: float, elliptic: bool,
           peak: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n x k x 32 x 32`` axis-aligned Gaussian spots at uniform random centres.

    The peak is 1, or ``peak`` (``n x k``); computed separably (outer product of a vertical
    and a horizontal profile), so only ``n x k x 32`` exponentials are taken.
    """
    cy = _u(g, (n, k, 1), 1.0, SIZE - 2.0)
    cx = _u(g, (n, k, 1), 1.0, SIZE - 2.0)
    sy = _u(g, (n, k, 1), sig_lo, sig_hi)
    sx = _u(g, (n, k, 1), sig_lo, sig_hi) if elliptic else sy
    coords = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE)
    gy = torch.exp(-0.5 * ((coords - cy) / sy) ** 2)
    gx = torch.exp(-0.5 * ((coords - cx) / sx) ** 2)
    if peak is not None:
        gy = gy * peak.view(n, k, 1)
    return gy.unsqueeze(3) * gx.unsqueeze(2)


def _tissue(g: torch.Generator, n: int) -> torch.Tensor:
    """``n`` normal tissue images, float ``n x 3 x 32 x 32`` in [0, 1]."""
    field = torch.zeros(n, 1, SIZE, SIZE)
    for res, amp in ((4, 1.0), (8, 0.5), (16, 0.25)):
        noise = torch.randn((n, 1, res, res), generator=g)
        field += amp * F.interpolate(noise, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    field = (field - field.mean(dim=(2, 3), keepdim=True)) / (field.std(dim=(2, 3), keepdim=True) + 1e-6)
    mix = torch.sigmoid(1.5 * field)                                   # n x 1 x H x W

    light = torch.tensor([0.93, 0.74, 0.80]).view(1, 3, 1, 1) + 0.03 * torch.randn((n, 3, 1, 1), generator=g)
    dark = torch.tensor([0.80, 0.50, 0.62]).view(1, 3, 1, 1) + 0.03 * torch.randn((n, 3, 1, 1), generator=g)
    img = mix * light + (1.0 - mix) * dark

    # cell nuclei: soft purple blobs, a random number per image
    count = torch.randint(6, _MAX_NUCLEI + 1, (n, 1), generator=g)
    present = (torch.arange(_MAX_NUCLEI).view(1, -1) < count).float()
    strength = _u(g, (n, _MAX_NUCLEI), 0.35, 0.6) * present
    alpha = _spots(g, n, _MAX_NUCLEI, 0.9, 1.6, elliptic=True, peak=strength).amax(dim=1, keepdim=True)
    purple = torch.tensor([0.42, 0.22, 0.52]).view(1, 3, 1, 1) + 0.03 * torch.randn((n, 3, 1, 1), generator=g)
    img = img * (1.0 - alpha) + purple * alpha

    # the tissue surface: a light lumen above a wavy boundary 5-9 px below the top edge, so
    # the images have an up and a down (as sections, scans and fundus photographs do) and a
    # rotated image can be told from an upright one
    ys = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE, 1)
    xs = torch.arange(SIZE, dtype=torch.float32).view(1, 1, 1, SIZE)
    level = _u(g, (n, 1, 1, 1), 5.0, 9.0)
    freq = _u(g, (n, 1, 1, 1), 0.5, 1.5) * (2 * np.pi / SIZE)
    phase = _u(g, (n, 1, 1, 1), 0.0, 2 * np.pi)
    boundary = level + 1.5 * torch.sin(freq * xs + phase)
    lumen = torch.sigmoid((boundary - ys) / 0.7)                       # n x 1 x H x W, 1 above
    lumen_colour = torch.tensor([0.97, 0.91, 0.94]).view(1, 3, 1, 1)
    img = img * (1.0 - lumen) + lumen_colour * lumen

    img = img * _u(g, (n, 1, 1, 1), 0.9, 1.08)
    img = img + 0.015 * torch.randn((n, 3, SIZE, SIZE), generator=g)
    return img.clamp(0.0, 1.0)


def _streaks(g: torch.Generator, n: int, k: int, length_lo: float, length_hi: float, width: float) -> torch.Tensor:
    """``n x k x 32 x 32`` weights of straight streaks (Gaussian profile across, flat along).

    Each streak has a uniform random centre (4 px from the border or more), direction and
    length; its weight is ``exp(-d^2 / (2 width^2))`` with ``d`` the distance to the segment.
    """
    cy = _u(g, (n, k, 1, 1), 4.0, SIZE - 4.0)
    cx = _u(g, (n, k, 1, 1), 4.0, SIZE - 4.0)
    angle = _u(g, (n, k, 1, 1), 0.0, np.pi)
    half = _u(g, (n, k, 1, 1), length_lo, length_hi) / 2
    ys = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE, 1) - cy
    xs = torch.arange(SIZE, dtype=torch.float32).view(1, 1, 1, SIZE) - cx
    along = xs * torch.cos(angle) + ys * torch.sin(angle)
    across = ys * torch.cos(angle) - xs * torch.sin(angle)
    beyond = (along.abs() - half).clamp(min=0.0)
    return torch.exp(-0.5 * (across ** 2 + beyond ** 2) / width ** 2)


def _blend(img: torch.Tensor, w: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Paint each of the ``L`` weight maps ``w`` (``n x L x H x W``) in its colour (``n x L x 3``)."""
    out = img
    n = img.shape[0]
    for k in range(w.shape[1]):                                        # at most 3 spots: tiny loop
        a = w[:, k : k + 1]
        out = out * (1.0 - a) + colour[:, k].view(n, 3, 1, 1) * a
    return out.clamp(0.0, 1.0)


def _add_lesions(g: torch.Generator, img: torch.Tensor, shape: str = "spot",
                 area: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add lesions to each image; returns (images, lesion weight map ``n x 1 x H x W``).

    ``shape``: ``'spot'`` (1-3 spots, sigma 0.55-0.85 px times ``sqrt(area)``) or ``'streak'``
    (1-2 streaks 1 px wide and 6-10 px times ``area`` long).
    """
    n = img.shape[0]
    most = _MAX_LESIONS if shape == "spot" else _MAX_STREAKS
    count = torch.randint(1, most + 1, (n, 1), generator=g)
    present = (torch.arange(most).view(1, -1) < count).float().view(n, most, 1, 1)
    if shape == "spot":
        scale = float(np.sqrt(area))
        w = _spots(g, n, most, 0.55 * scale, 0.85 * scale, elliptic=False)
        w = torch.where(w < _CUTOFF, torch.zeros_like(w), w)
        w = w * _u(g, (n, most, 1, 1), 0.6, 0.9) * present             # n x L x H x W
        red = torch.tensor([0.50, 0.06, 0.10])
        bright = torch.tensor([1.00, 0.95, 0.62])
        is_red = (torch.rand((n, most), generator=g) < 0.6).float()
        colour = is_red[..., None] * red + (1.0 - is_red[..., None]) * bright  # n x L x 3
    elif shape == "streak":
        w = _streaks(g, n, most, 6.0 * area, 10.0 * area, width=0.5)
        w = torch.where(w < _CUTOFF, torch.zeros_like(w), w)
        w = w * _u(g, (n, most, 1, 1), 0.8, 1.0) * present
        colour = torch.tensor([0.35, 0.03, 0.06]).expand(n, most, 3)
    else:
        raise ValueError(f"unknown lesion shape {shape!r}")
    return _blend(img, w, colour), w.amax(dim=1, keepdim=True)


def _quantise(img: torch.Tensor) -> torch.Tensor:
    return (img * 255.0).round().clamp(0, 255).to(torch.uint8)


def generate_synth_lesion(n_normal: int, n_anomalous: int, seed: int = 0, split_id: int = 0,
                          return_parts: bool = False, variant: str = "synth_lesion"):
    """Images (``uint8 N x 3 x 32 x 32``) and labels (``LongTensor``, 0 normal / 1 lesion).

    ``variant`` is one of ``VARIANTS`` (the lesions' shape and size).
    Labels come in a random order. With ``return_parts`` it also returns the images before
    lesions were added (``uint8``, equal to the images for class 0) and the lesion weight
    maps (``float N x 1 x 32 x 32``, zero wherever nothing was added).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; use one of {', '.join(VARIANTS)}")
    shape, area = VARIANTS[variant]
    g = _generator(seed, split_id)
    n = int(n_normal) + int(n_anomalous)
    labels = torch.cat([torch.zeros(int(n_normal), dtype=torch.long), torch.ones(int(n_anomalous), dtype=torch.long)])
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
    clean: Optional[torch.Tensor] = torch.empty_like(images) if return_parts else None
    masks: Optional[torch.Tensor] = torch.zeros(n, 1, SIZE, SIZE) if return_parts else None
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        base = _tissue(g, e - s)
        out = base.clone()
        anom = torch.nonzero(labels[s:e] == 1, as_tuple=False).flatten()
        if anom.numel():
            with_lesion, w = _add_lesions(g, base.index_select(0, anom), shape, area)
            out[anom] = with_lesion
            if masks is not None:
                masks[s + anom] = w
        images[s:e] = _quantise(out)
        if clean is not None:
            clean[s:e] = _quantise(base)
    if return_parts:
        return images, labels, clean, masks
    return images, labels


def load_synth_lesion(seed: int = 0, variant: str = "synth_lesion") -> Tuple[ImageDataset, ImageDataset, DatasetInfo]:
    sets = []
    for split_id, split in enumerate(("train", "test")):
        n_norm, n_anom = SPLIT_SIZES[split]
        images, labels = generate_synth_lesion(n_norm, n_anom, seed=seed, split_id=split_id, variant=variant)
        sets.append(ImageDataset(ArrayStore(images), labels, [f"{split}/{i}" for i in range(len(labels))]))
    info = DatasetInfo(name=variant, image_size=(SIZE, SIZE, 3), n_classes=2,
                       class_names=list(CLASS_NAMES), native_kind="small32")
    return sets[0], sets[1], info
