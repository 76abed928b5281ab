"""Draw a dissolver's dissolving grid and measure what it dissolves (the paper's Figure 1).

    python eval_dissolver.py --dataset covid --diffusion_model_path diffusion_models/ckpts/covid_1_32px.pt
    python eval_dissolver.py --dataset synth_lesion --diffusion_model_path d.pt --out grid.png

Row 0 of the PNG holds test images, half of the normal class and half anomalous (the columns are
headed so); each further row, labelled ``t = <t>``, holds them dissolved at one timestep of
``--timesteps_to_show`` (one reverse DDPM step at that timestep, as training dissolves,
``models.dissolve.Dissolver``). Beside the PNG a JSON
file holds, per timestep, the frequency report on up to ``--quality_images`` normal test images
(the share of high-frequency energy removed, the change of the low frequencies) and, on
``synth_lesion`` and its variants, the lesion report on the same tissue drawn with and without
that variant's lesions (``evals.dissolve_quality``). The dissolver is trained by
``diffusion_models/train_eval_ddpm.py --mode train``.
"""
import argparse
import os

import torch

from common.device import pick_device
from common.errors import UserError, exit_on_user_error
from common.flags import HelpFormatter, add_data_root, add_device, add_diff_resolution, add_seed
from common.paths import check_output_file
from datasets import get_dataset
from datasets.normal_class import normal_class_line
from datasets.synth_lesion import VARIANTS, generate_synth_lesion
from datasets.registry import check_dataset_name
from diffusion_models.ddpm import load_dissolver, train_command_hint
from diffusion_models.ddpm_data import check_normal_class, dissolver_class, paper_dataset_name
from evals.dissolve_quality import frequency_report, lesion_report
from evals.plots import plot_dissolving_grid
from models.dissolve import Dissolver
from utils import atomic_write_json

DEFAULT_SHOW_TIMESTEPS = [10, 30, 50, 70, 100, 150]


def build_parser():
    p = argparse.ArgumentParser(prog="eval_dissolver.py", formatter_class=HelpFormatter, description=__doc__)
    p.add_argument("--diffusion_model_path", default=None,
                   help="dissolver checkpoint (required: written by diffusion_models/train_eval_ddpm.py --mode train, "
                        "or the paper's model-<milestone>.pt)")
    p.add_argument("--dataset", default=None, help="dataset whose test images are shown (required; the paper's "
                                                   "names, e.g. sars-covid, are understood)")
    add_data_root(p)
    p.add_argument("--one_class_idx", "--on_label", type=int, default=None,
                   help="normal class (left out: the checkpoint's when it was trained on --dataset; else 1 for "
                        "covid, the non-COVID folder, and --normal_class's rules otherwise)")
    p.add_argument("--normal_class", default=None, metavar="NAME",
                   help="normal class by name (a class folder of a folder dataset)")
    add_diff_resolution(p, "--image_size", dest="image_size", default=None,
                        help="side in pixels the checkpoint must dissolve at (left out: whatever it has)")
    p.add_argument("--timesteps_to_show", type=int, nargs="+", default=None,
                   help=f"timesteps of the rows (left out: {' '.join(map(str, DEFAULT_SHOW_TIMESTEPS))})")
    p.add_argument("--n_show", type=int, default=8, help="images per row (half normal, half anomalous)")
    p.add_argument("--diffusion_weights", default="online", choices=["online", "ema"],
                   help="which weights dissolve (online: the paper's, the Trainer file's 'model')")
    p.add_argument("--diffusion_range_correct", "--range_correct", dest="range_correct", action="store_true",
                   help="feed x*2-1 and show (x0+1)/2 (without it: the paper's raw [0,1] in, [-1,1] out)")
    p.add_argument("--out", default=None,
                   help="PNG path (left out: next to the checkpoint); the dissolving-quality JSON goes beside it")
    p.add_argument("--quality_images", type=int, default=256,
                   help="images measured per timestep (frequency split; lesion removal on synth_lesion and its "
                        "variants)")
    add_seed(p, "seed of the images shown and of the lesion pairs drawn")
    add_device(p)
    return p


