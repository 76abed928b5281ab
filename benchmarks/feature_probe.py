"""What the features of trained models separate, on fresh images of a built-in synthetic set.

    python benchmarks/feature_probe.py --dataset synth_streak \\
        --load_path runs/synth_streak_quick/synth_streak/class_0/*/seed_0/last.model --random_init

For each model (and, with ``--random_init``, an untrained network of the first one's architecture
and width), prints and writes to ``--out`` (JSON) two measures of its penultimate features and of
its normalised SimCLR features (``evals/feature_probe.py``):

* ``probe_auroc``: a logistic regression fitted on ``--n`` normal and ``--n`` anomalous images,
  AUROC on as many others;
* ``lesion_sensitivity``: how far the lesions move an image in feature space (the same tissue
  with and without them) against how far apart two different normal images are.

The images are drawn by the set's generator from seeds no training or test split uses, upright
and unaugmented, in fp32. A model whose probe is high but whose CSI AUROC is low holds the
lesions in its features without its score using them; a low probe means the features do not
hold them.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import UserError, exit_on_user_error  # noqa: E402

SETS = ("synth_lesion", "synth_lesion_half", "synth_streak", "synth_streak_half")
OFFSET = 104729  # generator seeds apart from the sets' own (seed, 0/1) and the dissolver's quality pairs


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synth_streak", choices=SETS)
    p.add_argument("--load_path", nargs="+", default=[], help="train.py checkpoints (last.model, best_CSI.model)")
    p.add_argument("--random_init", action="store_true",
                   help="also an untrained network: the first model's arch and width (none given: resnet18 at "
                        "width 16, the main job's)")
    p.add_argument("--n", type=int, default=1000, help="images per class for the probe's fit and for its test; pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the figures (refused if it exists)")
    return p


def fresh_images(dataset, n, seed):
    from datasets.synth_lesion import generate_synth_lesion

    s = seed + OFFSET
    fit = generate_synth_lesion(n, n, seed=s, split_id=10, variant=dataset)
    test = generate_synth_lesion(n, n, seed=s, split_id=11, variant=dataset)
    lesioned, _, clean, _ = generate_synth_lesion(0, n, seed=s, split_id=12, return_parts=True, variant=dataset)
    other, _ = generate_synth_lesion(n, 0, seed=s, split_id=13, variant=dataset)
    as_float = lambda u8: u8.float() / 255.0  # noqa: E731
    return {"fit": (as_float(fit[0]), fit[1].numpy()), "test": (as_float(test[0]), test[1].numpy()),
            "lesioned": as_float(lesioned), "clean": as_float(clean), "other": as_float(other)}


def load(path):
    from common.checkpoint_io import read_model_checkpoint
    from models.resnet import build_model

    ckpt = read_model_checkpoint(path)
    meta = ckpt.get("meta") or {}
    state = ckpt["model"]
    try:
        model = build_model(meta.get("arch", "resnet18"), n_classes=state["linear.weight"].shape[0],
                            simclr_dim=state["simclr_layer.2.weight"].shape[0],
                            n_shifts=state["shift_cls_layer.weight"].shape[0], width=meta.get("resnet_width", 64))
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{path} is not a model this probe can rebuild ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}); pass a train.py checkpoint (last.model)") from None
    return model, meta


def measure(model, data, seed):
    from evals.feature_probe import features, lesion_sensitivity, probe_auroc

    row = {}
    for layer in ("penultimate", "simclr"):
        f = {k: features(model, data[k][0] if k in ("fit", "test") else data[k], layer)
             for k in ("fit", "test", "lesioned", "clean", "other")}
        row[layer] = {"probe_auroc": round(probe_auroc(f["fit"], data["fit"][1], f["test"], data["test"][1], seed), 4),
                      "lesion_sensitivity": round(lesion_sensitivity(f["lesioned"], f["clean"], f["other"]), 4)}
    return row


@exit_on_user_error
def main(argv=None):
    a = build_parser().parse_args(argv)
    if not a.load_path and not a.random_init:
        raise UserError("feature_probe.py: nothing to measure; pass --load_path MODEL [...] and/or --random_init")
    for path in a.load_path:
        if not os.path.isfile(path):
            raise UserError(f"feature_probe.py: no checkpoint at {path}; pass a train.py checkpoint (last.model)")
    if a.out and os.path.exists(a.out):
        raise UserError(f"feature_probe.py: {a.out} exists; pass another --out")
    import torch

    torch.manual_seed(a.seed)
    data = fresh_images(a.dataset, a.n, a.seed)
    models = [(path, *load(path)) for path in a.load_path]
    if a.random_init:
        from models.resnet import build_model

        meta = models[0][2] if models else {}
        torch.manual_seed(a.seed)
        models.append(("random_init", build_model(meta.get("arch", "resnet18"), n_classes=2,
                                                  width=meta.get("resnet_width", 16)), meta))
    rows = []
    print(f"{a.dataset}: {a.n} + {a.n} images to fit the probe, as many to test it, {a.n} pairs")
    print("model | penultimate: probe AUROC, lesion sensitivity | simclr: probe AUROC, lesion sensitivity")
    for name, model, _ in models:
        row = {"model": name, **measure(model.float(), data, a.seed)}
        rows.append(row)
        pen, sim = row["penultimate"], row["simclr"]
        print(f"{name} | {pen['probe_auroc']:.3f}, {pen['lesion_sensitivity']:.3f} | "
              f"{sim['probe_auroc']:.3f}, {sim['lesion_sensitivity']:.3f}")
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"dataset": a.dataset, "n": a.n, "seed": a.seed, "rows": rows}, fh, indent=1)
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
