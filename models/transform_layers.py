"""Batched, on-device image transformations: the shifts and the SimCLR augmentation.

Every layer takes an ``N x C x H x W`` float batch and draws its random parameters per
image from torch's generator of the batch's device, so a seed fixes the result.
"""
import math

import kornia
import torch
import torch.nn as nn
import torch.nn.functional as F

HUE_SCALE = 255.0 / 360.0  # CSI adds f_h * 255/360 (of a turn) to the hue
CROP_TRIALS = 10  # candidate crops drawn per image, as CSI's layer
# On CPU the colour jitter and the resized crop run a few images at a time, so that their passes
# over the images stay in cache (384 images at 224 px: the jitter 2.25 s in one go against 0.65 s
# four images at a time, the crop 0.27 against 0.19 s; the same bits either way)
CHUNK_PIXELS = 4 * 224 * 224


def _images_per_chunk(x, chunk_pixels):
    """How many images of ``x`` a chunk holds: all of them off the CPU or with ``chunk_pixels`` 0."""
    if x.device.type != "cpu" or not chunk_pixels:
        return max(1, x.shape[0])
    return max(1, chunk_pixels // (x.shape[2] * x.shape[3]))


def _joined(chunks, x):
    """The chunks' outputs as one batch (an empty batch stays empty)."""
    if not chunks:
        return x.clone()
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class Rotation(nn.Module):
    """Shift k: rotation by k * 90 degrees (counter-clockwise in the image plane)."""

    max_range = 4

    def forward(self, x, k):
        return torch.rot90(x, int(k) % 4, dims=(2, 3))


class CutPerm(nn.Module):
    """Shift k: swap top/bottom halves if k // 2 == 1, then left/right halves if k % 2 == 1."""

    max_range = 4

    def forward(self, x, k):
        k = int(k) % 4
        h, w = x.shape[2], x.shape[3]
        if k // 2 == 1:
            x = torch.cat([x[:, :, h // 2:], x[:, :, : h // 2]], dim=2)
        if k % 2 == 1:
            x = torch.cat([x[:, :, :, w // 2:], x[:, :, :, : w // 2]], dim=3)
        return x


class NoShift(nn.Module):
    max_range = 1

    def forward(self, x, k=0):
        return x


def get_shift(name):
    """The shift module for a base shift name (rotation, cutperm, none)."""
    return {"rotation": Rotation, "cutperm": CutPerm, "none": NoShift}[name]()


def _coin(n, p, like):
    """A boolean per image, True with probability p, shaped to broadcast over C, H, W."""
    return (torch.rand(n, device=like.device) < p).view(n, 1, 1, 1)


class HorizontalFlipRandom(nn.Module):
    """Flip each image horizontally with probability p, independently."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        return torch.where(_coin(x.shape[0], self.p, x), x.flip(3), x)


class ColorJitterLayer(nn.Module):
    """CSI's colour jitter: per image, with probability p, an HSV change (hue shift,
    saturation and value/brightness scaling) and a contrast change about each channel's
    mean, the two applied in random order; the result is clipped to [0, 1]. The hue moves
    by up to ``hue * 255/360`` of a turn, as CSI's layer does."""

    def __init__(self, p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, chunk_pixels=CHUNK_PIXELS):
        super().__init__()
        self.p, self.brightness, self.contrast, self.saturation, self.hue = p, brightness, contrast, saturation, hue
        self.chunk_pixels = chunk_pixels  # 0: the whole batch in one pass (as CSI's layer)

    @staticmethod
    def _factor(n, spread, like):
        return 1.0 + (torch.rand(n, 1, 1, device=like.device) * 2 - 1) * spread

    def _contrast(self, x, f):
        mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - mean) * f.unsqueeze(1) + mean

    def _hsv(self, x, f_h, f_s, f_v):
        # CSI's HSV holds hue as a fraction of a turn and adds f_h * 255/360 to it; kornia's
        # hue is in radians, so the same shift is f_h * 255/360 * 2 pi
        hsv = kornia.color.rgb_to_hsv(x.clamp(0, 1))
        h = torch.remainder(hsv[:, 0] + f_h * (HUE_SCALE * 2 * math.pi), 2 * math.pi)
        s = (hsv[:, 1] * f_s).clamp(0, 1)
        v = (hsv[:, 2] * f_v).clamp(0, 1)
        return kornia.color.hsv_to_rgb(torch.stack([h, s, v], dim=1))

    def forward(self, x):
        n, chunk_pixels = x.shape[0], self.chunk_pixels
        f_c = self._factor(n, self.contrast, x)
        f_s = self._factor(n, self.saturation, x)
        f_v = self._factor(n, self.brightness, x)
        f_h = (torch.rand(n, 1, 1, device=x.device) * 2 - 1) * self.hue
        contrast_first = torch.rand(1).item() < 0.5
        coin = _coin(n, self.p, x)
        # every operation below is per image: a chunk of images gives the bits of the whole batch
        step = _images_per_chunk(x, chunk_pixels)
        out = []
        for i in range(0, n, step):
            part, c = x[i:i + step], slice(i, i + step)
            if contrast_first:
                y = self._hsv(self._contrast(part, f_c[c]), f_h[c], f_s[c], f_v[c])
            else:
                y = self._contrast(self._hsv(part, f_h[c], f_s[c], f_v[c]), f_c[c])
            out.append(torch.where(coin[c], y.clamp(0, 1), part))
        return _joined(out, x)


class RandomColorGrayLayer(nn.Module):
    """Replace each image by its luma (ITU-R 601) in all channels with probability p."""

    def __init__(self, p=0.2):
        super().__init__()
        self.p = p

    def forward(self, x):
        gray = kornia.color.rgb_to_grayscale(x).expand_as(x)
        return torch.where(_coin(x.shape[0], self.p, x), gray, x)


class RandomResizedCropLayer(nn.Module):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` and resize it
    back to the input size, per image, through one affine resampling with reflection padding.
    ``fix_scale`` pins the area fraction at ``scale[0]``.

    Boxes follow CSI's layer (torchvision's rule, batched): ``10 N`` candidates are drawn for
    ``N`` images, each with side lengths rounded to whole pixels; candidates wider or taller than
    the image (or empty) are rejected, the valid ones are handed out in draw order, and images
    left without one get the whole image. A box's centre sits on a half-pixel grid, uniformly
    among the positions that keep it inside the image.
    """

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), fix_scale=False, chunk_pixels=CHUNK_PIXELS):
        super().__init__()
        self.scale, self.ratio, self.fix_scale = scale, ratio, fix_scale
        self.chunk_pixels = chunk_pixels  # 0: the whole batch in one pass

    def sample_boxes(self, n, height, width, device=None):
        """``(w, h, cx, cy)`` for ``n`` images of ``height x width``: box size as fractions of
        the image and centre in ``[-1, 1]`` coordinates (``affine_grid``'s), each of shape ``(n,)``."""
        m = n * CROP_TRIALS
        if self.fix_scale:
            area = torch.full((m,), float(self.scale[0]), device=device)
        else:
            area = torch.empty(m, device=device).uniform_(self.scale[0], self.scale[1])
        area = area * (height * width)
        r = torch.exp(torch.empty(m, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = torch.round(torch.sqrt(area * r))
        h = torch.round(torch.sqrt(area / r))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # valid candidates first, in draw order; the first n are used
        pick = torch.argsort((~ok).to(torch.uint8), stable=True)[:n]
        got = ok[pick]
        w = torch.where(got, w[pick], torch.full_like(w[pick], width))
        h = torch.where(got, h[pick], torch.full_like(h[pick], height))
        # centre offset j / size, j an integer uniform in [side - size, size - side]
        jx = torch.floor(torch.rand(n, device=device) * (2 * (width - w) + 1)) + (w - width)
        jy = torch.floor(torch.rand(n, device=device) * (2 * (height - h) + 1)) + (h - height)
        return w / width, h / height, jx / width, jy / height

    def forward(self, x):
        n, _, height, width = x.shape
        w, h, cx, cy = self.sample_boxes(n, height, width, x.device)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
        step, out = _images_per_chunk(x, self.chunk_pixels), []
        for i in range(0, n, step):  # per image: chunks give the bits of one pass
            part = x[i:i + step]
            grid = F.affine_grid(theta[i:i + step], list(part.shape), align_corners=False)
            out.append(F.grid_sample(part, grid, mode="bilinear", padding_mode="reflection", align_corners=False))
        return _joined(out, x)


def simclr_augmentation(resize_factor=0.08, resize_fix=False, chunk_pixels=CHUNK_PIXELS):
    """The SimCLR augmentation of docs/method.md §3, step 4: jitter, grayscale, resized crop."""
    return nn.Sequential(
        ColorJitterLayer(p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                         chunk_pixels=chunk_pixels),
        RandomColorGrayLayer(p=0.2),
        RandomResizedCropLayer(scale=(resize_factor, 1.0), fix_scale=resize_fix, chunk_pixels=chunk_pixels),
    )
