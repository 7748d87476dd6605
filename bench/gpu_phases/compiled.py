"""The generate phase's compiled rows, each in a child process with a hard time limit.

A torch.compile cannot be interrupted once it has started, and on a cold cache it can take
minutes: so each compiled shape runs in `gpu_check.py --compile-child SPEC.json`, killed
(with its compile workers) when its share of the phase's limit is spent. The child uses
inductor's default settings (SASI_INDUCTOR_TUNING=default: no coordinate-descent tuning),
keeps the VAE decode eager (SASI_COMPILE_DECODER=0) and caches under <out>/inductor-cache
(TORCHINDUCTOR_CACHE_DIR), so a rerun compiles warm.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from . import run_limited

GPU_CHECK = Path(__file__).resolve().parents[1] / "gpu_check.py"


def child_env(out_dir: Path) -> dict:
    cache = Path(out_dir).resolve().parent / "inductor-cache"
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
            "SASI_INDUCTOR_TUNING": "default", "SASI_COMPILE_DECODER": "0"}


def compiled_rows(args, batches, px: int, steps: int, peak: dict, flops: float, out_dir: Path,
                  deadline: float) -> list[dict]:
    """One row per batch: measured in a child, or a note saying why not."""
    from sasi_online.kernels import triton_probe

    rows = []
    for i, batch in enumerate(batches):
        what = f"compile batch {batch}"
        left = deadline - time.perf_counter()
        problem = triton_probe("cuda") if torch.cuda.is_available() else None
        if not args.compile:
            rows.append({"phase": "generate", "what": what, "note": "skipped: compile off (default with --tiny: "
                         "an inductor build takes minutes on a small CPU; pass --compile)"})
        elif problem:
            rows.append({"phase": "generate", "what": what, "note": f"skipped: inductor needs what the Triton "
                         f"probe lacks ({problem})"})
        elif left < args.compile_min_seconds:
            rows.append({"phase": "generate", "what": what, "note": f"skipped: {left:.0f} s left of the phase's "
                         f"limit < --compile-min-seconds {args.compile_min_seconds:.0f}"})
        else:
            limit = left if i == len(batches) - 1 else max(left - args.compile_min_seconds / 2, args.compile_min_seconds)
            rows.append(run_child(args, batch, px, steps, peak, flops, out_dir, min(limit, left)))
    return rows


def run_child(args, batch: int, px: int, steps: int, peak: dict, flops: float, out_dir: Path,
              limit: float) -> dict:
    spec = out_dir / f"compile_b{batch}.spec.json"
    result = out_dir / f"compile_b{batch}.row.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"tiny": bool(args.tiny), "batch": batch, "px": px, "steps": steps, "peak": peak,
                                "flops": flops, "seconds": float(args.section_seconds), "out": str(out_dir),
                                "row": str(result)}))
    log = out_dir / f"compile_b{batch}.log"
    t0 = time.perf_counter()
    rc = run_limited([sys.executable, str(GPU_CHECK), "--compile-child", str(spec)], limit, log, child_env(out_dir))
    wall = round(time.perf_counter() - t0, 1)
    if rc == 0 and result.is_file():
        return {**json.loads(result.read_text()), "child_seconds": wall}
    tail = log.read_text(errors="replace")[-300:] if log.is_file() else ""
    why = f"killed at its hard limit of {limit:.0f} s" if rc is None else f"child exited {rc}: {tail}"
    return {"phase": "generate", "what": f"compile batch {batch}", "error": why, "child_seconds": wall,
            "log": str(log)}


def child_main(spec_path: Path) -> int:
    """In the child: build the models, compile at one shape, time it, write the row."""
    from .generate import base_generator, measure

    spec = json.loads(spec_path.read_text())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    base = base_generator(spec["tiny"], dev, dtype, spec["steps"], spec["batch"], Path(spec["out"]))
    gen = base.with_settings(backend="compile")
    row = measure(gen, f"compile ({gen._backends['sd15'].mode}, inductor defaults, VAE eager)", spec["batch"],
                  spec["px"], dev, spec["peak"], spec["flops"], spec["seconds"])
    out = Path(spec["row"])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(row, default=str))
    os.replace(tmp, out)
    return 0
