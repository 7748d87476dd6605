"""train: 20 steps of `train()` on the GPU from configs/mocov2_imagenet100.yaml plus overrides:
DeepSpeed bf16, ZeRO-1, ResNet-50, 224 px, batch 128, random pictures (no download).
--tiny: the same path on a CPU (ResNet-18 small stem, 16 px, batch 8, fp32, 2 steps)."""
from __future__ import annotations

import time
from pathlib import Path

from . import device, peak_memory_mib, random_imagefolder, require, reset_peak_memory, train_rows

REPO = Path(__file__).resolve().parents[2]


def overrides(args, out_dir: Path) -> list[str]:
    tiny = args.tiny
    steps, batch, side = (2, 8, 16) if tiny else (20, 128, 224)
    data = random_imagefolder(out_dir / "data", images=4 * batch, side=side if tiny else 256)
    over = ["data.name=imagefolder", f"data.root={data}", f"data.image_size={side}", "augment.backend=torchvision",
            "train.pair_mode=base", f"train.batch_size={batch}", f"train.steps={steps}", "train.log_every=2",
            f"train.ckpt_every={steps}", "train.knn_every=1000000", "train.zero_stage=1",
            f"train.precision={'fp32' if tiny else 'bf16'}", f"train.out={out_dir / 'run'}", "train.resume=false",
            "method.queue_size=4096", "store.path=null", f"train.num_workers={0 if tiny else 4}"]
    if tiny:
        over += ["method.backbone=resnet18", "method.small_stem=true", "method.proj_hidden=256", "method.proj_dim=64"]
    return over


def run(args, out_dir: Path) -> list[dict]:
    require("deepspeed", "pydantic")
    from sasi_online.config import load_config
    from sasi_online.train import train

    dev = device()
    cfg = load_config(REPO / "configs" / "mocov2_imagenet100.yaml", overrides(args, out_dir))
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    fig = train_rows(out_dir / "run")
    if result.step != cfg.train.steps or not all(v == v for v in result.losses.values()):
        raise RuntimeError(f"trained {result.step}/{cfg.train.steps} steps, losses {result.losses}")
    return [{"phase": "train", "what": f"{cfg.method.backbone} {cfg.data.image_size}px batch {cfg.train.batch_size} "
             f"{cfg.train.precision} ZeRO-{cfg.train.zero_stage}", "images_per_s": fig["images_per_s"],
             "steps": result.step, "final_loss": result.losses[max(result.losses)],
             "peak_gpu_mib": peak_memory_mib(dev), "seconds": seconds}]
