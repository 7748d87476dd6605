"""Classifier-free guidance fused with one DDPM or DDIM scheduler step.

Per element, with ``m = uncond + guidance * (text - uncond)`` (the guided model output):

    x0   = clamp(A x + B m)          predicted clean latents (clamp only when clipping)
    eps  = C x + D m                 predicted noise (DDIM only)
    x'   = P x0 + Q x + R eps + S n  next latents

A..D depend on the prediction type (epsilon, v_prediction, sample), P..S on the sampler
(``guided_step_coefficients``). For DDPM without clipping this is the paper's Eq. 2,
x_{t-1} = 1/sqrt(a_t) (x_t - (1 - a_t)/sqrt(1 - abar_t) eps) + sigma_t n; going through
x0 as diffusers does keeps the optional x0 clipping and matches diffusers' rounding.

The torch reference spells diffusers' formulas out with tensor ops (five full passes and
temporaries); the Triton kernel reads uncond, text, latents (and noise) once and writes
the next latents once. Per-step scalars come from a diffusers scheduler via
``step_scalars(scheduler, t)`` so both paths are driven by the scheduler's own tables,
read on the host from its CPU copy (`t` is the CPU timestep): no device read, no sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sasi_online.errors import UserInputError

from ._triton import jit, require_triton

try:
    import triton.language as tl
except Exception:  # noqa: BLE001 - Triton is optional; require_triton explains at call time
    tl = None


KINDS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class StepScalars:
    """Everything one sampler step needs besides tensors (plain floats, no device)."""

    kind: str  # ddpm | ddim
    prediction_type: str  # epsilon | v_prediction | sample
    timestep: int
    prev_timestep: int
    alpha_t: float  # abar_t / abar_prev (DDPM's per-step alpha)
    alpha_bar_t: float
    alpha_bar_prev: float
    sigma_t: float  # std of the added noise; 0 for DDIM with eta=0 and at DDPM's last step
    clip_sample_range: float | None  # x0 clamp, None when the scheduler does not clip

    def as_kwargs(self) -> dict:
        """Keyword arguments for ``guided_step_fused`` / ``guided_step_torch``."""
        return dict(kind=self.kind, prediction_type=self.prediction_type, alpha_t=self.alpha_t,
                    alpha_bar_t=self.alpha_bar_t, alpha_bar_prev=self.alpha_bar_prev,
                    sigma_t=self.sigma_t, clip_sample_range=self.clip_sample_range)


def _as_int(t) -> int:
    """A timestep as a Python int, read from the host: a device tensor is refused, because
    reading it would be a host sync on every step (and would block CUDA-graph capture)."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise UserInputError(
                f"t: a timestep on {t.device}; reading it would sync the host every step. Pass the "
                f"scheduler's CPU timestep (scheduler.set_timesteps(n, device='cpu')) or a Python int.")
        return int(t)
    return int(t)


