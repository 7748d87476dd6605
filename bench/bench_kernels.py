"""Each Triton kernel against its torch reference: speed-up ratio on a GPU, peak memory of
InfoNCE, and the largest difference between the two paths.

    python bench/bench_kernels.py --out bench_results/kernels

On a CUDA machine it times both paths with CUDA events (median of --iters runs) and
measures InfoNCE's peak memory with torch.cuda.max_memory_allocated. Without a GPU it
runs Triton's CPU interpreter on tiny shapes: correctness only, no speed figures (the
interpreter is hundreds to thousands of times slower than torch), and InfoNCE memory as
tensor-size accounting plus the bytes autograd keeps for the backward, measured.
Writes kernels.json and kernels.md into --out after every section.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton fixes its mode at import: the interpreter must be chosen before that.
    os.environ.setdefault("TRITON_INTERPRET", "1")


import torch.nn.functional as F  # noqa: E402

from sasi_online.kernels import (AugRecipe, guided_step_torch, guided_step_triton,  # noqa: E402
                                 infonce_held_bytes, infonce_saved_bytes, infonce_torch, infonce_triton,
                                 ring_augment_torch, ring_augment_triton, ring_augment_vectorized,
                                 sample_aug_params)
from sasi_online.utils import atomic_write_json, atomic_write_text  # noqa: E402


def scaled_linear_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """Stable Diffusion's schedule, computed here so the bench needs no diffusers."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, 0)


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median wall time of `fn` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def bench_guided_step(device, shapes, dtypes, iters):
    ac = scaled_linear_alphas_cumprod()
    t, prev = 501, 451  # a mid-trajectory step of a 20-step schedule
    abar_t, abar_prev = float(ac[t]), float(ac[prev])
    rows = []
    for kind, pred in (("ddpm", "epsilon"), ("ddim", "v_prediction")):
        alpha_t = abar_t / abar_prev
        sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)) ** 0.5 if kind == "ddpm" else 0.0
        for shape in shapes:
            for dtype in dtypes:
                g = torch.Generator(device=device).manual_seed(0)
                u, c, x, n = (torch.randn(shape, generator=g, device=device, dtype=dtype)
                              for _ in range(4))
                args = dict(kind=kind, prediction_type=pred, noise_pred_uncond=u,
                            noise_pred_text=c, latents=x, guidance=7.5, alpha_t=alpha_t,
                            alpha_bar_t=abar_t, alpha_bar_prev=abar_prev, sigma_t=sigma,
                            noise=n if sigma > 0 else None)
                want, got = guided_step_torch(**args), guided_step_triton(**args)
                row = {"kind": kind, "prediction_type": pred, "shape": list(shape),
                       "dtype": str(dtype).replace("torch.", ""),
                       "max_abs_diff": max_diff(got, want)}
                if CUDA:
                    row["torch_ms"] = time_ms(lambda: guided_step_torch(**args), iters)
                    row["triton_ms"] = time_ms(lambda: guided_step_triton(**args), iters)
                    row["speedup"] = row["torch_ms"] / row["triton_ms"]
                rows.append(row)
    return rows


def bench_ring_augment(device, cases, iters):
    rows = []
    for n, src, out_size in cases:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, src, src, 3), dtype=torch.uint8, generator=g).to(device)
        params = sample_aug_params(n, (src, src), AugRecipe(), generator=g)
        want = ring_augment_torch(images, params, out_size)
        got = ring_augment_triton(images, params, out_size)
        vec = ring_augment_vectorized(images, params, out_size)
        row = {"views": n, "source_px": src, "out_px": out_size, "layout": "NHWC uint8",
               "max_abs_diff": max_diff(got, want), "vectorized_max_abs_diff": max_diff(vec, want)}
        if CUDA:  # the baseline: the vectorised torch path the dispatcher runs without Triton
            row["torch_ms"] = time_ms(lambda: ring_augment_vectorized(images, params, out_size), iters)
            row["loop_ms"] = time_ms(lambda: ring_augment_torch(images, params, out_size), iters)
            row["triton_ms"] = time_ms(lambda: ring_augment_triton(images, params, out_size), iters)
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


def _fwd_bwd(fn, q, k, queue):
    q.grad = None
    fn(q, k, queue, 0.2).backward()


def _peak_bytes(fn, q, k, queue) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _fwd_bwd(fn, q, k, queue)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _splits(b, kq, d, device) -> int:
    from sasi_online.kernels.infonce import _blocks, _split_plan

    block_b, block_k, _ = _blocks(d)
    return _split_plan(b, kq, block_b, block_k, device, None)[0]


