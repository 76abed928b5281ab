"""Blur "dissolving" for the paper's ablation (``blurgaussian_*``, ``blurmedian_*``, ``blurnone_*``).

Two behaviours, chosen by ``third_chunk_only``:

* the paper's (default). Its blur shift ignores the ``diffusion=False`` argument the training
  step passes for the two ordinary chunks, so **every** view is blurred: ``x1``, ``x2`` and the
  "dissolved" ``x3``. For each chunk and shift k the paper computes
  ``resize_back(T_k(blur(resize(x))))``: with ``--resize_to_constant`` the images are resized
  with nearest-neighbour interpolation (``F.interpolate``'s default) to
  ``--diff_resolution`` and back, for every dataset kind; the Gaussian blur is a convolution
  with the outer product of OpenCV's 1-D kernel and zero padding; the median blur pads with
  zeros too (kornia 0.6.8, the paper's pin, had no other border).
* ours before the paper's was matched (``--blur_third_chunk_only``): only ``x3`` is blurred,
  with OpenCV-like borders (reflect-101 for the Gaussian, replicate for the median), the
  dissolver's resolution change (:func:`datasets.resolution.to_dissolve_resolution`), and the
  shift applied after the resolution is restored.

As a ``models.strategies.DissolveStrategy``: ``applies_to`` names the chunks (0 = x1, 1 = x2,
2 = x3) the strategy changes; the trainer passes those chunks through
:meth:`BlurShift.dissolve_chunks`, which applies the shift itself (``shift_inside``) so that its
position relative to the resizing is the mode's.
"""
import cv2
import kornia
import numpy as np
import torch
import torch.nn.functional as F

from common.errors import SettingError, UserError
from datasets.resolution import check_kind, to_dissolve_resolution

ALL_CHUNKS = (0, 1, 2)
THIRD_CHUNK = (2,)
# the blur kernel's side: the paper's --kernel_size default, which its blur shifts are built with
KERNEL_SIZE = 7


def opencv_gaussian_kernel(kernel_size):
    """OpenCV's 1-D Gaussian kernel for ``kernel_size`` with sigma from the size.

    ``cv2.getGaussianKernel(k, 0)``: sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8, except that OpenCV
    uses fixed binomial-like tables for k = 1, 3, 5, 7 (which ``cv2.GaussianBlur(img, (k, k), 0)``
    applies). Returned as a float64 tensor of shape ``(k,)``.
    """
    return torch.from_numpy(cv2.getGaussianKernel(int(kernel_size), 0).reshape(-1).astype(np.float64))


