"""Shifts are exact; augmentation layers behave as specified and follow the seed."""
import torch

from models.transform_layers import (ColorJitterLayer, CutPerm, HorizontalFlipRandom, RandomColorGrayLayer,
                                     RandomResizedCropLayer, Rotation, simclr_augmentation)


def grid(h=4, w=4):
    return torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)


def test_rotation_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    r = Rotation()
    assert torch.equal(r(x, 0), x)
    # 90 degrees counter-clockwise: the right column becomes the top row
    assert r(x, 1).view(2, 2).tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert r(x, 2).view(2, 2).tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert r(x, 3).view(2, 2).tolist() == [[3.0, 1.0], [4.0, 2.0]]
    y = torch.randn(3, 3, 8, 8)
    assert torch.equal(r(r(y, 1), 3), y)


def test_cutperm_by_hand():
    x = grid()
    c = CutPerm()
    assert torch.equal(c(x, 0), x)
    # k=1: left/right halves swapped
    assert c(x, 1)[0, 0, 0].tolist() == [2.0, 3.0, 0.0, 1.0]
    # k=2: top/bottom halves swapped
    assert c(x, 2)[0, 0, :, 0].tolist() == [8.0, 12.0, 0.0, 4.0]
    # k=3: both
    assert c(x, 3)[0, 0, 0].tolist() == [10.0, 11.0, 8.0, 9.0]
    y = torch.randn(2, 3, 6, 6)
    for k in range(4):
        assert torch.equal(c(c(y, k), k), y)  # each is an involution
        assert torch.equal(c(y, k), c(y, k))


def test_flip_is_per_image_and_seeded():
    x = torch.randn(400, 1, 2, 3)
    torch.manual_seed(0)
    y = HorizontalFlipRandom(0.5)(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250
    torch.manual_seed(0)
    assert torch.equal(HorizontalFlipRandom(0.5)(x), y)


def test_grayscale_and_jitter_extremes():
    x = torch.rand(5, 3, 8, 8)
    g = RandomColorGrayLayer(p=1.0)(x)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(g[:, c], luma, atol=1e-5, rtol=0)
    assert torch.equal(RandomColorGrayLayer(p=0.0)(x), x)
    assert torch.equal(ColorJitterLayer(p=0.0)(x), x)
    j = ColorJitterLayer(p=1.0, brightness=0, contrast=0, saturation=0, hue=0)(x)
    torch.testing.assert_close(j, x, atol=1e-4, rtol=0)  # zero-strength jitter is the identity
    torch.manual_seed(1)
    j = ColorJitterLayer(p=1.0)(x)
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x, atol=1e-3)


def test_jitter_in_chunks_gives_the_bits_of_the_whole_batch():
    """On CPU the jitter runs a few images at a time (for the cache); the same seed must give the
    same bits as one pass over the batch, in both orders of its two changes, when a chunk does not
    divide the batch, and channels-last too."""
    whole_layer, layer = ColorJitterLayer(p=0.5, chunk_pixels=0), ColorJitterLayer(p=0.5, chunk_pixels=2 * 16 * 16)
    x = torch.rand(7, 3, 16, 16)
    orders = set()
    for seed in range(6):
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.manual_seed(seed)
            whole = whole_layer(inp)
            torch.manual_seed(seed)
            [torch.rand(7, 1, 1) for _ in range(4)]  # the jitter's four factors, then its order
            orders.add(torch.rand(1).item() < 0.5)
            torch.manual_seed(seed)
            parts = layer(inp)  # chunks of 2, 2, 2, 1 images
            assert torch.equal(whole, parts), seed
            assert not torch.equal(whole, x)
    assert orders == {True, False}  # both orders were met
    assert layer(torch.rand(0, 3, 16, 16)).shape == (0, 3, 16, 16)  # an empty batch stays empty


def test_crop_and_whole_augmentation_in_chunks_give_the_bits_of_one_pass():
    x = torch.rand(7, 3, 16, 16)
    for seed in range(3):
        torch.manual_seed(seed)
        whole = RandomResizedCropLayer((0.08, 1.0), chunk_pixels=0)(x)
        torch.manual_seed(seed)
        parts = RandomResizedCropLayer((0.08, 1.0), chunk_pixels=3 * 16 * 16)(x)  # 3, 3, 1 images
        assert torch.equal(whole, parts) and not torch.equal(whole, x)
        torch.manual_seed(seed)
        whole = simclr_augmentation(chunk_pixels=0)(x)
        torch.manual_seed(seed)
        parts = simclr_augmentation(chunk_pixels=2 * 16 * 16)(x)
        assert torch.equal(whole, parts)


def test_contrast_about_channel_mean():
    x = torch.rand(2, 3, 5, 5)
    layer = ColorJitterLayer(p=1.0)
    f = torch.tensor([0.5, 1.5]).view(2, 1, 1)
    y = layer._contrast(x, f)
    mean = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(y, (x - mean) * f.view(2, 1, 1, 1) + mean)


def test_resized_crop():
    x = torch.rand(3, 3, 16, 16)
    ident = RandomResizedCropLayer(scale=(1.0, 1.0), ratio=(1.0, 1.0))(x)
    torch.testing.assert_close(ident, x, atol=1e-5, rtol=0)
    # a fixed-scale crop of a constant image stays constant; of a ramp, it narrows the range
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(4, 3, 16, 16).contiguous()
    torch.manual_seed(0)
    y = RandomResizedCropLayer(scale=(0.25, 1.0), ratio=(1.0, 1.0), fix_scale=True)(ramp)
    spread = y.amax(dim=(1, 2, 3)) - y.amin(dim=(1, 2, 3))
    assert bool((spread < 0.6).all()) and bool((spread > 0.4).all())


def test_simclr_augmentation_follows_seed():
    aug = simclr_augmentation(0.54, True)
    x = torch.rand(6, 3, 32, 32)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    torch.manual_seed(6)
    c = aug(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape
