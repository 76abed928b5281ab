"""Figures of a reproduction run (matplotlib's object-oriented API on the Agg canvas, PNG; pyplot's
global state is never touched).

Each function reads the files the programs write and draws one PNG, written atomically
(a temporary file in the same folder, then ``os.replace``)::

    plot_roc(scores_csv, out_png)            # eval.py --save_scores_csv: ROC of normal vs anomalous
    plot_score_hist(scores_csv, out_png)     # the same scores as two histograms
    plot_loss_curves(scalars_csv, out_png)   # train.py's scalars.csv: training losses over steps
    plot_roc_comparison(curves, out_png)     # several runs' ROC curves in one figure
    plot_selection(selection_json, out_png)  # train.py's test AUROC per evaluation and the selected epoch
    plot_dissolving_grid(rows, timesteps, n_normal, n_anomalous, out_png)  # eval_dissolver.py's grid, labelled

Scores follow eval.py: higher means more normal, and normal test images are the positives.
"""
import csv
import json
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils import atomic_write

LOSS_TAGS = ("loss", "loss_sim", "loss_shift", "loss_linear")
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
            "tab:gray", "tab:olive", "tab:cyan")


# --------------------------------------------------------------------------- files


def save_figure(fig, out_png, dpi=110):
    """Write ``fig`` to ``out_png`` atomically; returns the path."""
    out_png = os.fspath(out_png)
    FigureCanvasAgg(fig)
    atomic_write(out_png, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    return out_png


def read_scores(scores_csv, score=None):
    """``(scores, normal, labels, score_name)`` from an eval.py ``--save_scores_csv`` file.

    ``score`` picks a ``score_<name>`` column (default: the first one). ``normal`` is a bool
    array (True for images of the normal class), ``labels`` the class indices.
    """
    with open(scores_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c for c in (reader.fieldnames or []) if c.startswith("score_")]
        rows = list(reader)
    if not columns or "normal" not in (reader.fieldnames or []):
        raise ValueError(f"{scores_csv} is not a scores CSV of eval.py (needs columns normal and score_<name>)")
    name = f"score_{score}" if score else columns[0]
    if name not in columns:
        raise ValueError(f"{scores_csv} has no column {name} (has {', '.join(columns)})")
    scores = np.array([float(r[name]) for r in rows], dtype=np.float64)
    normal = np.array([int(r["normal"]) == 1 for r in rows], dtype=bool)
    labels = np.array([int(r["label"]) if r.get("label") not in (None, "") else (0 if n else 1)
                       for r, n in zip(rows, normal)], dtype=np.int64)
    return scores, normal, labels, name[len("score_"):]


def read_sets(scores_csv):
    """The ``set`` column of a multi-class scores CSV (the in-distribution dataset's name or an
    out-of-distribution set's), or None for a one-class CSV without it."""
    with open(scores_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        if "set" not in (reader.fieldnames or []):
            return None
        return np.array([r["set"] for r in reader], dtype=object)


def read_scalars(scalars_csv):
    """``{tag: (steps, values)}`` from train.py's ``scalars.csv`` (columns step,tag,value,time)."""
    series = {}
    with open(scalars_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                step, value = int(float(row["step"])), float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue
            series.setdefault(row["tag"], ([], []))
            series[row["tag"]][0].append(step)
            series[row["tag"]][1].append(value)
    out = {}
    for tag, (steps, values) in series.items():
        order = np.argsort(np.asarray(steps), kind="stable")
        out[tag] = (np.asarray(steps)[order], np.asarray(values)[order])
    return out


# --------------------------------------------------------------------------- ROC


def roc_points(scores, positive):
    """False and true positive rates of every threshold (scikit-learn's ``roc_curve``) and the AUROC."""
    from sklearn.metrics import roc_auc_score, roc_curve  # imported by the figures that need it (a second)

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("a ROC curve needs both normal and anomalous images")
    fpr, tpr, _ = roc_curve(positive.astype(int), scores)
    return fpr, tpr, float(roc_auc_score(positive.astype(int), scores))


def _roc_axes(ax, title):
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (anomalous images taken as normal)")
    ax.set_ylabel("true positive rate (normal images kept)")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def plot_roc(scores_csv, out_png, score=None, title=None):
    """ROC curve of one evaluation: normal images (positives) against all anomalous ones, and
    against each anomalous class separately when there are several. Returns the pooled AUROC."""
    scores, normal, labels, name = read_scores(scores_csv, score)
    fig = Figure(figsize=(5.2, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    fpr, tpr, auc = roc_points(scores, normal)
    ax.plot(fpr, tpr, color=_COLOURS[0], linewidth=2, label=f"pooled: AUROC {auc:.3f}")
    other = sorted(set(labels[~normal].tolist()))
    sets = read_sets(scores_csv)
    if sets is not None:  # multi-class: the in-distribution test set against each out-of-distribution set
        other = []
        for i, name in enumerate(dict.fromkeys(sets[~normal].tolist())):
            keep = normal | (sets == name)
            f, t, a = roc_points(scores[keep], normal[keep])
            ax.plot(f, t, color=_COLOURS[(i + 1) % len(_COLOURS)], linewidth=1, label=f"vs {name}: {a:.3f}")
    if len(other) > 1:
        normal_class = labels[normal][0]
        for i, c in enumerate(other):
            keep = normal | (labels == c)
            f, t, a = roc_points(scores[keep], normal[keep])
            ax.plot(f, t, color=_COLOURS[(i + 1) % len(_COLOURS)], linewidth=1,
                    label=f"class {normal_class} vs {c}: {a:.3f}")
    _roc_axes(ax, title or f"ROC ({name} score), {int(normal.sum())} normal / {int((~normal).sum())} anomalous")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
    return auc


def plot_roc_comparison(curves, out_png, title="ROC curves"):
    """Several evaluations in one figure.

    ``curves``: list of ``(label, [scores_csv, ...])``; each label gets one colour and one line
    per CSV (e.g. one per seed); the legend shows the mean AUROC of the label's CSVs.
    """
    fig = Figure(figsize=(5.8, 5.8))
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, (label, paths) in enumerate(curves):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [roc_points(*read_scores(path)[:2]) for path in paths]
        if not points:
            continue
        aucs = [auc for _, _, auc in points]
        text = f"{label}: {np.mean(aucs):.3f}"
        if len(aucs) > 1:
            text += f" ± {np.std(aucs):.3f} ({len(aucs)} runs)"
        for j, (fpr, tpr, _) in enumerate(points):
            ax.plot(fpr, tpr, color=colour, linewidth=1.6 if j == 0 else 0.8, alpha=1.0 if j == 0 else 0.6,
                    label=text if j == 0 else None)
            drawn += 1
    if not drawn:
        raise ValueError("plot_roc_comparison: no curve to draw")
    _roc_axes(ax, title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


# --------------------------------------------------------------------------- scores


def plot_score_hist(scores_csv, out_png, score=None, bins=40, title=None):
    """Histograms of the scores of normal and anomalous test images (densities, shared bins)."""
    scores, normal, _, name = read_scores(scores_csv, score)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    for mask, label, colour in ((normal, "normal", "tab:blue"), (~normal, "anomalous", "tab:red")):
        values = scores[mask & np.isfinite(scores)]
        if values.size:
            ax.hist(values, bins=edges, density=True, alpha=0.55, color=colour,
                    label=f"{label} (n={values.size}, median {np.median(values):.3f})")
    ax.set_xlabel(f"{name} score (higher = more normal)")
    ax.set_ylabel("density")
    ax.set_title(title or "scores of the test images", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


# --------------------------------------------------------------------------- losses


def plot_loss_curves(scalars_csv, out_png, title=None):
    """Training losses over steps: the per-step ``train/<loss>`` values (and the per-epoch means
    ``epoch/<loss>`` placed at the epoch's last step when they exist) of train.py's scalars.csv."""
    series = read_scalars(scalars_csv)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, tag in enumerate(LOSS_TAGS):
        colour = _COLOURS[i % len(_COLOURS)]
        if f"train/{tag}" in series:
            steps, values = series[f"train/{tag}"]
            ax.plot(steps, values, color=colour, linewidth=1.2, marker="o" if len(steps) < 20 else None,
                    markersize=3, label=tag)
            drawn += 1
    if not drawn:  # only per-epoch means were logged
        for i, tag in enumerate(LOSS_TAGS):
            if f"epoch/{tag}" in series:
                epochs, values = series[f"epoch/{tag}"]
                ax.plot(epochs, values, color=_COLOURS[i % len(_COLOURS)], marker="o", markersize=3,
                        label=f"{tag} (epoch mean)")
                drawn += 1
        ax.set_xlabel("epoch")
    else:
        ax.set_xlabel("step")
    if not drawn:
        ax.text(0.5, 0.5, "no loss values were logged", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
        finite = [v for tag in LOSS_TAGS for key in (f"train/{tag}", f"epoch/{tag}") if key in series
                  for v in series[key][1] if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
            ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title(title or "training losses", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_png)
    return out_png


# --------------------------------------------------------------------------- checkpoint selection


def plot_selection(selection_json, out_png, title=None):
    """train.py's evaluations during training (selection.json): the test AUROC that selects
    ``best_CSI.model`` per evaluated epoch, its pooled counterpart, the selected epoch and the
    epoch of last.model. Returns the selected epoch."""
    with open(selection_json) as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or "evaluations" not in doc:
        raise ValueError(f"{selection_json} is not a selection.json written by train.py")
    evals = doc["evaluations"]
    best = next((v for k, v in doc.items() if k.startswith("best_") and isinstance(v, dict)), None)
    if not evals or best is None:
        raise ValueError(f"{selection_json} records no evaluation during training")
    metric = best["metric"]
    pooled = metric.replace("_one_class_mean", "_pooled").replace("_ood_mean", "_pooled")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    epochs = [e["epoch"] for e in evals]
    marker = "o" if len(epochs) < 40 else None
    ax.plot(epochs, [e[metric] for e in evals], color=_COLOURS[0], marker=marker, markersize=3,
            label=f"{metric} (selects)")
    if pooled != metric and all(pooled in e for e in evals):
        ax.plot(epochs, [e[pooled] for e in evals], color=_COLOURS[1], marker=marker, markersize=3, alpha=0.7,
                label=pooled)
    ax.plot([best["epoch"]], [best["value"]], marker="*", markersize=14, color=_COLOURS[3], linestyle="none",
            label=f"best_CSI.model: epoch {best['epoch']} ({best['value']:.3f})")
    last = doc.get("last.model") or {}
    if last.get("epoch") is not None:
        ax.axvline(last["epoch"], color="gray", linestyle="--", linewidth=1, label=f"last.model: epoch {last['epoch']}")

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test AUROC during training")
    ax.set_title(title or "checkpoint selection on the test set (the paper's)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
    return best["epoch"]


# --------------------------------------------------------------------------- dissolving grid


def dissolving_grid_labels(timesteps, n_normal, n_anomalous):
    """The labels of a dissolving grid: one per row (``input``, then ``t = <t>`` per timestep) and
    one per group of columns, ``(first column, end column, label)``: the normal images, then the
    anomalous ones (a group without images is left out)."""
    rows = ["input"] + [f"t = {int(t)}" for t in timesteps]
    groups = [(0, n_normal, f"normal ({n_normal})"), (n_normal, n_normal + n_anomalous, f"anomalous ({n_anomalous})")]
    return rows, [g for g in groups if g[1] > g[0]]


def dissolving_grid_figure(rows, timesteps, n_normal, n_anomalous, title=None, pad=2, tile_px=96):
    """The dissolving grid as a figure: ``rows`` (``R x N x H x W x 3`` floats in [0, 1]: the
    inputs, then one row per timestep of ``timesteps``) drawn without smoothing, each tile about
    ``tile_px`` pixels wide, a label per row (:func:`dissolving_grid_labels`), the column groups
    named above the images (normal, anomalous) and a line between them."""
    rows = np.clip(np.asarray(rows, dtype=np.float32), 0.0, 1.0)
    if rows.ndim != 5 or rows.shape[-1] != 3 or rows.shape[0] != len(timesteps) + 1:
        raise ValueError(f"rows must be (1 + {len(timesteps)} timesteps) x N x H x W x 3, got {rows.shape}")
    n_rows, n_cols, h, w, _ = rows.shape
    if n_cols != n_normal + n_anomalous:
        raise ValueError(f"{n_cols} columns, but {n_normal} normal + {n_anomalous} anomalous images")
    mosaic = np.ones((pad + n_rows * (h + pad), pad + n_cols * (w + pad), 3), dtype=np.float32)
    for i in range(n_rows):
        for j in range(n_cols):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            mosaic[y:y + h, x:x + w] = rows[i, j]
    row_labels, groups = dissolving_grid_labels(timesteps, n_normal, n_anomalous)
    scale = max(1.0, tile_px / w)
    fig = Figure(figsize=(scale * mosaic.shape[1] / 100 + 1.2, scale * mosaic.shape[0] / 100 + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(n_rows)])
    ax.set_yticklabels(row_labels, fontsize=9)
    ax.set_xticks([pad + (first + end) * (w + pad) / 2 - pad / 2 for first, end, _ in groups])
    ax.set_xticklabels([label for _, _, label in groups], fontsize=10)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if len(groups) == 2:  # between the normal and the anomalous columns
        ax.axvline(groups[1][0] * (w + pad) + pad / 2, color="tab:red", linewidth=1.5)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title or "dissolving: one reverse step at each timestep t", fontsize=10)
    fig.tight_layout()
    return fig


def plot_dissolving_grid(rows, timesteps, n_normal, n_anomalous, out_png, title=None):
    """:func:`dissolving_grid_figure` written to ``out_png`` (atomically)."""
    return save_figure(dissolving_grid_figure(rows, timesteps, n_normal, n_anomalous, title=title), out_png, dpi=100)
