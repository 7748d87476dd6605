"""Opening a SASI store with millions of records: build time, open time, memory, lookups/s.

    python bench/bench_store.py --records 1000000

Synthesises a store of --records manifest records (--variants per image, plus a
similarity/fishy update line for --updates of them, as `sasi filter` writes) with one
buffered write: no image files and no million fsyncs; the metadata path is what is
measured. Then, each in a fresh process (one thread):
- build:  the first open, which builds manifest.index from the manifest;
- open:   opening with the index: seconds and RSS growth, then lookups per second of
          `variant_table` (what training asks per sample, index only) and of `record`
          (a full record read back from the manifest).
The synthetic store is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


WORDS = ("a person wearing a red dress standing on a street with trees and cars in the background "
         "photo of a dog lying on grass near a wooden fence under a blue sky").split()


def synthesise(root: Path, records: int, variants: int = 8, updates: float = 0.1, seed: int = 0) -> int:
    """A store folder whose manifest holds `records` SASI records; returns the image count."""
    from sasi_online.data.store import HEADER, MANIFEST, STORE_FORMAT

    rnd = random.Random(seed)
    images = max(1, -(-records // variants))
    root.mkdir(parents=True, exist_ok=True)
    header = {"format": STORE_FORMAT, "dataset": {"name": "synthetic", "split": "train", "size": images},
              "models": {}, "settings": {}, "settings_hash": "0" * 16, "image_format": "png"}
    (root / HEADER).write_text(json.dumps(header))
    with open(root / MANIFEST, "w", encoding="utf-8", buffering=8 << 20) as fh:
        for k in range(records):
            i, v = k % images, k // images
            rel = f"train/{i % 100}_class{i % 100}/{i:07d}"
            caption = " ".join(rnd.choices(WORDS, k=14))
            line = {"caption": caption, "failed": False, "file": f"{rel}/v{v}.png", "index": i,
                    "relpath": rel, "retries": 0, "rewrite": caption + " at sunset, high detail",
                    "seed": rnd.getrandbits(31), "settings": "5f0c2a9e1b7d4c36", "variant": v,
                    "vp_kind": ("image", "mask", "mix", "noise")[v % 4]}
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            if rnd.random() < updates:
                sim = round(rnd.random(), 4)
                fh.write(json.dumps({"fishy": sim < 0.2, "index": i, "similarity": sim, "variant": v},
                                    sort_keys=True) + "\n")
    return images


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def phase(root: Path, which: str, lookups: int) -> dict:
    """One measurement in this process (the parent runs each in a fresh one)."""
    import numpy as np

    from sasi_online.data.store import SasiStore

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    store = SasiStore.open(root)
    out = {"seconds": time.perf_counter() - t0, "records": len(store), "rss_mb": _rss_mb() - rss0}
    if which == "open":
        n = int(store.header["dataset"]["size"])
        picks = np.random.default_rng(0).integers(0, n, size=lookups).tolist()
        t0 = time.perf_counter()
        first = [store.variant_table(i)[0][0] for i in picks]
        out["variant_lookups_per_s"] = lookups / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i, v in zip(picks[: lookups // 4], first):
            store.record(i, v)
        out["record_reads_per_s"] = (lookups // 4) / (time.perf_counter() - t0)
        out["rss_after_lookups_mb"] = _rss_mb() - rss0
    return out


def _in_child(root: Path, which: str, lookups: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--phase", which, "--dir", str(root), "--lookups", str(lookups)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000, help="manifest records (default 1000000)")
    ap.add_argument("--variants", type=int, default=8, help="SASI per image (default 8)")
    ap.add_argument("--updates", type=float, default=0.1, help="fraction of records with an update line")
    ap.add_argument("--lookups", type=int, default=20000, help="random lookups timed (default 20000)")
    ap.add_argument("--dir", help="where to put the synthetic store (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store")
    ap.add_argument("--phase", choices=("build", "open"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help="write store.json here")
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(Path(args.dir), args.phase, args.lookups)))
        return {}
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-store-"))
    root = base / "store"
    try:
        t0 = time.perf_counter()
        images = synthesise(root, args.records, args.variants, args.updates)
        made = time.perf_counter() - t0
        size_mb = (root / "manifest.jsonl").stat().st_size / 2**20
        build = _in_child(root, "build", args.lookups)
        opened = _in_child(root, "open", args.lookups)
        index_mb = (root / "manifest.index").stat().st_size / 2**20
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            if not args.dir:
                shutil.rmtree(base, ignore_errors=True)
    result = {"records": args.records, "images": images, "manifest_mb": size_mb, "index_mb": index_mb,
              "synthesise_s": made, "build": build, "open": opened}
    print(f"store of {args.records} records ({images} images, manifest {size_mb:.0f} MB, "
          f"index {index_mb:.0f} MB; synthesised in {made:.1f} s)")
    print(f"first open, building the index: {build['seconds']:.2f} s, +{build['rss_mb']:.0f} MB RSS")
    print(f"open with the index:            {opened['seconds']:.3f} s, +{opened['rss_mb']:.1f} MB RSS "
          f"(+{opened['rss_after_lookups_mb']:.1f} MB after the lookups)")
    print(f"lookups: {opened['variant_lookups_per_s']:,.0f} variant tables/s (index only), "
          f"{opened['record_reads_per_s']:,.0f} full records/s (from the manifest)")
    if args.out:
        from sasi_online.utils import atomic_write_json
        atomic_write_json(Path(args.out) / "store.json", result)
    return result


if __name__ == "__main__":
    main()
