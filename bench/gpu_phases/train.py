"""train: two rows from configs/mocov2_imagenet100.yaml plus overrides (ResNet-50, 224 px,
batch 128):

    on device  the GPU alone: synthetic uint8 batches already on the device, both views made
               there by the ring augmentation (Triton, or the vectorised torch path when the
               probe disabled it), the product's method, bf16 autocast, a torch SGD step;
               20 steps after 3 warm-up steps, one sync at the end
    data path  20 steps of `train()`: DeepSpeed bf16, ZeRO-1, random pictures decoded and
               augmented by the product's loader (torchvision, 4 workers): what a run sees

--tiny: the same on a CPU (ResNet-18 small stem, 16 px, batch 8, fp32, 2 steps)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import device, peak_memory_mib, random_imagefolder, require, reset_peak_memory, sync, train_rows

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


def on_device_row(cfg, dev: torch.device, tiny: bool) -> dict:
    """Images/s of the method's step with the data already on the device (no loader)."""
    from sasi_online.kernels import AugRecipe, augment_views, last_choice, sample_aug_params
    from sasi_online.ssl import build_method

    batch, side, steps = cfg.train.batch_size, cfg.data.image_size, cfg.train.steps
    src = side + side // 7  # source slots a little larger than the views, as the ring holds them
    method = build_method(cfg.method).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, src, src, 3), dtype=torch.uint8, generator=g).to(dev)
    params = [sample_aug_params(batch, (src, src), AugRecipe(), g) for _ in range(2)]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step(i: int) -> None:
        views = [augment_views(images, p, side).contiguous(memory_format=torch.channels_last) for p in params]
        with amp:
            loss = method(views, i, steps)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end(i, steps)

    for i in range(1 if tiny else 3):
        step(i)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(dev)
    seconds = time.perf_counter() - t0
    return {"phase": "train", "what": f"on device: {cfg.method.backbone} {side}px batch {batch}, synthetic uint8 "
            f"on {dev.type}, views by {last_choice('ring_augment').backend}", "images_per_s": batch * steps / seconds,
            "steps": steps, "peak_gpu_mib": peak_memory_mib(dev), "seconds": seconds}


def run(args, out_dir: Path) -> list[dict]:
    require("yaml", "tqdm", "deepspeed", "pydantic")
    from sasi_online.config import load_config
    from sasi_online.train import train

    dev = device()
    cfg = load_config(REPO / "configs" / "mocov2_imagenet100.yaml", overrides(args, out_dir))
    reset_peak_memory(dev)
    rows = [on_device_row(cfg, dev, args.tiny)]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    fig = train_rows(out_dir / "run")
    if result.step != cfg.train.steps or not all(v == v for v in result.losses.values()):
        raise RuntimeError(f"trained {result.step}/{cfg.train.steps} steps, losses {result.losses}")
    return rows + [{"phase": "train", "what": f"data path: {cfg.method.backbone} {cfg.data.image_size}px batch "
                    f"{cfg.train.batch_size} {cfg.train.precision} ZeRO-{cfg.train.zero_stage}, torchvision loader",
                    "images_per_s": fig["images_per_s"], "steps": result.step,
                    "final_loss": result.losses[max(result.losses)], "peak_gpu_mib": peak_memory_mib(dev),
                    "seconds": seconds}]
