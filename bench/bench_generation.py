"""SASI/s of the generator's own loop vs diffusers' pipelines at the same batch size.

A fair baseline: for each VP kind, batch size and mode, diffusers' Stable Diffusion
pipeline (plain, img2img, ControlNet, ControlNet img2img) is called with the same batch
as the loop (lists of prompts, images and generators), on the same modules, for the same
images (prompts, visual prompts, seeds, sampler, steps). Modes:

  eager    both sides run the modules as they are
  compile  ours: generation.backend=compile (ControlNet + UNet as one graph, compiled VAE
           decode, padded static batches); diffusers: its documented recipe, the UNet and
           the ControlNet each wrapped in torch.compile (and vae.decode), same inductor mode

Each cell is timed after one warm-up call (which compiles); the ratio is ours / diffusers'.
On a CPU the clock is the process's CPU time (`--clock`), so other jobs on shared cores do
not skew the ratios. Writes bench_generation.json after every row and a Markdown table.

    python bench/bench_generation.py --models runs/tiny-zoo --out runs/bench_generation
    python bench/bench_generation.py --modes eager,compile --kinds mask --batch-sizes 4

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


def diffusers_pipeline(gen, kind: str, cfg, compiled: bool):
    """diffusers' pipeline for `kind` over the generator's own modules (compiled as diffusers
    documents it when asked), and a function giving its per-call image arguments."""
    import torch
    from diffusers import (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    from sasi_online.engines.backends import compile_mode_for, inductor_options
    from sasi_online.generation.schedulers import make_scheduler

    fam = gen.family(gen.family_for(kind))
    unet, vae = fam.unet, fam.vae
    controlnet = fam.controlnet if kind in ("mask", "mix") else None
    if compiled:
        options = inductor_options(compile_mode_for(fam.device.type, cfg.compile_mode)[0])
        unet = torch.compile(unet, dynamic=False, options=options)
        controlnet = torch.compile(controlnet, dynamic=False, options=options) if controlnet else None
    parts = dict(vae=vae, text_encoder=fam.text_encoder, tokenizer=fam.tokenizer, unet=unet,
                 scheduler=make_scheduler(cfg.scheduler, fam.scheduler_config), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    res, s = cfg.resolution, cfg.strength
    if kind == "noise":
        pipe, extra = StableDiffusionPipeline(**parts), lambda vps: dict(height=res, width=res)
    elif kind == "image":
        pipe = StableDiffusionImg2ImgPipeline(**parts)
        extra = lambda vps: dict(image=[v.init_image for v in vps], strength=s)  # noqa: E731
    elif kind == "mask":
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
        extra = lambda vps: dict(image=[v.control_image for v in vps], height=res, width=res,  # noqa: E731
                                 controlnet_conditioning_scale=cfg.controlnet_scale)
    else:
        pipe = StableDiffusionControlNetImg2ImgPipeline(controlnet=controlnet, **parts)
        extra = lambda vps: dict(image=[v.init_image for v in vps], control_image=[v.control_image for v in vps],  # noqa: E731
                                 strength=s, height=res, width=res, controlnet_conditioning_scale=cfg.controlnet_scale)
    if compiled:
        pipe.vae.decode = torch.compile(vae.decode, dynamic=False, options=options)
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def run_diffusers(pipe, extra, prompts, vps, seeds, cfg, batch: int) -> None:
    """The pipeline over all images, `batch` at a time, one generator per image."""
    import torch

    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        pipe(prompt=prompts[sl], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, output_type="np",
             generator=[torch.Generator().manual_seed(s) for s in seeds[sl]], **extra(vps[sl]))


def _clock(name: str):
    return time.process_time if name == "cpu" else time.perf_counter


def _rate(fn, n: int, repeats: int, clock) -> float:
    fn()  # warm-up: first-call allocations, lazy loads, compilation
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return n / best


def bench_cell(models, kind: str, mode: str, batch: int, args, clock) -> dict:
    from sasi_online.config import Config
    from sasi_online.generation import SASIGenerator

    cfg = Config()
    cfg.models.root = str(models)
    g = cfg.generation
    g.resolution, g.scheduler, g.steps, g.batch_size = args.resolution, args.scheduler, args.steps, batch
    g.backend = "compile" if mode == "compile" else "eager"
    prompts, vps, seeds = _inputs(kind, args.images, args.resolution)
    ours_gen = SASIGenerator.from_config(cfg.models, g)
    ours = _rate(lambda: ours_gen.generate(prompts, vps, seeds), args.images, args.repeats, clock)
    ref_gen = ours_gen.with_settings(backend="eager")  # the same modules, fresh for diffusers' wrappers
    pipe, extra = diffusers_pipeline(ref_gen, kind, g, compiled=mode == "compile")
    try:
        ref = _rate(lambda: run_diffusers(pipe, extra, prompts, vps, seeds, g, batch), args.images, args.repeats,
                    clock)
    finally:
        vars(pipe.vae).pop("decode", None)  # the compiled decode was set on the shared VAE: undo it
    return {"kind": kind, "mode": mode, "steps": args.steps, "batch_size": batch, "sasi_per_s": round(ours, 3),
            "diffusers_sasi_per_s": round(ref, 3), "ratio": round(ours / ref, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="runs/tiny-zoo", help="model set root; the tiny zoo is built there if missing")
    parser.add_argument("--out", default="runs/bench_generation", help="folder for JSON + Markdown")
    parser.add_argument("--kinds", default="image,mask,mix,noise")
    parser.add_argument("--modes", default="eager,compile", help="eager and/or compile (both sides)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=8, help="SASI per measurement")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--scheduler", default="dpmsolver++")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per cell (best is kept)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="auto: the process's CPU time without a GPU, wall time with one")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from sasi_online.utils import atomic_write_json, atomic_write_text, limit_threads
    from sasi_online.zoo import build_zoo

    limit_threads()
    clock_name = args.clock if args.clock != "auto" else ("wall" if torch.cuda.is_available() else "cpu")
    models = Path(args.models)
    if not (models / "sd15").is_dir():
        build_zoo(models, seed=0)
    out = Path(args.out)
    rows = []
    for mode in args.modes.split(","):
        for kind in args.kinds.split(","):
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                rows.append(bench_cell(models, kind, mode, bs, args, _clock(clock_name)))
                print(json.dumps(rows[-1]), flush=True)
                atomic_write_json(out / "bench_generation.json", {"args": vars(args), "clock": clock_name, "rows": rows})
    lines = ["| mode | VP kind | batch | ours SASI/s | diffusers SASI/s (same batch) | ours / diffusers |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['kind']} | {r['batch_size']} | {r['sasi_per_s']:.2f} | "
              f"{r['diffusers_sasi_per_s']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    note = (f"\nTiny models, {args.resolution} px, {args.scheduler} {args.steps} steps, {args.images} SASI per cell, "
            f"{clock_name} clock, torch threads {os.environ.get('OMP_NUM_THREADS')}. Ratios matter, not absolute "
            f"numbers.\n")
    atomic_write_text(out / "bench_generation.md", "\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
