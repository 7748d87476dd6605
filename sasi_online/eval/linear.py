"""Linear probe on frozen features: standardised features, multinomial logistic regression.

The fit is full-batch L-BFGS (torch.optim.LBFGS with a strong-Wolfe line search) on an
L2-regularised cross-entropy. The problem is convex and starts from zero weights, so the
result does not depend on a seed or on batch order; the gradient is accumulated over
chunks so an ImageNet-size feature matrix fits on one device. The L2 strength is picked
from a small list on a seeded, class-balanced hold-out of the training features, then
the probe is refitted on all of them (the usual protocol: SimCLR, solo-learn).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sasi_online.eval.metrics import topk_accuracy


@dataclass
class Standardizer:
    """Per-dimension mean/std fitted on features that need no labels (the whole train split)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, feats: torch.Tensor, eps: float = 1e-6) -> "Standardizer":
        feats = feats.float()
        return cls(feats.mean(0), feats.std(0, unbiased=False).clamp_min(eps))

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.float().to(self.mean.device) - self.mean) / self.std


@dataclass
class LinearClassifier:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    weight_decay: float
    iterations: int

    def scores(self, feats: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        w, b = self.weight, self.bias
        return torch.cat([feats[i:i + chunk].to(w.device) @ w.T + b for i in range(0, len(feats), chunk)]) \
            if len(feats) else torch.zeros(0, len(b))


def fit_logistic(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 200, chunk: int = 65536) -> LinearClassifier:
    """Minimise mean CE + weight_decay/2 * ||W||² over (W, b) with full-batch L-BFGS.

    `feats` should already be standardised. Deterministic: zero init, no sampling.
    """
    if len(feats) == 0:
        raise ValueError("cannot fit a linear probe on zero labelled features")
    feats = feats.float()
    labels = labels.long().to(feats.device)
    weight = torch.zeros(num_classes, feats.shape[1], device=feats.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=feats.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    n = len(feats)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=feats.device)
        for i in range(0, n, chunk):
            part = F.cross_entropy(feats[i:i + chunk] @ weight.T + bias, labels[i:i + chunk],
                                   reduction="sum") / n
            part.backward()
            total += part.detach()
        reg = 0.5 * weight_decay * weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))  # L-BFGS keeps its state on the first param
    return LinearClassifier(weight.detach(), bias.detach(), weight_decay, iterations)


def select_weight_decay(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        candidates: list[float], seed: int, max_iter: int = 200,
                        holdout_fraction: float = 0.2) -> tuple[float, dict]:
    """Pick the L2 strength with the best top-1 on a class-balanced hold-out.

    Returns (weight_decay, {str(wd): holdout top-1}). With one candidate, or when some
    class has fewer than two examples (nothing to hold out), the middle candidate is used
    and the dict says why.
    """
    from sasi_online.eval.semi import balanced_subset
    from sasi_online.utils import derive_seed

    candidates = sorted(float(c) for c in candidates)
    if not candidates:
        raise ValueError("eval.linear_weight_decays is empty; give at least one value, e.g. [1e-3]")
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    present = counts[counts > 0]
    if len(candidates) == 1 or int(present.min()) < 2:
        return candidates[len(candidates) // 2], {"note": "no hold-out selection (one candidate or a class with < 2 examples)"}
    held = torch.as_tensor(balanced_subset(labels.cpu().numpy(), holdout_fraction, derive_seed("holdout", seed),
                                           min_per_class=1, max_fraction_per_class=0.5))
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    fit_x, fit_y = feats[mask.to(feats.device)], labels[mask.to(labels.device)]
    val_x, val_y = feats[held.to(feats.device)], labels[held.to(labels.device)]
    scores = {}
    for wd in candidates:
        clf = fit_logistic(fit_x, fit_y, num_classes, wd, max_iter=max_iter)
        scores[repr(wd)] = topk_accuracy(clf.scores(val_x), val_y, ks=(1,))["top1"]
    # Ties go to the stronger regulariser (more conservative).
    best = max(candidates, key=lambda wd: (scores[repr(wd)], wd))
    return best, scores


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, weight_decays: list[float],
                 seed: int = 0, max_iter: int = 200,
                 standardizer: Standardizer | None = None) -> dict:
    """Fit on (train_feats, train_labels), report top-1/top-5 on the test features (percent).

    `standardizer` defaults to one fitted on `train_feats`; semi-supervised evaluation
    passes one fitted on the whole (unlabelled) train split.
    """
    standardizer = standardizer or Standardizer.fit(train_feats)
    x_train, x_test = standardizer(train_feats), standardizer(test_feats)
    y_train = train_labels.long().to(x_train.device)
    wd, holdout = select_weight_decay(x_train, y_train, num_classes, weight_decays, seed, max_iter)
    clf = fit_logistic(x_train, y_train, num_classes, wd, max_iter=max_iter)
    return {**topk_accuracy(clf.scores(x_test), test_labels), "weight_decay": wd,
            "holdout_top1": holdout, "iterations": clf.iterations, "train_size": len(train_feats)}
