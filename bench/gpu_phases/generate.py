"""generate: the generator's own loop, timed as the product runs it.

SASIGenerator.generate end to end in the product's dtype (fp16 on a GPU): text encoder,
DPM-Solver++ scheduler on the CPU, ControlNet + UNet with classifier-free guidance, VAE
decode. The models are SD-1.5 + its seg ControlNet built in memory from their real configs
(values of runwayml/stable-diffusion-v1-5 and lllyasviel/sd-controlnet-seg, written below)
with random weights, and the tiny zoo's CLIP tokenizer (random weights: speed, not
pictures). Mask prompts (pure noise + the ControlNet) at 512 px; rows:

    eager   at batch 8, 1 and 16
    compile at batch 8, then 1 (backend=compile: ControlNet + UNet as one graph, CUDA graphs
            over padded static batches), each in a child process (gpu_phases/compiled.py)
            killed at its share of the phase's limit, with inductor's default settings (no
            coordinate-descent tuning), the VAE decode eager, and TORCHINDUCTOR_CACHE_DIR
            under --out so a rerun is warm
    tensorrt  not tried: TensorRT cannot be installed on the GPU machine (its wheels download
            from NVIDIA's own index, which that machine does not reach)

Each row: SASI/s (whole generate calls, after a warm-up call), model FLOPs per SASI (torch's
FLOP counter over one eager call), MFU against the device's bf16 dense spec peak
(gpu_phases.SPEC_BF16_TFLOPS; an unknown device: against the measured matmul rate only,
and the row says so) with the measured fp16 matmul rate beside it, compile seconds (first
call minus a steady call) and peak GPU memory. With --tiny the same code runs on a CPU
with tiny models in seconds (fp32, 64 px, batches 1 and 2, compile off unless asked).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import device, peak_memory_mib, require, reset_peak_memory, spec_peak_tflops, sync, time_call

# runwayml/stable-diffusion-v1-5 unet/config.json (full size)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# vae/config.json
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu")
# lllyasviel/sd-controlnet-seg config.json: the UNet's down path plus this embedding
SD15_SEG_EMBEDDING = (16, 32, 96, 256)
# scheduler/scheduler_config.json (the schedule every sampler is built from)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32, max_position_embeddings=77)
TRT_NOTE = ("not tried: TensorRT cannot be installed on the GPU machine (its wheels download from NVIDIA's "
            "own index, unreachable there); tests/test_trt_api.py runs the engine path against TensorRT 10 "
            "and 11 API fakes instead")


def build_family(tiny: bool, dev: torch.device, dtype: torch.dtype, where: Path):
    """A generator family in memory: real configs (or tiny ones), random weights, the zoo's tokenizer."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    from sasi_online.generation.families import Family
    from sasi_online.zoo.tokenizers import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    text = dict(TINY_TEXT, vocab_size=len(tokenizer)) if tiny else SD15_TEXT
    torch.manual_seed(0)
    with torch.device(dev):  # initialising ~1.2 B parameters on the CPU takes long
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(8, 16, 32, 32) if tiny else SD15_SEG_EMBEDDING)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    models = [m.to(device=dev, dtype=dtype).eval() for m in (unet, controlnet, vae, text_encoder)]
    fam = Family(name="sd15", folder=where, controlnet_folder=where, tokenizer=tokenizer,
                 text_encoder=models[3], unet=models[0], vae=models[2], scheduler_config=dict(SD15_SCHEDULER),
                 device=dev, dtype=dtype, _controlnet=models[1])
    fam.image_processor = VaeImageProcessor(vae_scale_factor=fam.vae_scale_factor)
    fam.control_image_processor = VaeImageProcessor(vae_scale_factor=fam.vae_scale_factor, do_convert_rgb=True,
                                                    do_normalize=False)
    return fam


