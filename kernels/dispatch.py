"""Pick the Triton kernel or its torch reference for each call, and say why.

Rule: Triton when it is importable, every input is on a CUDA device and the start-up
probe (``probe.py``: one trivial kernel compiled and run once per process) passed; the
torch path on a CPU, when Triton is missing, when the probe failed (no C compiler, no
``Python.h``, an unsupported GPU), or when forced. Force a backend per call with
``backend="torch"|"triton"`` or for the process with ``SASI_KERNEL_BACKEND=torch|triton``
("auto", the default, applies the rule). Forcing Triton on CPU tensors works only with
``TRITON_INTERPRET=1`` (Triton's slow interpreter, meant for tests); otherwise the call
fails with a message naming the fix, rather than silently running something else.
Each distinct choice is logged once at INFO level on the ``sasi_online.kernels`` logger;
``last_choice(kernel)`` returns the latest one and ``dispatch_counts()`` how many calls
took each path (a Triton→torch fallback is counted, never silent).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from sasi_online.errors import UserInputError

from . import probe as _probe
from ._triton import TritonUnavailableError, interpret_mode, require_triton, triton_import_problem
from .guided_step import guided_step_torch, guided_step_triton, step_scalars
from .infonce import MAX_DIM, infonce_torch, infonce_triton
from .ring_augment import (IMAGENET_MEAN, IMAGENET_STD, AugParams, ring_augment_torch,
                           ring_augment_triton, ring_augment_vectorized)

ENV_VAR = "SASI_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")
log = logging.getLogger("sasi_online.kernels")
_logged: set[tuple[str, str, str]] = set()
_last: dict[str, "BackendChoice"] = {}
_counts: dict[str, dict[str, int]] = {}


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "torch" | "triton"
    reason: str


def _requested(backend: str | None) -> tuple[str, str]:
    if backend is not None:
        source = f"backend={backend!r} argument"
    else:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"{ENV_VAR}={backend}"
    if backend not in BACKENDS:
        raise UserInputError(f"{source}: expected one of {BACKENDS}.")
    return backend, source


def choose_backend(*tensors: torch.Tensor, backend: str | None = None,
                   kernel: str = "kernel") -> BackendChoice:
    """Decide where `kernel` runs for these input tensors; the reason is a full sentence."""
    wanted, source = _requested(backend)
    if wanted == "torch":
        return BackendChoice("torch", f"{kernel}: torch reference, forced by {source}")
    devices = sorted({t.device.type for t in tensors})
    if wanted == "triton":
        require_triton(list(tensors), kernel)  # raises with the reason and the fix
        problem = _probe.probe(devices[0])
        if problem:
            raise TritonUnavailableError(f"{kernel}: cannot run the Triton kernel ({source}): {problem}. "
                                         f"Use backend='torch' (or {ENV_VAR}=torch) for the torch path.")
        how = "the CPU interpreter (TRITON_INTERPRET=1)" if devices == ["cpu"] else str(tensors[0].device)
        return BackendChoice("triton", f"{kernel}: Triton on {how}, forced by {source}")
    return auto_choice(kernel, devices, triton_import_problem(), _probe.probe)


def auto_choice(kernel: str, devices: list[str], import_problem: str | None, probe) -> BackendChoice:
    """The automatic rule for inputs on `devices` (device type names); `probe(device_type)`
    returns None when Triton runs there, else why not."""
    if import_problem:
        return BackendChoice("torch", f"{kernel}: torch reference; {import_problem}")
    if devices != ["cuda"]:
        note = (" (TRITON_INTERPRET=1 is set, but the interpreter is only used when forced "
                "with backend='triton')") if interpret_mode() else ""
        return BackendChoice("torch", f"{kernel}: torch reference because the input is on "
                                      f"{'/'.join(devices)}, and the Triton kernels run on CUDA "
                                      f"devices{note}")
    problem = probe("cuda")
    if problem:
        return BackendChoice("torch", f"{kernel}: torch path, Triton disabled: {problem}")
    return BackendChoice("triton", f"{kernel}: Triton, because Triton is importable, the input is on "
                                   f"CUDA and the start-up probe kernel ran")


def last_choice(kernel: str) -> BackendChoice | None:
    """The choice made by the latest dispatched call of `kernel` (for logs and metrics)."""
    return _last.get(kernel)


def dispatch_counts() -> dict[str, dict[str, int]]:
    """Calls per kernel and path so far in this process, e.g. {"ring_augment": {"torch": 3}}."""
    return {k: dict(v) for k, v in _counts.items()}


def _announce(choice: BackendChoice, kernel: str) -> None:
    _last[kernel] = choice
    per = _counts.setdefault(kernel, {})
    per[choice.backend] = per.get(choice.backend, 0) + 1
    key = (kernel, choice.backend, choice.reason)
    if key not in _logged:
        _logged.add(key)
        log.info(choice.reason)


def guided_step_fused(kind: str, prediction_type: str, noise_pred_uncond: torch.Tensor,
                      noise_pred_text: torch.Tensor, latents: torch.Tensor, guidance: float,
                      alpha_t: float, alpha_bar_t: float, alpha_bar_prev: float, sigma_t: float,
                      noise: torch.Tensor | None = None, clip_sample_range: float | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """CFG combine + one DDPM/DDIM step → next latents. Scalars: ``step_scalars(sched, t)``,
    e.g. ``guided_step_fused(noise_pred_uncond=u, noise_pred_text=c, latents=x,
    guidance=7.5, noise=n, **step_scalars(sched, t).as_kwargs())``."""
    choice = choose_backend(noise_pred_uncond, noise_pred_text, latents, backend=backend,
                            kernel="guided_step")
    _announce(choice, "guided_step")
    fn = guided_step_triton if choice.backend == "triton" else guided_step_torch
    return fn(kind, prediction_type, noise_pred_uncond, noise_pred_text, latents, guidance,
              alpha_t, alpha_bar_t, alpha_bar_prev, sigma_t, noise=noise,
              clip_sample_range=clip_sample_range)


def guided_scheduler_step(scheduler, noise_pred: torch.Tensor, t, latents: torch.Tensor,
                          guidance: float, generator=None, eta: float = 0.0,
                          backend: str | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for "CFG combine + ``scheduler.step``" in a denoising loop.

    `noise_pred` is the UNet output for ``cat([latents] * 2)`` (uncond first) or, without
    guidance, for `latents` alone. DDPM/DDIM schedulers take the fused path, drawing their
    noise exactly as diffusers does (same generator(s), same calls, so the same images);
    any other scheduler runs its own ``step`` unchanged. `t` is the scheduler's CPU timestep
    (a device tensor is refused: reading it would sync). `noise`, when given, is this step's
    noise drawn ahead (the loop draws every step's at once and uploads them together, so no
    step copies from the host); otherwise it is drawn here from `generator`.
    """
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    if noise_pred.shape[0] == 2 * latents.shape[0]:
        uncond, text = noise_pred.chunk(2)
    elif noise_pred.shape[0] == latents.shape[0]:
        uncond = text = noise_pred
    else:
        raise UserInputError(f"noise_pred: batch {noise_pred.shape[0]} is neither the latents' "
                             f"{latents.shape[0]} nor twice it (uncond + text halves).")
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        guided = uncond + guidance * (text - uncond)
        extra = {"generator": generator} if generator is not None else {}
        return scheduler.step(guided, t, latents, **extra, return_dict=False)[0]
    scalars = step_scalars(scheduler, t, eta=eta)
    draws = scalars.timestep > 0 if scalars.kind == "ddpm" else eta > 0
    if not draws:
        noise = None
    elif noise is None:  # exactly when diffusers' step draws, so the generators stay in step
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device,
                             dtype=latents.dtype)
    return guided_step_fused(noise_pred_uncond=uncond, noise_pred_text=text, latents=latents,
                             guidance=guidance, noise=noise, backend=backend,
                             **scalars.as_kwargs())


