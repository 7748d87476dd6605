"""Where and in which dtype a model runs, from a config section's `device` and `dtype`.

`auto` device: the device given by the caller (e.g. the generator's, so the language
models sit beside the diffusion models), else cuda when present. `auto` dtype: float16
on cuda, float32 on the CPU. Errors name the config key.
"""
from __future__ import annotations

from typing import Any, Optional

from sasi_online.errors import UserInputError

DTYPES = ("float32", "float16", "bfloat16")


def resolve_device(choice: str, key: str, fallback: Any = None):
    import torch

    if choice == "auto":
        if fallback is not None:
            return torch.device(str(fallback))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(f"{key}.device='{choice}' is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"{key}.device='{choice}' but this machine has no CUDA device; use "
                             f"{key}.device=cpu or auto")
    return device


def resolve_dtype(choice: str, key: str, device: Any):
    import torch

    if choice == "auto":
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    if choice not in DTYPES:
        raise UserInputError(f"{key}.dtype='{choice}' is not known; use auto, {', '.join(DTYPES)}")
    return getattr(torch, choice)


def device_and_dtype(section: Any, key: str, fallback: Optional[Any] = None) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) for config section `section` (named `key` in errors)."""
    device = resolve_device(getattr(section, "device", "auto"), key, fallback)
    return device, resolve_dtype(getattr(section, "dtype", "auto"), key, device)