def parse_args(argv=None):
    """The flags, the dataset's name first (a near miss gets a suggestion), then the dissolver's."""
    args = build_parser().parse_args(argv)
    if not args.dataset:
        raise UserError("eval_dissolver.py needs --dataset (e.g. --dataset covid, or synth_lesion to try it out)")
    ours = paper_dataset_name(args.dataset)
    if ours != args.dataset:
        print(f"note: --dataset {args.dataset} is the paper's name for {ours}")
        args.dataset = ours
    check_dataset_name(args.dataset)
    if args.n_show < 1:
        raise UserError(f"--n_show must be >= 1, got {args.n_show}")
    return args


def check_dissolver_file(args):
    """``--diffusion_model_path`` given and there (checked after the data: a wrong dataset or path
    is the first error); the hint trains one on ``--dataset``."""
    if not args.diffusion_model_path:
        hint = train_command_hint(None, args.image_size, args.dataset, args.data_root)
        raise UserError(f"eval_dissolver.py needs --diffusion_model_path CKPT, a dissolver; train one on "
                        f"{args.dataset} with: {hint}")
    if not os.path.exists(args.diffusion_model_path):
        hint = train_command_hint(args.diffusion_model_path, args.image_size, args.dataset, args.data_root)
        raise UserError(f"--diffusion_model_path {args.diffusion_model_path}: no such file; train a dissolver on "
                        f"{args.dataset} with: {hint}")


def output_paths(args):
    """The PNG and the JSON beside it, both checked writable before any work."""
    out = args.out or os.path.splitext(args.diffusion_model_path)[0] + "_dissolving.png"
    quality_path = os.path.splitext(out)[0] + ".json"
    for path in (out, quality_path):
        check_output_file(path, "--out")
    return out, quality_path


def timesteps_to_show(requested, num_timesteps):
    show = requested or DEFAULT_SHOW_TIMESTEPS
    bad = [t for t in show if not 0 <= t < num_timesteps]
    if bad:
        raise UserError(f"--timesteps_to_show {' '.join(map(str, bad))} outside 0..{num_timesteps - 1}")
    return show


def load_test_split(dataset, data_root, seed):
    """The test split of ``dataset`` and its ``DatasetInfo``."""
    _, test_set, info = get_dataset(dataset, data_root, image_size=None, seed=seed)
    return test_set, info


def normal_class(args, meta, info):
    """``--one_class_idx`` / ``--normal_class``, else the checkpoint's class when it was trained on
    ``--dataset``, else the DDPM script's default or the folder rules
    (``diffusion_models.ddpm_data.dissolver_class``); a note when the checkpoint was trained on
    another dataset."""
    dataset = args.dataset
    idx = meta.get("one_class_idx") if meta.get("dataset") == dataset else None
    recorded = None if idx is None else (meta.get("class_name"), idx)
    idx = dissolver_class(dataset, args.data_root, args.one_class_idx, args.normal_class, recorded)[0]
    check_normal_class(idx, info)
    print(normal_class_line(dataset, info.class_names, idx))
    if meta.get("dataset") is not None and meta.get("dataset") != dataset:
        print(f"note: the dissolver was trained on {meta.get('dataset')}, shown here on {dataset}")
    return idx


