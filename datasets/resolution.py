"""The resolution kinds of the datasets and the resize between a dataset's images and a
dissolver's resolution, shared by the diffusion dissolver, the blurs and the dissolver's data."""
import torch.nn.functional as F

from common.errors import UserError

from .base import NATIVE_KINDS


def check_kind(native_kind):
    """Refuse a resolution kind that is not one of :data:`datasets.base.NATIVE_KINDS`."""
    if native_kind not in NATIVE_KINDS:
        raise UserError(f"unknown dataset kind {native_kind!r}; expected one of {', '.join(NATIVE_KINDS)}")


def _resize(x, size):
    """Bilinear resize without antialiasing, as the paper's torchvision ``Resize`` on tensors
    (``antialias=None``, i.e. off) and its DDPM training data."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)


def to_dissolve_resolution(x, native_kind, resolution):
    """Bring ``x`` (N x C x H x W) to ``resolution`` x ``resolution``.

    ``medmnist28``: zero-pad 2 px on each side (28 -> 32), then resize if ``resolution`` is not
    32. Otherwise: identity when the size already matches, else bilinear resize without
    antialiasing (the paper's path: 224 -> 32 -> 224). Returns ``(y, undo)`` where ``undo(y')``
    maps a result back to ``x``'s size.
    """
    check_kind(native_kind)
    size = tuple(x.shape[-2:])
    target = (int(resolution), int(resolution))
    if native_kind == "medmnist28":
        if size != (28, 28):
            raise ValueError(f"medmnist28 images must be 28 x 28, got {size}")
        padded = F.pad(x, (2, 2, 2, 2))
        y = _resize(padded, target)

        def undo(z):
            return _resize(z, (32, 32))[..., 2:30, 2:30]

        return y, undo

    def undo(z):
        return _resize(z, size)

    return _resize(x, target), undo
