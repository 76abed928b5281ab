"""Fixtures shared by the test modules, the ``slow`` marker, and one thread per test worker.

tests/ and the repository root go on ``sys.path`` first: the modules import ``helpers`` (constants
and functions they share) and the project's packages by name.
"""
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from helpers import ROOT, TINY_DDPM  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: trains end to end or starts subprocesses (seconds to minutes); "
                   "-m 'not slow' leaves these out")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest.ini runs a worker per core: each worker, and every process it starts, computes with one
        # thread, so that the workers never fight over the cores (two torch processes of two threads each
        # on two cores run several times slower than one after the other)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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
    train_eval_ddpm.main(["--mode", "train", "--dataset", "synth_lesion", *TINY_DDPM, "--train_steps", "2",
                          "--save_path", str(path)])
    assert path.exists()
    return path
