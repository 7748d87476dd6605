"""SASI/s of the generator's own loop vs diffusers' pipelines called per image.

For each VP kind × batch size × step count, both sides make the same images (same
prompts, visual prompts, seeds and settings) on the tiny model set; the table reports
SASI/s of each and their ratio. Writes JSON and a Markdown table.

    python bench/bench_generation.py --models tiny-zoo --out runs/bench_generation

Speed is measured, not asserted: compare ratios on one machine, not absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _inputs(kind: str, n: int, res: int):
    import numpy as np
    from PIL import Image

    from sasi_online.visual.prompts import make_visual_prompt

    rng = np.random.default_rng(0)
    prompts, vps = [], []
    for i in range(n):
        real = Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8))
        mask = (rng.integers(0, 150, (8, 8)).repeat(res // 8, 0).repeat(res // 8, 1))
        prompts.append(f"a photo of object number {i}")
        vps.append(make_visual_prompt(kind, real, mask, resolution=res, seed=i))
    return prompts, vps, list(range(n))


def _diffusers_per_image(gen, kind: str, prompts, vps, seeds, cfg) -> None:
    """diffusers' own pipeline, one call per image, same components and settings."""
    import torch
    from diffusers import (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    from sasi_online.generation.schedulers import make_scheduler

    fam = gen.family(gen.family_for(kind))
    parts = dict(vae=fam.vae, text_encoder=fam.text_encoder, tokenizer=fam.tokenizer, unet=fam.unet,
                 scheduler=make_scheduler(cfg.scheduler, fam.scheduler_config), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    res = cfg.resolution
    if kind == "noise":
        pipe, extra = StableDiffusionPipeline(**parts), lambda vp: dict(height=res, width=res)
    elif kind == "image":
        pipe, extra = StableDiffusionImg2ImgPipeline(**parts), lambda vp: dict(image=vp.init_image,
                                                                                 strength=cfg.strength)
    elif kind == "mask":
        pipe = StableDiffusionControlNetPipeline(controlnet=fam.controlnet, **parts)
        extra = lambda vp: dict(image=vp.control_image, height=res, width=res,  # noqa: E731
                                controlnet_conditioning_scale=cfg.controlnet_scale)
    else:
        pipe = StableDiffusionControlNetImg2ImgPipeline(controlnet=fam.controlnet, **parts)
        extra = lambda vp: dict(image=vp.init_image, control_image=vp.control_image,  # noqa: E731
                                strength=cfg.strength, height=res, width=res,
                                controlnet_conditioning_scale=cfg.controlnet_scale)
    pipe.set_progress_bar_config(disable=True)
    for prompt, vp, seed in zip(prompts, vps, seeds):
        pipe(prompt=prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, output_type="np",
             generator=torch.Generator().manual_seed(seed), **extra(vp))


def _rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy loads
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="runs/tiny-zoo",
                        help="model set root; the tiny zoo is built there if missing")
    parser.add_argument("--out", default="runs/bench_generation", help="folder for JSON + Markdown")
    parser.add_argument("--kinds", default="image,mask,mix,noise")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--steps", default="10")
    parser.add_argument("--images", type=int, default=8, help="SASI per measurement")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--scheduler", default="dpmsolver++")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per cell (best is kept)")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from sasi_online.config import Config
    from sasi_online.generation import SASIGenerator
    from sasi_online.utils import atomic_write_json, atomic_write_text, limit_threads
    from sasi_online.zoo import build_zoo

    limit_threads()
    models = Path(args.models)
    if not (models / "sd15").is_dir():
        build_zoo(models, seed=0)
    out = Path(args.out)
    rows = []
    cfg = Config()
    cfg.models.root = str(models)
    cfg.generation.resolution = args.resolution
    cfg.generation.scheduler = args.scheduler
    for steps in [int(s) for s in args.steps.split(",")]:
        for kind in args.kinds.split(","):
            prompts, vps, seeds = _inputs(kind, args.images, args.resolution)
            cfg.generation.steps = steps
            ref_gen = SASIGenerator.from_config(cfg.models, cfg.generation)
            ref = _rate(lambda: _diffusers_per_image(ref_gen, kind, prompts, vps, seeds, cfg.generation),
                        args.images, args.repeats)
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                cfg.generation.batch_size = bs
                gen = SASIGenerator.from_config(cfg.models, cfg.generation)
                ours = _rate(lambda: gen.generate(prompts, vps, seeds), args.images, args.repeats)
                row = {"kind": kind, "steps": steps, "batch_size": bs, "sasi_per_s": round(ours, 3),
                       "diffusers_per_image_sasi_per_s": round(ref, 3), "speedup": round(ours / ref, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                atomic_write_json(out / "bench_generation.json", {"args": vars(args), "rows": rows})
    lines = ["| VP kind | steps | batch | ours SASI/s | diffusers per image SASI/s | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['steps']} | {r['batch_size']} | {r['sasi_per_s']:.2f} | "
              f"{r['diffusers_per_image_sasi_per_s']:.2f} | {r['speedup']:.2f}x |" for r in rows]
    note = (f"\nTiny models, {args.resolution} px, {args.scheduler}, {args.images} SASI per cell, "
            f"torch threads {os.environ.get('OMP_NUM_THREADS')}. Ratios matter, not absolute numbers.\n")
    atomic_write_text(out / "bench_generation.md", "\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
