"""The micro autoencoders: the zoo's AutoencoderKL trained to reconstruct the garments at
the diffusion side (64 px), then its AutoencoderTiny (TAESD layout) distilled from it, as
TAESD is from the SD VAE: its encoder predicts the VAE's scaled latents, its decoder turns
them back into the image. One VAE serves both families, as SD-1.5 and SD-2.x share theirs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import batches, random_start, run_steps, save_model, warmup_cosine
from .data import resize_grey

VAE_STEPS, TINY_STEPS, BATCH, LR = 800, 600, 32, 2e-3
KL_WEIGHT = 1e-6


def _images(grey, idx):
    return grey[idx].float().div(127.5).sub(1).expand(-1, 3, -1, -1)


def _train_vae(vae, grey, steps, gen, rng) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    stream = batches(rng, len(grey), BATCH)
    vae.train()

    def step(_):
        x = _images(grey, torch.from_numpy(next(stream)))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    return run_steps("vae", steps, step)


def _fit_scaling(vae, grey, rng) -> float:
    """Set the VAE's scaling factor so that the scaled latents have unit variance, as SD's
    0.18215 was chosen for its VAE (the UNet and TAESD work on the scaled latents)."""
    import torch

    idx = torch.from_numpy(rng.choice(len(grey), min(512, len(grey)), replace=False))
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(_images(grey, idx)).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae.config.scaling_factor


def _train_tiny(tiny, vae, grey, steps, rng) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(tiny.parameters(), lr=LR, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    stream = batches(rng, len(grey), BATCH)
    vae.eval()
    tiny.train()
    scale = vae.config.scaling_factor

    def step(_):
        x = _images(grey, torch.from_numpy(next(stream)))
        with torch.no_grad():
            target = vae.encode(x).latent_dist.mean * scale  # the latents the UNet works on
        loss = F.mse_loss(tiny.encode(x).latents, target) + F.mse_loss(tiny.decode(target).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    return run_steps("taesd", steps, step)


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int,
          vae_steps: int = VAE_STEPS, tiny_steps: int = TINY_STEPS) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from ..build import TINY_RESOLUTION, _build_sd, _build_taesd
    from ..seeding import _deterministic

    with _deterministic(seed, "micro/vae") as gen:
        sd = random_start(lambda d: _build_sd(d, "sd15", seed), "sd15")
        vae = AutoencoderKL.from_pretrained(str(sd / "vae"))
        grey = resize_grey(images, TINY_RESOLUTION, resample="bilinear")
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        vae_loss = _train_vae(vae, grey, vae_steps, gen, rng)
        scaling = _fit_scaling(vae, grey, rng)
        save_model(vae, None, sd, out / "vae")
    with _deterministic(seed, "micro/taesd"):
        src = random_start(lambda d: _build_taesd(d, seed), "taesd")
        tiny = AutoencoderTiny.from_pretrained(str(src))
        tiny_loss = _train_tiny(tiny, vae, grey, tiny_steps, rng)
        save_model(tiny, None, src, out / "taesd")
    return {"vae_steps": vae_steps, "taesd_steps": tiny_steps, "batch": BATCH,
            "vae_loss": round(vae_loss, 4), "taesd_loss": round(tiny_loss, 4), "scaling_factor": scaling}
