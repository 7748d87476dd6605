"""The micro BLIP-2 (OPT): names the garment and its shade.

Two phases, as BLIP-2 itself starts from a pretrained image encoder: first the vision
tower learns the garment class and shade (a linear probe on its pooled output, dropped
afterwards); then the Q-Former, the projection and OPT learn to caption in each SEP's
style (the templates of sasi_online.semantics.tiny_captions) while the vision tower
follows at a tenth of the rate, its probe loss kept so that it stays discriminative
(frozen, the captions named 5 points fewer classes than the probe read)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import batches, random_start, run_steps, save_model, warmup_cosine
from .data import normalize, resize_grey, shades

# The random set's vision tower (8-pixel patches, 32 wide, 2 layers) is too weak to tell
# a shirt from a pullover: 4-pixel patches, 64 wide, 3 layers (a linear probe on the
# 32-wide one read 78 % of the test images' classes).
VISION = dict(patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
VISION_STEPS, CAPTION_STEPS, BATCH = 3000, 1500, 64
VISION_LR, CAPTION_LR = 2e-3, 3e-3


class _Normalized:
    """Model inputs of the uint8 images, normalised batch by batch (`pixels[idx]`)."""

    def __init__(self, grey, mean, std):
        self.grey, self.mean, self.std = grey, mean, std

    def __len__(self) -> int:
        return len(self.grey)

    def __getitem__(self, idx):
        return normalize(self.grey[idx], self.mean, self.std)


def _model(seed: int):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from ..tiny_lm import _build_blip2

    src = random_start(lambda d: _build_blip2(d, seed, 0), "blip2")
    processor = Blip2Processor.from_pretrained(str(src), local_files_only=True)
    cfg = Blip2Config.from_pretrained(str(src), local_files_only=True)
    for key, value in VISION.items():
        setattr(cfg.vision_config, key, value)
    cfg.qformer_config.encoder_hidden_size = VISION["hidden_size"]
    return src, processor, Blip2ForConditionalGeneration(cfg)


def _train_vision(model, pixels, labels, tones, steps, gen, rng) -> float:
    import torch
    import torch.nn.functional as F

    vision = model.vision_model
    head = torch.nn.Linear(vision.config.hidden_size, 10 + 3)
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.05)
    sched = warmup_cosine(opt, steps)
    stream = batches(rng, len(pixels), BATCH)
    y_cls, y_tone = torch.from_numpy(labels), torch.from_numpy(tones)
    vision.train()

    def step(_):
        idx = torch.from_numpy(next(stream))
        x = pixels[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        out = head(vision(pixel_values=x).pooler_output)
        loss = F.cross_entropy(out[:, :10], y_cls[idx]) + F.cross_entropy(out[:, 10:], y_tone[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    return run_steps("blip2 vision", steps, step), head


def caption_rows(tokenizer, sep_list, n_query: int, image_token: int) -> dict:
    """(class, shade, sep index) -> list of (input ids, label ids): every caption taught."""
    from sasi_online.semantics import tiny_captions

    rows: dict = {}
    for s, sep in enumerate(sep_list):
        n_prompt = len(tokenizer(sep)["input_ids"])
        for label in range(10):
            for t, tone in enumerate(tiny_captions.TONES):
                for tpl in tiny_captions.caption_templates(label, sep):
                    ids = tokenizer(f"{sep} {tpl.format(c=tone)}{tokenizer.eos_token}")["input_ids"]
                    lab = [-100] * (n_query + n_prompt) + ids[n_prompt:]
                    rows.setdefault((label, t, s), []).append(([image_token] * n_query + ids, lab))
    return rows


def _train_captions(model, head, processor, pixels, labels, tones, steps, rng) -> float:
    import torch
    import torch.nn.functional as F

    from sasi_online.semantics import tiny_captions

    tok = processor.tokenizer
    seps = tiny_captions.training_seps()
    rows = caption_rows(tok, seps, processor.num_query_tokens, model.config.image_token_index)
    vision = list(model.vision_model.parameters()) + list(head.parameters())
    ids_vision = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids_vision]
    opt = torch.optim.AdamW([{"params": rest}, {"params": vision, "lr": CAPTION_LR / 10}],
                            lr=CAPTION_LR, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    stream = batches(rng, len(pixels), BATCH)
    y_cls, y_tone = torch.from_numpy(labels), torch.from_numpy(tones)
    model.train()

    def step(_):
        idx = next(stream)
        picked = []
        for i in idx:
            options = rows[(int(labels[i]), int(tones[i]), int(rng.integers(len(seps))))]
            picked.append(options[int(rng.integers(len(options)))])
        width = max(len(r) for r, _ in picked)
        pad = tok.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in picked])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in picked])
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for _, lb in picked])
        t_idx = torch.from_numpy(idx)
        out = model(pixel_values=pixels[t_idx], input_ids=ids, attention_mask=attn, labels=lab)
        probe = head(out.vision_outputs.pooler_output)
        loss = out.loss + F.cross_entropy(probe[:, :10], y_cls[t_idx]) + \
            F.cross_entropy(probe[:, 10:], y_tone[t_idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    return run_steps("blip2 captions", steps, step)


def train(images: np.ndarray, labels: np.ndarray, out: Path, seed: int,
          vision_steps: int = VISION_STEPS, caption_steps: int = CAPTION_STEPS) -> dict:
    import torch

    from ..seeding import _deterministic

    with _deterministic(seed, "micro/blip2") as gen:
        src, processor, model = _model(seed)
        ip = processor.image_processor
        grey = resize_grey(images, ip.size["height"])
        pixels = _Normalized(grey, ip.image_mean, ip.image_std)
        tones = shades(images)
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        v_loss, head = _train_vision(model, pixels, labels, tones, vision_steps, gen, rng)
        c_loss = _train_captions(model, head, processor, pixels, labels, tones, caption_steps, rng)
        save_model(model, processor, src, out / "blip2")
    return {"vision_steps": vision_steps, "caption_steps": caption_steps, "batch": BATCH,
            "vision_loss": round(v_loss, 4), "caption_loss": round(c_loss, 4)}
