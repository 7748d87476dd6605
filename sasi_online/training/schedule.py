"""Learning-rate schedule: linear warm-up then cosine decay to `min_lr` (a fraction of
each group's base rate), stepped once per optimizer step."""
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg_optim, total_steps: int):
    """A LambdaLR (its state_dict is plain numbers: safe to checkpoint). `min_lr` is
    absolute for the batch-scaled main rate and applied as the same ratio elsewhere."""
    main_lr = max(g["base_lr"] for g in optimizer.param_groups)
    ratio = min(cfg_optim.min_lr / main_lr, 1.0) if main_lr > 0 else 0.0

    def make(group):
        if group.get("fixed_lr"):
            return lambda step: 1.0
        return lambda step: cosine_with_warmup(step, total_steps, cfg_optim.warmup_steps, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [make(g) for g in optimizer.param_groups])
