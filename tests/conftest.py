import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for modules of tiny networks: they run several times faster so when
    other jobs share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dissolver(tmp_path_factory):
    """A dissolver checkpoint (UNet dim 8, two optimiser steps on synth_lesion), made once per
    session; tests only read it."""
    from diffusion_models import train_eval_ddpm

    path = tmp_path_factory.mktemp("ddpm") / "synth_0_32px.pt"
    train_eval_ddpm.main(["--mode", "train", "--dataset", "synth_lesion", "--unet_dim", "8", "--dim_mults", "1", "2",
                          "--batch_size", "8", "--grad_accum", "1", "--train_steps", "2", "--no_progress",
                          "--save_path", str(path)])
    assert path.exists()
    return path
