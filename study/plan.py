"""The plan of a study: one Run per dataset, class, transformation, resolution and seed, in table order."""
import json
import os

from common.errors import UserError
from common.paths import check_run_folder
from datasets import get_dataset, load_ood_sets
from datasets.fingerprint import check_outside_data, data_fingerprint, data_tree
from datasets.normal_class import choose_normal_class
from datasets.registry import is_folder_dataset
from datasets.ood import check_ood_names, default_ood_names
from diffusion_models.ddpm import ddpm_config
from study.rerun import attach_data, check_reruns, recorded_config  # noqa: F401 (recorded_config re-exported)


def uses_resolution(transformation, a):
    """Whether the transformation depends on the dissolving resolution."""
    kind = transformation.split("_")[0] if "_" in transformation else None
    return kind == "diffusion" or (kind is not None and a.resize_to_constant)


class Run:
    """One training + evaluation: dataset, class, transformation, resolution, seed."""

    def __init__(self, a, dataset, info, cls, transformation, resolution, seed, model, img_size=None):
        self.dataset, self.cls, self.transformation = dataset, cls, transformation
        self.img_size = img_size  # train.py's and eval.py's --img_size (None: the dataset's own size)
        self.resolution, self.seed, self.model = resolution, seed, model
        self.info, self.out = info, a.out
        self.dissolve_type = transformation.split("_")[0] if "_" in transformation else None
        self.multi = cls is None  # CSI's unlabeled multi-class setting
        setting = "multi_class" if self.multi else f"class_{cls}"
        self.dir = os.path.join(a.out, dataset, setting, f"{transformation}_{resolution}px", f"seed_{seed}")
        # the out-of-distribution sets eval.py scores (the columns of the multi-class table)
        self.ood_names = ood_names_of(a, dataset) if self.multi else []
        self.dissolver = dissolver_spec(a, dataset, cls, resolution) if self.dissolve_type == "diffusion" else None
        self.config = {
            "dataset": dataset, "one_class_idx": cls, "transformation": transformation, "resolution": resolution,
            "seed": seed, "model": model, "train": train_budget(a), "eval": {"ood_samples": a.ood_samples,
                                                                            "amp": a.amp},
            "selection": selection_budget(a),
            "dissolver": self.dissolver["name"] if self.dissolver else None,
            "resize_to_constant": bool(a.resize_to_constant) if self.dissolve_type else None,
        }
        if self.multi:  # only then: the settings of earlier (one-class) runs stay as they were recorded
            self.config["ood_dataset"] = a.ood_dataset
        if img_size is not None:  # likewise
            self.config["img_size"] = img_size
        self.status, self.error, self.reused = "pending", "", False
        self.results, self.train_seconds, self.eval_seconds, self.gmacs = None, None, None, None
        self.removal = None  # the dissolver's lesion removal ratio (synthetic lesions only)
        self.best = None  # results["best"]: best_CSI.model's epoch, AUROCs and what selected it
        self.notes = []
        self.log = None

    @property
    def label(self):
        cls = class_text(self.cls) + ("" if self.multi else f" ({self.info.class_names[self.cls]})")
        return f"{self.dataset} {cls} {self.transformation} {self.resolution}px seed {self.seed}"

    def path(self, name):
        return os.path.join(self.dir, name)


def class_text(cls):
    return "multi-class" if cls is None else f"class {cls}"


def ood_names_of(a, dataset):
    """The out-of-distribution sets eval.py scores for ``dataset`` (``--ood_dataset`` or CSI's)."""
    return list(a.ood_dataset) if a.ood_dataset else list(default_ood_names(dataset, "eval"))


def classes_of(a, dataset, info):
    """The normal classes planned for ``dataset`` (None: multi-class): ``--one_class_idx``, or
    ``--normal_class``'s names; neither: multi-class where there are out-of-distribution sets,
    else the class ``datasets.normal_class``'s rules choose (a folder dataset's good/normal or
    only training folder; class 0 for the others)."""
    if a.one_class_idx is not None:
        return list(a.one_class_idx)
    folder = is_folder_dataset(dataset)
    if getattr(a, "normal_class", None):
        return [choose_normal_class(dataset, info.class_names, info.train_classes, normal_class=name,
                                    folder_dataset=folder) for name in a.normal_class]
    if a.ood_dataset or default_ood_names(dataset, "eval"):
        return [None]
    return [choose_normal_class(dataset, info.class_names, info.train_classes, folder_dataset=folder)]


def image_size_of(a, dataset):
    """The side ``dataset``'s images are read at (None: the dataset's own): ``--img_size``, else
    ``--preset quick``'s size for folder datasets."""
    if a.img_size is not None:
        return a.img_size
    return getattr(a, "folder_img_size", None) if is_folder_dataset(dataset) else None


