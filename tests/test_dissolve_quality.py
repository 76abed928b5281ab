"""Dissolving quality: the frequency split against a direct FFT computation, and the lesion
removal ratio at its two ends (the identity and a dissolver that returns the clean tissue)."""
import math

import numpy as np
import pytest
import torch

from datasets.synth_lesion import generate_synth_lesion
from evals.dissolve_quality import frequency_report, frequency_split, lesion_report


def test_frequency_split_of_two_cosines():
    """A low cosine (1/16 cycle/px) plus a high one (1/4): the split separates them exactly."""
    n = 32
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    low_wave = np.cos(2 * np.pi * xx / 16)
    high_wave = 0.5 * np.cos(2 * np.pi * (yy + xx) / 4)  # |f| = sqrt(2)/4 ~ 0.354
    x = torch.tensor(low_wave + high_wave, dtype=torch.float32)[None, None]
    low, high = frequency_split(x, cutoff=0.125)
    assert torch.allclose(low[0, 0], torch.tensor(low_wave, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(high[0, 0], torch.tensor(high_wave, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(low + high, x, atol=1e-6)


def test_frequency_report_against_numpy_fft():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 16, 16))
    y = x * 0.5 + 0.25  # halves every non-constant part
    rep = frequency_report(torch.tensor(x), torch.tensor(y), cutoff=0.2)
    f = np.sqrt(np.fft.fftfreq(16)[:, None] ** 2 + np.fft.fftfreq(16)[None, :] ** 2)
    keep = f <= 0.2

    def parts(a):
        spec = np.fft.fft2(a)
        low = np.fft.ifft2(spec * keep).real
        return low, a - low

    lx, hx = parts(x)
    ly, hy = parts(y)
    e = lambda t: (t ** 2).reshape(2, -1).sum(1)  # noqa: E731
    assert math.isclose(rep["hf_removed"], float(np.mean(1 - e(hy) / e(hx))), rel_tol=1e-5)
    assert math.isclose(rep["hf_removed"], 0.75, rel_tol=1e-5)  # (1/2)^2 of the energy stays
    assert math.isclose(rep["lf_change"], float(np.mean(e(ly - lx) / e(lx))), rel_tol=1e-5)


@pytest.fixture(scope="module")
def pairs():
    images, labels, clean, masks = generate_synth_lesion(0, 12, seed=3, return_parts=True)
    return images.float() / 255, clean.float() / 255


def test_removal_ratio_is_zero_for_identity_and_one_for_clean_returning(pairs):
    lesioned, clean = pairs
    ident = lesion_report(lambda x: x, lesioned, clean)
    assert ident["removal_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert ident["tissue_change"] == pytest.approx(0.0, abs=1e-6)
    assert ident["n_images"] == 12

    lookup = {l.numpy().tobytes(): c for l, c in zip(lesioned, clean)}
    lookup.update({c.numpy().tobytes(): c for c in clean})

    def perfect(x):  # returns the lesion-free tissue of every image
        return torch.stack([lookup[i.numpy().tobytes()] for i in x])

    best = lesion_report(perfect, lesioned, clean)
    assert best["removal_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert best["tissue_change"] == pytest.approx(0.0, abs=1e-6)

    flat = lesion_report(lambda x: x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), lesioned, clean)
    assert flat["tissue_change"] == pytest.approx(1.0, abs=1e-6)  # flattening changes all the tissue
    half = lesion_report(lambda x: 0.5 * x, lesioned, clean)
    assert half["removal_ratio"] == pytest.approx(0.75, abs=1e-6)  # a quarter of the lesion energy stays
