"""Score a test set with a trained model and report AUROC (CSI's ``eval.py``).

One-class setting (``--one_class_idx C``): the normal class's test images against every other
class. CSI's unlabeled multi-class setting (``--one_class_idx`` left out on cifar10 / imagenet or
with ``--ood_dataset``, or ``None``): the whole in-distribution test set against each
``--ood_dataset``, one AUROC per set and their mean, the axes and weights from the whole
training set, printed as CSI prints them (``[svhn CSI 0.9321] [svhn best 0.9321]``).

Example (the paper's command):
    python eval.py --mode ood_pre --dataset kvasir --model resnet18_imagenet --ood_score CSI \
        --shift_trans_type rotation --print_score --diffusion_upper_offset 0. --diffusion_offset 0. \
        --ood_samples 10 --resize_factor 0.54 --resize_fix --one_class_idx 0 --load_path logs/<run>/last.model
"""
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from cli.args import choose_class, parse_args
from common import distributed
from common.checkpoint_io import read_model_checkpoint
from common.device import device_facts, device_precision, make_deterministic, precision_line
from common.errors import UserError, exit_on_user_error
from common.paths import check_distinct, check_output_file
from datasets import get_dataset, load_ood_sets, one_class_split
from datasets.base import FolderStore, ImageDataset, is_image_file
from datasets.fingerprint import check_outside_data, check_same_data, data_fingerprint, data_tree
from datasets.normal_class import check_recorded_class, normal_class_line, recorded_class
from datasets.ood import default_ood_names, with_interp
from datasets.registry import describe_images
from evals.ood import simple_scores
from evals.ood_pre import auroc_report, csi_scores, extract_features, ood_report
from evals.scoring_reference import (DEFAULT_QUANTILE, ScoringProtocol, compute_reference, few_train_warning,
                                     model_digest, read_reference, reference_path, score_images, threshold_of,
                                     write_reference)
from models.resnet import build_model
from utils import atomic_write, atomic_write_csv, atomic_write_json, set_seed, warn

CSI_SCORES = ("CSI", "simclr")
SIMPLE_SCORES = ("baseline", "clean_norm", "similar")


def save_score_path(P):
    """Where ``--save_score`` writes the raw scores: next to the model."""
    return os.path.join(os.path.dirname(os.path.abspath(P.load_path)), f"scores_{P.mode}.npz")


def output_files(P):
    """``(flag, path)`` of every file this evaluation writes."""
    return [(flag, path) for flag, path in (("--save_results", P.save_results),
                                            ("--save_scores_csv", P.save_scores_csv),
                                            ("--save_score", save_score_path(P) if P.save_score else None)) if path]


def check_data(P, meta, train_set, test_set, info, names):
    """Before any work, on the data as read: no output inside the dataset's folder; the data
    are those the model was trained on (its fingerprint), or ``--accept_changed_data`` (the
    changes are returned, for the results); every name the per-image CSV holds can be written."""
    check_outside_data(output_files(P), data_tree(train_set, test_set), P.dataset)
    changes = check_same_data(meta.get("data"), data_fingerprint(P.dataset, train_set, test_set, info),
                              P.load_path, P.accept_changed_data, where=f"--data_root {P.data_root}",
                              advice="evaluate a model trained on the data as they are")
    check_names(P, names)
    return changes


def check_names(P, names):
    """Every name the per-image CSV will hold can be written as UTF-8 (a file name that is not
    is one line now, not a failure after the whole evaluation)."""
    if not P.save_scores_csv:
        return
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UserError(f"the file name {shown} is not valid UTF-8, and --save_scores_csv writes UTF-8: rename "
                            f"it (e.g. convmv -f latin1 -t utf8), or leave out --save_scores_csv") from None


def check_defined(reports, what):
    """Every AUROC of ``reports`` ({score: {key: AUROC}}) is a number: an undefined one (a side
    without images) is one line, never reported or written as a number."""
    for score, report in reports.items():
        for key, value in report.items():
            if not math.isfinite(value):
                raise UserError(f"the {score} AUROC {key} is undefined ({what}): scoring needs normal and anomalous "
                                f"images; nothing was written")


