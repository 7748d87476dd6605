"""Does Triton really run here? One trivial kernel, compiled and launched once per process.

Importing triton proves little: it builds its launcher with gcc or clang and needs
``Python.h`` at the first launch, and an unsupported GPU fails there too. ``probe(device)``
compiles and runs a tiny kernel on that device type the first time it is asked, checks
its result, and caches the outcome (None, or a sentence saying why Triton cannot run).
The dispatcher asks it before choosing Triton on CUDA, so a box without a compiler runs
every kernel on the torch path and logs one line saying why.

On the CPU the kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``); in a
compiled-mode process its launch fails ("0 active drivers") and the probe says so.
"""
from __future__ import annotations

import logging
import threading

import torch

from ._triton import interpret_mode, jit, triton_import_problem

try:
    import triton.language as tl
except Exception:  # noqa: BLE001 - Triton is optional; the probe reports why
    tl = None

log = logging.getLogger("sasi_online.kernels")
_lock = threading.Lock()
_results: dict[str, str | None] = {}
_runs: dict[str, int] = {}


@jit
def probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0 + 1.0, mask=mask)


def compile_and_run(device_type: str) -> None:
    """Launch the probe kernel on `device_type` and check its output; raises on any failure."""
    x = torch.arange(16, dtype=torch.float32, device=device_type)
    y = torch.full_like(x, -1.0)
    probe_kernel[(1,)](x, y, 16, BLOCK=16)
    if device_type == "cuda":
        torch.cuda.synchronize()
    if not torch.equal(y.cpu(), torch.arange(16, dtype=torch.float32) * 2 + 1):
        raise RuntimeError("the probe kernel ran but returned wrong values")


def _attempt(device_type: str) -> str | None:
    problem = triton_import_problem()
    if problem:
        return problem
    if device_type not in ("cpu", "cuda"):
        return f"the Triton kernels run on CUDA devices, not on {device_type}"
    try:
        compile_and_run(device_type)
    except Exception as exc:  # noqa: BLE001 - no compiler, no Python.h, unsupported GPU ...
        hint = (" (on the CPU Triton runs only through its interpreter: TRITON_INTERPRET=1 in the "
                "environment before triton is imported)") if device_type == "cpu" and not interpret_mode() else ""
        return (f"the start-up probe kernel failed to compile or run on {device_type} "
                f"({type(exc).__name__}: {str(exc).strip()[:300]}){hint}")
    return None


def probe(device_type: str = "cuda") -> str | None:
    """None when Triton compiles and runs on `device_type`, else why not (cached per process;
    a failure is logged once at WARNING on the ``sasi_online.kernels`` logger)."""
    device_type = torch.device(device_type).type
    with _lock:
        if device_type not in _results:
            _runs[device_type] = _runs.get(device_type, 0) + 1
            _results[device_type] = _attempt(device_type)
            if _results[device_type]:
                log.warning("Triton disabled on %s, every kernel takes its torch path: %s",
                            device_type, _results[device_type])
        return _results[device_type]


def probe_runs(device_type: str) -> int:
    """How many times this process attempted the probe on `device_type` (at most once)."""
    return _runs.get(torch.device(device_type).type, 0)


def forget() -> None:
    """Drop the cached outcomes (tests that inject a fault, then retry)."""
    with _lock:
        _results.clear()
        _runs.clear()
