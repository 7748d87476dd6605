"""The samplers the generator offers, built fresh per batch from the family's config.

Multistep solvers keep state (previous model outputs, step index), so every batch gets
its own instance. The prediction type (epsilon / v_prediction) comes from the family's
scheduler config, so every sampler handles both.
"""
from __future__ import annotations

from typing import Any

from sasi_online.errors import UserInputError

SCHEDULER_NAMES = ("ddpm", "ddim", "dpmsolver++", "unipc")


def make_scheduler(name: str, base_config: dict) -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    table = {
        "ddpm": (DDPMScheduler, {}),  # the paper's sampler (Eq. 2)
        "ddim": (DDIMScheduler, {}),
        "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "unipc": (UniPCMultistepScheduler, {}),
    }
    if name not in table:
        raise UserInputError(f"generation.scheduler='{name}' is not known; use one of {', '.join(SCHEDULER_NAMES)}")
    cls, extra = table[name]
    return cls.from_config(base_config, **extra)
