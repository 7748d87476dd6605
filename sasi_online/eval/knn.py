"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / MoCo style).

Each test feature votes with its k most cosine-similar training features; a neighbour's
vote for its class weighs exp(similarity / T). k=200, T=0.07 are the usual values
(Wu et al. 2018; MoCo's monitor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sasi_online.eval.metrics import topk_accuracy


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 200, t: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024, center: bool = False) -> torch.Tensor:
    """Class scores [N_test, C] of the weighted kNN vote.

    Features are L2-normalised here, so callers may pass raw backbone outputs. `center`:
    subtract the bank's mean feature first (post-ReLU features share a large common
    component that makes every cosine near 1 and the vote nearly uniform). Test rows
    are processed in chunks so an ImageNet-size bank fits in memory.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"kNN needs 2-D features of one width, got train {tuple(train_feats.shape)} "
                         f"and test {tuple(test_feats.shape)}")
    if len(train_feats) != len(train_labels):
        raise ValueError(f"{len(train_feats)} training features but {len(train_labels)} labels")
    if k < 1 or t <= 0:
        raise ValueError(f"kNN needs k >= 1 and T > 0 (eval.knn_k, eval.knn_t), got k={k}, T={t}")
    train_labels = train_labels.long().to(train_feats.device)
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, len(train_feats))
    mean = train_feats.float().mean(0, keepdim=True) if center else None
    bank = F.normalize(train_feats.float() - mean if center else train_feats.float(), dim=1)
    scores = []
    for start in range(0, len(test_feats), chunk):
        query = test_feats[start:start + chunk].float().to(bank.device)
        query = F.normalize(query - mean if center else query, dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        weights = (sim / t).exp()
        votes = torch.zeros(len(query), num_classes, device=bank.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes)
    return torch.cat(scores)


def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, t: float = 0.07,
                 num_classes: int | None = None, center: bool = False) -> dict:
    """{"top1", "top5", "k", "t", "center"}: accuracies in percent."""
    num_classes = num_classes or int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k=k, t=t, num_classes=num_classes, center=center)
    return {**topk_accuracy(scores, test_labels), "k": min(k, len(train_feats)), "t": t, "center": center}
