"""Top-k accuracy from class scores: the one number format every evaluation reports."""
from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Percent of rows whose true label is among the k highest scores, for each k.

    k is clipped to the number of classes (top-5 of a 3-class problem is top-3, i.e. 100 %),
    so the keys stay `top1`/`top5` whatever the dataset.
    """
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} do not match")
    labels = labels.to(scores.device).long()
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        top = scores.topk(kk, dim=1).indices
        hits = int((top == labels[:, None]).any(dim=1).sum())
        out[f"top{k}"] = 100.0 * hits / len(labels) if len(labels) else float("nan")
    return out
