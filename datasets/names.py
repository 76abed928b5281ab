"""The names of the datasets the programs know."""

DATASET_NAMES = ("covid", "kvasir", "retina", "aptos", "breakhis", "chestxray",
                 "pneumoniamnist", "breastmnist", "chestmnist",
                 "cifar10", "cifar100", "imagefolder", "digits", "synth_lesion",
                 "synth_lesion_half", "synth_streak", "synth_streak_half")
# CSI's ImageNet-30 (its unlabeled multi-class benchmark; datasets/ood.py reads it)
EXTRA_DATASET_NAMES = ("imagenet",)
ALL_DATASET_NAMES = DATASET_NAMES + EXTRA_DATASET_NAMES
