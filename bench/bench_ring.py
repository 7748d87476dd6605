"""The ring's cost per trainer micro-step at real sizes: lookup, draw, put and stats.

    python bench/bench_ring.py --slots 100000 --batch 256

Slots hold metadata-size images (--image-side, 1 px by default) so that a 100k-slot ring
fits in host memory; the metadata work is the same as for 512 px slots. The ring is
filled with SASI of random images of a --dataset-size dataset (126,689: ImageNet-100),
then each micro-step looks up a batch whose images are half in the ring (what look-ahead
makes), draws from the pool for the misses, puts --puts new SASI and reads the stats.
It also runs the same steps at slots / 10: an O(batch) ring costs the same at both
(the ratio is printed). One thread, median over --steps micro-steps.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


from sasi_online.online.ring import RingPool  # noqa: E402
from sasi_online.utils import atomic_write_json  # noqa: E402

OPS = ("lookup", "draw", "put", "stats")


def filled_ring(slots: int, side: int, dataset_size: int, max_reuse: int, max_age: int,
                rng: np.random.Generator) -> RingPool:
    ring = RingPool(slots, (side, side, 3), max_reuse=max_reuse, max_age=max_age, dataset_size=dataset_size)
    pixel = torch.zeros((side, side, 3), dtype=torch.uint8)
    for i in rng.integers(0, dataset_size, size=slots).tolist():
        ring.put(i, 0, pixel, step=0)
    return ring


def run(slots: int, batch: int, steps: int, puts: int, side: int, dataset_size: int,
        max_reuse: int = 8, max_age: int = 2000, seed: int = 0) -> dict:
    """Median milliseconds per micro-step of each ring operation."""
    rng = np.random.default_rng(seed)
    ring = filled_ring(slots, side, dataset_size, max_reuse, max_age, rng)
    pixel = torch.zeros((side, side, 3), dtype=torch.uint8)
    times = {op: [] for op in OPS}
    hits = draws = 0
    for step in range(1, steps + 1):
        held = ring.index[rng.integers(0, slots, size=batch // 2)]  # look-ahead hits ...
        indices = np.concatenate([held, rng.integers(0, dataset_size, size=batch - held.size)]).tolist()
        t0 = time.perf_counter()
        found = ring.lookup(indices, step, rng)
        t1 = time.perf_counter()
        misses = sum(h is None for h in found)
        drawn = ring.draw(misses, step, rng, exclude=set(indices))
        t2 = time.perf_counter()
        for i in rng.integers(0, dataset_size, size=puts).tolist():
            ring.put(i, 0, pixel, step)
        t3 = time.perf_counter()
        ring.stats(step)
        t4 = time.perf_counter()
        for op, dt in zip(OPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[op].append(dt * 1e3)
        hits += batch - misses
        draws += len(drawn)
    out = {op: statistics.median(v) for op, v in times.items()}
    out["lookup+draw"] = statistics.median(a + b for a, b in zip(times["lookup"], times["draw"]))
    out.update(slots=slots, batch=batch, puts=puts, hit_rate=hits / (steps * batch), draws=draws / steps)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=100_000, help="ring slots (default 100000)")
    ap.add_argument("--batch", type=int, default=256, help="samples per micro-step (default 256)")
    ap.add_argument("--steps", type=int, default=200, help="micro-steps timed (default 200)")
    ap.add_argument("--puts", type=int, default=8, help="SASI arriving per micro-step (default 8)")
    ap.add_argument("--dataset-size", type=int, default=126_689, help="images in the dataset (ImageNet-100)")
    ap.add_argument("--image-side", type=int, default=1, help="slot image side in px (metadata-size: 1)")
    ap.add_argument("--out", help="write ring.json here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = dict(batch=args.batch, steps=args.steps, puts=args.puts, side=args.image_side,
              dataset_size=args.dataset_size)
    full = run(args.slots, **kw)
    small = run(max(args.slots // 10, args.batch), **kw)
    print(f"ring of {args.slots} slots, batch {args.batch}, {args.puts} puts per micro-step, "
          f"dataset {args.dataset_size}; ms per micro-step (median of {args.steps}):")
    print(f"{'op':<12}{'ms':>9}{'ms at ' + str(small['slots']):>16}{'ratio':>8}")
    for op in (*OPS, "lookup+draw"):
        print(f"{op:<12}{full[op]:>9.3f}{small[op]:>16.3f}{full[op] / max(small[op], 1e-9):>8.2f}")
    print(f"hit rate {full['hit_rate']:.2f}, {full['draws']:.0f} pool draws per micro-step")
    result = {"full": full, "tenth": small}
    if args.out:
        atomic_write_json(Path(args.out) / "ring.json", result)
    return result


if __name__ == "__main__":
    main()