def augment_views(images: torch.Tensor, params: AugParams, out_size: int, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, channels_last: bool | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """uint8 ring slots + ``sample_aug_params(...)`` → normalised float [N, 3, S, S]."""
    choice = choose_backend(images, backend=backend, kernel="ring_augment")
    if choice.backend == "torch":  # on a CPU the per-view loop is the faster of the two torch paths
        loop = images.device.type == "cpu"
        choice = BackendChoice("torch", choice.reason + (" (per-view loop, faster on the host)" if loop
                                                         else " (vectorised batch ops)"))
        fn = ring_augment_torch if loop else ring_augment_vectorized
    else:
        fn = ring_augment_triton
    _announce(choice, "ring_augment")
    return fn(images, params, out_size, mean=mean, std=std, channels_last=channels_last)


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                 backend: str | None = None) -> torch.Tensor:
    """MoCo InfoNCE over a queue (positive at index 0), mean over the batch."""
    choice = choose_backend(q, k, queue, backend=backend, kernel="infonce")
    # Only the automatic choice falls back; a forced Triton (argument or environment)
    # fails with the fix instead of silently running the reference.
    if choice.backend == "triton" and _requested(backend)[0] == "auto" and q.ndim == 2 \
            and q.shape[1] > MAX_DIM:
        choice = BackendChoice("torch", f"infonce: torch reference because the feature size "
                                        f"{q.shape[1]} exceeds the fused kernel's {MAX_DIM}")
    _announce(choice, "infonce")
    fn = infonce_triton if choice.backend == "triton" else infonce_torch
    return fn(q, k, queue, temperature)
