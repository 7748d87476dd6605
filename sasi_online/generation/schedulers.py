"""The samplers the generator offers, built fresh per batch from the family's config.

Multistep solvers keep state (previous model outputs, step index), so every batch gets
its own instance. The prediction type (epsilon / v_prediction) comes from the family's
scheduler config, so every sampler handles both.
"""
from __future__ import annotations

from typing import Any

from sasi_online.errors import UserInputError

SCHEDULER_NAMES = ("ddpm", "ddim", "dpmsolver++", "unipc", "lcm")
# latent-consistency sampling: few steps, with an LCM-LoRA (models.lora) or an LCM-distilled UNet
LCM_STEPS = (2, 8)


def check_steps(name: str, steps: int) -> None:
    """Refuse a step count the sampler is not made for (LCM: 2-8)."""
    low, high = LCM_STEPS
    if name == "lcm" and not low <= steps <= high:
        raise UserInputError(f"generation.scheduler=lcm takes generation.steps from {low} to {high} "
                             f"(latent-consistency sampling; 4 is the usual choice), got {steps}")


def make_scheduler(name: str, base_config: dict) -> Any:
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler,
                           UniPCMultistepScheduler)

    table = {
        "ddpm": (DDPMScheduler, {}),  # the paper's sampler (Eq. 2)
        "ddim": (DDIMScheduler, {}),
        "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "unipc": (UniPCMultistepScheduler, {}),
        "lcm": (LCMScheduler, {}),
    }
    if name not in table:
        raise UserInputError(f"generation.scheduler='{name}' is not known; use one of {', '.join(SCHEDULER_NAMES)}")
    cls, extra = table[name]
    return cls.from_config(base_config, **extra)
