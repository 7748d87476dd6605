"""`sasi semantics`: captions, rewrites and visual prompts for a dataset, with a grid PNG.

The first stages of the paper's LMM-MPA without the diffusion models: BLIP-2 captions
(z'), LLM rewrites (z*) and the visual prompt of each (image, variant). Writes
`semantics.jsonl` (one line per image and variant), `summary.json` (counts, fallback
rate, skipped images) and `grid.png` (real | caption | rewrite | mask map | visual prompt).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/...); defaults: embedded data, tiny-zoo")
    parser.add_argument("--out", default="runs/semantics", help="output folder")
    parser.add_argument("--models", help="model folder (models.root), e.g. tiny-zoo from `sasi zoo build`")
    parser.add_argument("--limit", type=int, default=32, help="number of images (first N in index order)")
    parser.add_argument("--vp-kind", choices=["image", "mask", "mix", "noise"], help="visual.kind")
    parser.add_argument("--variants", type=int, help="rewrites per image (semantics.variants)")
    parser.add_argument("--grid-rows", type=int, default=8, help="images shown in grid.png")
    parser.add_argument("--strict", action="store_true", help="stop at a corrupt image instead of skipping it")
    parser.add_argument("--device", help="where the captioner, rewriter and segmenter run: auto (cuda if "
                                         "present), cpu, cuda, cuda:N (semantics.device; semantics.dtype "
                                         "sets their precision)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")


def run(args: argparse.Namespace) -> int:
    from sasi_online.config import load_config
    from sasi_online.data.datasets import IterStats, build_dataset, iter_samples
    from sasi_online.generation.text_stage import ModelText
    from sasi_online.utils import atomic_write_json, atomic_write_text, limit_threads, save_grid
    from sasi_online.visual.prompts import build_visual_prompts, needs_mask
    from sasi_online.visual.segmenter import Segmenter

    limit_threads()
    overrides = list(args.overrides)
    if args.models:
        overrides.append(f"models.root={args.models}")
    if args.vp_kind:
        overrides.append(f"visual.kind={args.vp_kind}")
    if args.variants:
        overrides.append(f"semantics.variants={args.variants}")
    if args.strict:
        overrides.append("data.strict=true")
    if args.device:
        overrides.append(f"semantics.device={args.device}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = build_dataset(cfg.data)
    indices = list(range(min(args.limit, len(ds))))
    stats = IterStats()
    samples = list(iter_samples(ds, tqdm(indices, desc="images", unit="img"), cfg.data.strict, stats))
    t0 = time.perf_counter()
    text = ModelText(cfg, cache_path=out / "captions.jsonl")
    captions = text.captions(samples)
    t_caption = time.perf_counter() - t0

    variants = cfg.semantics.variants
    rows_s = [s for s in samples for _ in range(variants)]
    rewrite_ids = [v for _ in samples for v in range(variants)]
    t0 = time.perf_counter()
    rewrites = text.rewrites([c for c in captions for _ in range(variants)], rows_s, rewrite_ids)
    t_rewrite = time.perf_counter() - t0

    t0 = time.perf_counter()
    # as `sasi generate` builds it (visual.segment_size), so the previewed mask maps are the ones used
    segmenter = (Segmenter.from_config(cfg.models, cfg.visual, device=text.captioner.device,
                                       dtype=next(text.captioner.model.parameters()).dtype)
                 if needs_mask(cfg.visual.kind) else None)
    vps = build_visual_prompts([s.image for s in rows_s], [s.index for s in rows_s], rewrite_ids,
                               cfg=cfg.visual, resolution=cfg.generation.resolution,
                               base_seed=cfg.generation.seed, segmenter=segmenter,
                               semantic_variants=variants)
    t_visual = time.perf_counter() - t0

    lines = []
    for s, v, cap, rw, vp in zip(rows_s, rewrite_ids, [c for c in captions for _ in range(variants)], rewrites, vps):
        lines.append(json.dumps({"index": s.index, "variant": v, "relpath": s.relpath, "label": s.label,
                                 "caption": cap, "rewrite": rw, "vp_kind": vp.kind, "seed": vp.seed}))
    atomic_write_text(out / "semantics.jsonl", "\n".join(lines) + "\n")

    rewrite_stats = text.rewriter.stats.as_dict()
    summary = {
        "images": len(samples), "variants": variants, "skipped_images": stats.skipped,
        "skipped_files": stats.skipped_files, "sep": cfg.semantics.sep,
        "rewrite_mode": cfg.semantics.rewrite_mode, "vp_kind": cfg.visual.kind, "rewrite_stats": rewrite_stats,
        "seconds": {"caption": t_caption, "rewrite": t_rewrite, "visual": t_visual},
    }
    atomic_write_json(out / "summary.json", summary)

    rows, labels = [], []
    for i, s in enumerate(samples[: args.grid_rows]):
        vp = vps[i * variants]
        prompt_image = vp.init_image or vp.control_image
        row = [s.image, f"z': {captions[i]}", f"z*: {rewrites[i * variants]}"]
        row.append(vp.control_image if vp.control_image is not None else "(no mask for this VP kind)")
        row.append(prompt_image if prompt_image is not None else "(pure noise)")
        rows.append(row)
        labels.append(f"#{s.index} {ds.classes[s.label] if 0 <= s.label < len(ds.classes) else ''}")
    save_grid(rows, out / "grid.png", titles=["real", "caption", "rewrite", "mask map", f"VP ({cfg.visual.kind})"],
              row_labels=labels)
    print(f"{len(samples)} images, {len(lines)} rewrites (fallback rate "
          f"{rewrite_stats['fallback_rate']:.0%}), {stats.skipped} skipped -> {out}/grid.png, "
          f"{out}/semantics.jsonl")
    return 0
