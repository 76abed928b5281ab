"""How long until a dissolver dissolves lesions: removal ratio against DDPM training steps.

    python benchmarks/dissolver_study.py --widths 16 32 --steps 250 500 1000 2000 --out runs/dissolver_study

For each UNet width, trains one dissolver on the normal class of ``--dataset`` (a built-in set
whose generator draws the same tissue with and without its lesions: ``synth_lesion``, the
default, ``synth_streak`` or ``synth_streak_half``) with
``diffusion_models/train_eval_ddpm.py`` (resumed from one step count to the next, so the
checkpoints form one training run), and after each step count runs ``eval_dissolver.py``, whose
JSON holds, per timestep, the lesion removal ratio, the tissue change and the share of
high-frequency energy removed. Prints one table row per (width, steps, timestep) and writes
the rows to ``<out>/study.csv``. Input range: the paper's ([0, 1] in); ``--range_correct``
measures the range-correct variant of the same checkpoints too.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, log):
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synth_lesion", choices=("synth_lesion", "synth_streak", "synth_streak_half"))
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    p.add_argument("--steps", type=int, nargs="+", default=[250, 500, 1000, 2000])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--timesteps", type=int, nargs="+", default=[30, 50, 70, 100])
    p.add_argument("--quality_images", type=int, default=256)
    p.add_argument("--range_correct", action="store_true", help="also measure the range-correct variant")
    p.add_argument("--out", default=os.path.join("runs", "dissolver_study"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"), help="train_eval_ddpm.py --amp (training)")
    a = p.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "study.log")
    py = sys.executable
    rows = []
    for width in a.widths:
        ckpt = os.path.join(out, f"{a.dataset}_dim{width}.pt")
        spent = 0.0
        for steps in sorted(a.steps):
            t0 = time.time()
            cmd = [py, "diffusion_models/train_eval_ddpm.py", "--mode", "train", "--dataset", a.dataset,
                   "--unet_dim", str(width), "--batch_size", str(a.batch_size), "--grad_accum", str(a.grad_accum),
                   "--lr", str(a.lr), "--train_steps", str(steps), "--save_every", str(steps),
                   "--save_path", ckpt, "--device", a.device, "--amp", a.amp, "--no_progress"]
            if os.path.exists(ckpt):
                cmd.append("--resume")
            run(cmd, log)
            spent += time.time() - t0
            for rc in ([False, True] if a.range_correct else [False]):
                png = os.path.join(out, f"dim{width}_s{steps}{'_rc' if rc else ''}.png")
                cmd = [py, "eval_dissolver.py", "--dataset", a.dataset,
                       "--diffusion_model_path", ckpt, "--out", png, "--quality_images", str(a.quality_images),
                       "--device", a.device, "--timesteps_to_show", *map(str, a.timesteps)]
                if rc:
                    cmd.append("--range_correct")
                run(cmd, log)
                with open(os.path.splitext(png)[0] + ".json") as fh:
                    quality = json.load(fh)
                for r in quality["timesteps"]:
                    row = {"dataset": a.dataset, "unet_dim": width, "ddpm_steps": steps, "images_seen": steps * a.batch_size * a.grad_accum,
                           "train_seconds": round(spent, 1), "range": "correct" if rc else "paper", "t": r["t"],
                           "removal_ratio": round(r["removal_ratio"], 4), "tissue_change": round(r["tissue_change"], 4),
                           "hf_removed": round(r["hf_removed"], 4), "lf_change": round(r["lf_change"], 4)}
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    with open(os.path.join(out, "study.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {os.path.join(out, 'study.csv')}")


if __name__ == "__main__":
    main()
