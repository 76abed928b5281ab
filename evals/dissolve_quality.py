"""How much a dissolver changes images: by spatial frequency, and (on ``synth_lesion``) per lesion.

Pure functions of tensors (``N x C x H x W``, float). A dissolver is any callable
``d(x) -> x'`` of the same shape.

* :func:`frequency_split` cuts an image into a low- and a high-frequency part with a radial
  mask in the 2-D Fourier domain (``|f| <= cutoff`` cycles per pixel, Nyquist = 0.5).
* :func:`frequency_report` says how much of the input's high-frequency energy the dissolved
  image lost (``hf_removed``: 1 = all of it, 0 = none, negative = added) and how much its
  low-frequency part moved (``lf_change``, relative to the input's low-frequency energy).
* :func:`lesion_report`, given the same tissue drawn with and without lesions, says how much
  of the lesions the dissolver removes: ``removal_ratio = 1 - ||d(l) - d(c)||^2 / ||l - c||^2``
  (1 when the dissolved lesioned image equals the dissolved clean one; 0 for the identity),
  and how much it changes lesion-free tissue: ``tissue_change = ||d(c) - c||^2 / ||c - mean(c)||^2``
  (0 for the identity and for a dissolver that returns the clean tissue; about 1 for one that
  flattens the image to its mean). A useful dissolver has a high ratio and a low tissue change.
"""
import torch


def radial_frequency(h, w, device=None):
    """``h x w`` magnitudes of the FFT frequencies (cycles per pixel) in ``torch.fft.fft2``'s layout."""
    fy = torch.fft.fftfreq(h, device=device).view(h, 1)
    fx = torch.fft.fftfreq(w, device=device).view(1, w)
    return torch.sqrt(fy ** 2 + fx ** 2)


def frequency_split(x, cutoff=0.125):
    """``(low, high)`` with ``low + high == x``: frequencies up to ``cutoff`` cycles/pixel, and the rest."""
    x = x.float()
    spec = torch.fft.fft2(x)
    mask = (radial_frequency(x.shape[-2], x.shape[-1], x.device) <= cutoff).to(spec.dtype)
    low = torch.fft.ifft2(spec * mask).real
    return low, x - low


def _energy(t):
    return t.pow(2).flatten(1).sum(1)


def frequency_report(x, y, cutoff=0.125):
    """Mean over images of ``hf_removed = 1 - E_high(y) / E_high(x)`` and
    ``lf_change = ||low(y) - low(x)||^2 / ||low(x)||^2``; plus the energies' means."""
    lx, hx = frequency_split(x, cutoff)
    ly, hy = frequency_split(y, cutoff)
    ehx, ehy = _energy(hx), _energy(hy)
    hf_removed = 1 - ehy / ehx.clamp_min(1e-12)
    lf_change = _energy(ly - lx) / _energy(lx).clamp_min(1e-12)
    return {"cutoff": float(cutoff), "hf_removed": float(hf_removed.mean()), "lf_change": float(lf_change.mean()),
            "hf_energy_in": float(ehx.mean()), "hf_energy_out": float(ehy.mean())}


def lesion_report(dissolve, lesioned, clean):
    """``removal_ratio`` and ``tissue_change`` (means over images) of ``dissolve`` on pairs of the
    same tissue with (``lesioned``) and without (``clean``) lesions; images without any lesion
    pixel are left out of the ratio."""
    lesioned, clean = lesioned.float(), clean.float()
    dl, dc = dissolve(lesioned).float(), dissolve(clean).float()
    lesion_energy = _energy(lesioned - clean)
    has = lesion_energy > 1e-12
    if not bool(has.any()):
        raise ValueError("lesion_report needs images that differ from their clean versions")
    ratio = 1 - _energy(dl - dc)[has] / lesion_energy[has]
    centred = clean - clean.mean(dim=(1, 2, 3), keepdim=True)
    tissue = _energy(dc - clean) / _energy(centred).clamp_min(1e-12)
    return {"removal_ratio": float(ratio.mean()), "tissue_change": float(tissue.mean()),
            "n_images": int(has.sum())}
