"""The micro CLIP: image and text towers trained together on the garments.

Two contrastive terms: image-text (each image against every caption the micro BLIP-2
can write; the captions naming its class and shade are its positives) and image-image
(two augmented views of the same image against the batch), so that an image is
closest to pictures of itself, then to its class (what the SASI filter scores)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import batches, random_start, run_steps, save_model, warmup_cosine
from .data import resize_grey, shades

PATCH = 4
STEPS, BATCH, LR = 1000, 64, 2e-3
VIEW_TEMPERATURE = 0.1


def caption_texts() -> tuple[list[str], np.ndarray]:
    """Every caption the micro captioner is taught, and its key (class * 3 + shade)."""
    from sasi_online.semantics import tiny_captions

    texts, keys = [], []
    for label in range(10):
        for t, tone in enumerate(tiny_captions.TONES):
            for sep in tiny_captions.training_seps():
                for tpl in tiny_captions.caption_templates(label, sep):
                    texts.append(tpl.format(c=tone))
                    keys.append(label * 3 + t)
    return texts, np.array(keys)


def augment(raw, gen):
    """Random shift (up to 3 px), mirror and brightness gain of (B, 1, H, W) images in [0, 1]."""
    import torch

    b = raw.shape[0]
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=gen))
    x = torch.roll(raw, shifts=(dy, dx), dims=(2, 3))
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    gain = 0.75 + 0.5 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x * gain).clamp(0, 1)


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int, steps: int = STEPS) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from ..build import _build_clip
    from ..seeding import _deterministic

    with _deterministic(seed, "micro/clip") as gen:
        src = random_start(lambda d: _build_clip(d, seed), "clip")
        processor = CLIPProcessor.from_pretrained(str(src), local_files_only=True)
        cfg = CLIPConfig.from_pretrained(str(src), local_files_only=True)
        cfg.vision_config.patch_size = PATCH
        model = CLIPModel(cfg)
        ip = processor.image_processor
        side = ip.crop_size["height"]
        raw = resize_grey(images, side)
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        texts, text_keys = caption_texts()
        enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
        same = torch.from_numpy(text_keys)
        keys = torch.from_numpy(labels * 3 + shades(images))
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        sched = warmup_cosine(opt, steps)
        stream = batches(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))),
                         len(images), BATCH)
        model.train()

        def embed(x):
            feats = model.get_image_features(pixel_values=(x.expand(-1, 3, -1, -1) - mean) / std)
            return F.normalize(getattr(feats, "pooler_output", feats), dim=-1)

        def step(_):
            idx = torch.from_numpy(next(stream))
            batch = raw[idx].float() / 255.0
            a, b = embed(augment(batch, gen)), embed(augment(batch, gen))
            t = model.get_text_features(**enc)
            t = F.normalize(getattr(t, "pooler_output", t), dim=-1)
            pos = (keys[idx].view(-1, 1) == same.view(1, -1)).float()
            logits = model.logit_scale.exp() * a @ t.T
            loss_text = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            views = a @ b.T / VIEW_TEMPERATURE
            target = torch.arange(len(idx))
            loss_view = 0.5 * (F.cross_entropy(views, target) + F.cross_entropy(views.T, target))
            loss = loss_text + loss_view
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # at most 100, as CLIP does
            return loss.detach()

        loss = run_steps("clip", steps, step)
        save_model(model, processor, src, out / "clip")
    return {"steps": steps, "batch": BATCH, "final_loss": round(loss, 4)}