def check_outputs(P):
    """Before any work: every output can be written, none is an input, no two are one file."""
    outputs = [(flag, path) for flag, path in (("--save_results", P.save_results),
                                               ("--save_scores_csv", P.save_scores_csv),
                                               ("--save_score", save_score_path(P) if P.save_score else None))
               if path is not None]
    inputs = [("--load_path", P.load_path)] + ([("the scoring reference", reference_path(P.load_path))]
                                               if P.score_folder else [])
    check_distinct(outputs, inputs=inputs, input_folders=[("--score_folder", P.score_folder)])
    for flag, path in outputs:
        check_output_file(path, flag)


def check_trained_on(P, meta):
    """The checkpoint's dataset and normal class (train.py records them; ``None``: the
    multi-class setting) are the ones asked for."""
    ds, cls = meta.get("dataset"), meta.get("one_class_idx")
    multi = "one_class_idx" in meta and cls is None and ds is not None  # older files: always a class

    no_defaults = not default_ood_names(P.dataset)
    if ds is not None and ds != P.dataset:
        flags = f"--dataset {ds}" + ("" if multi else f" --one_class_idx {cls}")
        raise UserError(f"{P.load_path} was trained on {flags}, not --dataset {P.dataset}; pass {flags}")
    if cls is not None and P.one_class_idx is None:
        why = ("--one_class_idx None" if P.one_class_given else
               "--ood_dataset" if P.ood_dataset and no_defaults else
               f"leaving out --one_class_idx on {P.dataset}")
        raise UserError(f"{P.load_path} was trained with --one_class_idx {cls} ({ds}) as the normal class; the "
                        f"unlabeled multi-class setting (asked for by {why}) needs a model trained on every class: "
                        f"pass --one_class_idx {cls}")
    if multi and P.one_class_idx is not None:
        scored = meta.get("ood_dataset") or []
        hint = f" (its training scored {' '.join(scored)})" if scored else ""
        how = ("leave out --one_class_idx" if P.one_class_given and not no_defaults
               else f"pass --one_class_idx None --ood_dataset NAME ...{hint}")
        raise UserError(f"{P.load_path} was trained in the unlabeled multi-class setting (every class of {ds} "
                        f"normal), not with --one_class_idx {P.one_class_idx} as the normal class; evaluate it in "
                        f"that setting: {how}")
    if cls is not None and cls != P.one_class_idx:
        raise UserError(f"{P.load_path} was trained with --one_class_idx {cls} ({ds}) as the normal class, not "
                        f"{P.one_class_idx}; pass --one_class_idx {cls}")


def folder_dataset(folder, image_size):
    """Every image below ``folder`` (recursively, sorted), resized to the model's input size."""
    if not os.path.isdir(folder):
        raise UserError(f"--score_folder {folder} is not a folder")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if is_image_file(f))
    if not paths:
        raise UserError(f"--score_folder {folder} holds no images (.png .jpg .jpeg .bmp .tif .tiff)")
    names = [os.path.relpath(p, folder) for p in paths]
    store = FolderStore(paths, (image_size[0], image_size[1]))
    return ImageDataset(store, torch.zeros(len(paths), dtype=torch.long), names)


