"""Every GPU path on fake CUDA tensors (tests/fake_cuda.py, in a subprocess: it patches torch):
no device mixing in any training step, evaluation, dissolver step or dissolving measure, the
data path sends uint8 images, a resume's optimiser state is read to the host first, and the
host syncs of a training step are the ones meant to be there."""
import json
import linecache
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "tests", "fake_cuda.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake_cuda") / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    print(proc.stdout)  # the host syncs of every check (pytest -s shows them)
    assert out.exists(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    doc["returncode"], doc["stdout"] = proc.returncode, proc.stdout
    return doc


def source_of(site):
    """The source line of a sync site ``path:line (function)``."""
    path, rest = site.split(":", 1)
    return linecache.getline(os.path.join(ROOT, path), int(rest.split(" ", 1)[0]))


def sites(entries):
    return [e.split(": ", 1)[0] for e in entries]


@pytest.mark.slow
def test_every_gpu_path_runs_on_fake_cuda_without_device_mixing(report):
    assert report["failed"] == {} and report["returncode"] == 0, report["failed"]
    assert "device" in report["control"], report["control"]  # mixing cuda:0 and the CPU is refused
    names = set(report["checks"])
    for name in ("DIA 32 px", "DIA 224 px", "CSI (", "fp16", "fp32", "blur: Gaussian", "blur: median", "K=1"):
        assert any(n.startswith("training step: ") and name in n for n in names), name
    for name in ("CSI feature extraction and scores", "--mode ood score baseline", "--mode ood score similar",
                 "dissolver optimiser step (resumed from a checkpoint read to the CPU)",
                 "dissolving measures (frequency and lesion reports)"):
        assert name in names, name


@pytest.mark.slow
def test_a_training_step_syncs_once_to_log_and_once_more_for_loss_scaling(report):
    for name, check in report["checks"].items():
        if not name.startswith("training step: "):
            continue
        where = sites(check["syncs"])
        by_function = {s.split("(")[-1].rstrip(")"): s for s in where}
        assert len(by_function) == len(where), where  # each sync point once
        # the logged losses: one .tolist() of the four values, averaged over the ranks before it
        assert ".tolist()" in source_of(by_function.pop("train_step")), where
        if "fp16" in name:  # GradScaler.step reads whether the gradients were finite
            assert "scaler.step" in source_of(by_function.pop("resnet_step")), where
        assert by_function == {}, f"{name}: host syncs not meant to be there: {by_function}"


@pytest.mark.slow
def test_the_data_path_sends_uint8_images_and_does_not_sync(report):
    for name, check in report["checks"].items():
        if name.startswith("training step: "):
            assert check["data_syncs"] == [], (name, check["data_syncs"])
            (image_dtype, image_shape), (label_dtype, _) = check["host_to_device"]
            assert image_dtype == "torch.uint8" and len(image_shape) == 4 and label_dtype == "torch.int64", check


@pytest.mark.slow
def test_evaluation_and_the_dissolver_sync_only_by_design(report):
    checks = report["checks"]
    for name in ["CSI feature extraction and scores"] + [n for n in checks if n.startswith("--mode ood")]:
        for site in sites(checks[name]["syncs"]):  # each batch's features or scores kept on the host
            assert ".cpu()" in source_of(site), (name, site)
    step = checks["dissolver optimiser step (resumed from a checkpoint read to the CPU)"]["syncs"]
    ours = [s for s in sites(step) if not s.startswith("ema_pytorch/")]
    assert len(ours) == 1 and ".tolist()" in source_of(ours[0]), step  # loss and gradient norm, read together
