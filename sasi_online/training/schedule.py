"""Learning-rate schedule: linear warm-up then cosine decay to `min_lr` (a fraction of
each group's base rate), stepped once per optimizer step; optionally a cosine weight-decay
schedule from `weight_decay` to `weight_decay_end` on the decayed groups (DINO's).

Warm-up comes as `optim.warmup_steps` (when set) or `optim.warmup_epochs` x the run's
steps per epoch; `min_lr` is per 256 images like `lr`, so its ratio to `lr` holds at any batch.
"""
from __future__ import annotations

import math

import torch


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_value(start: float, end: float, step: int, total_steps: int) -> float:
    """`start` at step 0 to `end` at the last step along a half cosine (DINO's schedules)."""
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_of(cfg_optim, steps_per_epoch: int) -> int:
    if cfg_optim.warmup_steps is not None:
        return int(cfg_optim.warmup_steps)
    return int(round(float(cfg_optim.warmup_epochs or 0.0) * max(int(steps_per_epoch), 1)))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR (its state_dict is plain numbers: safe to checkpoint) that also moves the
    weight decay of the groups that decay along a cosine when `wd_end` is set."""

    def __init__(self, optimizer, lambdas, total_steps: int, wd_end=None):
        self.total_steps, self.wd_end = total_steps, wd_end
        super().__init__(optimizer, lambdas)

    def step(self, epoch=None):
        super().step(epoch)
        if self.wd_end is None:
            return
        for g in self.optimizer.param_groups:
            base = g.get("base_weight_decay", 0.0)
            if base:  # biases/norms (0) stay undecayed
                g["weight_decay"] = cosine_value(base, float(self.wd_end), self.last_epoch, self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg_optim, total_steps: int, steps_per_epoch: int = 1):
    """The scheduler for `optimizer`; `steps_per_epoch` converts epoch-valued settings."""
    ratio = 0.0
    if cfg_optim.min_lr and cfg_optim.lr:
        ratio = min(float(cfg_optim.min_lr) / float(cfg_optim.lr), 1.0)
    warm = warmup_steps_of(cfg_optim, steps_per_epoch)

    def make(group):
        if group.get("fixed_lr"):
            return lambda step: 1.0
        return lambda step: cosine_with_warmup(step, total_steps, warm, ratio)

    wd_end = getattr(cfg_optim, "weight_decay_end", None)
    if wd_end is not None and cfg_optim.weight_decay is not None and float(wd_end) == float(cfg_optim.weight_decay):
        wd_end = None  # constant
    return WarmupCosine(optimizer, [make(g) for g in optimizer.param_groups], total_steps, wd_end)