def print_quantiles(name, scores):
    q = np.quantile(scores, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
    print(f"{name}: " + " ".join(f"{v:.4f}" for v in q) + "  (min q10 q25 median q75 q90 max)")


@exit_on_user_error
def main(argv=None):
    P = parse_args("eval", argv)
    scores_wanted = list(dict.fromkeys(P.ood_score))
    if P.mode == "ood_pre":
        bad = [s for s in scores_wanted if s not in CSI_SCORES]
        if bad:
            raise UserError(f"--mode ood_pre computes --ood_score CSI or simclr, not {' '.join(bad)} "
                            f"(use --mode ood for {', '.join(SIMPLE_SCORES)})")
    else:
        bad = [s for s in scores_wanted if s not in SIMPLE_SCORES]
        if bad:
            raise UserError(f"--mode ood computes --ood_score {' '.join(SIMPLE_SCORES)}, not {' '.join(bad)}")
    if P.score_folder and P.mode != "ood_pre":
        raise UserError("--score_folder works with --mode ood_pre")
    check_outputs(P)

    if P.multi_gpu:
        raise UserError("--multi_gpu (CSI's DataParallel) is not supported: run eval.py on several GPUs with torchrun --nproc_per_node=N "
                        "eval.py ... (each process extracts the features of its share of the images)")
    make_deterministic(P.deterministic)  # before any CUDA work
    with distributed.joined(P.device) as device:
        distributed.quiet_unless_main()
        return evaluate(P, device, scores_wanted)


def evaluate(P, device, scores_wanted):
    """Features (sharded over torchrun's ranks), scores, AUROCs, and the files asked for."""
    set_seed(P.seed)
    precision = device_precision(P.amp, device)  # of the device this process computes on, now set
    print(precision_line(P.amp, precision, *device_facts(device)))
    ckpt = read_model_checkpoint(P.load_path, "cpu")  # load_state_dict moves the weights
    meta = ckpt.get("meta") or {}
    P.model = P.model or meta.get("arch") or "resnet18"  # left out: the network the checkpoint records
    if meta.get("arch") and meta["arch"] != P.model:
        raise UserError(f"{P.load_path} holds a {meta['arch']} but --model is {P.model}; pass --model {meta['arch']}")
    if P.score_folder:  # from the run and its scoring reference: the data are read only to compute a missing one
        return score_folder(P, device, precision, ckpt, meta, scores_wanted)
    choose_class(P, recorded_class(meta), what=P.load_path)  # left out: the class the model was trained on
    check_trained_on(P, meta)
    train_set, test_set, info = get_dataset(P.dataset, P.data_root, image_size=P.img_size, seed=P.seed,
                                            aptos_all_grades=P.aptos_all_grades)
    if meta.get("image_size") and list(meta["image_size"]) != list(info.image_size):
        raise UserError(f"{P.load_path} was trained on {meta['image_size'][0]}-px images ({meta.get('dataset')}), "
                        f"--dataset {P.dataset} gives {info.image_size[0]} px")
    data_changes = check_data(P, meta, train_set, test_set, info, test_set.names)
    normal_train, test_set = one_class_split(train_set, test_set, info, P.one_class_idx, seed=P.seed)
    print(normal_class_line(info.name, info.class_names, P.one_class_idx))
    print(describe_images(info)[0])
    multi = P.one_class_idx is None
    ood_sets = {}
    if multi:  # read before the model: missing data is one line, before any work

        ood_sets = with_interp(load_ood_sets(P.ood_dataset, P.data_root, info), test_set, P.test_batch_size)
        check_names(P, [n for d in ood_sets.values() for n in d.names])
    net, n_shifts = load_model(P, ckpt, meta, info.n_classes, device)

    labels = test_set.labels.numpy()
    results = {"auroc_by_score": {}, "dataset": P.dataset, "one_class_idx": P.one_class_idx,
               "load_path": os.path.abspath(P.load_path), "mode": P.mode, "ood_samples": P.ood_samples,
               "n_normal": int((labels == P.one_class_idx).sum()),
               "n_anomalous": int((labels != P.one_class_idx).sum()),
               "class_names": list(info.class_names)}
    if data_changes:  # --accept_changed_data
        results["data_changed_since_training"] = data_changes
    if multi:
        results.update(setting="multi_class", ood_dataset=list(ood_sets), n_normal=len(test_set),
                       n_anomalous=sum(len(d) for d in ood_sets.values()),
                       n_ood={name: len(d) for name, d in ood_sets.items()})
    per_image = {}
    per_ood = {}  # multi-class: score -> {set: scores}
    if P.mode == "ood_pre":
        if P.base_shift != "rotation":
            warn(f"CSI scores are computed with the rotation shift (the paper's protocol); "
                 f"--shift_trans_type {P.shift_trans_type} is ignored here")
        if "CSI" in scores_wanted and n_shifts != 4:
            raise UserError(f"--ood_score CSI needs a model trained with 4 shifts; {P.load_path} has {n_shifts} "
                            f"(it was trained with --mode simclr: use --ood_score simclr)")
        kw = dict(base_shift="rotation", n_samples=P.ood_samples, device=device, batch_size=P.ood_batch_size,
                  resize_factor=P.resize_factor, resize_fix=P.resize_fix, amp=precision, sharded=True)
        total = (len(normal_train) + len(test_set) + sum(len(d) for d in ood_sets.values())) * P.ood_samples
        with tqdm(total=total, desc="features", unit="img", disable=None) as bar:
            f_train = extract_features(net, normal_train, progress=bar, **kw)  # once, for every score
            f_test = extract_features(net, test_set, progress=bar, **kw)
            # CSI: each set's features as the test set's; interp's from the test set's images
            f_ood = {name: extract_features(net, d, progress=bar, **kw) for name, d in ood_sets.items()}
        for score in scores_wanted:
            per_image[score] = csi_scores(f_train, f_test, 4, score).numpy()
            per_ood[score] = {name: csi_scores(f_train, f, 4, score).numpy() for name, f in f_ood.items()}
    else:
        def simple(dataset, score):
            return simple_scores(net, dataset, score, device, layer=P.ood_layer[0], batch_size=P.ood_batch_size,
                                 resize_factor=P.resize_factor, resize_fix=P.resize_fix, amp=precision,
                                 seed=P.seed).numpy()

        for score in scores_wanted:
            per_image[score] = simple(test_set, score)
            per_ood[score] = {name: simple(d, score) for name, d in ood_sets.items()}

    if multi:
        return report_multi_class(P, results, scores_wanted, per_image, per_ood, test_set, ood_sets)
    for score, s in per_image.items():
        results["auroc_by_score"][score] = auroc_report(s, labels, P.one_class_idx)
    check_defined(results["auroc_by_score"], f"{results['n_normal']} normal and {results['n_anomalous']} anomalous "
                                             f"test images")
    for score, s in per_image.items():
        rep = results["auroc_by_score"][score]
        line = " ".join(f"[{key} {score} {v:.4f}]" for key, v in rep.items())
        print(line)
        if P.print_score:
            print_quantiles(f"{score} normal", s[labels == P.one_class_idx])
            print_quantiles(f"{score} anomalous", s[labels != P.one_class_idx])
    first = scores_wanted[0]
    results["auroc"] = results["auroc_by_score"][first]
    results["ood_score"] = first
    # the per-image files first, the results last: a results file means every output was written
    if P.save_scores_csv:
        rows = [{"index": i, "name": test_set.names[i], "label": int(labels[i]),
                 "normal": int(labels[i] == P.one_class_idx),
                 **{f"score_{k}": f"{v[i]:.6f}" for k, v in per_image.items()}} for i in range(len(labels))]
        atomic_write_csv(rows, ["index", "name", "label", "normal"] + [f"score_{k}" for k in per_image],
                         P.save_scores_csv)
    if P.save_score:
        atomic_write(save_score_path(P), lambda fh: np.savez(fh, labels=labels, **per_image))
    if P.save_results:
        atomic_write_json(results, P.save_results)
    return results


def load_model(P, ckpt, meta, n_classes, device):
    """The network of the checkpoint, its settings (width, head sizes, shifts) from the run, in
    eval mode: ``(model, n_shifts)``."""
    n_shifts = int(meta.get("n_shifts", ckpt["model"]["shift_cls_layer.weight"].shape[0]))
    model = build_model(P.model, n_classes=n_classes, simclr_dim=meta.get("simclr_dim", P.simclr_dim),
                        n_shifts=n_shifts, width=meta.get("resnet_width", P.resnet_width)).to(device)
    try:
        model.load_state_dict(ckpt["model"], strict=not P.no_strict)
    except RuntimeError as exc:
        raise UserError(f"{P.load_path} does not fit --model {P.model} with {n_classes} classes: "
                        f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, n_shifts


def score_folder(P, device, precision, ckpt, meta, scores_wanted):
    """``--score_folder``: every image below the folder scored against the model's scoring
    reference (``evals.scoring_reference``), flagged by its threshold, written as a CSV with the
    test set's per-image columns (label and normal empty) plus ``anomaly_score`` (minus the
    score: higher = more anomalous), ``anomalous`` (0/1), ``threshold`` (on the score's scale:
    anomalous when the score is below it) and ``anomaly_threshold`` (minus it: anomalous when
    ``anomaly_score`` is above it). Everything else comes from the run; the training and test
    data are read only when the reference is missing (it is then computed and kept)."""
    if meta.get("class_names"):
        print(normal_class_line(P.dataset, meta["class_names"], P.one_class_idx))
    if not meta.get("image_size"):
        raise UserError(f"{P.load_path} does not record the size of its images; --score_folder needs a model "
                        f"written by this train.py")
    h, w = meta["image_size"][:2]
    print(f"{P.dataset}: new images read at {h}x{w} px, the size the model was trained at")
    n_classes = int(meta.get("n_classes") or ckpt["model"]["linear.weight"].shape[0])
    model, n_shifts = load_model(P, ckpt, meta, n_classes, device)
    if "CSI" in scores_wanted and n_shifts != 4:
        raise UserError(f"--ood_score CSI needs a model trained with 4 shifts; {P.load_path} has {n_shifts} "
                        f"(it was trained with --mode simclr: use --ood_score simclr)")
    path = reference_path(P.load_path)
    digest = model_digest(ckpt["model"])
    ref, why = read_reference(path, digest)
    asked = ScoringProtocol(samples=P.ood_samples or 10,
                            resize_factor=0.54 if P.resize_factor is None else P.resize_factor,
                            resize_fix=True if P.resize_fix is None else P.resize_fix,
                            batch_size=P.ood_batch_size, amp=precision)
    if ref is None:
        ref = reference_from_data(P, device, model, meta, ckpt, digest, asked, path, why)
    protocol = ScoringProtocol.from_dict(ref["protocol"])
    given = [f for f, v in (("--ood_samples", P.ood_samples), ("--resize_factor", P.resize_factor),
                            ("--resize_fix", P.resize_fix)) if v is not None]
    if given and not asked.same_features(protocol):
        raise UserError(f"{path} was computed with {protocol.samples} sample(s), crop scale {protocol.resize_factor:g}"
                        f"{' fixed' if protocol.resize_fix else ''}; {' '.join(given)} ask for other features: leave "
                        f"them out (the reference's are taken), or move {path} away so that eval.py computes one "
                        f"with them from the training data")
    first = scores_wanted[0]
    served = ref["scores"]
    if any(s not in served for s in scores_wanted):
        raise UserError(f"{path} serves the {' and '.join(served)} score(s), not {' '.join(scores_wanted)}: "
                        f"pass --ood_score {served[0]}")
    thr, quantile, n_train = threshold_of(ref, first, P.threshold_quantile)
    few = few_train_warning(n_train, quantile)
    if few:
        warn(few)

    target = folder_dataset(P.score_folder, meta["image_size"])
    check_names(P, target.names)
    with tqdm(total=len(target) * protocol.samples, desc="features", unit="img", disable=None) as bar:
        feats = extract_features(model, target, "rotation", protocol.samples, device, batch_size=P.ood_batch_size,
                                 resize_factor=protocol.resize_factor, resize_fix=protocol.resize_fix,
                                 amp=precision, progress=bar, sharded=True)
    per_image = {s: score_images(ref, feats, s).numpy() for s in scores_wanted}
    columns = ["index", "name", "label", "normal"] + [f"score_{s}" for s in scores_wanted] + \
        ["anomaly_score", "anomalous", "threshold", "anomaly_threshold"]
    rows = [{"index": i, "name": name, "label": "", "normal": "",
             **{f"score_{s}": f"{v[i]:.6f}" for s, v in per_image.items()},
             "anomaly_score": f"{-per_image[first][i]:.6f}", "anomalous": int(per_image[first][i] < thr),
             "threshold": f"{thr:.6f}", "anomaly_threshold": f"{-thr:.6f}"}
            for i, name in enumerate(target.names)]
    atomic_write_csv(rows, columns, P.save_scores_csv)
    n_flag = sum(r["anomalous"] for r in rows)
    print(f"scored {len(rows)} images of {P.score_folder} with the {first} score ({protocol.samples} sample(s)); "
          f"threshold {thr:.6f}: the {quantile:g} quantile of the leave-one-out scores of {n_train} normal training "
          f"images ({os.path.basename(path)}); anomalous: score_{first} < {thr:.6f}, i.e. anomaly_score > "
          f"{-thr:.6f}; {n_flag} flagged anomalous; wrote {P.save_scores_csv}")
    return {"n_scored": len(rows), "n_flagged": n_flag, "threshold": thr, "threshold_quantile": quantile,
            "n_train": n_train, "score": first, "reference": path}


def reference_from_data(P, device, model, meta, ckpt, digest, protocol, path, why):
    """The scoring reference of the model, computed from the run's training data and kept at
    ``path`` (a warning when it cannot be written); one line when the data cannot be read."""
    try:
        train_set, test_set, info = get_dataset(P.dataset, P.data_root, image_size=P.img_size, seed=P.seed,
                                                aptos_all_grades=P.aptos_all_grades)
    except UserError as exc:
        raise UserError(f"no scoring reference for {P.load_path} ({why}), and the training data it is computed from "
                        f"cannot be read ({exc}): restore them (or pass --data_root DIR where they are now), or "
                        f"score with the run's last.model, whose reference train.py writes") from None
    recorded = recorded_class(meta)
    if recorded is not None and recorded[0] is not None:
        check_recorded_class(P.dataset, info.class_names, recorded[0], recorded[1], P.load_path)
    check_data(P, meta, train_set, test_set, info, [])  # the reference comes from the data the model was trained on
    if list(meta["image_size"]) != list(info.image_size):
        raise UserError(f"{P.load_path} was trained on {meta['image_size'][0]}-px images, --dataset {P.dataset} "
                        f"gives {info.image_size[0]} px now")
    normal_train = one_class_split(train_set, test_set, info, P.one_class_idx, seed=P.seed)[0]
    identity = {"model_file": os.path.basename(P.load_path), "model_digest": digest, "run_id": meta.get("run_id"),
                "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "dataset": P.dataset,
                "one_class_idx": P.one_class_idx, "normal_class": meta.get("normal_class"),
                "image_size": list(meta["image_size"])}
    print(f"computing the scoring reference of {P.load_path} from {len(normal_train)} normal training images "
          f"({why})")
    with tqdm(total=len(normal_train) * protocol.samples, desc="reference", unit="img", disable=None) as bar:
        ref = compute_reference(model, normal_train, device, protocol, identity, quantile=DEFAULT_QUANTILE,
                                sharded=True, progress=bar)
    try:
        write_reference(ref, path)
    except OSError as exc:
        warn(f"could not keep the scoring reference {path} ({exc.strerror or exc}); it is computed again next time")
    return ref


def report_multi_class(P, results, scores_wanted, per_image, per_ood, test_set, ood_sets):
    """CSI's multi-class report: per set a line ``[svhn CSI 0.9321] [svhn best 0.9321]``, the
    mean (``ood_mean``), then the best AUROC of every set tab-separated, as CSI's eval.py prints
    them; the JSON, the per-image CSV (``set`` column) and the raw scores as asked."""
    names = list(ood_sets)
    for score in scores_wanted:
        results["auroc_by_score"][score] = ood_report(per_image[score], per_ood[score])
    check_defined(results["auroc_by_score"], "an out-of-distribution set or the test set without images")
    bests = []
    for key in names + ["ood_mean"]:
        values = {score: results["auroc_by_score"][score][key] for score in scores_wanted}
        best = max(values.values())
        bests.append(best)
        print(" ".join(f"[{key} {score} {v:.4f}]" for score, v in values.items()) + f" [{key} best {best:.4f}]")
    print("\t".join(f"{b:.4f}" for b in bests))
    if P.print_score:
        for score in scores_wanted:
            print_quantiles(f"{score} {P.dataset} (in-distribution test)", per_image[score])
            for name in names:
                print_quantiles(f"{score} {name}", per_ood[score][name])
    first = scores_wanted[0]
    results["auroc"] = results["auroc_by_score"][first]
    results["ood_score"] = first
    sets = [(P.dataset, test_set.names, test_set.labels.tolist(), 1, per_image)]
    sets += [(name, ood_sets[name].names, None, 0, {k: v[name] for k, v in per_ood.items()}) for name in names]
    if P.save_scores_csv:
        columns = [f"score_{k}" for k in scores_wanted]
        rows, i = [], 0
        for set_name, item_names, item_labels, normal, scores in sets:
            for j, item in enumerate(item_names):
                rows.append({"index": i, "name": item, "set": set_name,
                             "label": "" if item_labels is None else int(item_labels[j]), "normal": normal,
                             **{f"score_{k}": f"{scores[k][j]:.6f}" for k in scores_wanted}})
                i += 1
        atomic_write_csv(rows, ["index", "name", "set", "label", "normal"] + columns, P.save_scores_csv)
    if P.save_score:
        set_index = np.concatenate([np.full(len(item_names), k) for k, (_, item_names, *_) in enumerate(sets)])
        arrays = {k: np.concatenate([scores[k] for *_, scores in sets]) for k in scores_wanted}
        atomic_write(save_score_path(P), lambda fh: np.savez(fh, labels=set_index,
                                                             sets=np.array([name for name, *_ in sets]), **arrays))
    if P.save_results:  # last: a results file means every output was written
        atomic_write_json(results, P.save_results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
