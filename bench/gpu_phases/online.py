"""online: 30 steps of co-located `train()` (online.mode=colocated: the trainer generates on its
own GPU between steps) with full-size random-weight SD-1.5 + seg ControlNet, built from
their real configs, generating mask prompts (ControlNet) at 512 px, 20 steps, with
generation.text=class_name and the tiny zoo's tokenizer. SASI/s is counted from the first
log step after a finished batch (model loading and the first batch excluded). At least one
ring hit is required; a non-finite SASI counts as a failure. Beside it, the semantic stages
the loop would add (gpu_phases/semantics.py): BLIP-2 OPT-2.7B captions and LLaMA-7B
rewrites, timed per stage at full size with random weights.
--tiny: configs/online_tiny.yaml on the tiny zoo, on a CPU (tiny stage models)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import device, peak_memory_mib, random_imagefolder, require, reset_peak_memory, train_rows

REPO = Path(__file__).resolve().parents[2]

# SD-1.5's shipped configs (unet/config.json, vae/config.json, text_encoder/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SEG_CONDITIONING = (16, 32, 96, 256)  # sd-controlnet-seg's conditioning_embedding_out_channels


def zoo_path(args, out_dir: Path) -> Path:
    if getattr(args, "zoo", None):
        return Path(args.zoo)
    from sasi_online.zoo import build_zoo

    return build_zoo(out_dir.parent / "tiny-zoo", seed=0)


def build_full_sd15(zoo: Path, root: Path) -> Path:
    """models.root with full-size random-weight sd15 + controlnet-sd15-seg; every other
    folder (tokenizer source, segmenter, captioner...) links to the tiny zoo."""
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (root / "controlnet-sd15-seg" / "config.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for folder in zoo.iterdir():
        if folder.name not in ("sd15", "controlnet-sd15-seg") and not (root / folder.name).exists():
            (root / folder.name).symlink_to(folder.resolve())
    dev = device()
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(zoo / "sd15" / "tokenizer")
    with torch.device(dev):  # initialising ~1.2 B parameters on the CPU takes long
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=max(49408, len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            **CLIP_L_TEXT))
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=SEG_CONDITIONING)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(root / "sd15", safe_serialization=True)
    controlnet.to(torch.float16).save_pretrained(root / "controlnet-sd15-seg", safe_serialization=True)
    del pipe, controlnet, unet, vae, text
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return root


def overrides(args, out_dir: Path, models: Path) -> tuple[Path, list[str]]:
    common = ["online.mode=colocated", "online.producers=0", "online.colocated_every=1", "generation.text=class_name",
              "store.path=null", "store.write_online=false", "train.knn_every=1000000", "train.resume=false",
              f"train.out={out_dir / 'run'}", "online.plots=false", "augment.backend=torchvision"]
    if args.tiny:
        return REPO / "configs" / "online_tiny.yaml", common + [
            f"models.root={models}", "train.steps=6", "train.batch_size=8", "train.log_every=2", "train.ckpt_every=6",
            "train.knn_bank=100", "train.knn_test=100", "generation.steps=2", "generation.batch_size=8",
            "online.lookahead=6", "online.start_sasi=8", "online.max_age=50"]
    data = random_imagefolder(out_dir / "data", images=512, side=256)
    return REPO / "configs" / "online_1gpu.yaml", common + [
        f"models.root={models}", "data.name=imagefolder", f"data.root={data}", "data.image_size=224",
        "generation.resolution=512", f"generation.steps={int(args.steps)}", "generation.batch_size=8",
        "generation.dtype=bfloat16", "visual.kind=mask",
        "train.steps=30", "train.batch_size=64", "train.log_every=5", "train.ckpt_every=30", "method.queue_size=4096",
        "online.ring_slots=512", "online.lookahead=8", "online.start_sasi=8", "online.max_age=1000"]


def sasi_rate_after_first_batch(run_dir: Path, batch: int) -> float | None:
    """SASI/s between the first log row that counts a generated SASI and the last one: each
    interval's seconds are its steps x batch / its images/s (the loop's own clock)."""
    from sasi_online.training.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl", "images_per_s") if "online/sasi_generated" in r]
    first = next((i for i, r in enumerate(rows) if r["online/sasi_generated"] > 0), None)
    if first is None or first == len(rows) - 1:
        return None
    later = rows[first + 1:]
    seconds = sum((r["step"] - p["step"]) * batch / max(r["images_per_s"], 1e-9) for p, r in zip(rows[first:], later))
    return (later[-1]["online/sasi_generated"] - rows[first]["online/sasi_generated"]) / max(seconds, 1e-9)


def run(args, out_dir: Path) -> list[dict]:
    require("yaml", "tqdm", "deepspeed", "pydantic", "diffusers", "transformers",
            *(() if getattr(args, "zoo", None) else ("peft",)))  # building the tiny zoo makes a LoRA
    from sasi_online.config import load_config
    from sasi_online.train import train

    from .semantics import stage_rows

    dev = device()
    deadline = time.perf_counter() + float(args.online_seconds)
    zoo = zoo_path(args, out_dir)
    models = zoo if args.tiny else build_full_sd15(zoo, out_dir / "models")
    config, over = overrides(args, out_dir, models)
    cfg = load_config(config, over)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    summary = json.loads((out_dir / "run" / "online_summary.json").read_text())
    outcomes, producer = summary["outcomes"], summary["producers"][0]
    fig = train_rows(out_dir / "run")
    pairs = max(sum(outcomes.values()), 1)
    row = {"phase": "online", "what": f"co-located, {cfg.generation.resolution}px {cfg.visual.kind} SASI, "
           f"{cfg.generation.steps} steps, {cfg.data.image_size}px training, batch {cfg.train.batch_size}",
           "images_per_s": fig["images_per_s"],
           "sasi_per_s": sasi_rate_after_first_batch(out_dir / "run", cfg.train.batch_size),
           "sasi_per_s_whole_run": producer.get("generated_this_run", 0) / max(producer.get("wall_s", 0.0), 1e-9),
           "producer_busy": producer.get("busy_s", 0.0) / max(producer.get("wall_s", 0.0), 1e-9),
           "ring_hit_rate": outcomes["ring_hit"] / pairs, "ring_hits": outcomes["ring_hit"],
           "sasi_pair_rate": summary.get("sasi_pair_rate"),
           "sasi_failed": producer.get("failed", 0), "steps": result.step, "peak_gpu_mib": peak_memory_mib(dev),
           "seconds": seconds}
    if outcomes["ring_hit"] < 1 or producer.get("failed", 0) or producer.get("stopped", 0):
        raise RuntimeError(f"online phase: {outcomes['ring_hit']} ring hits, {producer.get('failed', 0)} failed SASI "
                           f"(non-finite counts), producer error '{producer.get('error', '')}'; row {row}")
    return [row] + stage_rows(dev, args.tiny, deadline)