def bench_infonce(device, shapes, iters):
    rows = []
    for b, kq, d in shapes:
        splits = _splits(b, kq, d, device)
        g = torch.Generator(device=device).manual_seed(0)
        q = F.normalize(torch.randn(b, d, generator=g, device=device), dim=1).requires_grad_()
        k = F.normalize(torch.randn(b, d, generator=g, device=device), dim=1)
        queue = F.normalize(torch.randn(kq, d, generator=g, device=device), dim=1)
        loss_t = infonce_torch(q, k, queue, 0.2)
        (dq_t,) = torch.autograd.grad(loss_t, q)
        loss_f = infonce_triton(q, k, queue, 0.2)
        (dq_f,) = torch.autograd.grad(loss_f, q)
        row = {"B": b, "K": kq, "D": d, "queue_splits": splits,
               "loss_abs_diff": max_diff(loss_f, loss_t),
               "grad_q_max_abs_diff": max_diff(dq_f, dq_t),
               "held_for_backward_bytes": {
                   "torch": infonce_held_bytes(infonce_torch, q, k, queue, 0.2),
                   "triton": infonce_held_bytes(infonce_triton, q, k, queue, 0.2)},
               "accounting_bytes": {"torch": infonce_saved_bytes(b, kq, d, "torch"),
                                    "triton": infonce_saved_bytes(b, kq, d, "triton",
                                                                  splits=splits)}}
        if CUDA:
            row["torch_ms"] = time_ms(lambda: _fwd_bwd(infonce_torch, q, k, queue), iters)
            row["triton_ms"] = time_ms(lambda: _fwd_bwd(infonce_triton, q, k, queue), iters)
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
            row["peak_bytes"] = {"torch": _peak_bytes(infonce_torch, q, k, queue),
                                 "triton": _peak_bytes(infonce_triton, q, k, queue)}
            row["peak_ratio_torch_over_triton"] = (row["peak_bytes"]["torch"]
                                                   / max(1, row["peak_bytes"]["triton"]))
        rows.append(row)
    if not CUDA:  # what the reference would need at MoCo's real size, by accounting
        b, kq, d = 256, 65536, 128
        rows.append({"B": b, "K": kq, "D": d, "accounting_only": True,
                     "accounting_bytes": {"torch": infonce_saved_bytes(b, kq, d, "torch"),
                                          "triton": infonce_saved_bytes(b, kq, d, "triton")}})
    return rows


def compile_check_subprocess(arch: int = 90) -> list[dict]:
    """Compile every kernel for sm_`arch` in a process without the interpreter."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "sasi_online.kernels.compile_check", "--arch",
                        str(arch)], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    try:
        return json.loads(r.stdout)
    except ValueError:
        return [{"kernel": "all", "ok": False, "error": (r.stdout + r.stderr)[-2000:]}]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def to_markdown(report: dict) -> str:
    lines = ["# Triton kernels vs torch references", "", f"- mode: {report['mode']}",
             f"- device: {report['device']}",
             f"- torch {report['torch']}, triton {report['triton']}", ""]
    for name, rows in report["sections"].items():
        lines += [f"## {name}", ""]
        if not rows:
            continue
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_results/kernels", help="folder for kernels.json/.md")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per path (GPU)")
    args = ap.parse_args(argv)
    import triton

    out = Path(args.out)
    device = torch.device("cuda" if CUDA else "cpu")
    report = {"mode": "gpu: timings and peak memory" if CUDA else
              "cpu-interpreter: correctness only, no speed figures (Triton's interpreter is "
              "200-3000x slower than torch); InfoNCE memory by accounting and saved-tensor "
              "measurement",
              "device": torch.cuda.get_device_name() if CUDA else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "sections": {}}
    if CUDA:
        plan = [("guided_step", lambda: bench_guided_step(
                    device, [(8, 4, 64, 64), (32, 4, 96, 96)], [torch.float32, torch.float16],
                    args.iters)),
                ("ring_augment", lambda: bench_ring_augment(
                    device, [(256, 256, 224), (512, 96, 64)], max(3, args.iters // 4))),
                ("infonce", lambda: bench_infonce(
                    device, [(256, 65536, 128), (512, 16384, 128)], args.iters))]
    else:
        plan = [("guided_step", lambda: bench_guided_step(device, [(2, 4, 8, 8)],
                                                          [torch.float32], 1)),
                ("ring_augment", lambda: bench_ring_augment(device, [(4, 32, 16)], 1)),
                ("infonce", lambda: bench_infonce(device, [(16, 256, 32)], 1)),
                ("compile_sm90_without_gpu", compile_check_subprocess)]
    for name, run in plan:
        print(f"[bench_kernels] {name} ...", flush=True)
        report["sections"][name] = run()
        atomic_write_json(out / "kernels.json", report)
        atomic_write_text(out / "kernels.md", to_markdown(report))
    print(f"[bench_kernels] wrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