def step_scalars(scheduler, t, eta: float = 0.0) -> StepScalars:
    """Per-step scalars of a diffusers DDPMScheduler or DDIMScheduler at timestep `t`.

    `t` must be one of ``scheduler.timesteps`` (after ``set_timesteps``). `eta` is DDIM's
    noise level (0 = deterministic); DDPM ignores it.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = scheduler.config
    if isinstance(scheduler, DDPMScheduler):
        kind = "ddpm"
    elif isinstance(scheduler, DDIMScheduler):
        kind = "ddim"
    else:
        raise UserInputError(
            f"scheduler: the fused guidance step supports DDPMScheduler and DDIMScheduler, got "
            f"{type(scheduler).__name__}. Use the generator's unfused path for other samplers.")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise UserInputError(f"scheduler.config.prediction_type={cfg.prediction_type!r}: expected "
                             f"one of {PREDICTION_TYPES}.")
    if getattr(cfg, "thresholding", False):
        raise UserInputError("scheduler.config.thresholding=True (dynamic thresholding) needs a "
                             "per-sample quantile and is not fused; set thresholding=False or use "
                             "the unfused step.")
    clip = float(cfg.clip_sample_range) if getattr(cfg, "clip_sample", False) else None
    t = _as_int(t)
    ac = scheduler.alphas_cumprod
    if t < 0 or t >= len(ac):
        raise UserInputError(f"t={t}: outside the scheduler's 0..{len(ac) - 1} timesteps.")
    abar_t = ac[t]

    if kind == "ddpm":
        if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise UserInputError(
                f"scheduler.config.variance_type={cfg.variance_type!r}: the fused step supports "
                f"fixed_small, fixed_small_log and fixed_large (learned variances need the "
                f"model's variance channels).")
        prev = _as_int(scheduler.previous_timestep(t))
        abar_prev = ac[prev] if prev >= 0 else scheduler.one
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        if t > 0:
            # Same float32 tensor arithmetic as DDPMScheduler._get_variance.
            variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
            if cfg.variance_type == "fixed_small":
                sigma = variance ** 0.5
            elif cfg.variance_type == "fixed_small_log":
                sigma = torch.exp(0.5 * torch.log(variance))
            else:
                sigma = beta_t ** 0.5
            sigma = float(sigma)
        else:
            sigma = 0.0
    else:
        if scheduler.num_inference_steps is None:
            raise UserInputError("scheduler: call scheduler.set_timesteps(n) before step_scalars.")
        prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
        abar_prev = ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        alpha_t = abar_t / abar_prev
        if eta < 0:
            raise UserInputError(f"eta={eta}: DDIM's eta must be >= 0 (0 = deterministic).")
        sigma = float(eta * scheduler._get_variance(t, prev) ** 0.5) if eta > 0 else 0.0
    return StepScalars(kind=kind, prediction_type=cfg.prediction_type, timestep=t,
                       prev_timestep=prev, alpha_t=float(alpha_t), alpha_bar_t=float(abar_t),
                       alpha_bar_prev=float(abar_prev), sigma_t=sigma, clip_sample_range=clip)


def _check(kind, prediction_type, uncond, text, latents, noise, sigma_t, alpha_bar_t):
    if kind not in KINDS:
        raise UserInputError(f"kind={kind!r}: expected one of {KINDS}.")
    if prediction_type not in PREDICTION_TYPES:
        raise UserInputError(f"prediction_type={prediction_type!r}: expected one of "
                             f"{PREDICTION_TYPES} (the scheduler's config.prediction_type).")
    for name, x in (("noise_pred_uncond", uncond), ("noise_pred_text", text), ("noise", noise)):
        if x is not None and x.shape != latents.shape:
            raise UserInputError(f"{name}: shape {tuple(x.shape)} differs from latents "
                                 f"{tuple(latents.shape)}; split the batched UNet output with "
                                 f".chunk(2) into uncond and text halves.")
    if sigma_t > 0 and noise is None:
        raise UserInputError(f"noise: sigma_t={sigma_t:g} > 0 but no noise was given; pass "
                             f"torch.randn(latents.shape, generator=...) (same as diffusers).")
    if not 0.0 < alpha_bar_t <= 1.0:
        raise UserInputError(f"alpha_bar_t={alpha_bar_t}: must lie in (0, 1].")


def guided_step_torch(kind: str, prediction_type: str, noise_pred_uncond: torch.Tensor,
                      noise_pred_text: torch.Tensor, latents: torch.Tensor, guidance: float,
                      alpha_t: float, alpha_bar_t: float, alpha_bar_prev: float, sigma_t: float,
                      noise: torch.Tensor | None = None,
                      clip_sample_range: float | None = None) -> torch.Tensor:
    """Reference: guidance combine, then diffusers' DDPM/DDIM step formulas verbatim."""
    _check(kind, prediction_type, noise_pred_uncond, noise_pred_text, latents, noise, sigma_t,
           alpha_bar_t)
    x = latents
    m = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
    beta_prod_t = 1 - alpha_bar_t
    if prediction_type == "epsilon":
        x0 = (x - beta_prod_t ** 0.5 * m) / alpha_bar_t ** 0.5
        eps = m
    elif prediction_type == "v_prediction":
        x0 = alpha_bar_t ** 0.5 * x - beta_prod_t ** 0.5 * m
        eps = alpha_bar_t ** 0.5 * m + beta_prod_t ** 0.5 * x
    else:
        x0 = m
        eps = (x - alpha_bar_t ** 0.5 * x0) / beta_prod_t ** 0.5
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    if kind == "ddpm":
        c0 = alpha_bar_prev ** 0.5 * (1 - alpha_t) / beta_prod_t
        ct = alpha_t ** 0.5 * (1 - alpha_bar_prev) / beta_prod_t
        out = c0 * x0 + ct * x
    else:
        out = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev - sigma_t ** 2) ** 0.5 * eps
    if sigma_t > 0:
        out = out + sigma_t * noise
    return out


