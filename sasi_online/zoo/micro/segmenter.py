"""The micro segmenter: the zoo's UperNet (ConvNeXt, 150 ADE20K labels) trained on the
garments' foreground masks, the garment labelled `apparel` (a bag `bag`) and the black
background `wall`, so that its ADE20K-palette mask maps outline the garment."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import batches, random_start, run_steps, save_model, warmup_cosine
from .data import FOREGROUND_THRESHOLD, normalize, resize_grey

BACKGROUND, APPAREL, BAG = "wall", "apparel", "bag"
BAG_CLASS = 8  # Fashion-MNIST's "Bag"
STEPS, BATCH, LR = 600, 32, 4e-3


def label_ids() -> tuple[int, int, int]:
    from sasi_online.visual.palette import ADE20K_CLASSES

    return tuple(ADE20K_CLASSES.index(n) for n in (BACKGROUND, APPAREL, BAG))


def target_maps(images: np.ndarray, labels: np.ndarray, size: int):
    """(N, size, size) uint8 ADE20K ids: the foreground of the image resized as the model sees it."""
    import torch

    bg, apparel, bag = label_ids()
    fg = resize_grey(images, size, resample="bilinear")[:, 0] > FOREGROUND_THRESHOLD
    garment = torch.where(torch.from_numpy(labels == BAG_CLASS), bag, apparel).to(torch.uint8).view(-1, 1, 1)
    return torch.where(fg, garment, torch.full_like(garment, bg))


def _loss(model, x, y):
    """Cross-entropy at half the input side: the model's own loss upsamples 150 logit maps
    to the full side first, which costs most of a training step (argmax maps barely differ)."""
    import torch.nn.functional as F

    features = model.backbone.forward_with_filtered_kwargs(x).feature_maps
    logits = model.decode_head(features)
    side = x.shape[-1] // 2
    logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, y[:, ::2, ::2])


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int, steps: int = STEPS) -> dict:
    import torch
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    from ..build import TINY_RESOLUTION, _build_upernet
    from ..seeding import _deterministic

    with _deterministic(seed, "micro/upernet") as gen:
        src = random_start(lambda d: _build_upernet(d, seed), "upernet")
        processor = AutoImageProcessor.from_pretrained(str(src), local_files_only=True)
        model = UperNetForSemanticSegmentation.from_pretrained(str(src), local_files_only=True)
        size = TINY_RESOLUTION
        grey = resize_grey(images, size, resample="bilinear")
        targets = target_maps(images, labels, size)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
        sched = warmup_cosine(opt, steps)
        stream = batches(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))),
                         len(images), BATCH)
        model.train()

        def step(_):
            idx = torch.from_numpy(next(stream))
            x = normalize(grey[idx], processor.image_mean, processor.image_std)
            y = targets[idx].long()
            flip = torch.rand(len(idx), generator=gen) < 0.5  # garments face either way
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
            loss = _loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return loss.detach()

        loss = run_steps("upernet", steps, step)
        save_model(model, processor, src, out / "upernet")
    return {"steps": steps, "batch": BATCH, "final_loss": round(loss, 4)}
