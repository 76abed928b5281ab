"""The results tables: results.csv (one row per run) and results.md (the paper's tables, the runs, the budget)."""
import os

import numpy as np

from study.dissolvers import DISSOLVER_TABLE_NOTE, dissolver_notes, dissolver_table
from study.plan import column_key, column_labels, train_budget
from study.runs import BEST_FILE, BEST_LABEL
from study.text import fmt, md_escape, num, rel
from utils import atomic_write_csv, atomic_write_text

CSV_FIELDS = ["dataset", "one_class_idx", "transformation", "resolution", "seed", "status", "auroc_pooled",
              "auroc_one_class_mean", "auroc_per_class", "auroc_pooled_best", "auroc_one_class_mean_best",
              "best_epoch", "last_epoch", "best_selection_auroc", "train_seconds", "eval_seconds", "dissolver_gmacs",
              "model", "reused", "run_dir", "error", "auroc_ood_mean", "auroc_per_ood", "auroc_ood_mean_best",
              "dissolver_removal_ratio"]
# auroc_*: last.model (the honest figure); auroc_*_best: best_CSI.model, the best on test (the paper's
# selection), both by eval.py; best_selection_auroc: the test AUROC during training that selected it;
# multi-class runs (one_class_idx None): auroc_ood_mean, auroc_per_ood (<set>:<AUROC>;...), auroc_ood_mean_best;
# dissolver_removal_ratio: the run's dissolver's lesion removal ratio averaged over t = 30..100 of its grid
# (synthetic lesions only)


def csv_row(a, r):
    auroc = (r.results or {}).get("auroc", {})
    per_class = ";".join(f"{k[len('one_class_'):]}:{v:.6g}" for k, v in auroc.items()
                         if k.startswith("one_class_") and k != "one_class_mean")
    best = r.best or {}
    order = (r.results or {}).get("ood_dataset") or [k for k in auroc if k != "ood_mean"]  # eval.py's order
    per_ood = ";".join(f"{k}:{auroc[k]:.6g}" for k in order if k in auroc) if r.multi else ""
    return {"dataset": r.dataset, "one_class_idx": "None" if r.multi else r.cls, "transformation": r.transformation,
            "resolution": r.resolution, "seed": r.seed, "status": r.status,
            "auroc_pooled": num(auroc.get("pooled")), "auroc_one_class_mean": num(auroc.get("one_class_mean")),
            "auroc_per_class": per_class,
            "auroc_pooled_best": num(best.get("auroc", {}).get("pooled")),
            "auroc_one_class_mean_best": num(best.get("auroc", {}).get("one_class_mean")),
            "best_epoch": best.get("epoch", ""), "last_epoch": best.get("last_epoch", ""),
            "best_selection_auroc": num(best.get("selected_on", {}).get("value")),
            "train_seconds": "" if r.train_seconds is None else r.train_seconds,
            "eval_seconds": "" if r.eval_seconds is None else r.eval_seconds,
            "dissolver_gmacs": "" if r.gmacs is None else r.gmacs, "model": r.model, "reused": int(r.reused),
            "run_dir": rel(r.dir, a.out), "error": r.error,
            "auroc_ood_mean": num(auroc.get("ood_mean")) if r.multi else "", "auroc_per_ood": per_ood,
            "auroc_ood_mean_best": num(best.get("auroc", {}).get("ood_mean")) if r.multi else "",
            "dissolver_removal_ratio": "" if r.removal is None else round(r.removal, 4)}


def pooled_auroc(r, which="last", key="pooled"):
    """eval.py's pooled AUROC (or its ``key``) of a finished run's last.model or best_CSI.model
    (None: none)."""
    if r.status != "ok":
        return None
    auroc = r.results["auroc"] if which == "last" else (r.best or {}).get("auroc", {})
    return auroc.get(key)


def headline_auroc(r, which="last"):
    """The AUROC a run is summed up by: pooled (one-class), the mean over the
    out-of-distribution sets (multi-class)."""
    return pooled_auroc(r, which, "ood_mean" if r.multi else "pooled")


def summary_cell(group, which="last", key="pooled"):
    """``mean ± std (n)`` of the pooled AUROC, or of ``key`` (std: numpy's, over the seeds that finished)."""
    ok = [float(v) for v in (pooled_auroc(r, which, key) for r in group) if v is not None]
    failed = [r for r in group if r.status == "failed"]
    if not ok:
        if failed:
            return "failed: " + md_escape(failed[0].error, 160, first_clause=True)
        return "—"
    cell = f"{np.mean(ok):.3f} ± {np.std(ok):.3f} ({len(ok)})"
    if failed:
        cell += f"; {len(failed)} failed: " + md_escape(failed[0].error, 120, first_clause=True)
    return cell


