"""Measured quality of the micro model set against the random tiny set, on the embedded
test split (500 Fashion-MNIST test images the micro set never saw). Writes JSON.

    python bench/bench_micro_zoo.py --out runs/bench_micro_zoo [--random tiny-zoo] [--grid docs/micro_zoo]

The same measures as tests/test_micro_zoo.py (sasi_online.zoo.micro.quality and .judge);
with --random, the random set's figures too (built with `sasi zoo build DIR --random`).
SASI figures: the judge (a small CNN trained here on the embedded train split) reads the
class of SASI made by `generate_store` (what `sasi generate` runs) from the first
--sasi-images test images at --steps steps. --grid DIR writes one PNG per visual-prompt
kind (real | visual prompt | SASI | prompt, one row per class) from the micro set.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# VP kind -> the generation settings its figure is measured with (the rest: defaults)
SASI_KINDS = {
    "image": {"strength": 0.5},
    "mix": {"strength": 0.5},
    "mask": {},
    "noise": {"text": "class_name"},  # text-to-image from "a photo of a <class>"
}
GOALS = {"sasi_image": 0.70, "sasi_mix": 0.60, "sasi_noise": 0.60, "clip_own_sasi_auroc": 0.80}


def _measure_text_and_masks(zoo: Path) -> dict:
    import numpy as np
    from PIL import Image

    from sasi_online.zoo.micro import quality
    from sasi_online.zoo.micro.data import embedded_split

    images, labels = embedded_split("test")
    out: dict = {}
    cap = quality.caption_scores(zoo, images, labels)
    out["caption_garment"], out["caption_shade"] = cap["garment"], cap["shade"]
    rw = quality.rewrite_scores(zoo, cap["captions"][::2])
    out["rewrite_keep"], out["rewrite_differ"] = rw["keep"], rw["differ"]
    out["rewrite_fallback_rate"] = rw["fallback_rate"]
    out["mask_iou"] = quality.mask_iou(zoo, images, 45)["iou"]
    rng = np.random.default_rng(0)
    copies = [Image.fromarray(np.clip(np.roll(im, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) *
                                      rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)).resize((64, 64))
              for im in images]
    out["clip_own_copy_auroc"] = quality.clip_auroc(zoo, images, copies)
    out["examples"] = list(zip(cap["captions"][::2][:3], rw["rewrites"][:3]))
    return out


def _measure_sasi(zoo: Path, judge, n: int, steps: int) -> tuple[dict, dict]:
    """Judge accuracy per VP kind, and CLIP own-SASI AUROC (image VP); also the SASI made."""
    from sasi_online.zoo.micro import judge as J
    from sasi_online.zoo.micro import quality
    from sasi_online.zoo.micro.data import embedded_split

    images, _ = embedded_split("test")
    out, made = {}, {}
    for kind, settings in SASI_KINDS.items():
        t0 = time.perf_counter()
        made[kind] = J.sasi_accuracy(judge, zoo, kind, n, steps=steps, **settings)
        out[f"sasi_{kind}"] = made[kind]["accuracy"]
        out[f"sasi_{kind}_seconds"] = round(time.perf_counter() - t0, 1)
    img = made["image"]
    out["clip_own_sasi_auroc"] = quality.clip_auroc(zoo, images[img["indices"]], img["images"])
    return out, made


def _grids(zoo: Path, made: dict, folder: Path) -> list[str]:
    """One PNG per VP kind: a row per class (its first test image), real | VP | SASI | text."""
    from sasi_online.data.datasets import FASHION_MNIST_CLASSES
    from sasi_online.utils import save_grid
    from sasi_online.zoo.micro import judge as J
    from sasi_online.zoo.micro.data import embedded_split

    images, _ = embedded_split("test")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, m in made.items():
        rows_at = {}
        for pos, y in enumerate(m["labels"]):
            rows_at.setdefault(int(y), pos)
        picks = [rows_at[c] for c in sorted(rows_at)]
        vps = J.visual_prompts(zoo, kind, [m["indices"][p] for p in picks], **SASI_KINDS[kind])
        rows, labels = [], []
        for p, vp in zip(picks, vps):
            cell = vp.init_image if vp.init_image is not None else vp.control_image
            text = f"judge reads: {FASHION_MNIST_CLASSES[int(m['read'][p])]}. Prompt: {m['prompts'][p]}"
            vp_cell = cell if cell is not None else "(pure noise)"
            rows.append([images[m["indices"][p]], vp_cell, m["images"][p], text])
            labels.append(FASHION_MNIST_CLASSES[int(m["labels"][p])])
        path = folder / f"{kind}.png"
        save_grid(rows, path, titles=["real", "visual prompt", "SASI", "prompt"], row_labels=labels, cell=64)
        _shrink_png(path)
        written.append(str(path))
    return written


def _shrink_png(path: Path, colours: int = 64) -> None:
    """A palette PNG (the grids are committed): written beside, renamed into place."""
    import os

    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    with Image.open(path) as im:
        im.convert("RGB").quantize(colours).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_micro_zoo")
    ap.add_argument("--micro", default=None, help="a built micro zoo (default: build one under --out)")
    ap.add_argument("--random", default=None, help="a random tiny zoo to compare with")
    ap.add_argument("--sasi-images", type=int, default=200, help="test images that get SASI per VP kind")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps of those SASI")
    ap.add_argument("--grid", default=None, metavar="DIR",
                    help="write one grid PNG per VP kind into DIR (the README's: docs/micro_zoo)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from sasi_online.zoo.micro import judge as J
    from sasi_online.zoo.micro.data import embedded_split
    from sasi_online.zoo.micro.ship import build_micro

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    micro = Path(args.micro) if args.micro else build_micro(out / "micro-zoo")
    t0 = time.perf_counter()
    judge = J.train_judge(*embedded_split("train"))
    result: dict = {"judge": {"real_test_accuracy": judge.accuracy(*embedded_split("test")),
                              "seconds": round(time.perf_counter() - t0, 1)},
                    "settings": {"sasi_images": args.sasi_images, "steps": args.steps, "kinds": SASI_KINDS},
                    "goals": GOALS}
    zoos = {"micro": micro, **({"random": Path(args.random)} if args.random else {})}
    for name, zoo in zoos.items():
        t0 = time.perf_counter()
        result[name] = _measure_text_and_masks(zoo)
        sasi, made = _measure_sasi(zoo, judge, args.sasi_images, args.steps)
        result[name].update(sasi, seconds=round(time.perf_counter() - t0, 1))
        if name == "micro" and args.grid:
            result["grids"] = _grids(zoo, made, Path(args.grid))
    if args.random:
        result["image_vp_points_above_random"] = round(100 * (result["micro"]["sasi_image"] -
                                                              result["random"]["sasi_image"]), 1)
    from sasi_online.utils import atomic_write_json
    atomic_write_json(out / "micro_zoo.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
