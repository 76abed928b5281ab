"""benchmarks/bench.py runs both steps on a tiny configuration and its last line is their ratio."""
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # each test runs a benchmark script in a subprocess


def test_bench_prints_both_steps_and_their_ratio():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--mode", "simclr_DIA", "--batch_size", "4",
           "--resnet_width", "8", "--unet_dim", "8", "--steps", "1", "--warmup", "0", "--eval_images", "4",
           "--ood_samples", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    step = {m.group(1): float(m.group(2)) for m in (re.match(r"(ours|paper-style)\s+([0-9.]+) s/step", x) for x in lines)
            if m}
    assert set(step) == {"ours", "paper-style"}
    for name in step:  # the parts are reported and the dissolving part is not empty
        line = next(x for x in lines if x.startswith(name))
        assert re.search(r"dissolve ([0-9.]+) s", line) and float(re.search(r"dissolve ([0-9.]+) s", line).group(1)) > 0
    assert sum("CSI evaluation" in x for x in lines) == 2
    ratio = float(re.fullmatch(r"speedup_vs_paper_style=([0-9.]+)", lines[-1]).group(1))
    assert abs(ratio - step["paper-style"] / step["ours"]) <= 0.01 + 0.01 * ratio  # printed values are rounded


def test_bench_ddpm_prints_both_steps_and_their_ratio():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ddpm.py"), "--unet_dim", "8", "--batch_size", "2",
           "--grad_accum", "2", "--steps", "1", "--amp", "on"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    step = {m.group(1): float(m.group(3)) for m in
            (re.match(r"(ours|paper-style)\s+\(([^)]*)\): ([0-9.]+) s per optimiser step", x) for x in lines) if m}
    assert set(step) == {"ours", "paper-style"}
    assert "bf16" in next(x for x in lines if x.startswith("ours"))
    assert "package layers, fp32" in next(x for x in lines if x.startswith("paper-style"))
    ratio = float(re.fullmatch(r"speedup_vs_paper_style=([0-9.]+)", lines[-1]).group(1))
    # printed values are rounded to 0.01 s
    lo = (step["paper-style"] - 0.005) / (step["ours"] + 0.005)
    hi = (step["paper-style"] + 0.005) / max(step["ours"] - 0.005, 1e-3)
    assert lo - 0.01 <= ratio <= hi + 0.01
