"""One-shot GPU check: how fast can a producer make SASI on this machine?

Runs on a bare GPU machine that has torch (+ triton) but possibly not diffusers:
  - bf16 matmul rate (the MFU denominator), measured here;
  - SASI/s and model-FLOP utilisation of the SD-1.5 UNet + seg ControlNet with
    classifier-free guidance (random weights, the real configs written inline), eager on
    a 2x2 grid of batch x resolution, and torch.compile at one static shape;
  - speed-ups of the project's Triton kernels over their torch references
    (`sasi_online.kernels`, when importable and on a GPU);
  - ring bandwidth: host <-> device copies of uint8 image slots.
Results are written after every section to gpu_check.json and gpu_check.md in --out
(default $OUT if set, else runs/gpu_check), so a run cut short still reports what
finished. Each section has a time guard; the default total stays under 8 minutes.

Missing diffusers: the model sections print a clear skip. To bring it along, copy its
wheel (and any missing pure-Python needs) into a folder, e.g. `.whl/`, and pass
`--wheels .whl`: they are pip-installed from that folder (no network) into a temporary
target before anything else runs.

    python bench/gpu_check.py                 # full size, on a GPU
    python bench/gpu_check.py --tiny --out /tmp/gc   # CPU smoke test: tiny configs, seconds

SASI/s counts denoising only (steps x (ControlNet + UNet) per image with CFG); the
text encoder and VAE decode add a few percent at 20+ steps.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _import_project() -> None:
    """Make `sasi_online` importable from this checkout without putting the repository
    root on sys.path: there, the top-level `kernels/` folder would shadow the Hugging Face
    package of that name, which diffusers and transformers probe for."""
    try:
        importlib.import_module("sasi_online")
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("sasi_online", REPO / "sasi_online" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "sasi_online")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sasi_online"] = module
    spec.loader.exec_module(module)


_import_project()

# SD-1.5 UNet as shipped in runwayml/stable-diffusion-v1-5/unet/config.json.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
)
TEXT_LEN = 77


# ----------------------------------------------------------------------------- report
class Report:
    """Results so far; written (atomically) after every section."""

    def __init__(self, out: Path, config: dict):
        self.out = out
        self.data: dict = {"config": config, "sections": {}, "generation": []}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.data["sections"][name] = {"status": status, "seconds": round(seconds, 2), "note": note}
        print(f"[gpu_check] {name}: {status} in {seconds:.1f} s {note}", flush=True)
        self.write()

    def write(self) -> None:
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.data, indent=2, default=str) + "\n")
        _atomic_write(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        d = self.data
        lines = ["# GPU check", "", f"- device: {d.get('env', {}).get('device', '?')}",
                 f"- torch {d.get('env', {}).get('torch', '?')}, diffusers {d.get('env', {}).get('diffusers', '-')}",
                 f"- mode: {'tiny (smoke test)' if d['config']['tiny'] else 'full size SD-1.5 + ControlNet'}"]
        if "matmul" in d:
            m = d["matmul"]
            lines.append(f"- matmul {m['dtype']} {m['n']}^3: {m['tflops']:.4g} TFLOP/s (MFU denominator)")
        lines += ["", "## Sections", "", "| section | status | s | note |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['status']} | {v['seconds']} | {v['note']} |" for k, v in d["sections"].items()]
        if d["generation"]:
            lines += ["", "## Generation (denoising, CFG, ControlNet + UNet)", "",
                      "| backend | batch | px | ms/step | SASI/s | TFLOP/step | MFU |", "|---|---|---|---|---|---|---|"]
            for r in d["generation"]:
                lines.append(f"| {r['backend']} | {r['batch']} | {r['resolution']} | {r['ms_per_step']:.2f} | "
                             f"{r['sasi_per_s']:.4g} | {r['tflop_per_step']:.4g} | {r['mfu']:.3f} |")
        if d.get("kernels"):
            lines += ["", "## Kernels (Triton vs torch reference)", "", "| kernel | torch ms | triton ms | speed-up |",
                      "|---|---|---|---|"]
            for k, r in d["kernels"].items():
                if "speedup" in r:
                    lines.append(f"| {k} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f} |")
                else:
                    lines.append(f"| {k} | - | - | {r.get('error', 'skipped')} |")
        if "ring" in d:
            r = d["ring"]
            lines += ["", "## Ring bandwidth (uint8 slots)", "",
                      f"- {r['slots']} slots of {r['slot_shape']}, {r['mib']:.1f} MiB, {r['path']}",
                      f"- host -> device {r['host_to_device_gbps']:.2f} GB/s, device -> host "
                      f"{r['device_to_host_gbps']:.2f} GB/s"]
        return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, max_seconds: float, warmup: int = 2, min_iters: int = 2,
              max_iters: int = 50) -> float:
    """Mean seconds per call, after warm-up, stopping after `max_seconds` (at least min_iters)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n < min_iters or time.perf_counter() - t0 < max_seconds):
        fn()
        n += 1
        if device.type == "cuda" and n % 5 == 0:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------- sections
