"""Measured quality of the micro model set against the random tiny set, on the embedded
test split (500 Fashion-MNIST test images the micro set never saw). Writes JSON.

    python bench/bench_micro_zoo.py --out runs/bench_micro_zoo [--random tiny-zoo]

The same measures as tests/test_micro_zoo.py (sasi_online.zoo.micro.quality); with
--random, the random set's figures too (built with `sasi zoo build DIR --random`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _measure(zoo: Path) -> dict:
    import numpy as np
    from PIL import Image

    from sasi_online.zoo.micro import quality
    from sasi_online.zoo.micro.data import embedded_split

    images, labels = embedded_split("test")
    out: dict = {}
    t0 = time.perf_counter()
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
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["examples"] = list(zip(cap["captions"][::2][:3], rw["rewrites"][:3]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_micro_zoo")
    ap.add_argument("--micro", default=None, help="a built micro zoo (default: build one under --out)")
    ap.add_argument("--random", default=None, help="a random tiny zoo to compare with")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from sasi_online.zoo.micro.ship import build_micro

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    micro = Path(args.micro) if args.micro else build_micro(out / "micro-zoo")
    result = {"micro": _measure(micro)}
    if args.random:
        result["random"] = _measure(Path(args.random))
    from sasi_online.utils import atomic_write_json
    atomic_write_json(out / "micro_zoo.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
