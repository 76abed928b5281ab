"""The figures: each run's (ROC, score histograms, loss curves, selection, dissolving grid) and the ROC comparisons."""
import os

from evals import plots
from study.plan import class_text, column_key, column_labels
from utils import atomic_write, warn


def draw_run_figures(run, dissolver):
    """The run's figures; a figure that cannot be drawn is a note, not a failure."""
    title = f"{run.dataset} {class_text(run.cls)}, {run.transformation} {run.resolution}px, seed {run.seed}"
    jobs = [("roc.png", plots.plot_roc, "scores.csv"), ("score_hist.png", plots.plot_score_hist, "scores.csv"),
            ("loss_curves.png", plots.plot_loss_curves, "scalars.csv")]
    if run.best is not None:  # train.py evaluated during training and kept best_CSI.model
        jobs.append(("selection.png", plots.plot_selection, "selection.json"))
    for out, fn, src in jobs:
        if os.path.exists(run.path(out)):
            continue
        try:
            fn(run.path(src), run.path(out), title=title)
        except Exception as exc:  # noqa: BLE001
            run.notes.append(f"{out} not drawn: {type(exc).__name__}: {exc}")
    if dissolver is not None and not os.path.exists(run.path("dissolving.png")):
        grid = run.dissolver["grid"]
        if os.path.exists(grid):  # eval_dissolver.py's grid, labelled (timestep per row, normal and anomalous columns)
            with open(grid, "rb") as fh:
                data = fh.read()
            atomic_write(run.path("dissolving.png"), lambda out: out.write(data))
        else:
            run.notes.append("dissolving.png missing: " + dissolver.get("grid_error", "grid not drawn"))


def draw_comparisons(a, runs):
    """``<out>/<dataset>_class<i>_roc.png``: the ROC curves of every transformation."""
    written = []
    groups = {}
    for r in runs:
        if r.status == "ok" and os.path.exists(r.path("scores.csv")):
            groups.setdefault((r.dataset, r.cls), {}).setdefault(column_key(r), []).append(r.path("scores.csv"))
    labels = column_labels(runs)
    for (dataset, cls), by_col in groups.items():
        which = "multi_class" if cls is None else f"class{cls}"
        out = os.path.join(a.out, f"{dataset}_{which}_roc.png")
        what = ("multi-class, in-distribution test set against every out-of-distribution set" if cls is None
                else f"normal class {cls}")
        try:
            plots.plot_roc_comparison([(labels[k], v) for k, v in by_col.items()], out,
                                      title=f"{dataset}, {what}: ROC per transformation")
            written.append(out)
        except Exception as exc:  # noqa: BLE001

            warn(f"{out} not drawn: {type(exc).__name__}: {exc}")
    return written
