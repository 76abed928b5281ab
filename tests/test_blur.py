"""The blur ablation (blurgaussian_*, blurmedian_*, blurnone_*) as the paper ran it, and our
earlier third-chunk-only variant behind --blur_third_chunk_only.

References are computed here with numpy (zero padding, nearest indices, rotations) or OpenCV."""
import cv2
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from cli.args import parse_args
from common.errors import SettingError, UserError
from models.blur import BlurShift
from models.dissolve import DissolveSettings, make_dissolve_fn
from models.resnet import build_model
from models.transform_layers import CutPerm, Rotation
from helpers import random_images
from training.config import TrainConfig
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- numpy references


def np_gauss_kernel2d(k):
    g = cv2.getGaussianKernel(k, 0).reshape(-1)
    return np.outer(g, g)


def np_window_op(img, k, op):
    """``op`` over each k x k window of a zero-padded (C, H, W) image."""
    p = k // 2
    padded = np.pad(img, ((0, 0), (p, p), (p, p)))
    win = sliding_window_view(padded, (k, k), axis=(1, 2))  # C, H, W, k, k
    return op(win)


def np_gauss_zero(img, k):
    kern = np_gauss_kernel2d(k)
    return np_window_op(img.astype(np.float64), k, lambda w: (w * kern).sum(axis=(-1, -2)))


def np_median_zero(img, k):
    return np_window_op(img, k, lambda w: np.median(w.reshape(*w.shape[:3], -1), axis=-1))


def np_nearest(img, size):
    """Nearest-neighbour resize of (C, H, W): output index i reads floor(i * in / out)."""
    h, w = img.shape[1:]
    rows = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(int), w - 1)
    return img[:, rows][:, :, cols]


def np_rot(img, k):
    return np.rot90(img, k, axes=(1, 2))


