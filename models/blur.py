"""Blur "dissolving" for the paper's ablation (``blurgaussian_*``, ``blurmedian_*``, ``blurnone_*``).

Same call shape as the diffusion dissolver: ``dissolve_chunks(list_of_chunks, epoch) -> list``.
"""
import numpy as np
import torch

from common.errors import UserError
from models.dissolve import NATIVE_KINDS, to_dissolve_resolution


def _check_kind(native_kind):
    if native_kind not in NATIVE_KINDS:
        raise UserError(f"unknown dataset kind {native_kind!r}; expected one of {', '.join(NATIVE_KINDS)}")


def opencv_gaussian_kernel(kernel_size):
    """OpenCV's 1-D Gaussian kernel for ``kernel_size`` with sigma from the size.

    ``cv2.getGaussianKernel(k, 0)``: sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8, except that OpenCV
    uses fixed binomial-like tables for k = 1, 3, 5, 7 (which ``cv2.GaussianBlur(img, (k, k), 0)``
    applies). Returned as a float64 tensor of shape ``(k,)``.
    """
    import cv2

    return torch.from_numpy(cv2.getGaussianKernel(int(kernel_size), 0).reshape(-1).astype(np.float64))


def opencv_sigma(kernel_size):
    """OpenCV's sigma-from-size rule."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


class BlurShift(torch.nn.Module):
    """Blur "dissolving": ``'gaussian'`` (OpenCV's kernel, reflect-101 borders like
    ``cv2.GaussianBlur``), ``'median'`` (replicate borders like ``cv2.medianBlur``) or ``'none'``.

    With ``resize_to_constant`` the images are first brought to ``diff_resolution`` (as the
    diffusion dissolver does) and back afterwards. Same call shape as :class:`Dissolver`:
    ``dissolve_chunks(list_of_chunks, epoch) -> list_of_chunks``.
    """

    BLURS = ("gaussian", "median", "none")

    def __init__(self, blur, kernel_size=3, native_kind="small32", diff_resolution=32, resize_to_constant=False):
        super().__init__()
        if blur not in self.BLURS:
            raise UserError(f"unknown blur {blur!r}; use one of {', '.join(self.BLURS)}")
        _check_kind(native_kind)
        kernel_size = int(kernel_size)
        if blur != "none" and (kernel_size < 1 or kernel_size % 2 == 0):
            raise UserError(f"--kernel_size {kernel_size} must be a positive odd integer, e.g. 3 or 5")
        self.blur = blur
        self.kernel_size = kernel_size
        self.native_kind = native_kind
        self.diff_resolution = int(diff_resolution)
        self.resize_to_constant = bool(resize_to_constant)
        kernel = opencv_gaussian_kernel(kernel_size) if blur == "gaussian" else torch.ones(1, dtype=torch.float64)
        self.register_buffer("kernel", kernel.to(torch.float32), persistent=False)

    def _blur(self, x):
        import kornia

        if self.blur == "none" or self.kernel_size == 1:
            return x
        if self.blur == "gaussian":
            k = self.kernel.to(x.device, x.dtype)[None]
            return kornia.filters.filter2d_separable(x, k, k, border_type="reflect")
        return kornia.filters.median_blur(x, (self.kernel_size, self.kernel_size), border_type="replicate")

    @torch.no_grad()
    def forward(self, x, ts=None):
        if not self.resize_to_constant:
            return self._blur(x)
        y, undo = to_dissolve_resolution(x, self.native_kind, self.diff_resolution)
        return undo(self._blur(y))

    def dissolve_chunks(self, x_chunks, epoch=0):
        sizes = [c.shape[0] for c in x_chunks]
        out = self.forward(torch.cat(list(x_chunks)))
        return list(out.split(sizes))
