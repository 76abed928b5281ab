"""Augmentation details that follow the paper's (CSI's) code: hue range, crop rejection rule,
and the 1-based epoch the dissolving sampler sees. References are computed independently
(colorsys, a numpy Monte Carlo of torchvision's crop rule, torchvision itself)."""
import colorsys
import math

import numpy as np
import pytest
import torch

from cli.args import parse_args
from models.dissolve import StepSampler
from models.resnet import build_model
from models.transform_layers import ColorJitterLayer, RandomResizedCropLayer
from training.config import TrainConfig
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HUE_BOUND = 0.1 * 255 / 360  # CSI: hue += U(-0.1, 0.1) * 255/360 of a turn


# --------------------------------------------------------------------------- hue


def test_hue_shift_reaches_csi_bound_and_not_beyond():
    rng = np.random.RandomState(0)
    hues = rng.rand(3000)
    rgb = np.array([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues], dtype=np.float32)
    x = torch.from_numpy(rgb).view(-1, 3, 1, 1)
    torch.manual_seed(0)
    y = ColorJitterLayer(p=1.0, brightness=0, contrast=0, saturation=0, hue=0.1)(x)
    after = np.array([colorsys.rgb_to_hsv(*px)[0] for px in y.view(-1, 3).double().numpy()])
    d = (after - hues + 0.5) % 1.0 - 0.5  # signed hue change in turns
    assert np.abs(d).max() <= HUE_BOUND + 1e-3
    assert np.abs(d).max() >= HUE_BOUND - 3e-3  # 3000 uniform draws come this close
    assert np.abs(d).mean() == pytest.approx(HUE_BOUND / 2, abs=2e-3)  # uniform on the range
    assert abs(d.mean()) < 3e-3  # symmetric


# --------------------------------------------------------------------------- crop


def numpy_torchvision_rule(n, size, scale, ratio, rng, trials=10):
    """torchvision's RandomResizedCrop box rule for a square image, as plain numpy: up to 10
    candidates per image, first one inside the image wins, else the whole (square) image."""
    area = size * size
    target = rng.uniform(scale[0], scale[1], (n, trials)) * area
    ar = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, trials)))
    w = np.round(np.sqrt(target * ar))
    h = np.round(np.sqrt(target / ar))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    any_ok = ok.any(axis=1)
    w = np.where(any_ok, w[rows, first], size)
    h = np.where(any_ok, h[rows, first], size)
    return w * h / area


def test_crop_mean_area_follows_torchvision_rule():
    scale, ratio, size = (0.08, 1.0), (3 / 4, 4 / 3), 32
    ref = numpy_torchvision_rule(200_000, size, scale, ratio, np.random.RandomState(1)).mean()
    torch.manual_seed(0)
    w, h, _, _ = RandomResizedCropLayer(scale, ratio).sample_boxes(200_000, size, size)
    ours = (w * h).double().mean().item()
    assert ours == pytest.approx(ref, abs=4e-3)
    # 0.490 at 32 px (0.478 for large images); clamping oversized candidates instead gives 0.534
    assert 0.48 < ref < 0.50 and ours < 0.50
    # and against torchvision itself (fewer draws: it samples one box per call)
    from torchvision.transforms import RandomResizedCrop

    img = torch.zeros(1, size, size)
    torch.manual_seed(2)
    tv = np.mean([np.prod(RandomResizedCrop.get_params(img, list(scale), list(ratio))[2:]) / size ** 2
                  for _ in range(4000)])
    assert ours == pytest.approx(tv, abs=0.015)


def test_crop_boxes_stay_inside_on_a_half_pixel_grid():
    torch.manual_seed(3)
    size = 20
    w, h, cx, cy = RandomResizedCropLayer((0.08, 1.0)).sample_boxes(5000, size, size)
    assert bool((w <= 1).all() and (h <= 1).all() and (w > 0).all())
    assert bool((cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all())
    j = cx * size
    assert torch.allclose(j, j.round(), atol=1e-4)  # offsets are whole half-pixels
    # every allowed offset of a given width occurs, the extreme ones included
    wpx = (w * size).round()
    sel = wpx == 10
    assert set((j[sel]).round().int().tolist()) == set(range(-10, 11))


def test_crop_fallback_is_the_whole_image():
    layer = RandomResizedCropLayer(scale=(1.5, 2.0))  # every candidate is larger than the image
    w, h, cx, cy = layer.sample_boxes(7, 9, 9)
    assert w.tolist() == [1.0] * 7 and h.tolist() == [1.0] * 7
    assert cx.abs().max().item() == 0 and cy.abs().max().item() == 0
    x = torch.rand(7, 3, 9, 9)
    torch.testing.assert_close(layer(x), x, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- epoch seen by the sampler


class RecordingDissolver:
    """Stands in for the dissolver: records the epoch and the Beta parameters it would use."""

    applies_to = (2,)
    shift_inside = False
    info = None

    def __init__(self):
        self.sampler = StepSampler("beta_by_epoch")
        self.seen = []

    def dissolve_chunks(self, chunks, epoch=0):
        self.seen.append((epoch, self.sampler.params(epoch)))
        return list(chunks)


def test_sampler_sees_the_one_based_epoch():
    P = parse_args("train", ["--mode", "simclr_DIA", "--shift_trans_type", "blurnone_rotation",
                             "--batch_size", "2", "--resnet_width", "8", "--simclr_dim", "8"])
    stub = RecordingDissolver()
    model = build_model("resnet18", 2, simclr_dim=8, n_shifts=4, width=8)
    trainer = Trainer(TrainConfig.from_flags(vars(P)), model, torch.device("cpu"), dissolve=stub)
    x = torch.rand(2, 3, 8, 8)
    trainer.epoch = 0  # nothing completed: the first epoch is running
    trainer.make_views(x)
    trainer.epoch = 14
    trainer.make_views(x)
    (e1, ab1), (e15, ab15) = stub.seen
    assert (e1, e15) == (1, 15)
    # the paper's sampler at epoch 1: a = 20, b = 2 + 1 * 2 * (20 - 2) / 30 = 3.2;
    # at epoch 15 (second half of the cycle): b = 20, a = 2 + (30 - 15 - 1) * 1.2 = 18.8
    assert ab1 == pytest.approx((20.0, 3.2))
    assert ab15 == pytest.approx((18.8, 20.0))
