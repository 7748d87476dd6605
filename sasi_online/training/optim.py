"""Optimizers from the method's parameter groups: SGD, LARS, AdamW.

The base learning rate is given per 256 images and scaled by the global batch (Goyal et
al.); groups that carry their own "lr" keep it unscaled (see ssl/methods/base.py).
"""
from __future__ import annotations

import torch

from sasi_online.errors import UserInputError

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    Each parameter's update is scaled by trust = eta * ||w|| / (||g|| + wd * ||w||).
    Groups with `lars_exclude=True` (biases, norms — as BYOL/SimCLR do) skip both the
    adaptation and, when their weight_decay is 0, the decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"LARS lr must be positive, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                wd = group["weight_decay"]
                if wd:
                    g = g.add(p, alpha=wd)
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(p.grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return base_lr * global_batch / 256.0


def build_optimizer(cfg_optim, param_groups: list[dict], global_batch: int) -> torch.optim.Optimizer:
    """A torch optimizer (DeepSpeed gets it passed in: no FusedAdam build)."""
    if cfg_optim.name not in OPTIMIZERS:
        raise UserInputError(f"optim.name '{cfg_optim.name}' is not one of {', '.join(OPTIMIZERS)}")
    if cfg_optim.lr <= 0:
        raise UserInputError(f"optim.lr must be positive, got {cfg_optim.lr}")
    lr = scaled_lr(cfg_optim.lr, global_batch)
    groups = []
    for g in param_groups:
        g = dict(g)
        if not g["params"]:
            continue
        g["base_lr"] = g.get("lr", lr)  # the schedule multiplies this
        g["lr"] = g["base_lr"]
        g.setdefault("weight_decay", cfg_optim.weight_decay)
        g.setdefault("fixed_lr", False)
        if cfg_optim.name != "lars":
            g.pop("lars_exclude", None)
        groups.append(g)
    if cfg_optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg_optim.momentum,
                               weight_decay=cfg_optim.weight_decay)
    if cfg_optim.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg_optim.momentum, weight_decay=cfg_optim.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg_optim.weight_decay)
