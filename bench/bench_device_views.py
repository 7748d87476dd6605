"""Host work of one online micro-step's views, before and after the split (issue: views on the device).

    python bench/bench_device_views.py --batch 256 --image-size 224

A synthetic dataset of JPEG-encoded 500x375 images (ImageNet's typical size) and a ring
of 256 px slots (SASI + real image) holding half the batch's images (look-ahead hits);
the other half are pool draws. Per micro-step, one thread, median of --steps:
- `host_pairs_s`    the host path (augment.backend=dali's shape, here with torchvision):
                    resolve + decode + augment every view in the trainer process;
- `worker_s`        the split path's DataLoader-worker part: decode + uint8 real views
                    (off the trainer's critical path: train.num_workers run it ahead);
- `trainer_host_s`  the split path's trainer-process work outside `augment_views`
                    (resolve, plan, gathers, normalisation, scatter): what stays on the
                    step's critical path when `augment_views` runs on a GPU;
- `augment_views_s` the batched ring augmentation (here its torch reference on the CPU;
                    on a GPU the Triton kernel, asynchronous to the host).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch


from sasi_online.config import Config  # noqa: E402
from sasi_online.data.augment import build_augmenter  # noqa: E402
from sasi_online.data.pairs import PairBuilder  # noqa: E402
from sasi_online.data.sampler import StepSampler  # noqa: E402
from sasi_online.online.device_views import DeviceViewBatches, RealViews  # noqa: E402
from sasi_online.online.ring import RingPool  # noqa: E402
from sasi_online.online.ring_source import OnlineMicroBatches, RingSource  # noqa: E402


class JpegDataset:
    """`n` distinct JPEG files in memory, decoded on access like a folder dataset."""

    def __init__(self, n: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            self.blobs.append(buf.getvalue())

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        from types import SimpleNamespace

        from PIL import Image

        return SimpleNamespace(image=Image.open(io.BytesIO(self.blobs[i])).convert("RGB"))


def _ring(ds_size: int, batch: int, side: int, sampler: StepSampler, steps: int) -> RingPool:
    ring = RingPool(batch * 2, (2, side, side, 3), max_reuse=10 ** 6, max_age=10 ** 6, dataset_size=ds_size)
    slot = torch.randint(0, 256, (2, side, side, 3), dtype=torch.uint8)
    for m in range(steps):
        for i in sampler.indices(m, 0)[: batch // 2]:  # half of each batch: look-ahead hits
            ring.put(i, 0, slot, step=0)
    others = [i for i in range(ds_size) if i not in set(ring.index.tolist())][: ring.slots - ring.live_count]
    for i in others:  # draws for the other half
        ring.put(i, 0, slot, step=0)
    return ring


def run(batch: int, image_size: int, steps: int, recipe: str = "mocov2") -> dict:
    torch.set_num_threads(1)
    cfg = Config()
    cfg.data.image_size, cfg.augment.recipe = image_size, recipe
    side = int(np.ceil(image_size * 8 / 7))
    steps += 1  # micro-step 0 warms up (transforms built, first allocations): not timed
    ds = JpegDataset(batch * (steps + 2))
    sampler = StepSampler(len(ds), batch, seed=0)
    augmenter = build_augmenter(cfg.augment, image_size)
    import sasi_online.kernels.dispatch as dispatch

    original, timed = dispatch.augment_views, {"s": 0.0}

    def timing_augment(*a, **k):  # device_views imports augment_views at call time
        t0 = time.perf_counter()
        out = original(*a, **k)
        timed["s"] += time.perf_counter() - t0
        return out

    rows = {k: [] for k in ("host_pairs_s", "worker_s", "trainer_host_s", "augment_views_s")}
    source = RingSource(_ring(len(ds), batch, side, sampler, steps))
    old = OnlineMicroBatches(ds, sampler, PairBuilder("sasi", augmenter, source), 0, 0, source)
    for m in range(steps):
        t0 = time.perf_counter()
        old(m)
        rows["host_pairs_s"].append(time.perf_counter() - t0)
    source = RingSource(_ring(len(ds), batch, side, sampler, steps), on_device=True)
    builder = PairBuilder("sasi", augmenter, source)
    worker = RealViews(ds, sampler, builder, 0, 0)
    trainer = DeviceViewBatches(sampler, builder, source, 0, 0, torch.device("cpu"), image_size)
    dispatch.augment_views = timing_augment
    try:
        for m in range(steps):
            t0 = time.perf_counter()
            raw = worker(m).views
            t1 = time.perf_counter()
            timed["s"] = 0.0
            trainer(m, raw)
            t2 = time.perf_counter()
            rows["worker_s"].append(t1 - t0)
            rows["augment_views_s"].append(timed["s"])
            rows["trainer_host_s"].append(t2 - t1 - timed["s"])
    finally:
        dispatch.augment_views = original
    out = {k: statistics.median(v[1:]) for k, v in rows.items()}
    out.update(batch=batch, image_size=image_size, slot_side=side, steps=steps - 1,
               critical_path_ratio=out["host_pairs_s"] / max(out["trainer_host_s"], 1e-9))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="samples per micro-step (per trainer)")
    p.add_argument("--image-size", type=int, default=224, help="data.image_size (view side)")
    p.add_argument("--steps", type=int, default=3, help="micro-steps timed (median)")
    p.add_argument("--recipe", default="mocov2", help="augment recipe")
    args = p.parse_args(argv)
    result = run(args.batch, args.image_size, args.steps, args.recipe)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