def guided_step_coefficients(kind: str, prediction_type: str, alpha_t: float,
                             alpha_bar_t: float, alpha_bar_prev: float,
                             sigma_t: float) -> tuple[float, ...]:
    """(A, B, C, D, P, Q, R, S) of the module docstring, in float64."""
    sa, sb = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction_type == "epsilon":
        a, b, c, d = 1 / sa, -sb / sa, 0.0, 1.0
    elif prediction_type == "v_prediction":
        a, b, c, d = sa, -sb, sb, sa
    else:
        a, b, c, d = 0.0, 1.0, 1 / sb, -sa / sb
    if kind == "ddpm":
        beta = 1 - alpha_bar_t
        p = math.sqrt(alpha_bar_prev) * (1 - alpha_t) / beta
        q = math.sqrt(alpha_t) * (1 - alpha_bar_prev) / beta
        r = 0.0
    else:
        p, q = math.sqrt(alpha_bar_prev), 0.0
        r = math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma_t ** 2))
    return a, b, c, d, p, q, r, float(sigma_t)


@jit
def guided_step_kernel(u_ptr, c_ptr, x_ptr, n_ptr, out_ptr, numel, guidance,
                       ca, cb, cc, cd, cp, cq, cr, cs, clip,
                       HAS_NOISE: tl.constexpr, CLIP: tl.constexpr, USE_EPS: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = u + guidance * (c - u)
    x0 = ca * x + cb * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    out = cp * x0 + cq * x
    if USE_EPS:
        out += cr * (cc * x + cd * m)
    if HAS_NOISE:
        n = tl.load(n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out += cs * n
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def guided_step_triton(kind: str, prediction_type: str, noise_pred_uncond: torch.Tensor,
                       noise_pred_text: torch.Tensor, latents: torch.Tensor, guidance: float,
                       alpha_t: float, alpha_bar_t: float, alpha_bar_prev: float, sigma_t: float,
                       noise: torch.Tensor | None = None,
                       clip_sample_range: float | None = None,
                       out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """One fused pass; computes in float32 and writes in latents' dtype (or into `out`,
    which may be `latents` itself for an in-place step)."""
    _check(kind, prediction_type, noise_pred_uncond, noise_pred_text, latents, noise, sigma_t,
           alpha_bar_t)
    tensors = [noise_pred_uncond, noise_pred_text, latents] + ([noise] if noise is not None else [])
    require_triton(tensors, "guided_step")
    kernel = guided_step_kernel
    u, c, x = (t.contiguous() for t in (noise_pred_uncond, noise_pred_text, latents))
    has_noise = sigma_t > 0
    n = noise.contiguous() if has_noise else x  # placeholder pointer, never read
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or not out.is_contiguous():
        raise UserInputError("out: must be a contiguous tensor shaped like latents.")
    coeffs = guided_step_coefficients(kind, prediction_type, alpha_t, alpha_bar_t,
                                      alpha_bar_prev, sigma_t)
    numel = x.numel()
    if numel == 0:
        return out
    grid = ((numel + block - 1) // block,)
    kernel[grid](u, c, x, n, out, numel, float(guidance), *coeffs,
                 float(clip_sample_range or 0.0), HAS_NOISE=has_noise,
                 CLIP=clip_sample_range is not None, USE_EPS=kind == "ddim", BLOCK=block)
    return out
