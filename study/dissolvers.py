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
TRAIN_T = (30, 100)  # the timesteps training draws from (the paper's offsets 0.3 and 1.0)
DISSOLVER_TABLE_NOTE = ("What each dissolver does to images, per timestep t of its dissolving grid (one reverse step "
                        "at t, as training dissolves; eval_dissolver.py measures it), and the mean over the grid's "
                        "timesteps inside training's range, t in 30..100. D is the dissolver.")
# the measures of eval_dissolver.py's JSON (evals.dissolve_quality): key, name, digits, what it is (one line);
# the lesion measures exist only where lesions can be drawn on and off the same tissue (the synthetic datasets)
MEASURES = (
    ("removal_ratio", "lesion removal ratio", 2,
     "1 - ||D(lesioned) - D(clean)||^2 / ||lesioned - clean||^2 over pairs of the same synthetic tissue drawn with "
     "and without lesions: 1 removes the lesions entirely, 0 keeps them (synthetic lesion datasets only)"),
    ("tissue_change", "tissue change", 3,
     "||D(clean) - clean||^2 / ||clean - mean(clean)||^2 on the lesion-free tissue of those pairs: 0 leaves healthy "
     "tissue as it is, about 1 flattens it to its mean (synthetic lesion datasets only)"),
    ("hf_removed", "high-frequency energy removed", 2,
     "1 - E_high(D(x)) / E_high(x) on up to 256 normal test images, E_high the energy above 0.125 cycles per "
     "pixel: 1 removes all fine detail, 0 none, below 0 adds some"),
    ("lf_change", "low-frequency change", 3,
     "||low(D(x)) - low(x)||^2 / ||low(x)||^2 on the same images: how far the coarse content moves (0: not at all)"),
)


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
                     "--progress_file", progress_path(spec), "--amp", a.amp)
            if a.device:
                cmd += ["--device", a.device]
            resuming = os.path.exists(spec["ckpt"])
            if resuming:  # an interrupted training: continue it exactly
                cmd.append("--resume")
            ok, seconds, reason = self.steps.run(cmd, spec["log"], what=f"training the dissolver {spec['name']}",
                                                 append=resuming, progress=progress_path(spec))
            if not ok:
                state = {"ok": False, "reason": f"training failed: {reason}", "gmacs": None,
                         "train_seconds": seconds, "log": spec["log"]}
                self.state[spec["name"]] = state
                print(f"{head}: FAILED after {seconds:.0f} s: {reason} (log {rel(spec['log'], a.out)})", flush=True)
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
                     "--timesteps_to_show", *GRID_TIMESTEPS, "--quality_images", a.dissolver_quality_images)
            if a.device:
                cmd += ["--device", a.device]
            ok, _, reason = self.steps.run(cmd, spec["grid_log"],
                                           what=f"drawing the grid of the dissolver {spec['name']}")
            if not ok:
                state["grid_error"] = reason
        state["spec"] = spec
        state["quality"] = read_quality(spec)
        self.state[spec["name"]] = state
        what = "reused" if state.get("reused") else f"trained in {state['train_seconds']:.0f} s"
        macs = f"{state['gmacs']:.3f} GMACs/image" if state.get("gmacs") is not None else "MACs unknown"
        removal = removal_ratio(state)
        removal = "" if removal is None else f", lesion removal ratio {removal:.2f}"
        grid = f" (grid failed: {state['grid_error']})" if state.get("grid_error") else ""
        print(f"{head}: {what}, {macs}{removal}{grid} ({time.time() - t0:.0f} s)", flush=True)
        return state


def progress_path(spec):
    """The file the dissolver's training writes its progress to (reproduce.py shows it)."""
    return os.path.splitext(spec["ckpt"])[0] + ".progress.json"


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


def dissolver_rows(runs):
    """``[(spec, quality rows)]`` of every dissolver the runs used that has its measurements."""
    specs = list({r.dissolver["name"]: r.dissolver for r in runs if r.dissolver}.values())
    return [(spec, q) for spec, q in ((spec, read_quality(spec)) for spec in specs) if q]


def measures_of(rows):
    """The measures (entries of :data:`MEASURES`) that some dissolver of ``rows`` has."""
    return [m for m in MEASURES if any(m[0] in row for _, q in rows for row in q)]


def dissolver_table(runs):
    """What each dissolver the runs used does to images: one row per dissolver and measure that
    applies to its data (:data:`MEASURES`; eval_dissolver.py's measurement, docs/method.md), one
    column per timestep of its grid, then the mean over the timesteps inside training's range.
    None when no run dissolves with a measured dissolver."""
    rows = dissolver_rows(runs)
    if not rows:
        return None
    ts = sorted({row["t"] for _, q in rows for row in q})
    lines = ["| dissolver | measure | " + " | ".join(f"t={t}" for t in ts) + " | mean, t in 30..100 |",
             "|---|---|" + "---|" * (len(ts) + 1)]
    for spec, q in rows:
        by_t = {row["t"]: row for row in q}
        for key, name, digits, _ in MEASURES:
            if not any(key in row for row in q):
                continue
            cells = [fmt(by_t.get(t, {}).get(key), digits) for t in ts]
            inside = [row[key] for row in q if key in row and TRAIN_T[0] <= row["t"] <= TRAIN_T[1]]
            mean = float(np.mean(inside)) if inside else None
            lines.append(f"| {spec['name']} | {name} | " + " | ".join(cells) + f" | {fmt(mean, digits)} |")
    return "\n".join(lines)


def dissolver_notes(runs):
    """One line per measure :func:`dissolver_table` shows: what it is."""
    return [f"- {name}: {what}" for _, name, _, what in measures_of(dissolver_rows(runs))]


def dissolver_gmacs(ckpt_path):
    """GMACs of one dissolving call (the UNet on one image): thop's default count, the one the
    paper's table reports (``diffusion_models.macs``); None when it cannot be counted."""
    try:
        as_paper, _ = config_macs(read_dissolver_checkpoint(ckpt_path, "cpu")["config"])
        return round(float(as_paper) / 1e9, 4)
    except Exception as exc:  # noqa: BLE001 - a figure of merit, not worth failing the run for
        warn(f"could not count the MACs of {ckpt_path}: {type(exc).__name__}: {exc}")
        return None
