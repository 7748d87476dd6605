"""Start-up cost of the model identity on full-size snapshots, without downloading them.

Builds each snapshot's file list (tests/fixtures/real_checkpoints/<name>/FILES.txt) with
its config files and every weight file as a sparse file of the real size (sizes below,
the hub's listed sizes rounded to the MB), then times:

  legacy   the identity of earlier versions: every .json/.safetensors/.bin/.model file read
  cold     the identity now (configs + the weights a loader opens), empty file-hash cache
  cached   the same in a fresh process (file-hash cache on disk; nothing is read)
  hub      the same snapshot as a hub cache (links into blobs/ named by sha256), empty cache

Sparse files read as zeros without touching the disk, so `legacy` and `cold` here are the
hashing (CPU) time only; on a real disk add the time to read the bytes (reported as GB).

    python bench/bench_identity.py [--out runs/bench_identity] [--only sd15]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real_checkpoints"
MB = 1_000_000
# real sizes in MB of the large files (hub listing, rounded); any other weight file: 1 MB
SIZES = {
    "sd15": {
        "unet/diffusion_pytorch_model.safetensors": 3438, "unet/diffusion_pytorch_model.bin": 3438,
        "unet/diffusion_pytorch_model.non_ema.safetensors": 3438,
        "unet/diffusion_pytorch_model.non_ema.bin": 3438,
        "unet/diffusion_pytorch_model.fp16.safetensors": 1719, "unet/diffusion_pytorch_model.fp16.bin": 1719,
        "vae/diffusion_pytorch_model.safetensors": 335, "vae/diffusion_pytorch_model.bin": 335,
        "vae/diffusion_pytorch_model.fp16.safetensors": 167, "vae/diffusion_pytorch_model.fp16.bin": 167,
        "text_encoder/model.safetensors": 492, "text_encoder/pytorch_model.bin": 492,
        "text_encoder/model.fp16.safetensors": 246, "text_encoder/pytorch_model.fp16.bin": 246,
        "safety_checker/model.safetensors": 1216, "safety_checker/pytorch_model.bin": 1216,
        "safety_checker/model.fp16.safetensors": 608, "safety_checker/pytorch_model.fp16.bin": 608,
        "v1-5-pruned-emaonly.ckpt": 4265, "v1-5-pruned-emaonly.safetensors": 4265,
        "v1-5-pruned.ckpt": 7704, "v1-5-pruned.safetensors": 7703,
    },
    "llama": {
        "model-00001-of-00002.safetensors": 9976, "model-00002-of-00002.safetensors": 3500,
        "pytorch_model-00001-of-00002.bin": 9977, "pytorch_model-00002-of-00002.bin": 3500,
        "tokenizer.model": 1,
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".model")


def build(name: str, dest: Path) -> float:
    """The snapshot with sparse weights; returns the GB of weight files."""
    total = 0
    for rel in (FIXTURES / name / "FILES.txt").read_text().split():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        src = FIXTURES / name / rel
        if src.is_file():
            shutil.copyfile(src, path)
        elif rel.endswith(WEIGHT_SUFFIXES):
            size = SIZES[name].get(rel, 1) * MB
            with open(path, "wb") as fh:
                fh.truncate(size)
            total += size
        else:
            path.write_text("{}" if rel.endswith(".json") else "x")
    return total / 1e9


def hub(folder: Path, root: Path) -> Path:
    """`folder` as a hub cache; sparse weights become sparse blobs named by a sha256."""
    snap = root / "models--org--name" / "snapshots" / ("a" * 40)
    blobs = root / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        name = hashlib.sha256(p.relative_to(folder).as_posix().encode()).hexdigest()  # stands for its content
        if p.suffix not in WEIGHT_SUFFIXES:
            name = hashlib.sha1(p.read_bytes()).hexdigest()
        os.replace(p, blobs / name)
        link = snap / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blobs / name, link.parent), link)
    return snap


def timed(fn: str, folder: Path, cache: Path) -> tuple[float, str]:
    """Seconds and result of `sasi_online.zoo.<fn>(folder)` in a fresh process (imports excluded)."""
    code = ("import sys,time; from sasi_online import zoo; t=time.perf_counter(); "
            f"h=zoo.{fn}(sys.argv[1]); print(time.perf_counter()-t, h)")
    env = dict(os.environ, SASI_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_identity")
    ap.add_argument("--only", choices=sorted(SIZES), help="one snapshot")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for name in [args.only] if args.only else sorted(SIZES):
        folder = out / name
        gb = build(name, folder)
        row = {"snapshot": name, "weights_gb": round(gb, 1)}
        row["legacy_s"] = round(timed("legacy_model_hash", folder, out / f"{name}-cache-legacy")[0], 2)
        row["cold_s"] = round(timed("model_hash", folder, out / f"{name}-cache")[0], 2)
        row["cached_s"] = round(timed("model_hash", folder, out / f"{name}-cache")[0], 3)
        row["hub_s"] = round(timed("model_hash", hub(folder, out / f"{name}-hub"), out / f"{name}-cache-hub")[0], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    from sasi_online.utils import atomic_write_json
    atomic_write_json(out / "identity.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
