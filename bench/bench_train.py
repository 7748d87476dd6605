"""Trainer throughput per method, and DALI vs torchvision augmentation, in one run.

    python bench/bench_train.py [--methods mocov2,simclr] [--steps 5] [--out bench/results]

Writes `bench_train.json` and `bench_train.md` (tables side by side). Trainer images/s
is the median over the steps after the first (which pays for warm-up), counted in
source images per optimizer step over all trainers. Numbers depend on the machine and
its load: compare ratios within one run, not across machines.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


import numpy as np  # noqa: E402
import torch  # noqa: E402

from sasi_online.utils import atomic_write_json, atomic_write_text, limit_threads  # noqa: E402

MULTI_CROP = {"dino", "swav"}
RECIPE = {"simclr": "simclr", "byol": "simclr", "dino": "dino", "swav": "dino"}


def bench_augment(batch: int, repeats: int, image_size: int) -> list[dict]:
    from sasi_online.data.augment import TorchvisionAugmenter, load_recipe
    from sasi_online.data.dali_pipeline import DaliAugmenter, dali_available

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(batch)]
    rows = []
    for name in ("mocov2", "simclr"):
        recipe = load_recipe(name)
        backends = [TorchvisionAugmenter(recipe, image_size)]
        if dali_available():
            backends.append(DaliAugmenter(recipe, image_size, max_batch=batch))
        for aug in backends:
            aug.apply("global0", images[:8])  # warm-up (DALI builds its pipeline)
            t0 = time.perf_counter()
            for _ in range(repeats):
                for kind in recipe.view_kinds(2, 0):
                    aug.apply(kind, images)
            dt = time.perf_counter() - t0
            rows.append({"recipe": name, "backend": aug.backend,
                         "views_per_s": 2 * batch * repeats / dt})
    return rows


def bench_trainer(methods: list[str], steps: int, batch: int, image_size: int, backbone: str) -> list[dict]:
    from sasi_online.config import config_from_dict
    from sasi_online.training.metrics import read_metrics
    from sasi_online.train import train

    rows = []
    for name in methods:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_from_dict({
                "data": {"name": "fashion_mnist", "image_size": image_size},
                "augment": {"recipe": RECIPE.get(name, "mocov2")},
                "method": {"name": name, "backbone": backbone, "queue_size": batch * 8,
                           "proj_dim": 64, "proj_hidden": 256, "pred_hidden": 256,
                           "num_prototypes": 64, "local_crops": 2 if name in MULTI_CROP else 0},
                "train": {"pair_mode": "base", "batch_size": batch, "steps": steps, "log_every": 1,
                          "ckpt_every": 10 ** 6, "knn_every": 10 ** 6, "knn_bank": 10, "knn_test": 10,
                          "out": tmp},
            })
            t0 = time.perf_counter()
            train(cfg)
            wall = time.perf_counter() - t0
            per_step = [r["images_per_s"] for r in read_metrics(Path(tmp) / "metrics.jsonl", "loss")][1:]
            rows.append({"method": name, "images_per_s": statistics.median(per_step) if per_step else float("nan"),
                         "wall_s": wall})
            print(f"  {name}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
    return rows


def to_markdown(result: dict) -> str:
    lines = ["# bench_train", "", f"backbone {result['backbone']}, {result['image_size']} px, "
             f"batch {result['batch']}, {result['steps']} steps, {result['threads']} thread(s)", "",
             "| method | trainer img/s |", "|---|---|"]
    lines += [f"| {r['method']} | {r['images_per_s']:.1f} |" for r in result["trainer"]]
    lines += ["", "| recipe | backend | views/s | vs torchvision |", "|---|---|---|---|"]
    base = {r["recipe"]: r["views_per_s"] for r in result["augment"] if r["backend"] == "torchvision"}
    for r in result["augment"]:
        lines.append(f"| {r['recipe']} | {r['backend']} | {r['views_per_s']:.0f} | "
                     f"{r['views_per_s'] / base[r['recipe']]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="mocov2,simclr,byol,simsiam,barlow_twins,dino")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--aug-batch", type=int, default=256)
    p.add_argument("--aug-repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    limit_threads()
    print("augmentation ...", flush=True)
    augment = bench_augment(args.aug_batch, args.aug_repeats, 32)
    print("trainer ...", flush=True)
    trainer = bench_trainer([m for m in args.methods.split(",") if m], args.steps, args.batch,
                            args.image_size, args.backbone)
    result = {"backbone": args.backbone, "image_size": args.image_size, "batch": args.batch,
              "steps": args.steps, "threads": torch.get_num_threads(), "trainer": trainer,
              "augment": augment}
    out = Path(args.out)
    atomic_write_json(out / "bench_train.json", result)
    md = to_markdown(result)
    atomic_write_text(out / "bench_train.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