def np_cutperm(img, k):
    h, w = img.shape[1:]
    if k // 2 == 1:
        img = np.concatenate([img[:, h // 2:], img[:, :h // 2]], axis=1)
    if k % 2 == 1:
        img = np.concatenate([img[:, :, w // 2:], img[:, :, :w // 2]], axis=2)
    return img


# --------------------------------------------------------------------------- the paper's blurs


@pytest.mark.parametrize("k", [3, 5, 7])
def test_gaussian_is_zero_padded_2d_opencv_kernel(k):
    x = random_images(2, 12, seed=k)
    out = BlurShift("gaussian", k)(x).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i], np_gauss_zero(x[i].numpy(), k), atol=1e-5, rtol=0)
    # on a constant image the corner keeps only the kernel's quarter that overlaps the image
    g = cv2.getGaussianKernel(k, 0).reshape(-1)
    ones = BlurShift("gaussian", k)(torch.ones(1, 1, 9, 9))
    assert ones[0, 0, 0, 0].item() == pytest.approx(g[k // 2:].sum() ** 2, abs=1e-6)
    assert ones[0, 0, 4, 4].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_median_is_zero_padded(k):
    x = random_images(2, 11, seed=10 + k)
    out = BlurShift("median", k)(x).numpy()
    for i in range(2):
        np.testing.assert_array_equal(out[i], np_median_zero(x[i].numpy(), k))
    # by hand, 3 x 3 on a constant image: a corner window holds 4 ones and 5 zeros (median 0),
    # an edge window 6 ones and 3 zeros (median 1)
    if k == 3:
        ones = BlurShift("median", 3)(torch.ones(1, 1, 5, 5))[0, 0]
        assert ones[0, 0].item() == 0.0 and ones[0, 2].item() == 1.0 and ones[2, 2].item() == 1.0


@pytest.mark.parametrize("size,kind", [(28, "medmnist28"), (20, "small32"), (40, "large224")])
def test_resize_to_constant_is_nearest_around_blur_then_shift(size, kind):
    """The paper's order, every dataset kind alike (no MedMNIST padding): nearest resize to
    --diff_resolution, blur, shift k, nearest resize back."""
    x = random_images(2, size, seed=size)
    for blur, shift, np_shift in (("gaussian", Rotation(), np_rot), ("none", CutPerm(), np_cutperm)):
        b = BlurShift(blur, 3, native_kind=kind, diff_resolution=16, resize_to_constant=True)
        out = b.dissolve_chunks([x] * 4, epoch=1, shift=shift)
        for k in range(4):
            for i in range(2):
                small = np_nearest(x[i].numpy(), (16, 16))
                if blur == "gaussian":
                    small = np_gauss_zero(small, 3)
                want = np_nearest(np_shift(small, k), (size, size))
                np.testing.assert_allclose(out[k][i].numpy(), want, atol=1e-5, rtol=0)
    # the order matters here: resizing back before rotating gives another image
    b = BlurShift("none", native_kind=kind, diff_resolution=16, resize_to_constant=True)
    assert not torch.equal(b(x, 1, Rotation()), torch.rot90(b(x), 1, dims=(2, 3)))


def test_blur_errors_are_user_errors():
    with pytest.raises(UserError):
        BlurShift("gaussian", 4)
    with pytest.raises(UserError):
        BlurShift("box", 3)
    with pytest.raises(UserError):
        BlurShift("none", native_kind="huge")
    # worded in the constructor's argument; train.py words it in its flag
    with pytest.raises(SettingError) as e:
        BlurShift("median", 0)
    assert str(e.value).startswith("kernel_size 0 must be") and e.value.settings == ("kernel_size",)
    assert e.value.worded({"kernel_size": "--kernel_size"}).startswith("--kernel_size 0 must be")


# --------------------------------------------------------------------------- --blur_third_chunk_only


def _np_hwc(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("k", [3, 5, 9])
def test_third_chunk_only_gaussian_matches_opencv(k):
    img = np.random.RandomState(k).rand(21, 26, 3).astype(np.float32)
    out = BlurShift("gaussian", k, third_chunk_only=True)(torch.from_numpy(img).permute(2, 0, 1)[None])
    assert np.abs(_np_hwc(out[0]) - cv2.GaussianBlur(img, (k, k), 0)).max() < 1e-5


@pytest.mark.parametrize("k", [3, 5])
def test_third_chunk_only_median_matches_opencv(k):
    img = (np.random.RandomState(k).rand(21, 26, 3) * 255).astype(np.uint8)
    out = BlurShift("median", k, third_chunk_only=True)(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    assert np.array_equal(np.round(_np_hwc(out[0]) * 255).astype(np.uint8), cv2.medianBlur(img, k))


def test_third_chunk_only_resizes_like_the_dissolver():
    x = random_images(4, 224)
    assert torch.equal(BlurShift("none", third_chunk_only=True)(x), x)
    chunks = [x[:2], x[2:]]
    for blur in ("gaussian", "median", "none"):
        b = BlurShift(blur, 5, native_kind="large224", resize_to_constant=True, third_chunk_only=True)
        assert [o.shape for o in b.dissolve_chunks(chunks, 1)] == [c.shape for c in chunks]
    small = BlurShift("none", native_kind="large224", resize_to_constant=True, third_chunk_only=True)(x)
    assert not torch.equal(small, x)  # went through 32 px and back
    # smooth (bilinear) resizing, not nearest: values that are in no input pixel appear
    assert not torch.isin(small, x).all()


# --------------------------------------------------------------------------- in the training step


def _trainer(extra):
    P = parse_args("train", ["--mode", "simclr_DIA", "--batch_size", "3", "--resnet_width", "8",
                             "--simclr_dim", "8", "--kernel_size", "3", *extra])
    dissolve = make_dissolve_fn(P.shift_trans_type, DissolveSettings.from_flags(vars(P)), "cpu", "small32")
    assert isinstance(dissolve, BlurShift)
    model = build_model("resnet18", 2, simclr_dim=8, n_shifts=4, width=8)
    return Trainer(TrainConfig.from_flags(vars(P)), model, torch.device("cpu"), dissolve=dissolve), dissolve


def _matches_one_flip(view, img, ref):
    """``view`` equals ``ref(img)`` or ``ref(flipped img)``; returns which (0 or 1), or None."""
    for flipped, src in enumerate((img, img[:, :, ::-1])):
        if np.allclose(view, ref(np.ascontiguousarray(src)), atol=1e-5, rtol=0):
            return flipped
    return None


@pytest.mark.parametrize("shift_type", ["blurgaussian_rotation", "blurmedian_cutperm"])
def test_blur_step_blurs_all_three_chunks(shift_type):
    trainer, dissolve = _trainer(["--shift_trans_type", shift_type])
    assert dissolve.applies_to == (0, 1, 2)
    b, K = 3, 4
    x = random_images(b, 12, seed=3)
    torch.manual_seed(0)
    views, chunks = trainer.make_views(x)
    assert chunks == 3 and views.shape == (3 * K * b, 3, 12, 12)
    views = views.numpy()
    blur_np = np_gauss_zero if "gaussian" in shift_type else np_median_zero
    shift_np = np_rot if shift_type.endswith("rotation") else np_cutperm
    for c in range(3):
        flips = []
        for k in range(K):
            for i in range(b):
                v = views[(c * K + k) * b + i]
                img = x[i].numpy()
                f = _matches_one_flip(v, img, lambda s: shift_np(blur_np(s, 3), k))
                assert f is not None, (c, k, i)
                assert _matches_one_flip(v, img, lambda s: shift_np(s, k)) is None  # really blurred
                flips.append(f)
        if c < 2:  # x1 and x2: one flip per image, shared by the K shifts
            flips = np.array(flips).reshape(K, b)
            assert (flips == flips[0]).all()


def test_flag_restores_third_chunk_only():
    trainer, dissolve = _trainer(["--shift_trans_type", "blurgaussian_rotation", "--blur_third_chunk_only"])
    assert dissolve.applies_to == (2,)
    b, K = 3, 4
    x = random_images(b, 12, seed=4)
    torch.manual_seed(0)
    views = trainer.make_views(x)[0].numpy()

    def cv_blur(s):  # OpenCV's reflect-101 border, channels last
        return cv2.GaussianBlur(s.transpose(1, 2, 0).astype(np.float32), (3, 3), 0).transpose(2, 0, 1)

    for c in range(3):
        for k in range(K):
            for i in range(b):
                v = views[(c * K + k) * b + i]
                img = x[i].numpy()
                if c < 2:
                    assert _matches_one_flip(v, img, lambda s: np_rot(s, k)) is not None
                else:
                    assert _matches_one_flip(v, img, lambda s: np_rot(cv_blur(s), k)) is not None
                    assert _matches_one_flip(v, img, lambda s: np_rot(np_gauss_zero(s, 3), k)) is None