def mask_prompts(n: int, px: int):
    """n mask visual prompts (random ADE20K-palette-like maps): pure noise + the ControlNet."""
    import numpy as np

    from sasi_online.visual.prompts import VisualPrompt

    rng = np.random.default_rng(0)
    cell = max(px // 8, 1)
    vps = [VisualPrompt(kind="mask", init_image=None, seed=i, control_image=(
        rng.integers(0, 6, (8, 8, 1)) * 40).repeat(cell, 0).repeat(cell, 1).repeat(3, 2).astype(np.uint8))
        for i in range(n)]
    return [f"a photo of object number {i}" for i in range(n)], vps, list(range(n))


def matmul_rate(dev: torch.device, tiny: bool, seconds: float, dtype: torch.dtype) -> dict:
    n = 256 if tiny else 8192
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    sec = time_call(lambda: a @ b, dev, max_seconds=min(seconds, 10.0), max_iters=200)
    return {"phase": "generate", "what": f"matmul {str(dtype).replace('torch.', '')} {n}^3 (MFU denominator)",
            "tflops": 2 * n ** 3 / sec / 1e12}


def flops_per_sasi(gen, px: int) -> float:
    """Model FLOPs of one SASI: torch's counter over one eager generate call at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    prompts, vps, seeds = mask_prompts(1, px)
    one = gen.with_settings(batch_size=1, backend="eager")
    with FlopCounterMode(display=False) as counter:
        one.generate(prompts, vps, seeds)
    return float(counter.get_total_flops())


def peak_info(dev: torch.device, matmul_tflops: float) -> dict:
    """The MFU denominator: the device's spec peak when the table knows it, else the measured rate."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    spec, note = spec_peak_tflops(name)
    return {"spec_tflops": spec, "matmul_tflops": matmul_tflops, "note": note}


def measure(gen, what: str, batch: int, px: int, dev, peak: dict, flops: float, seconds: float) -> dict:
    prompts, vps, seeds = mask_prompts(batch, px)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    first = gen.generate(prompts, vps, seeds)  # warm-up; compiles here for backend=compile
    sync(dev)
    first_s = time.perf_counter() - t0
    sec = time_call(lambda: gen.generate(prompts, vps, seeds), dev, max_seconds=seconds, warmup=0,
                    min_iters=1, max_iters=5)
    rate = batch / sec
    achieved = flops * rate / 1e12
    row = {"phase": "generate", "what": what, "backend": gen.cfg.backend, "batch": batch, "resolution": px,
           "steps": gen.cfg.steps, "dtype": str(gen.dtype).replace("torch.", ""), "sasi_per_s": rate,
           "seconds_per_call": sec, "tflop_per_sasi": flops / 1e12, "achieved_tflops": achieved,
           "mfu": achieved / peak["spec_tflops"] if peak["spec_tflops"] else None,
           "mfu_vs_measured_matmul": achieved / peak["matmul_tflops"],
           "peak_memory_mib": peak_memory_mib(dev), "all_finite": bool(first.finite.all()),
           "attention": _short(gen.attention)}
    if not peak["spec_tflops"]:
        row["note"] = "MFU vs the measured matmul rate only: device not in the spec table"
    if gen.cfg.backend == "compile":
        row["compile_seconds"] = round(max(first_s - sec, 0.0), 1)
    return row


def base_generator(tiny: bool, dev, dtype, steps: int, batch: int, where: Path, backend: str = "eager"):
    """SASIGenerator over build_family's in-memory models, as the phase and its compile child use it."""
    from sasi_online.config import Config
    from sasi_online.generation import SASIGenerator

    cfg = Config()
    g = cfg.generation
    g.family, g.resolution, g.steps, g.batch_size = "sd15", 64 if tiny else 512, steps, batch
    g.dtype, g.device, g.backend = str(dtype).replace("torch.", ""), dev.type, backend
    gen = SASIGenerator(cfg.models, g)
    gen._adopt("sd15", build_family(tiny, dev, dtype, where))
    return gen


def _short(attention: str | None) -> str:
    """'attention: sdpa (why ...)' → 'sdpa, fused QKV' for the table."""
    text = str(attention or "")
    name = text.split(" (")[0].replace("attention: ", "")
    return name + (", fused QKV" if "QKV projections fused" in text else "")


def run(args, out_dir: Path) -> list[dict]:
    require("yaml", "tqdm", "diffusers", "transformers")
    from .compiled import compiled_rows

    tiny = bool(args.tiny)
    dev = device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + float(args.generate_seconds)
    seconds = float(args.section_seconds)
    px = 64 if tiny else 512
    small, large = (1, 2) if tiny else (1, 8)
    steps = 2 if tiny else int(args.steps)
    rows = [matmul_rate(dev, tiny, seconds, dtype)]
    peak = peak_info(dev, rows[0]["tflops"])
    base = base_generator(tiny, dev, dtype, steps, small, out_dir)
    flops = flops_per_sasi(base, px)
    # eager rows first (the production batch first), kept short so the compile children get
    # most of the phase's limit
    for batch in (large, small, 2 * large):
        if time.perf_counter() > deadline - (args.compile_min_seconds if args.compile else 0) and len(rows) > 1:
            rows.append({"phase": "generate", "what": f"eager batch {batch}", "note": "skipped: time guard"})
        else:
            rows.append(measure(base.with_settings(batch_size=batch), "eager", batch, px, dev, peak, flops, seconds))
    del base
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rows += compiled_rows(args, (large, small), px, steps, peak, flops, out_dir, deadline)
    eager = {r["batch"]: r for r in rows if r.get("backend") == "eager"}
    for r in rows:
        if r.get("backend") == "compile" and r.get("batch") in eager:
            r["speedup_vs_eager"] = r["sasi_per_s"] / eager[r["batch"]]["sasi_per_s"]
    rows.append({"phase": "generate", "what": "tensorrt", "note": TRT_NOTE})
    return rows
