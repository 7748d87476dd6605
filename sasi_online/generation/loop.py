"""The denoising loop, in swappable pieces.

text encoding → latent init (noise, or img2img noising to `strength`) → `denoise`
(repeated `denoise_step`: UNet + ControlNet → `guided_step`) → VAE decode.
Each piece mirrors what diffusers' Stable Diffusion pipelines do, so the same seeds and
settings give the same image (tested against those pipelines).

No host sync inside `denoise`: the scheduler lives on the CPU (its timesteps, sigmas and
alpha tables), so the sampler's bookkeeping and every step coefficient are computed from
that CPU copy; the models get the same timesteps uploaded to the device once per batch.
Nothing in the loop reads a device tensor back (tested by making `.item()` / `.cpu()` on
device data raise), which also lets a whole step be captured in a CUDA graph.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor


def encode_text(tokenizer: Any, text_encoder: Any, prompts: Sequence[str],
                negatives: Optional[Sequence[str]], device: torch.device) -> torch.Tensor:
    """CLIP text states; with `negatives` the result is [negatives; prompts] (2N rows) for CFG."""

    def run(texts: Sequence[str]) -> torch.Tensor:
        tok = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
        return text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].to(text_encoder.dtype)

    cond = run(prompts)
    if negatives is None:
        return cond
    return torch.cat([run(negatives), cond])


def img2img_steps(steps: int, strength: float) -> int:
    """How many denoising steps img2img runs; refuses settings that leave none (the "SASI"
    would be the noised input itself; diffusers refuses them too)."""
    init = min(int(steps * strength), steps)
    if init < 1:
        from sasi_online.errors import UserInputError

        raise UserInputError(
            f"generation.steps={steps} x generation.strength={strength} leaves no denoising step for "
            f"image/mix visual prompts; raise generation.steps or generation.strength so that "
            f"steps x strength >= 1")
    return init


def img2img_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that img2img runs: the last `strength` fraction of `steps`."""
    t_start = max(steps - img2img_steps(steps, strength), 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


def init_latents(scheduler: Any, vae: Any, shape: tuple, generators: list, device: torch.device,
                 dtype: torch.dtype, image: Optional[torch.Tensor] = None,
                 first_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Starting latents: scaled pure noise, or the VAE latents of `image` noised to `first_t`.

    One generator per image: its draws (VAE sample, then noise) never depend on the batch.
    """
    if image is None:
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        return noise * scheduler.init_noise_sigma
    dist = vae.encode(image.to(device, dtype)).latent_dist
    z = dist.sample(generator=generators) * vae.config.scaling_factor
    noise = randn_tensor(z.shape, generator=generators, device=device, dtype=dtype)
    tables = getattr(scheduler, "alphas_cumprod", None)
    noised = scheduler.add_noise(z, noise, first_t.repeat(z.shape[0]))
    if tables is not None:
        # DDPM/DDIM's add_noise moves this table to the latents' device; the loop's step
        # coefficients must keep reading the CPU copy (a device read would sync every step)
        scheduler.alphas_cumprod = tables
    return noised


def step_kwargs(scheduler: Any, generators: list) -> dict:
    """Stochastic samplers (DDPM) draw their noise from the per-image generators."""
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "generator" in params:
        kw["generator"] = generators
    if "eta" in params:
        kw["eta"] = 0.0
    return kw


def fused_step_problem(scheduler: Any) -> Optional[str]:
    """Why `scheduler` cannot take the fused CFG + step kernel, or None when it can.

    The kernel implements DDPM and DDIM only (fixed variances, no dynamic thresholding);
    multistep solvers keep history and always run their own `step`.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        return f"{type(scheduler).__name__} is not DDPM/DDIM"
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False):
        return "dynamic thresholding needs a per-sample quantile"
    if isinstance(scheduler, DDPMScheduler) and cfg.variance_type not in (
            "fixed_small", "fixed_small_log", "fixed_large"):
        return f"variance_type={cfg.variance_type!r} needs the model's variance channels"
    return None


def guided_step(scheduler: Any, noise_pred: torch.Tensor, t: Any, latents: torch.Tensor,
                guidance: float, extra: dict, fused: bool = True,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Classifier-free guidance combine + one scheduler step.

    With `fused` (and a scheduler `fused_step_problem` accepts) both run as one kernel
    (`sasi_online.kernels.guided_scheduler_step`: Triton on CUDA, its torch reference
    elsewhere). Its DDPM noise comes from the same per-image generators with the same
    draws as `scheduler.step`, so fused and unfused loops give the same images.
    """
    if fused and fused_step_problem(scheduler) is None:
        from sasi_online.kernels import guided_scheduler_step

        return guided_scheduler_step(scheduler, noise_pred, t, latents, guidance,
                                     generator=extra.get("generator"), eta=extra.get("eta", 0.0), noise=noise)
    if noise_pred.shape[0] == 2 * latents.shape[0]:
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
    if noise is not None and is_lcm(scheduler):
        return lcm_step(scheduler, noise_pred, t, latents, noise)
    return scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]


def is_lcm(scheduler: Any) -> bool:
    from diffusers import LCMScheduler

    return isinstance(scheduler, LCMScheduler)


def lcm_step(scheduler: Any, model_output: torch.Tensor, t: Any, sample: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """diffusers' `LCMScheduler.step` with its noise drawn ahead (`step_noise`): the same
    boundary-condition scalings, x0 prediction and re-noising, read from the scheduler's CPU
    tables, so nothing waits for the device. Returns the next sample (the denoised one at the
    last step, as the scheduler does)."""
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    i, timesteps = scheduler.step_index, scheduler.timesteps
    prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else t
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
    else:
        x0 = model_output
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    denoised = c_out * x0 + c_skip * sample
    last = i == scheduler.num_inference_steps - 1
    scheduler._step_index += 1
    return denoised if last else a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise


def denoise_step(backend: Callable[..., torch.Tensor], scheduler: Any, latents: torch.Tensor, t: Any,
                 text_states: torch.Tensor, guidance: float, extra: dict,
                 controlnet: Any = None, control: Optional[torch.Tensor] = None,
                 control_scale: float = 1.0, fused: bool = True,
                 model_t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One sampler step for a batch: UNet (+ ControlNet) → `guided_step`.

    `t` is the scheduler's own (CPU) timestep; `model_t` the same value already on the
    models' device (default: `t`)."""
    model_t = t if model_t is None else model_t
    cfg = text_states.shape[0] == 2 * latents.shape[0]
    model_in = torch.cat([latents] * 2) if cfg else latents
    model_in = scheduler.scale_model_input(model_in, t)
    if controlnet is not None and getattr(controlnet, "fuses_controlnet", False):
        # a compiled graph or an engine holding ControlNet + UNet as one call
        noise_pred = controlnet.controlled(model_in, model_t, text_states, control, control_scale)
    else:
        down, mid = None, None
        if controlnet is not None:
            down, mid = controlnet(model_in, model_t, encoder_hidden_states=text_states, controlnet_cond=control,
                                   conditioning_scale=control_scale, guess_mode=False, return_dict=False)
        noise_pred = backend(model_in, model_t, text_states, down, mid)
    return guided_step(scheduler, noise_pred, t, latents, guidance, extra, fused=fused, noise=noise)


def step_noise(scheduler: Any, timesteps: torch.Tensor, latents: torch.Tensor, extra: dict,
               fused: bool) -> Optional[torch.Tensor]:
    """The fused DDPM step's noise for every step, drawn ahead on the CPU from the per-image
    generators (the same draws, in the same order, as diffusers' step makes) and uploaded in
    one copy: otherwise each step would copy its noise from pageable host memory, which
    waits for the device. LCM's re-noising draws come ahead the same way. None when no step
    draws (DPM-Solver++, UniPC, DDIM with eta 0)."""
    from diffusers import DDPMScheduler

    gens = extra.get("generator")
    ddpm = fused and isinstance(scheduler, DDPMScheduler) and fused_step_problem(scheduler) is None
    if gens is None or not (ddpm or is_lcm(scheduler)):
        return None
    cpu = torch.device("cpu")
    if ddpm:
        drawn = [int(t) > 0 for t in timesteps]
    else:  # LCM re-noises after every step but the schedule's last
        drawn = [k < len(timesteps) - 1 for k in range(len(timesteps))]
    draws = [randn_tensor(tuple(latents.shape), generator=gens, device=cpu, dtype=latents.dtype)
             if d else torch.zeros(tuple(latents.shape), dtype=latents.dtype) for d in drawn]
    stacked = torch.stack(draws)
    return latents.new_empty(stacked.shape).copy_(stacked)


def upload_timesteps(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The batch's timesteps on `like`'s device: one host-to-device copy per batch."""
    return like.new_empty(timesteps.shape, dtype=timesteps.dtype).copy_(timesteps)


def denoise(backend: Callable[..., torch.Tensor], scheduler: Any, latents: torch.Tensor,
            timesteps: torch.Tensor, text_states: torch.Tensor, guidance: float, extra: dict,
            controlnet: Any = None, control: Optional[torch.Tensor] = None, control_scale: float = 1.0,
            fused: bool = True) -> torch.Tensor:
    """Every step of one batch. `timesteps` is the scheduler's CPU schedule (set_timesteps on
    "cpu"): steps read it, the models read its one upload. No host sync in here."""
    if timesteps.device.type != "cpu":
        from sasi_online.errors import UserInputError

        raise UserInputError("denoise takes the scheduler's CPU timesteps (scheduler.set_timesteps(n, device='cpu')); "
                         "device timesteps would make every step read the device")
    on_device = upload_timesteps(timesteps, latents)
    noises = step_noise(scheduler, timesteps, latents, extra, fused)
    for i, t in enumerate(timesteps):
        latents = denoise_step(backend, scheduler, latents, t, text_states, guidance, extra,
                               controlnet=controlnet, control=control, control_scale=control_scale,
                               fused=fused, model_t=on_device[i], noise=None if noises is None else noises[i])
    return latents


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [-1, 1] (N x 3 x H x W)."""
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


def to_uint8(images: torch.Tensor, host: bool = True) -> "np.ndarray | torch.Tensor":  # noqa: F821
    """[-1, 1] images → N x H x W x 3 uint8, rounded the way diffusers' PIL output is.

    host=True: a numpy array. host=False: a uint8 tensor on the images' device, the same
    values (the same float32 scale, round half to even, clamp), converted there: nothing is
    read back, so a GPU producer can resize and stage its SASI without a host round trip."""
    if host:
        x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (x * 255).round().astype("uint8")
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8).contiguous()