def train_budget(a):
    budget = {k: getattr(a, k) for k in ("epochs", "batch_size", "max_batches_per_epoch", "max_steps", "warmup",
                                         "resnet_width")}
    budget.update(amp=a.amp, extra=list(a.train_args))
    if getattr(a, "nproc_per_run", 1) > 1:  # only then: the settings of earlier runs stay as they were recorded
        budget["nproc_per_run"] = a.nproc_per_run  # a global batch of nproc_per_run x batch_size
    return budget


def selection_budget(a):
    """train.py's evaluation during training (None: off), part of a run's settings."""
    if not a.selection:
        return None
    return {"every": a.save_step, "samples": a.selection_samples, "max_images": a.selection_max_images}


def dissolver_spec(a, dataset, cls, resolution):
    which = "all" if cls is None else f"class{cls}"  # None: trained on every class (--all_classes)
    name = (f"{dataset}_{which}_{resolution}px_unet{a.ddpm_unet_dim}_s{a.ddpm_train_steps}"
            f"_b{a.ddpm_batch_size}x{a.ddpm_grad_accum}")
    folder = os.path.join(a.out, "dissolvers")
    return {"name": name, "dataset": dataset, "cls": cls, "resolution": resolution,
            "ckpt": os.path.join(folder, name + ".pt"), "done": os.path.join(folder, name + ".json"),
            "log": os.path.join(folder, name + ".train.log"), "grid": os.path.join(folder, name + "_dissolving.png"),
            "grid_log": os.path.join(folder, name + ".grid.log")}


def default_model(info):
    return "resnet18" if info.image_size[0] <= 64 else "resnet18_imagenet"


def make_plan(a):
    """Check the datasets (through ``datasets.get_dataset``) and list the runs in table order."""
    check_run_folder(a.out, "--out")  # writable, no file, no link to nothing (nothing is created here)
    runs = []
    for dataset in a.dataset:
        img_size = image_size_of(a, dataset)
        # a bad name or bad files: UserError
        train_set, test_set, info = get_dataset(dataset, a.data_root, image_size=img_size,
                                                aptos_all_grades=a.aptos_all_grades)
        # the study's outputs never land among the dataset's files (later runs would read them as images)
        check_outside_data([("--out", a.out)], data_tree(train_set, test_set), dataset)
        data = data_fingerprint(dataset, train_set, test_set, info)
        first = len(runs)
        classes = classes_of(a, dataset, info)
        if None in classes:  # multi-class: the out-of-distribution sets are read now, as the dataset is

            names = check_ood_names(ood_names_of(a, dataset), dataset)
            if not names:
                raise UserError(f"the multi-class setting scores out-of-distribution sets and {dataset} has no "
                                f"default ones: name them with --ood_dataset NAME ...")
            load_ood_sets(names, a.data_root, info)
        bad = [c for c in classes if c is not None and not 0 <= c < info.n_classes]
        if bad:
            names = ", ".join(f"{i}={n}" for i, n in enumerate(info.class_names))
            raise UserError(f"--one_class_idx {' '.join(map(str, bad))} is out of range for {dataset}: use "
                            f"0..{info.n_classes - 1} ({names})")
        model = a.model or default_model(info)
        native = info.image_size[0]
        for cls in classes:
            for transformation in a.shift_trans_type:
                resolutions = a.diff_resolution if uses_resolution(transformation, a) else [native]
                for res in resolutions:
                    for seed in a.seeds:
                        runs.append(Run(a, dataset, info, cls, transformation, res, seed, model, img_size))
        attach_data(runs[first:], data)
    if any(r.dissolver for r in runs):
        for res in a.diff_resolution:
            ddpm_config(image_size=res, unet_dim=a.ddpm_unet_dim)  # UserError for an impossible UNet
    check_reruns(runs)  # a run kept in --out is evaluated again, resumed, or the command refused
    check_dissolvers(runs)
    return runs


def check_dissolvers(runs):
    """A dissolver kept in ``--out/dissolvers`` was trained on this data (its record's digest),
    or the command is refused: runs on other data would dissolve with it."""
    for spec in {r.dissolver["name"]: r.dissolver for r in runs if r.dissolver}.values():
        try:
            with open(spec["done"]) as fh:
                trained_on = (json.load(fh) or {}).get("data")
        except (OSError, ValueError, AttributeError):
            continue
        if trained_on and spec.get("data") and trained_on != spec["data"]:
            raise UserError(f"the dissolver {spec['ckpt']} was trained on other data (fingerprint {trained_on}, the "
                            f"data now: {spec['data']}); use another --out for this data")


def column_key(r):
    return (r.transformation, r.resolution if r.dissolve_type else None)


def column_labels(runs):
    """Column of each (transformation, resolution): the transformation's name, plus the
    resolution when it was run at several."""
    keys = list(dict.fromkeys(column_key(r) for r in runs))
    counts = {}
    for t, _ in keys:
        counts[t] = counts.get(t, 0) + 1
    return {k: (f"{k[0]} @ {k[1]}px" if counts[k[0]] > 1 else k[0]) for k in keys}
