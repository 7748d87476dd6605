"""The micro model set: the zoo's tiny models trained once on Fashion-MNIST's 60,000
training images, so that what they write, segment and score means something.

`train_micro(DATA, OUT)` (`sasi zoo train-micro`) trains them; the package ships the
result under sasi_online/assets/micro_zoo/ and `build_micro(DIR)` (`sasi zoo build DIR`,
the default) writes a complete zoo from it. One module per model:

    segmenter.py   UperNet: foreground masks as ADE20K `apparel` / `bag` on `wall`
    captioner.py   BLIP-2 (OPT): names the garment and its shade
    clip.py        CLIP: image-text and image-image contrastive
    rewriter.py    LLaMA: few-shot SRP completion, trained longer
    autoencoders.py  AutoencoderKL (both families' VAE) and AutoencoderTiny distilled from it
    diffusion.py   per family the text-conditioned UNet and its CLIP text encoder, in the VAE's
                   latent space, on the prompts the pipeline feeds (sd15 ε, sd21 v)
    controlnet.py  per family the seg ControlNet (from its trained UNet) on the mask maps

    data.py        the idx files, foreground masks, shades, batched preprocessing
    common.py      the seeded step loop (progress bar, log), sampling, saving
    quality.py     reading the garment and shade back from text; caption, rewrite, mask, CLIP scores
    judge.py       the judge (a small CNN on the embedded train split) and SASI made for it to read
    train.py       train_micro: one model after the other, resumable; train.json, zoo.json
    ship.py        build_micro: the shipped models plus random tiny ones for any folder not shipped
"""
from __future__ import annotations

from .data import DEFAULT_DATA, load_split  # noqa: F401
from .train import TRAINERS, train_micro  # noqa: F401

__all__ = ["DEFAULT_DATA", "TRAINERS", "load_split", "train_micro"]
