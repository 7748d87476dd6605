"""kernels: today's kernel section of the GPU check, as a phase (the fast-producer issue
reworks it): speed-ups of the project's Triton kernels over their torch references on a
GPU, and ring bandwidth (uint8 image slots, pinned host <-> device). On a CPU (--tiny) the
Triton kernels cannot run compiled: only the ring rows are measured and a row says so."""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from . import device, time_call


def kernel_rows(dev: torch.device, deadline: float, seconds: float) -> list[dict]:
    K = importlib.import_module("sasi_online.kernels")
    g = torch.Generator().manual_seed(0)
    results: dict = {}

    def pair(name, torch_fn, triton_fn):
        if time.perf_counter() > deadline:
            results[name] = {"error": "time guard"}
            return
        try:
            tt = time_call(torch_fn, dev, seconds)
            tr = time_call(triton_fn, dev, seconds)
            results[name] = {"torch_ms": tt * 1e3, "triton_ms": tr * 1e3, "speedup": tt / tr}
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}

    lat = [torch.randn(8, 4, 64, 64, generator=g).to(dev) for _ in range(4)]
    step = dict(kind="ddpm", prediction_type="epsilon", guidance=7.5, alpha_t=0.99, alpha_bar_t=0.5,
                alpha_bar_prev=0.52, sigma_t=0.01)
    pair("guided_step (8x4x64x64, ddpm)",
         lambda: K.guided_step_torch(noise_pred_uncond=lat[0], noise_pred_text=lat[1], latents=lat[2], noise=lat[3], **step),
         lambda: K.guided_step_triton(noise_pred_uncond=lat[0], noise_pred_text=lat[1], latents=lat[2], noise=lat[3], **step))
    imgs = torch.randint(0, 256, (64, 256, 256, 3), dtype=torch.uint8, generator=g).to(dev)
    params = K.sample_aug_params(64, (256, 256), generator=g)
    pair("ring_augment (64x256x256 -> 224)", lambda: K.ring_augment_torch(imgs, params, 224),
         lambda: K.ring_augment_triton(imgs, params, 224))
    q = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1).to(dev).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1).to(dev)
    queue = torch.nn.functional.normalize(torch.randn(65536, 128, generator=g), dim=1).to(dev)

    def fwd_bwd(fn):
        def run():
            q.grad = None
            fn(q, k, queue, 0.2).backward()
        return run
    pair("infonce fwd+bwd (B256, K65536, D128)", fwd_bwd(K.infonce_torch), fwd_bwd(K.infonce_triton))
    return [{"phase": "kernels", "what": name, **r} for name, r in results.items()]


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
    rows = [ring_row(dev, args.tiny, seconds)]
    if dev.type != "cuda":
        rows.append({"phase": "kernels", "what": "triton kernels", "note": "need a GPU (the CPU interpreter checks "
                     "correctness only: tests/test_kernels.py)"})
        return rows
    rows += kernel_rows(dev, time.perf_counter() + args.kernels_seconds, seconds)
    return rows
