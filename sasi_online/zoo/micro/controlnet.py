"""The micro seg ControlNets: per family `ControlNetModel.from_unet(trained UNet)`, trained
with the UNet and text encoder frozen on the garments' ADE20K-palette mask maps, coloured
as the micro segmenter draws them (`apparel`, a bag `bag`, on `wall`; foreground at
FOREGROUND_THRESHOLD), so that a mask map decides where the garment is."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sasi_online.errors import UserInputError

from .common import batches, run_steps, save_model, warmup_cosine
from .data import shades
from .diffusion import BATCH, diffusion_loss, draw_prompts, prompt_bank, scaled_latents, token_ids
from .segmenter import target_maps

STEPS, LR = 400, 1e-3
CONDITIONING_CHANNELS = (8, 16, 32, 32)  # as the random set's: 64 px mask map -> 8 x 8


def colour(ids):
    """(B, 3, H, W) float32 mask maps in [0, 1] (the pipeline's control image range) from ids."""
    import torch

    from sasi_online.visual.palette import ADE20K_PALETTE

    palette = torch.from_numpy(ADE20K_PALETTE.astype(np.float32) / 255.0)
    return palette[ids.long()].permute(0, 3, 1, 2).contiguous()


def _frozen_family(out: Path, family: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = out / family
    if not (folder / "unet" / "config.json").is_file():
        raise UserInputError(f"'{out}' holds no trained {family}/: its ControlNet is made from its UNet; "
                             f"train it first (`sasi zoo train-micro --only {family} --out {out}`)")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(str(folder / "scheduler")))
    return unet, te, tok, sched


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int, family: str,
          steps: int = STEPS) -> dict:
    import torch
    from diffusers import ControlNetModel

    from ..build import TINY_RESOLUTION
    from ..seeding import _deterministic

    latents = scaled_latents(images, out)
    maps = target_maps(images, labels, TINY_RESOLUTION)  # the segmenter's own training targets
    tones = shades(images)
    name = f"controlnet-{family}-seg"
    with _deterministic(seed, f"micro/{name}") as gen:
        unet, te, tok, noise_sched = _frozen_family(out, family)
        bank = prompt_bank()
        with torch.no_grad():  # the text encoder is frozen: every prompt's states once
            states_bank = te(token_ids(tok, bank[0]))[0]
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
        opt = torch.optim.AdamW(cn.parameters(), lr=LR, weight_decay=0.01)
        sched = warmup_cosine(opt, steps)
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        stream = batches(rng, len(latents), BATCH)
        cn.train()

        def step(_):
            idx = next(stream)
            x0, cond = latents[torch.from_numpy(idx)], colour(maps[torch.from_numpy(idx)])
            states = states_bank[torch.from_numpy(draw_prompts(labels[idx], tones[idx], rng, bank))]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
            noisy = noise_sched.add_noise(x0, noise, t)
            down, mid = cn(noisy, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
            pred = unet(noisy, t, states, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            loss = diffusion_loss(noise_sched, pred, x0, noise, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
            opt.step()
            sched.step()
            return loss.detach()

        loss = run_steps(name, steps, step)
        save_model(cn, None, None, out / name)
    return {"steps": steps, "batch": BATCH, "final_loss": round(loss, 4)}
