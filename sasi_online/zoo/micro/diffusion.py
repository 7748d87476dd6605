"""The micro diffusion models: per family (sd15 ε-prediction with a 32-wide text context,
sd21 v-prediction with a 48-wide one) a text-conditioned UNet2DConditionModel and its CLIP
text encoder, trained together in the latent space of the micro VAE (64 px garments →
8 x 8 x 4 latents, `latent_dist.mean * scaling_factor`, computed once for the whole set).

The prompts are the ones the pipeline feeds at generation time: the micro BLIP-2's captions
for every SEP (tiny_captions), the micro LLaMA's rewrites and expansions of them, and the
class-name prompt ("a photo of a <class>"), with the image's own shade word, plus ~10 %
empty prompts so that classifier-free guidance has an unconditional model to push from.

Text encoder: trained jointly with the UNet. sd15's starts from the micro CLIP's text tower
where OUT holds it (same tokenizer, width 32 and layout): it already tells the garments and
shades apart, and a 32-wide encoder trained from scratch next to the UNet bound the class
weakly (text-to-image judged right 27 % vs 62 % for sd21 in a trial); sd21's 48 width has
no trained tower to start from, so it starts from the random builder's initialisation."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from sasi_online.errors import UserInputError

from .common import batches, random_start, run_steps, warmup_cosine
from .data import resize_grey, shades

UNET_CHANNELS, NORM_GROUPS = (16, 32), 8  # narrower than the random set's (32, 64): 10 MB cap
STEPS, BATCH, LR = 1200, 128, 1e-3
STEPS_SD15 = 1500  # the ε family binds the text more slowly
EMPTY_SHARE, CLASS_NAME_SHARE = 0.1, 0.2
MIN_SNR_GAMMA = 5.0
LATENT_CACHE = ".cache"  # under OUT; not part of the model set (zoo.json leaves it out)


def prompt_bank() -> tuple[list[str], dict[tuple[int, int], list[int]], list[int]]:
    """(texts, (class, shade) -> indices of its prompts, class -> its class-name prompt);
    texts[0] is the empty prompt."""
    from sasi_online.semantics import tiny_captions as tc

    texts, by_key, class_name = [""], {}, []
    seen = {"": 0}

    def add(text: str) -> int:
        if text not in seen:
            seen[text] = len(texts)
            texts.append(text)
        return seen[text]

    pairs = tc.rewrite_pairs()
    for label in range(10):
        class_name.append(add(f"a photo of a {tc.FASHION_CLASSES[label].lower()}"))
        for s, tone in enumerate(tc.TONES):
            mine = [add(tpl.format(c=tone)) for sep in tc.training_seps()
                    for tpl in tc.caption_templates(label, sep)]
            words = set(texts[i] for i in mine)
            for caption, rewrite, expansion in pairs:
                if caption in words:
                    mine += [add(rewrite), add(expansion)]
            by_key[(label, s)] = sorted(set(mine))
    return texts, by_key, class_name


def draw_prompts(labels, tones, rng: np.random.Generator, bank) -> np.ndarray:
    """One prompt index per image: its class-name prompt, one of its captions/rewrites, or empty."""
    _, by_key, class_name = bank
    u = rng.random(len(labels))
    out = np.empty(len(labels), dtype=np.int64)
    for j, (lab, tone) in enumerate(zip(labels, tones)):
        if u[j] < EMPTY_SHARE:
            out[j] = 0
        elif u[j] < EMPTY_SHARE + CLASS_NAME_SHARE:
            out[j] = class_name[lab]
        else:
            choices = by_key[(int(lab), int(tone))]
            out[j] = choices[rng.integers(len(choices))]
    return out


def trained_vae(out: Path):
    from diffusers import AutoencoderKL

    if not (out / "vae" / "config.json").is_file():
        raise UserInputError(f"'{out}' holds no trained vae/: the diffusion models learn in its latent "
                             f"space; train it first (`sasi zoo train-micro --only vae --out {out}`)")
    return AutoencoderKL.from_pretrained(str(out / "vae")).eval()


def scaled_latents(images: np.ndarray, out: Path, chunk: int = 256):
    """(N, 4, 8, 8) float32 scaled latents of the training images, cached under OUT per VAE."""
    import torch

    from ..build import TINY_RESOLUTION
    from .autoencoders import _images

    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    key = hashlib.sha256(weights.read_bytes() + np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    cache = out / LATENT_CACHE / f"latents-{key}.npy"
    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    vae = trained_vae(out)
    grey = resize_grey(images, TINY_RESOLUTION, resample="bilinear")
    parts = []
    with torch.no_grad():
        for s in run_chunks(len(grey), chunk):
            parts.append(vae.encode(_images(grey, torch.arange(s, min(s + chunk, len(grey))))).latent_dist.mean)
    latents = (torch.cat(parts) * vae.config.scaling_factor).contiguous()
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, latents.numpy())
    tmp.replace(cache)
    return latents


def run_chunks(n: int, chunk: int):
    from tqdm.auto import tqdm

    return tqdm(range(0, n, chunk), desc="encode latents", unit="chunk", disable=None)


def token_ids(tokenizer, texts: list[str]):
    """Token ids as the generator encodes prompts (padded to the tokenizer's max length)."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def diffusion_target(scheduler, latents, noise, t):
    """What the family's UNet predicts: the noise (ε) or the velocity (v)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def diffusion_loss(scheduler, pred, latents, noise, t):
    """MSE to the family's target, its weight capped at the nearly clean timesteps (min-SNR,
    gamma 5: the target's own SNR weight, snr for ε and snr + 1 for v, clipped at gamma), so
    they stop dominating; noisy timesteps, where the garment's class is decided, keep weight 1."""
    import torch

    a = scheduler.alphas_cumprod.to(latents.device)[t]
    snr = a / (1 - a)
    own = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    weight = torch.clamp(own, max=MIN_SNR_GAMMA) / own
    err = (pred - diffusion_target(scheduler, latents, noise, t)).pow(2).mean(dim=(1, 2, 3))
    return (weight * err).mean()


def _clip_text_start(text_encoder, out: Path) -> str:
    """Load the micro CLIP's text tower into `text_encoder` where the shapes fit; returns
    where the encoder starts from ("clip" or "random")."""
    from transformers import CLIPModel

    if not (out / "clip" / "config.json").is_file():
        return "random"
    tower = CLIPModel.from_pretrained(str(out / "clip")).text_model.state_dict()
    mine = text_encoder.state_dict()  # transformers 5: the text model itself, no .text_model
    if tower.keys() != mine.keys() or any(tower[k].shape != mine[k].shape for k in mine):
        return "random"
    text_encoder.load_state_dict(tower)
    return "clip"


def _start(family: str, seed: int):
    """The random builder's pipeline folder, and a UNet with its config but narrower blocks."""
    from diffusers import UNet2DConditionModel

    from ..build import _build_sd

    src = random_start(lambda d: _build_sd(d, family, seed), family)
    cfg = dict(UNet2DConditionModel.load_config(str(src / "unet")))
    cfg.update(block_out_channels=list(UNET_CHANNELS), norm_num_groups=NORM_GROUPS)
    return src, UNet2DConditionModel.from_config(cfg)


def save_pipeline(src: Path, unet, text_encoder, out: Path) -> None:
    """Write the family's pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) atomically; vae/ is left out: the shipped vae/ goes into both families."""
    tmp = out.with_name(f".{out.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("unet", "text_encoder", "vae"))
    unet.eval().save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.eval().save_pretrained(tmp / "text_encoder", safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(src.parent, ignore_errors=True)


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int, family: str,
          steps: int = STEPS) -> dict:
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..seeding import _deterministic

    latents = scaled_latents(images, out)
    tones = shades(images)
    with _deterministic(seed, f"micro/{family}") as gen:
        src, unet = _start(family, seed)
        tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(str(src / "text_encoder"))
        text_start = _clip_text_start(text_encoder, out) if family == "sd15" else "random"
        noise_sched = DDPMScheduler.from_config(DDPMScheduler.load_config(str(src / "scheduler")))
        bank = prompt_bank()
        ids = token_ids(tokenizer, bank[0])
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
        sched = warmup_cosine(opt, steps)
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        stream = batches(rng, len(latents), BATCH)
        unet.train()
        text_encoder.train()

        def step(_):
            idx = next(stream)
            x0 = latents[torch.from_numpy(idx)]
            caps, inv = torch.unique(torch.from_numpy(draw_prompts(labels[idx], tones[idx], rng, bank)),
                                     return_inverse=True)
            states = text_encoder(ids[caps])[0][inv]  # each distinct prompt encoded once
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
            pred = unet(noise_sched.add_noise(x0, noise, t), t, states).sample
            loss = diffusion_loss(noise_sched, pred, x0, noise, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            return loss.detach()

        loss = run_steps(family, steps, step)
        save_pipeline(src, unet, text_encoder, out / family)
    return {"steps": steps, "batch": BATCH, "final_loss": round(loss, 4),
            "block_out_channels": list(UNET_CHANNELS), "prediction": noise_sched.config.prediction_type, "text_encoder_start": text_start}
