"""The science bench's control stores: SASI stores whose "SASI" are not generated.

    same_class  each image's partner is another real training image of its class (an oracle
                positive): the gain a perfect positive can give this recipe. If it shows none,
                the bench has no power to see SASI help.
    vae         the image itself through the SASI path's VAE round trip at the generation size
                (the diffusion family's image processor, encode, decode; no denoising): a gain
                of SASI beyond this one is attributable to generation, not to a smoothed view.

Both are written with the project's store code (the same header, records and image files as
`sasi generate`), at the generation resolution, so the training path reads them exactly as it
reads generated SASI.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CONTROLS = ("same_class", "vae")


def same_class_partners(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each index, another index of the same label (uniform, seeded); itself only when
    its class has a single image."""
    rng = np.random.default_rng(seed)
    partner = np.arange(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        offsets = rng.integers(1, len(members), size=len(members))  # never 0: never itself
        partner[members] = members[(np.arange(len(members)) + offsets) % len(members)]
    return partner


def _rgb(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.uint8)


def _vae_round_trip(cfg, images: list[Image.Image], seed: int) -> np.ndarray:
    import torch

    from sasi_online.generation import loop
    from sasi_online.generation.generator import SASIGenerator

    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    fam = gen.family(gen.family_for("image"))
    res = cfg.generation.resolution
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            chunk = images[start:start + 32]
            pixels = fam.image_processor.preprocess([im.convert("RGB") for im in chunk], height=res, width=res)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + j) for j in range(len(chunk))]
            z = fam.vae.encode(pixels.to(gen.device, gen.dtype)).latent_dist.sample(generator=gens)
            out.append(loop.to_uint8(loop.decode(fam.vae, z)))
    return np.concatenate(out)


def build_control_store(cfg, path, control: str, seed: int, progress: bool = True) -> dict:
    """Write (or finish) the control store at `path` for the whole training split; returns
    {"generated", "failed", "sasi_per_image"}. A rerun adds only what is missing."""
    from tqdm.auto import tqdm

    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.store import SasiStore
    from sasi_online.generation.offline import dataset_identity

    if control not in CONTROLS:
        raise ValueError(f"unknown control '{control}'; choose from {', '.join(CONTROLS)}")
    import dataclasses

    ds = build_dataset(dataclasses.replace(cfg.data, limit=None))
    res = cfg.generation.resolution
    settings = {"control": control, "seed": seed, "resolution": res}
    models = {"control": control} if control == "same_class" else {"vae_family": cfg.generation.family,
                                                                   "models_root": str(cfg.models.root)}
    with SasiStore.create(path, dataset=dataset_identity(ds), models=models, settings=settings) as store:
        n_fit = min(int(cfg.data.limit or len(ds)), len(ds))  # partners only among images training sees
        todo = [i for i in range(n_fit) if (i, 0) not in store]
        partners = same_class_partners(np.asarray(ds.labels())[:n_fit], seed)
        with tqdm(total=len(todo), desc=f"control store ({control})", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), 256):
                idx = todo[start:start + 256]
                if control == "same_class":
                    images = np.stack([_rgb(ds[int(partners[i])].image, res) for i in idx])
                else:
                    images = _vae_round_trip(cfg, [ds[i].image for i in idx], seed)
                for i, im in zip(idx, images):
                    note = f"real image {int(partners[i])} (same class)" if control == "same_class" else "VAE round trip"
                    store.add(im, index=i, variant=0, relpath=ds.relpath(i), vp_kind=f"control:{control}",
                              seed=seed, caption=note)
                bar.update(len(idx))
    return {"generated": len(todo), "failed": 0, "sasi_per_image": 1.0}
