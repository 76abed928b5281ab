"""The dissolvers: training or reusing each DDPM once, its dissolving grid, quality and MACs."""
import json
import os
import time

import numpy as np

from diffusion_models.ddpm import read_dissolver_checkpoint
from diffusion_models.macs import config_macs
from study.plan import class_text
from study.steps import class_flags, py
from study.text import fmt, rel
from utils import atomic_write_json, warn

GRID_TIMESTEPS = (10, 30, 50, 70, 100, 150)  # rows of the dissolving grid (the training range is 30..100)
TRAIN_T = (30, 100)
DISSOLVER_TABLE_NOTE = (
    "Per timestep t of the dissolving grid: lesion removal ratio / tissue change, measured on 256 images of "
    "the same tissue drawn with and without lesions (removal ratio = 1 - ||D(lesioned) - D(clean)||^2 / "
    "||lesioned - clean||^2: 1 removes the lesions entirely, 0 keeps them; tissue change = ||D(clean) - clean||^2 "
    "/ ||clean - mean(clean)||^2). Other datasets: the share of high-frequency energy removed. The last column "
    "averages the removal ratio over the grid's timesteps inside training's range.")  # the timesteps training draws from (the paper's offsets 0.3 and 1.0)


def ddpm_save_every(train_steps):
    """Milestones of the pipeline's dissolver: the paper's 31,250 steps, or five per training
    when it is shorter, so an interrupted training resumes from a recent checkpoint."""
    return max(1, min(31_250, -(-int(train_steps) // 5)))


class Dissolvers:
    """Trains (or reuses) each dissolver once, draws its grid and counts its MACs; ``steps`` (a
    :class:`study.steps.Steps`) runs the training and the grid."""

    def __init__(self, a, steps):
        self.a = a
        self.steps = steps
        self.state = {}  # name -> dict(ok, reason, gmacs, seconds)

    def get(self, spec):
        if spec["name"] in self.state:
            return self.state[spec["name"]]
        a, t0 = self.a, time.time()
        head = f"dissolver {spec['dataset']} {class_text(spec['cls'])} {spec['resolution']}px ({spec['name']})"
        print(f"{head} ...", end="", flush=True)
        info = None
        if os.path.exists(spec["done"]):
            try:
                with open(spec["done"]) as fh:
                    info = json.load(fh)
            except (OSError, ValueError):
                info = None
        if info is not None and os.path.exists(spec["ckpt"]):
            state = dict(info, ok=True, reason="", reused=True)
        else:
            cmd = py("diffusion_models/train_eval_ddpm.py", "--mode", "train", "--dataset", spec["dataset"],
                     "--data_root", a.data_root, *class_flags(spec["cls"], "--all_classes"),
                     "--image_size", spec["resolution"],
                     "--train_steps", a.ddpm_train_steps, "--save_every", ddpm_save_every(a.ddpm_train_steps),
                     "--batch_size", a.ddpm_batch_size, "--grad_accum", a.ddpm_grad_accum,
                     "--unet_dim", a.ddpm_unet_dim, "--save_path", spec["ckpt"], "--seed", 0, "--no_progress",
                     "--amp", a.amp)
            if a.device:
                cmd += ["--device", a.device]
            resuming = os.path.exists(spec["ckpt"])
            if resuming:  # an interrupted training: continue it exactly
                cmd.append("--resume")
            ok, seconds, reason = self.steps.run(cmd, spec["log"], what=f"training the dissolver {spec['name']}",
                                                 append=resuming)
            if not ok:
                state = {"ok": False, "reason": f"training failed: {reason}", "gmacs": None,
                         "train_seconds": seconds, "log": spec["log"]}
                self.state[spec["name"]] = state
                print(f" FAILED after {seconds:.0f} s: {reason} (log {rel(spec['log'], a.out)})", flush=True)
                return state
            gmacs = dissolver_gmacs(spec["ckpt"])
            state = {"ok": True, "reason": "", "gmacs": gmacs, "train_seconds": round(seconds, 2), "reused": False}
            atomic_write_json({"gmacs": gmacs, "train_seconds": round(seconds, 2), "checkpoint": spec["ckpt"],
                               "data": spec.get("data"),  # the digest of the data's fingerprint (study.rerun)
                               "ddpm": {"unet_dim": a.ddpm_unet_dim, "train_steps": a.ddpm_train_steps,
                                        "batch_size": a.ddpm_batch_size, "grad_accum": a.ddpm_grad_accum,
                                        "amp": a.amp}},
                              spec["done"])
        if not os.path.exists(spec["grid"]):
            cmd = py("eval_dissolver.py", "--dataset", spec["dataset"],
                     "--data_root", a.data_root, *class_flags(spec["cls"]),
                     "--diffusion_model_path", spec["ckpt"], "--out", spec["grid"],
                     "--timesteps_to_show", *GRID_TIMESTEPS)
            if a.device:
                cmd += ["--device", a.device]
            ok, _, reason = self.steps.run(cmd, spec["grid_log"],
                                           what=f"drawing the grid of the dissolver {spec['name']}")
            if not ok:
                state["grid_error"] = reason
                print(f" (grid failed: {reason})", end="")
        state["spec"] = spec
        state["quality"] = read_quality(spec)
        self.state[spec["name"]] = state
        what = "reused" if state.get("reused") else f"trained in {state['train_seconds']:.0f} s"
        macs = f"{state['gmacs']:.3f} GMACs/image" if state.get("gmacs") is not None else "MACs unknown"
        removal = removal_ratio(state)
        removal = "" if removal is None else f", lesion removal ratio {removal:.2f}"
        print(f" {what}, {macs}{removal} ({time.time() - t0:.0f} s)", flush=True)
        return state


def read_quality(spec):
    """The dissolving-quality rows (``eval_dissolver.py``'s JSON beside the grid), or []."""
    path = os.path.splitext(spec["grid"])[0] + ".json"
    try:
        with open(path) as fh:
            return list(json.load(fh).get("timesteps") or [])
    except (OSError, ValueError, AttributeError):
        return []


def removal_ratio(state):
    """The dissolver's lesion removal ratio averaged over the grid's timesteps inside the training
    range (30..100 of the paper's offsets): None where it was not measured (no synthetic lesions)."""
    values = [row["removal_ratio"] for row in (state or {}).get("quality", [])
              if "removal_ratio" in row and TRAIN_T[0] <= row["t"] <= TRAIN_T[1]]
    if not values:
        return None
    return float(np.mean(values))


def dissolver_table(runs):
    """One row per dissolver the runs used: its lesion removal ratio and tissue change per
    timestep of its grid (eval_dissolver.py's measurement; see docs/method.md),
    and the removal ratio averaged over the training range. None when no run dissolves."""
    specs = list({r.dissolver["name"]: r.dissolver for r in runs if r.dissolver}.values())
    rows = [(spec, read_quality(spec)) for spec in specs]
    rows = [(spec, q) for spec, q in rows if q]
    if not rows:
        return None
    ts = sorted({row["t"] for _, q in rows for row in q})
    lines = ["| dissolver | " + " | ".join(f"t={t}" for t in ts) + " | removal ratio, t in 30..100 |",
             "|---|" + "---|" * (len(ts) + 1)]
    for spec, q in rows:
        by_t = {row["t"]: row for row in q}
        cells = []
        for t in ts:
            row = by_t.get(t, {})
            cells.append(f"{row['removal_ratio']:.2f} / {row['tissue_change']:.3f}" if "removal_ratio" in row
                         else (f"hf removed {row['hf_removed']:.2f}" if "hf_removed" in row else ""))
        mean = removal_ratio({"quality": q})
        lines.append(f"| {spec['name']} | " + " | ".join(cells) + f" | {fmt(mean, 2)} |")
    return "\n".join(lines)


def dissolver_gmacs(ckpt_path):
    """GMACs of one dissolving call (the UNet on one image): thop's default count, the one the
    paper's table reports (``diffusion_models.macs``); None when it cannot be counted."""
    try:
        as_paper, _ = config_macs(read_dissolver_checkpoint(ckpt_path, "cpu")["config"])
        return round(float(as_paper) / 1e9, 4)
    except Exception as exc:  # noqa: BLE001 - a figure of merit, not worth failing the run for
        warn(f"could not count the MACs of {ckpt_path}: {type(exc).__name__}: {exc}")
        return None
