"""The simple scores of ``--mode ood``: ``baseline``, ``clean_norm`` and ``similar``."""
import torch
import torch.nn.functional as F

from common.device import dataset_images
from models.transform_layers import simclr_augmentation
from utils import autocast_for, batch_indices


@torch.no_grad()
def simple_scores(model, dataset, score, device, layer="simclr", batch_size=100,
                  resize_factor=0.54, resize_fix=True, amp=False, seed=0):
    """Per-image scores, higher = more normal.

    ``baseline``: largest softmax probability of the linear head on the clean image;
    ``clean_norm``: norm of the chosen layer's output on the clean image;
    ``similar``: cosine similarity of the clean image's feature to the mean feature of two
    augmented copies. ``amp``: the precision of the forward passes (``'bf16'``, ``'fp16'``,
    ``'fp32'``; ``True``/``False``: bf16/fp32).
    """
    was_training = model.training
    model.eval()
    aug = simclr_augmentation(resize_factor, resize_fix)
    out = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for idx in batch_indices(len(dataset), batch_size):
            x = dataset_images(dataset, idx, device)
            with autocast_for(device, amp):
                logits, aux = model(x, penultimate=True, simclr=True, shift=True)
            if score == "baseline":
                s = F.softmax(logits.float(), dim=1).max(dim=1).values
            elif score == "clean_norm":
                s = aux[layer].float().norm(dim=1)
            elif score == "similar":
                with autocast_for(device, amp):
                    _, a1 = model(aug(x), penultimate=True, simclr=True, shift=True)
                    _, a2 = model(aug(x), penultimate=True, simclr=True, shift=True)
                mean_aug = (F.normalize(a1[layer].float(), dim=1) + F.normalize(a2[layer].float(), dim=1)) / 2
                s = F.cosine_similarity(aux[layer].float(), mean_aug, dim=1)
            else:
                raise ValueError(f"unknown --mode ood score {score!r}")
            out.append(s.cpu())
    model.train(was_training)
    return torch.cat(out)
