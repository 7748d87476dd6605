"""`sasi generate`: SASI for a dataset, streamed into a resumable store.

Runs captions → rewrites → visual prompts → generation per batch. Running the same
command again continues where it stopped (a kill at any moment loses at most the batch
in flight). Ends with a per-stage time summary (also saved as STORE/reports/timing.json) and a
grid PNG real | visual prompt | SASI (STORE/reports/grid.png).
"""
from __future__ import annotations

import argparse
import json
import sys

from sasi_online.utils import DiskFullError

# CLI option -> dotted config key (None values are left to the config)
OPTION_KEYS = {
    "data": "data.name", "data_root": "data.root", "models": "models.root", "vp_kind": None,
    "steps": "generation.steps", "scheduler": "generation.scheduler", "guidance": "generation.guidance",
    "strength": "generation.strength", "scale": "generation.controlnet_scale",
    "resolution": "generation.resolution", "batch_size": "generation.batch_size",
    "seed": "generation.seed", "family": "generation.family", "text": "generation.text",
    "strict": "data.strict",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = " ".join(__doc__.split("\n\n")[:2]).replace("\n", " ") + (
        " Every option below also exists as a config key; --config FILE and trailing "
        "section.key=value overrides are applied first, explicit options last.")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. generation.negative_prompt='blurry'")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--store", help="store folder (config store.path); created if missing")
    parser.add_argument("--data", help="dataset name (data.name), e.g. fashion_mnist, cifar10, imagefolder")
    parser.add_argument("--data-root", help="dataset folder (data.root); not needed for fashion_mnist")
    parser.add_argument("--models", help="model set root in Hugging Face layout (models.root)")
    parser.add_argument("--vp-kind", choices=["image", "mask", "mix", "noise", "direct"],
                        help="visual prompt: image (img2img), mask (ControlNet-seg), mix (both), "
                             "noise (text-to-image), direct (text only, several seeds per caption; paper "
                             "Table 8). Default: visual.kind")
    parser.add_argument("--variants", type=int, default=1,
                        help="SASI per image: makes sure variants 0..N-1 exist (more can be added later)")
    parser.add_argument("--steps", type=int, help="sampler steps (generation.steps)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim", "dpmsolver++", "unipc"],
                        help="sampler (generation.scheduler); ddpm is the paper's Eq. 2")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (generation.guidance)")
    parser.add_argument("--strength", type=float,
                        help="img2img strength for image/mix prompts, in (0, 1] (generation.strength)")
    parser.add_argument("--scale", type=float, help="ControlNet conditioning scale (generation.controlnet_scale)")
    parser.add_argument("--resolution", type=int, help="square output side in pixels (generation.resolution)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (generation.batch_size)")
    parser.add_argument("--seed", type=int, help="base seed; each (image, variant) derives its own")
    parser.add_argument("--family", choices=["auto", "sd15", "sd21"],
                        help="auto = paper profile: sd21 for image/noise, sd15 + seg ControlNet for mask/mix")
    parser.add_argument("--text", choices=["model", "class_name"],
                        help="model = BLIP-2 caption + LLM rewrite (paper); class_name = 'a photo of a <class>'")
    parser.add_argument("--limit", type=int, help="only the first N images of the dataset")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="stop at a corrupt image instead of skipping it")
    parser.add_argument("--allow-new-settings", action="store_true",
                        help="add SASI made with other settings/models to an existing store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace):
    from sasi_online.config import load_config

    overrides = list(args.overrides or [])
    for opt, key in OPTION_KEYS.items():
        value = getattr(args, opt, None)
        if key is not None and value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.store:
        overrides.append(f"store.path={json.dumps(args.store)}")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    import logging

    from sasi_online.errors import UserInputError
    from sasi_online.generation.offline import GRID_FILE, TIMING_FILE, generate_store
    from sasi_online.utils import limit_threads

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limit_threads()
    cfg = build_config(args)
    if not cfg.store.path:
        raise UserInputError("no store folder: pass --store DIR (or set store.path in the config)")
    try:
        summary = generate_store(cfg, cfg.store.path, kind=args.vp_kind, variants=args.variants,
                                 limit=args.limit, allow_new_settings=args.allow_new_settings,
                                 progress=not args.no_progress)
    except DiskFullError as exc:
        print(f"sasi generate: stopped: {exc.strerror}", file=sys.stderr)
        return 3
    print(f"generated {summary.generated} SASI ({summary.failed} failed, "
          f"{summary.skipped_existing} already in the store, {summary.skipped_corrupt} corrupt images "
          f"skipped) in {summary.wall_seconds:.1f} s: {summary.sasi_per_second:.2f} SASI/s")
    if summary.generated:
        print("seconds per SASI by stage: " + ", ".join(
            f"{k} {v / summary.generated:.4f}" for k, v in sorted(summary.seconds.items())))
        print(f"timing: {cfg.store.path}/{TIMING_FILE}   grid: {cfg.store.path}/{GRID_FILE}")
    return 0
