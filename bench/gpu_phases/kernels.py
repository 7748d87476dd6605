"""kernels: the project's Triton kernels against the torch path the product would otherwise
run (for the ring augmentation: the vectorised torch version, with the per-view loop
beside it for reference), and ring bandwidth (uint8 image slots, pinned host <-> device).
When the start-up Triton probe failed, the Triton columns say why and the torch paths are
still timed. On a CPU (--tiny) Triton cannot run compiled: the ring rows and the torch
paths at a small size are measured, and a row says so.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from . import device, time_call


def _timed(fn, dev, seconds) -> float | str:
    try:
        return time_call(fn, dev, seconds) * 1e3
    except Exception as exc:  # noqa: BLE001 - one kernel failing must not hide the others
        return f"{type(exc).__name__}: {exc}"[:200]


def _row(name: str, paths: dict, baseline: str, dev, seconds: float, deadline: float) -> dict:
    """ms per path (a string where it could not run), and speed-ups over `baseline`."""
    row = {"phase": "kernels", "what": name}
    for path, fn in paths.items():
        if isinstance(fn, str):
            row[f"{path}_ms"] = fn
        elif time.perf_counter() > deadline:
            row[f"{path}_ms"] = "skipped: time guard"
        else:
            row[f"{path}_ms"] = _timed(fn, dev, seconds)
    base = row.get(f"{baseline}_ms")
    for path in paths:
        ms = row.get(f"{path}_ms")
        if path != baseline and isinstance(ms, float) and isinstance(base, float):
            row[f"{path}_speedup_vs_{baseline}"] = base / ms
    if any(isinstance(v, str) and not v.startswith("skipped") for k, v in row.items() if k.endswith("_ms")):
        row["error"] = "; ".join(f"{k}: {v}" for k, v in row.items() if k.endswith("_ms") and isinstance(v, str))
    return row


def kernel_rows(dev: torch.device, tiny: bool, deadline: float, seconds: float) -> list[dict]:
    K = importlib.import_module("sasi_online.kernels")
    problem = K.triton_probe(dev.type) if dev.type == "cuda" else "Triton runs compiled on CUDA only"
    no_triton = f"skipped: {problem}" if problem else None
    g = torch.Generator().manual_seed(0)
    n, side, out = (8, 48, 32) if tiny else (256, 256, 224)
    imgs = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g).to(dev)
    params = K.sample_aug_params(n, (side, side), K.AugRecipe(blur_p=0.5, solarize_p=0.2), generator=g)
    rows = [_row(f"ring_augment ({n}x{side}x{side} -> {out}, blur + solarise)", {
        "vectorized": lambda: K.ring_augment_vectorized(imgs, params, out),
        "loop": lambda: K.ring_augment_torch(imgs, params, out),
        "triton": no_triton or (lambda: K.ring_augment_triton(imgs, params, out))}, "vectorized", dev, seconds,
        deadline)]
    lat = [torch.randn(8, 4, 64, 64, generator=g).to(dev) for _ in range(4)]
    step = dict(kind="ddpm", prediction_type="epsilon", guidance=7.5, alpha_t=0.99, alpha_bar_t=0.5,
                alpha_bar_prev=0.52, sigma_t=0.01)
    args = dict(noise_pred_uncond=lat[0], noise_pred_text=lat[1], latents=lat[2], noise=lat[3], **step)
    rows.append(_row("guided_step (8x4x64x64, ddpm)", {
        "torch": lambda: K.guided_step_torch(**args),
        "triton": no_triton or (lambda: K.guided_step_triton(**args))}, "torch", dev, seconds, deadline))
    b, kq = (16, 512) if tiny else (256, 65536)
    q = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1).to(dev).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1).to(dev)
    queue = torch.nn.functional.normalize(torch.randn(kq, 128, generator=g), dim=1).to(dev)

    def fwd_bwd(fn):
        def run():
            q.grad = None
            fn(q, k, queue, 0.2).backward()
        return run
    rows.append(_row(f"infonce fwd+bwd (B{b}, K{kq}, D128)", {
        "torch": fwd_bwd(K.infonce_torch), "triton": no_triton or fwd_bwd(K.infonce_triton)}, "torch", dev,
        seconds, deadline))
    return rows


def ring_row(dev: torch.device, tiny: bool, seconds: float) -> dict:
    """Producer -> ring traffic: uint8 image slots copied host -> device and back."""
    slots, side = (8, 64) if tiny else (256, 512)
    pin = dev.type == "cuda"
    host = torch.randint(0, 256, (slots, side, side, 3), dtype=torch.uint8)
    host = host.pin_memory() if pin else host
    on_dev = torch.empty_like(host, device=dev)
    back = torch.empty_like(host).pin_memory() if pin else torch.empty_like(host)
    nbytes = host.numel()
    h2d = time_call(lambda: on_dev.copy_(host, non_blocking=pin), dev, seconds)
    d2h = time_call(lambda: back.copy_(on_dev, non_blocking=pin), dev, seconds)
    return {"phase": "kernels", "what": f"ring copies, {slots} slots {side}x{side}x3 uint8 "
            f"({'pinned host <-> cuda' if pin else 'cpu <-> cpu'})", "mib": nbytes / 2 ** 20,
            "host_to_device_gbps": nbytes / h2d / 1e9, "device_to_host_gbps": nbytes / d2h / 1e9}


def run(args, out_dir: Path) -> list[dict]:
    dev = device()
    seconds = max(args.section_seconds / 4, 0.05)
    deadline = time.perf_counter() + args.kernels_seconds
    return [ring_row(dev, args.tiny, seconds)] + kernel_rows(dev, args.tiny, deadline, seconds)