def summary_table(runs, which="last"):
    """The "Different transformations" table of ``last.model`` or (``which="best"``) of
    ``best_CSI.model``: rows dataset (and class), columns transformations. One-class runs only."""
    runs = [r for r in runs if not r.multi]
    labels = column_labels(runs)
    classes = {r.cls for r in runs}
    rows = list(dict.fromkeys((r.dataset, r.cls) for r in runs))
    lines = ["| Dataset | " + " | ".join(labels.values()) + " |",
             "|---|" + "---|" * len(labels)]
    for dataset, cls in rows:
        name = dataset + (f" (class {cls})" if len(classes) > 1 else "")
        cells = [summary_cell([r for r in runs if (r.dataset, r.cls) == (dataset, cls) and column_key(r) == key],
                              which) for key in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_class_table(runs, which="last"):
    """CSI's unlabeled multi-class table of ``last.model`` or (``which="best"``) ``best_CSI.model``:
    one row per dataset and transformation, one column per out-of-distribution set, then their
    mean; cells mean ± std (n) over seeds."""
    runs = [r for r in runs if r.multi]
    labels = column_labels(runs)
    names = list(dict.fromkeys(n for r in runs for n in r.ood_names))
    lines = ["| Dataset | Transformation | " + " | ".join(names + ["mean"]) + " |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for dataset in dict.fromkeys(r.dataset for r in runs):
        for key, label in labels.items():
            group = [r for r in runs if r.dataset == dataset and column_key(r) == key]
            if group:
                cells = [summary_cell(group, which, name) for name in names + ["ood_mean"]]
                lines.append(f"| {dataset} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_class_runs_table(runs):
    """One row per multi-class run: its AUROC per out-of-distribution set and their mean (and its
    dissolver's MACs when a run of the study dissolves with one)."""
    gmacs = uses_dissolver(runs)
    runs = [r for r in runs if r.multi]
    names = list(dict.fromkeys(n for r in runs for n in r.ood_names))
    lines = ["| dataset | transformation | res | seed | " + " | ".join(names) + " | mean (last) | "
             "mean (best on test) | best epoch / last | train s | eval s | "
             + ("dissolver GMACs | " if gmacs else "") + "status |",
             "|---|---|---|---|" + "---|" * (len(names) + 6 + gmacs)]
    for r in runs:
        auroc = (r.results or {}).get("auroc", {})
        best = r.best or {}
        epochs = f"{best['epoch']} / {best['last_epoch']}" if best else ""
        lines.append(f"| {r.dataset} | {r.transformation} | {r.resolution} | {r.seed} | "
                     + " | ".join(fmt(auroc.get(n)) for n in names)
                     + f" | {fmt(auroc.get('ood_mean'))} | {fmt(best.get('auroc', {}).get('ood_mean'))} | {epochs} | "
                       f"{fmt(r.train_seconds, 1)} | {fmt(r.eval_seconds, 1)} | "
                     + (f"{fmt(r.gmacs, 3)} | " if gmacs else "") + f"{run_status(r)} |")
    return "\n".join(lines)


def uses_dissolver(runs):
    """Whether a run of the study dissolves with a trained dissolver (a diffusion_* transformation)."""
    return any(r.dissolver for r in runs)


def run_status(r):
    if r.status == "ok":
        status = "ok (reused)" if r.reused else "ok"
        if r.notes:
            status += "; " + md_escape("; ".join(r.notes), 200)
        return status
    return r.status if r.status != "failed" else "failed: " + md_escape(r.error, 300)


def runs_table(a, runs):
    gmacs = uses_dissolver(runs)  # the column only where a dissolver was used
    lines = ["| dataset | class | transformation | res | seed | AUROC pooled (last) | AUROC class mean (last) | "
             "AUROC pooled (best on test) | best epoch / last | train s | eval s | "
             + ("dissolver GMACs | " if gmacs else "") + "status |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gmacs else "") + "---|"]
    for r in runs:
        if r.multi:
            continue  # multi_class_runs_table
        auroc = (r.results or {}).get("auroc", {})
        status = run_status(r)
        best = r.best or {}
        epochs = f"{best['epoch']} / {best['last_epoch']}" if best else ""
        lines.append(f"| {r.dataset} | {r.cls} | {r.transformation} | {r.resolution} | {r.seed} | "
                     f"{fmt(auroc.get('pooled'))} | {fmt(auroc.get('one_class_mean'))} | "
                     f"{fmt(best.get('auroc', {}).get('pooled'))} | {epochs} | {fmt(r.train_seconds, 1)} | "
                     f"{fmt(r.eval_seconds, 1)} | " + (f"{fmt(r.gmacs, 3)} | " if gmacs else "") + f"{status} |")
    return "\n".join(lines)


def write_tables(a, runs, command):
    done = [r for r in runs if r.status != "pending"]
    atomic_write_csv([csv_row(a, r) for r in done], CSV_FIELDS, os.path.join(a.out, "results.csv"))
    budget = train_budget(a)
    text = [
        f"# DIA reproduction: {', '.join(a.dataset)}",
        "",
        f"Command: `{command}`",
        "",
    ]
    if any(not r.multi for r in runs):
        text += one_class_sections(a, runs)
    if any(r.multi for r in runs):
        text += multi_class_sections(a, runs)
    dissolvers = dissolver_table(runs)
    if dissolvers:
        text += ["## Dissolvers: what they dissolve", "", DISSOLVER_TABLE_NOTE, "", dissolvers, "",
                 *dissolver_notes(runs), ""]
    dissolving = uses_dissolver(runs)
    text += [
        "## Budget",
        "",
        f"- train.py: model {', '.join(sorted({r.model for r in runs}))}, "
        + ", ".join((k if v is True else f"{k} {v}") for k, v in budget.items() if v not in (None, [], False)),
        f"- eval.py: ood_samples {a.ood_samples}, resize_factor 0.54 (fixed)",
        (f"- checkpoint selection (train.py's evaluation during training, as the paper's): every {a.save_step} "
         f"epoch(s), CSI score, {a.selection_samples} sample(s), crop scale in [0.54, 1], "
         + (f"at most {a.selection_max_images}" if a.selection_max_images else "all")
         + " normal training and test images" if a.selection else "- checkpoint selection: off (--no_selection)"),
        *([f"- dissolver: Unet(dim={a.ddpm_unet_dim}), {a.ddpm_train_steps} optimiser steps of {a.ddpm_grad_accum} x "
           f"{a.ddpm_batch_size} images (the paper's: 156,250 of 2 x 256, dim 64)"] if dissolving else []),
        "- std: numpy's (population) standard deviation over the seeds"
        + ("; MACs: one dissolving call on one image (thop's default count, as benchmarks/dissolver_macs.py)."
           if dissolving else "."),
        "- figures per run: roc.png, score_hist.png (last.model), loss_curves.png, selection.png (test AUROC during "
        "training and the selected epoch)"
        + (", dissolving.png (diffusion_*: the dissolver's grid)" if dissolving else "")
        + "; per dataset and class: <dataset>_class<i>_roc.png (multi-class: <dataset>_multi_class_roc.png)",
        "",
    ]
    atomic_write_text("\n".join(text), os.path.join(a.out, "results.md"))


def one_class_sections(a, runs):
    """results.md's one-class part: the paper's "Different transformations" tables and the runs."""
    return [
        "## Different transformations",
        "",
        "Pooled AUROC (normal test images against all others; eval.py --mode ood_pre --ood_score CSI, rotation), "
        "mean ± std over seeds (number of finished runs), of two checkpoints of each run.",
        "",
        "### last.model: the model at the end of training (the honest figure)",
        "",
        summary_table(runs),
        "",
        f"### {BEST_FILE}: {BEST_LABEL}",
        "",
        *(["The checkpoint whose test AUROC during training (CSI score, mean over the anomalous classes) was "
           "highest: chosen on the test set itself, so an optimistic figure. The paper's train.py keeps this "
           "file; which file its tables report is not said. Same evaluation as above; the AUROC that selected it "
           "(train.py's evaluation, budget below) is results.csv's best_selection_auroc.",
           "",
           summary_table(runs, "best")] if a.selection else ["Not computed (--no_selection)."]),
        "",
        "## Runs",
        "",
        runs_table(a, runs),
        "",
    ]


def multi_class_sections(a, runs):
    """results.md's multi-class part: CSI's table (a column per out-of-distribution set) and the runs."""
    return [
        "## Unlabeled multi-class (CSI)",
        "",
        "AUROC of the in-distribution test set (every class normal) against each out-of-distribution set, and "
        "their mean (eval.py --mode ood_pre --ood_score CSI, rotation; CSI's layout), mean ± std over seeds "
        "(number of finished runs).",
        "",
        "### last.model: the model at the end of training (the honest figure)",
        "",
        multi_class_table(runs),
        "",
        f"### {BEST_FILE}: {BEST_LABEL}",
        "",
        *(["Chosen during training by the highest mean AUROC over the out-of-distribution sets of train.py's "
           "evaluation, on the test sets themselves: an optimistic figure.",
           "",
           multi_class_table(runs, "best")] if a.selection else ["Not computed (--no_selection)."]),
        "",
        "## Runs (multi-class)",
        "",
        multi_class_runs_table(runs),
        "",
    ]
