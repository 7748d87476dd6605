"""Guarded access to Triton, shared by every kernel file.

Triton is optional: it ships with CUDA builds of torch, but it launches kernels only on a
GPU, or on the CPU through its slow interpreter. The interpreter is chosen once, when
triton is first imported (its own library functions, such as tl.sum, are decorated
then), so ``TRITON_INTERPRET=1`` must be in the environment before anything imports
triton; switching it later leaves kernels that cannot run. ``interpret_mode`` reports
the mode triton was actually imported in.
"""
from __future__ import annotations

import os

import torch

from sasi_online.errors import UserInputError


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


try:  # optional: kernels are defined either way, launched only when Triton is present
    import triton as _triton_mod
    import triton.language as _tl

    _IMPORT_PROBLEM = None
    # The mode triton fixed at its import: its standard library is interpreted or not.
    _INTERPRETED = type(_tl.standard.sum).__name__ == "InterpretedFunction"

    def jit(fn):
        """triton.jit, decorating in the mode triton was imported in even if
        TRITON_INTERPRET changed since (our kernels call triton's library functions)."""
        if _INTERPRETED == _env_interpret():
            return _triton_mod.jit(fn)
        if _INTERPRETED:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(fn)
        from triton.runtime.jit import JITFunction

        return JITFunction(fn)
except Exception as exc:  # noqa: BLE001 - any failure means "no Triton"; we say why
    _IMPORT_PROBLEM = (f"Triton unavailable because importing it failed "
                       f"({type(exc).__name__}: {exc})")
    _INTERPRETED = False

    def jit(fn):  # kernels stay plain functions; require_triton refuses to launch them
        return fn


class TritonUnavailableError(UserInputError):
    """Triton cannot run this call; the message says why and what to use instead."""


def interpret_mode() -> bool:
    """True when this process's Triton runs kernels through its CPU interpreter."""
    return _INTERPRETED


def triton_import_problem() -> str | None:
    """None when Triton imported, else a sentence saying why it is unavailable."""
    return _IMPORT_PROBLEM


def device_problem(tensors: list[torch.Tensor]) -> str | None:
    """None when Triton can run on the devices of `tensors`, else why it cannot."""
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        return f"inputs are on several devices ({sorted(devices)}); move them to one"
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"} and interpret_mode():
        return None
    if devices == {"cpu"} and _env_interpret():
        return ("TRITON_INTERPRET=1 was set after triton had been imported in compiled mode; "
                "set it in the environment before the process starts")
    return (f"input is on {'/'.join(sorted(devices))}: the Triton kernels run on CUDA tensors, "
            f"or on the CPU only through the slow interpreter (TRITON_INTERPRET=1 in the "
            f"environment before triton is imported)")


def require_triton(tensors: list[torch.Tensor], kernel: str) -> None:
    """Raise TritonUnavailableError, naming the fix, when `kernel` cannot run in Triton."""
    problem = triton_import_problem() or device_problem(tensors)
    if problem:
        raise TritonUnavailableError(
            f"{kernel}: cannot run the Triton kernel: {problem}. Use backend='torch' "
            f"(or SASI_KERNEL_BACKEND=torch) for the torch reference.")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