def opencv_sigma(kernel_size):
    """OpenCV's sigma-from-size rule."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def resize_nearest(x, size):
    """``F.interpolate(x, size)`` with its default mode (nearest), as the paper resizes for blurs."""
    return F.interpolate(x, size=tuple(size), mode="nearest")


class BlurShift(torch.nn.Module):
    """Blur "dissolving": ``'gaussian'`` (OpenCV's kernel), ``'median'`` or ``'none'``.

    Call shape of the diffusion dissolver plus the shift:
    ``dissolve_chunks(list_of_K_chunks, epoch, shift=None) -> list_of_K_chunks``, chunk k
    shifted by ``shift(., k)`` when a shift is given. See the module docstring for the two
    behaviours (``third_chunk_only``).
    """

    BLURS = ("gaussian", "median", "none")
    shift_inside = True  # dissolve_chunks applies the shift (between blur and resize-back)
    info = None  # no checkpoint describes a blur

    def __init__(self, blur, kernel_size=KERNEL_SIZE, native_kind="small32", diff_resolution=32,
                 resize_to_constant=False, third_chunk_only=False):
        super().__init__()
        if blur not in self.BLURS:
            raise UserError(f"unknown blur {blur!r}; use one of {', '.join(self.BLURS)}")
        check_kind(native_kind)
        kernel_size = int(kernel_size)
        if blur != "none" and (kernel_size < 1 or kernel_size % 2 == 0):
            raise SettingError(f"{{kernel_size}} {kernel_size} must be a positive odd integer, e.g. 3 or 5",
                               "kernel_size")
        self.blur = blur
        self.kernel_size = kernel_size
        self.native_kind = native_kind
        self.diff_resolution = int(diff_resolution)
        self.resize_to_constant = bool(resize_to_constant)
        self.third_chunk_only = bool(third_chunk_only)
        self.applies_to = THIRD_CHUNK if self.third_chunk_only else ALL_CHUNKS
        kernel = opencv_gaussian_kernel(kernel_size) if blur == "gaussian" else torch.ones(1, dtype=torch.float64)
        # the 1-D kernel and its outer product in float32, as the paper builds its conv weight
        self.register_buffer("kernel", kernel.to(torch.float32), persistent=False)
        self.register_buffer("kernel2d", torch.outer(kernel, kernel).to(torch.float32), persistent=False)

    # ----- the blurs ------------------------------------------------------------------------
    def _blur_zero_padded(self, x):
        """The paper's blurs: zero padding at the border."""
        if self.blur == "none":
            return x
        k = self.kernel_size
        if self.blur == "gaussian":
            c = x.shape[1]
            weight = self.kernel2d.to(x.device, x.dtype).expand(c, 1, k, k)
            return F.conv2d(x, weight, padding=k // 2, groups=c)
        if k == 1:
            return x
        return kornia.filters.median_blur(x, (k, k), border_type="constant")

    def _blur_opencv_borders(self, x):
        """The third-chunk-only blurs (``third_chunk_only``): OpenCV's borders (reflect-101 Gaussian,
        replicate median)."""
        if self.blur == "none" or self.kernel_size == 1:
            return x
        if self.blur == "gaussian":
            k = self.kernel.to(x.device, x.dtype)[None]
            return kornia.filters.filter2d_separable(x, k, k, border_type="reflect")
        return kornia.filters.median_blur(x, (self.kernel_size, self.kernel_size), border_type="replicate")

    def _start(self, x):
        """Blur ``x``; returns ``(y, finish)`` with ``finish(y_k, k, shift)`` giving chunk k's views."""
        if self.third_chunk_only:
            if self.resize_to_constant:
                y, undo = to_dissolve_resolution(x, self.native_kind, self.diff_resolution)
                y = undo(self._blur_opencv_borders(y))
            else:
                y = self._blur_opencv_borders(x)

            def finish(z, k, shift):
                return z if shift is None else shift(z, k)

            return y, finish

        size = tuple(x.shape[-2:])
        if self.resize_to_constant:
            x = resize_nearest(x, (self.diff_resolution, self.diff_resolution))
        y = self._blur_zero_padded(x)

        def finish(z, k, shift):  # the paper's order: blur -> shift -> resize back
            if shift is not None:
                z = shift(z, k)
            return resize_nearest(z, size) if self.resize_to_constant else z

        return y, finish

    # ----- calls ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x, k=0, shift=None):
        """Blurred (and, given ``shift``, shifted by k) ``x``, at ``x``'s size."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # blur in float32, as the paper
            y, finish = self._start(x.float())
            return finish(y, k, shift)

    @torch.no_grad()
    def dissolve_chunks(self, x_chunks, epoch=0, shift=None):
        """Chunk k -> its blurred view, shifted by ``shift(., k)`` when given.

        Chunks that are the same tensor object (the trainer passes ``[x1] * K``) are blurred once.
        ``epoch`` is unused (blurs have no random strength).
        """
        x_chunks = list(x_chunks)
        uniq, slot = [], []
        for c in x_chunks:
            for j, u in enumerate(uniq):
                if u is c:
                    slot.append(j)
                    break
            else:
                slot.append(len(uniq))
                uniq.append(c)
        dev = x_chunks[0].device
        with torch.autocast(device_type=dev.type, enabled=False):
            y, finish = self._start(torch.cat([u.float() for u in uniq]))
            parts = y.split([u.shape[0] for u in uniq])
            return [finish(parts[j], k, shift) for k, j in enumerate(slot)]