def grid_images(labels, idx, n_show, seed):
    """Indices of up to ``n_show`` test images, normal ones first (half, or more when too few
    are anomalous), each group drawn at random with ``seed``; and how many of each."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.nonzero(labels == idx).flatten()
    anomal = torch.nonzero(labels != idx).flatten()
    normal = normal[torch.randperm(len(normal), generator=g)]
    anomal = anomal[torch.randperm(len(anomal), generator=g)]
    n_norm = min(len(normal), (n_show + 1) // 2)
    n_anom = min(len(anomal), n_show - n_norm)
    n_norm = min(len(normal), n_show - n_anom)
    return torch.cat([normal[:n_norm], anomal[:n_anom]]), n_norm, n_anom


def write_grid(dissolver, x, show, n_norm, n_anom, path, title):
    """The images and one row per timestep of them dissolved, as a labelled PNG (rows ``input``
    and ``t = <t>``, the normal and the anomalous columns headed; small images enlarged without
    smoothing so the fine details stay visible: ``evals.plots.plot_dissolving_grid``)."""
    rows = torch.stack([x] + [dissolver(x, [t]) for t in show]).clamp(0, 1).float().cpu()
    plot_dissolving_grid(rows.permute(0, 1, 3, 4, 2).numpy(), show, n_norm, n_anom, path, title=title)


def dissolving_quality(dissolver, test_set, labels, idx, show, dataset, n_images, seed, device):
    """Per timestep: the frequency report on up to ``n_images`` normal test images and, on
    ``synth_lesion`` and its variants, the lesion report on the same tissue drawn with and
    without that variant's lesions."""
    normal = torch.nonzero(labels == idx).flatten()[:n_images]
    x, _ = test_set.get_batch(normal)
    x = x.to(device, torch.float32)
    pairs = None
    if dataset in VARIANTS:
        lesioned, _, clean, _ = generate_synth_lesion(0, n_images, seed=seed + 7919, split_id=5,
                                                      return_parts=True, variant=dataset)
        pairs = (lesioned.float().div(255).to(device), clean.float().div(255).to(device))
    rows = []
    for t in show:
        row = {"t": int(t), **frequency_report(x, dissolver(x, [t]))}
        if pairs is not None:
            row.update(lesion_report(lambda z, t=t: dissolver(z, [t]), *pairs))
        rows.append(row)
    return {"n_images": int(x.shape[0]), "timesteps": rows}


def print_quality(report):
    for row in report["timesteps"]:
        extra = (f", lesion removal ratio {row['removal_ratio']:.3f}, tissue change {row['tissue_change']:.3f}"
                 if "removal_ratio" in row else "")
        print(f"  t={row['t']:>4}: high-frequency energy removed {row['hf_removed']:.3f}, low-frequency change "
              f"{row['lf_change']:.3f}{extra}")


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    outputs = output_paths(args) if args.out else None  # an --out that cannot be written: before any work
    test_set, info = load_test_split(args.dataset, args.data_root, args.seed)  # the data, then the dissolver
    check_dissolver_file(args)
    diffusion, ck = load_dissolver(args.diffusion_model_path, device, expect_resolution=args.image_size,
                                   expect_channels=3, resolution_flag="--image_size", weights=args.diffusion_weights)
    resolution = ck["config"]["image_size"]
    out, quality_path = outputs or output_paths(args)
    show = timesteps_to_show(args.timesteps_to_show, diffusion.num_timesteps)
    idx = normal_class(args, ck["meta"], info)
    labels = torch.as_tensor(test_set.labels).long()
    pick, n_norm, n_anom = grid_images(labels, idx, args.n_show, args.seed)
    if len(pick) == 0:
        raise UserError(f"the {args.dataset} test split under {args.data_root} holds no images")
    dissolver = Dissolver(diffusion, info.native_kind, diff_resolution=resolution, offset=0.0, upper=0.0,
                          range_correct=args.range_correct)
    x = test_set.get_batch(pick)[0].to(device, torch.float32)
    mode = "range-correct ([-1,1] in, (x0+1)/2 shown)" if args.range_correct else \
        "paper range ([0,1] in as is, [-1,1] prediction shown clipped to [0,1])"
    title = (f"dissolving {args.dataset} test images, normal class {idx} ({info.class_names[idx]}): one reverse "
             f"step at t, {resolution}-px dissolver ({os.path.basename(args.diffusion_model_path)})")
    write_grid(dissolver, x, show, n_norm, n_anom, out, title)
    print(f"wrote {out}: row 0 = {n_norm} normal + {n_anom} anomalous {args.dataset} test images; rows 1.."
          f"{len(show)} = dissolved at t = {', '.join(map(str, show))} ({resolution} px, {mode})")
    report = dissolving_quality(dissolver, test_set, labels, idx, show, args.dataset, args.quality_images,
                                args.seed, device)
    report.update(checkpoint=args.diffusion_model_path, weights=args.diffusion_weights, mode=mode,
                  dataset=args.dataset, resolution=resolution, grid={"n_normal": n_norm, "n_anomalous": n_anom,
                                                                     "timesteps": [int(t) for t in show]})
    atomic_write_json(report, quality_path)
    print_quality(report)
    print(f"wrote {quality_path}")


if __name__ == "__main__":
    main()