def install_wheels(folder: str) -> str:
    target = tempfile.mkdtemp(prefix="gpu_check_site_")
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        return f"no wheels in '{folder}'"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--target", target, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip install from '{folder}' failed: {proc.stderr.strip()[-500:]}"
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return f"installed {len(wheels)} wheel(s) from '{folder}'"


def env_section(report: Report, device: torch.device) -> None:
    try:
        import diffusers
        dver = diffusers.__version__
    except Exception as exc:  # missing or broken
        dver = None
        report.data["diffusers_error"] = f"{type(exc).__name__}: {exc}"
    report.data["env"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "diffusers": dver,
    }


def matmul_section(report: Report, device: torch.device, tiny: bool, budget: float) -> float:
    """bf16 matmul rate on the GPU (fp32 on a CPU, where bf16 is emulated)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 256 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = time_call(lambda: a @ b, device, max_seconds=min(budget, 10.0), max_iters=200)
    tflops = 2 * n ** 3 / sec / 1e12
    report.data["matmul"] = {"dtype": str(dtype).replace("torch.", ""), "n": n, "tflops": tflops}
    return tflops


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    cfg = TINY_UNET if tiny else SD15_UNET
    # Build straight on the device: initialising 1.2 B parameters on the CPU takes long.
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(8, 16, 32, 32) if tiny else (16, 32, 96, 256))
    unet = unet.to(device=device, dtype=dtype).eval()
    controlnet = controlnet.to(device=device, dtype=dtype).eval()
    try:
        from sasi_online.engines.attention import configure_attention
        choice = str(configure_attention(unet, controlnet, "auto"))
    except Exception as exc:  # the engines package is optional here
        choice = f"diffusers default ({type(exc).__name__})"
    return unet, controlnet, choice


class ControlledUNet(torch.nn.Module):
    """ControlNet then UNet: one denoising model call with CFG (batch = 2 x images)."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, sample, t, text, control):
        down, mid = self.controlnet(sample, t, text, controlnet_cond=control, return_dict=False)
        return self.unet(sample, t, text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


def step_inputs(batch: int, px: int, device, dtype, cross_dim: int):
    b2 = 2 * batch  # classifier-free guidance
    return (torch.randn(b2, 4, px // 8, px // 8, device=device, dtype=dtype),
            torch.full((b2,), 500.0, device=device),
            torch.randn(b2, TEXT_LEN, cross_dim, device=device, dtype=dtype),
            torch.rand(b2, 3, px, px, device=device, dtype=dtype))


def step_flops(model, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return float(counter.get_total_flops())


def measure(model, backend: str, batch: int, px: int, steps: int, device, dtype, cross_dim: int,
            peak_tflops: float, seconds: float) -> dict:
    inputs = step_inputs(batch, px, device, dtype, cross_dim)
    with torch.no_grad():
        sec = time_call(lambda: model(*inputs), device, max_seconds=seconds)
    flops = step_flops(model if backend == "eager" else model._orig_mod, inputs)
    return {"backend": backend, "batch": batch, "resolution": px, "steps": steps, "ms_per_step": sec * 1e3,
            "sasi_per_s": batch / (steps * sec), "tflop_per_step": flops / 1e12,
            "mfu": flops / sec / (peak_tflops * 1e12)}


def generation_section(report: Report, args, device, peak_tflops: float, deadline: float) -> None:
    try:
        importlib.import_module("diffusers")
    except Exception as exc:
        report.section("generation", "skipped", 0.0,
                       f"diffusers is not importable ({type(exc).__name__}); copy its wheel into a folder "
                       f"and pass --wheels DIR")
        return
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet, controlnet, attention = build_models(args.tiny, device, dtype)
    model = ControlledUNet(unet, controlnet).eval()
    cross = unet.config.cross_attention_dim
    report.data["attention"] = attention
    grid = [(b, px) for px in args.resolutions for b in args.batches]
    done = 0
    for batch, px in grid:
        left = deadline - time.perf_counter()
        if left < 5:
            break
        r = measure(model, "eager", batch, px, args.steps, device, dtype, cross, peak_tflops,
                    min(args.section_seconds, left / 2))
        report.data["generation"].append(r)
        report.write()
        done += 1
    report.section("generation_eager", "ok" if done == len(grid) else "partial", time.perf_counter() - t0,
                   f"{done}/{len(grid)} grid points; {attention}")

    if not args.compile:
        report.section("generation_compiled", "skipped", 0.0,
                       "compile off (default with --tiny: an inductor build takes minutes on a small CPU; "
                       "pass --compile)")
        return
    left = deadline - time.perf_counter()
    if left < args.compile_min_seconds:
        report.section("generation_compiled", "skipped", 0.0,
                       f"time guard: {left:.0f} s left < {args.compile_min_seconds} s needed to compile")
        return
    t0 = time.perf_counter()
    batch, px = max(args.batches), max(args.resolutions)
    mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs on a GPU
    try:
        compiled = torch.compile(model, mode=mode, dynamic=False)
        with torch.no_grad():
            compiled(*step_inputs(batch, px, device, dtype, cross))  # compile now, outside the timing
        compile_s = time.perf_counter() - t0
        r = measure(compiled, "compile", batch, px, args.steps, device, dtype, cross, peak_tflops,
                    min(args.section_seconds, max(5.0, deadline - time.perf_counter()) / 2))
        r.update(compile_mode=mode, compile_seconds=round(compile_s, 1))
        eager = [e for e in report.data["generation"] if e["backend"] == "eager"
                 and (e["batch"], e["resolution"]) == (batch, px)]
        if eager:
            r["speedup_vs_eager"] = eager[0]["ms_per_step"] / r["ms_per_step"]
        report.data["generation"].append(r)
        report.section("generation_compiled", "ok", time.perf_counter() - t0,
                       f"mode {mode}, batch {batch}, {px} px, compile {compile_s:.0f} s")
    except Exception as exc:
        report.section("generation_compiled", "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:300])


def kernels_section(report: Report, device, deadline: float, seconds: float) -> None:
    if device.type != "cuda":
        report.section("kernels", "skipped", 0.0, "Triton kernels need a GPU (the CPU interpreter checks "
                                                  "correctness only, see tests/test_kernels.py)")
        return
    try:
        K = importlib.import_module("sasi_online.kernels")
    except Exception as exc:
        report.section("kernels", "skipped", 0.0, f"sasi_online.kernels not importable: {type(exc).__name__}: {exc}")
        return
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    results: dict = {}
    report.data["kernels"] = results

    def pair(name, torch_fn, triton_fn):
        if time.perf_counter() > deadline:
            results[name] = {"error": "time guard"}
            return
        try:
            tt = time_call(torch_fn, device, seconds)
            tr = time_call(triton_fn, device, seconds)
            results[name] = {"torch_ms": tt * 1e3, "triton_ms": tr * 1e3, "speedup": tt / tr}
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        report.write()

    lat = [torch.randn(8, 4, 64, 64, generator=g).to(device) for _ in range(4)]
    step = dict(kind="ddpm", prediction_type="epsilon", guidance=7.5, alpha_t=0.99, alpha_bar_t=0.5,
                alpha_bar_prev=0.52, sigma_t=0.01)
    pair("guided_step (8x4x64x64, ddpm)",
         lambda: K.guided_step_torch(noise_pred_uncond=lat[0], noise_pred_text=lat[1], latents=lat[2], noise=lat[3], **step),
         lambda: K.guided_step_triton(noise_pred_uncond=lat[0], noise_pred_text=lat[1], latents=lat[2], noise=lat[3], **step))
    imgs = torch.randint(0, 256, (64, 256, 256, 3), dtype=torch.uint8, generator=g).to(device)
    params = K.sample_aug_params(64, (256, 256), generator=g)
    pair("ring_augment (64x256x256 -> 224)", lambda: K.ring_augment_torch(imgs, params, 224),
         lambda: K.ring_augment_triton(imgs, params, 224))
    q = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1).to(device).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1).to(device)
    queue = torch.nn.functional.normalize(torch.randn(65536, 128, generator=g), dim=1).to(device)

    def fwd_bwd(fn):
        def run():
            q.grad = None
            fn(q, k, queue, 0.2).backward()
        return run
    pair("infonce fwd+bwd (B256, K65536, D128)", fwd_bwd(K.infonce_torch), fwd_bwd(K.infonce_triton))
    ok = all("speedup" in r for r in results.values())
    report.section("kernels", "ok" if ok else "partial", time.perf_counter() - t0)


def ring_section(report: Report, device, tiny: bool, seconds: float) -> None:
    """Producer → ring traffic: uint8 image slots copied host → device and back."""
    t0 = time.perf_counter()
    slots, side = (8, 64) if tiny else (256, 512)
    pin = device.type == "cuda"
    host = torch.randint(0, 256, (slots, 3, side, side), dtype=torch.uint8)
    host = host.pin_memory() if pin else host
    dev = torch.empty_like(host, device=device)
    back = torch.empty_like(host).pin_memory() if pin else torch.empty_like(host)
    nbytes = host.numel()
    h2d = time_call(lambda: dev.copy_(host, non_blocking=pin), device, seconds)
    d2h = time_call(lambda: back.copy_(dev, non_blocking=pin), device, seconds)
    report.data["ring"] = {"slots": slots, "slot_shape": [3, side, side], "mib": nbytes / 2 ** 20,
                           "path": "pinned host <-> cuda" if pin else "cpu <-> cpu (no GPU)",
                           "host_to_device_gbps": nbytes / h2d / 1e9, "device_to_host_gbps": nbytes / d2h / 1e9}
    report.section("ring", "ok", time.perf_counter() - t0)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model configs (CPU smoke test, seconds)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                   help="output folder (default: $OUT if set, else runs/gpu_check)")
    p.add_argument("--wheels", default=None, help="pip-install every wheel in this folder first (no network)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="whole-run time guard (default 450 full size, 60 tiny)")
    p.add_argument("--section-seconds", type=float, default=None,
                   help="timing loop length per measurement (default 8 full size, 1 tiny)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per SASI, for SASI/s (default: 20)")
    p.add_argument("--batches", type=int, nargs=2, default=None, help="two batch sizes in images (default: 1 8; tiny: 1 2)")
    p.add_argument("--resolutions", type=int, nargs=2, default=None, help="two image sides in pixels (default: 256 512; tiny: 32 64)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile at one static shape (default: on unless --tiny)")
    p.add_argument("--compile-min-seconds", type=float, default=180.0,
                   help="skip compile when less than this is left of the budget (default: 180)")
    args = p.parse_args(argv)
    args.budget_seconds = args.budget_seconds or (60.0 if args.tiny else 450.0)
    args.section_seconds = args.section_seconds or (1.0 if args.tiny else 8.0)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8])
    args.resolutions = args.resolutions or ([32, 64] if args.tiny else [256, 512])
    args.compile = (not args.tiny) if args.compile is None else args.compile
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_seconds
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = Report(Path(args.out), {k: v for k, v in vars(args).items()})
    if args.wheels:
        report.section("wheels", "ok", 0.0, install_wheels(args.wheels))
    env_section(report, device)
    t0 = time.perf_counter()
    peak = matmul_section(report, device, args.tiny, args.section_seconds)
    report.section("matmul", "ok", time.perf_counter() - t0, f"{peak:.4g} TFLOP/s")
    # Generation gets the budget minus what the two small sections after it need.
    try:
        generation_section(report, args, device, peak, deadline - (40 if not args.tiny else 5))
    except Exception as exc:
        report.section("generation", "failed", 0.0, f"{type(exc).__name__}: {exc}"[:300])
    for name, fn in (("kernels", lambda: kernels_section(report, device, deadline, args.section_seconds / 4)),
                     ("ring", lambda: ring_section(report, device, args.tiny, args.section_seconds / 4))):
        try:
            fn()
        except Exception as exc:
            report.section(name, "failed", 0.0, f"{type(exc).__name__}: {exc}"[:300])
    report.data["total_seconds"] = round(time.perf_counter() - start, 1)
    report.write()
    print(f"[gpu_check] done in {report.data['total_seconds']} s -> {Path(args.out) / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
