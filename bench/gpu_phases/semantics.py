"""The online phase's semantic stages, timed one by one: BLIP-2 (OPT-2.7B) captioning and
LLaMA-7B rewriting at full size, random weights made on the device (speed, not words).

Sizes are the published configs' (Salesforce/blip2-opt-2.7b, meta-llama/Llama-2-7b-hf; the
folders under ../shared/real-checkpoints/ keep their other keys and shrink these). Each
stage: one batch of 8, greedy decoding of 30 new tokens after the prompt the product sends
(BLIP-2: 32 query tokens + a ~12-token SEP on a 224 px image; LLaMA: a ~320-token SRP with
5 examples). LLaMA runs 8-bit through bitsandbytes when the box has it, else bf16 and the
row says so. --tiny: the same code with tiny sizes on a CPU.
"""
from __future__ import annotations

import importlib.util
import time

import torch

from . import peak_memory_mib, reset_peak_memory, sync

OPT_2_7B = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
                word_embed_proj_dim=2560, max_position_embeddings=2048, eos_token_id=50118)
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14)
QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               encoder_hidden_size=1408, vocab_size=30522)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY_OPT = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=704,
                word_embed_proj_dim=32, max_position_embeddings=512, eos_token_id=2)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=224,
                patch_size=14)
TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    encoder_hidden_size=32, vocab_size=128)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=563, max_position_embeddings=4096)
BATCH, NEW_TOKENS, SEP_TOKENS, SRP_TOKENS = 8, 30, 12, 320


def _timed_generate(model, dev, **inputs) -> float:
    """Seconds of one greedy generate call of NEW_TOKENS, after a short warm-up call."""
    kwargs = dict(do_sample=False, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)
    with torch.inference_mode():
        model.generate(**inputs, do_sample=False, max_new_tokens=2)
        sync(dev)
        t0 = time.perf_counter()
        model.generate(**inputs, **kwargs)
        sync(dev)
    return time.perf_counter() - t0


def caption_row(dev: torch.device, tiny: bool) -> dict:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    text = dict(TINY_OPT if tiny else OPT_2_7B, model_type="opt")
    image_token = text["vocab_size"] - 7  # '<image>' sits near the end of the vocabulary (50265 of 50272)
    cfg = Blip2Config(vision_config=TINY_VIT if tiny else EVA_VIT_G, qformer_config=TINY_QFORMER if tiny else QFORMER,
                      text_config=text, num_query_tokens=32, image_token_index=image_token)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = Blip2ForConditionalGeneration(cfg).to(dtype).eval()
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, image_token - 1, (BATCH, SEP_TOKENS), generator=g)
    ids = torch.cat([torch.full((BATCH, 32), image_token), prompt], 1).to(dev)
    pixels = torch.rand(BATCH, 3, 224, 224, generator=g).to(dev, dtype)
    sec = _timed_generate(model, dev, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"phase": "online", "what": f"stage: caption, BLIP-2 OPT {'tiny' if tiny else '2.7B'} "
            f"({params / 1e9:.2f} B params, {str(dtype).replace('torch.', '')}), batch {BATCH}, {NEW_TOKENS} tokens",
            "captions_per_s": BATCH / sec, "seconds_per_batch": sec, "build_s": build,
            "peak_gpu_mib": peak_memory_mib(dev)}


def rewrite_row(dev: torch.device, tiny: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    eight_bit = dev.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = LlamaConfig(**(TINY_LLAMA if tiny else LLAMA_7B), bos_token_id=1, eos_token_id=2)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    if eight_bit:
        model = _to_8bit(model)
    build = time.perf_counter() - t0
    ids = torch.randint(3, cfg.vocab_size, (BATCH, SRP_TOKENS), generator=torch.Generator().manual_seed(1)).to(dev)
    sec = _timed_generate(model, dev, input_ids=ids, attention_mask=torch.ones_like(ids))
    params = sum(p.numel() for p in model.parameters())
    del model
    row = {"phase": "online", "what": f"stage: rewrite, LLaMA {'tiny' if tiny else '7B'} ({params / 1e9:.2f} B "
           f"params, {'8-bit' if eight_bit else str(dtype).replace('torch.', '')}), batch {BATCH}, "
           f"{SRP_TOKENS}-token prompt, {NEW_TOKENS} tokens", "rewrites_per_s": BATCH / sec,
           "seconds_per_batch": sec, "build_s": build, "peak_gpu_mib": peak_memory_mib(dev)}
    if dev.type == "cuda" and not eight_bit:
        row["note"] = "8-bit skipped: bring wheel bitsandbytes (timed in bf16 instead)"
    return row


def _to_8bit(model):
    """Swap every decoder Linear for bitsandbytes' 8-bit layer (as load_in_8bit would)."""
    import bitsandbytes as bnb

    for module in list(model.model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(child.weight.data.to("cpu", torch.float16), requires_grad=False,
                                             has_fp16_weights=False)
                setattr(module, name, q.to(child.weight.device))
    return model


def stage_rows(dev: torch.device, tiny: bool, deadline: float) -> list[dict]:
    rows = []
    for what, fn in (("caption", caption_row), ("rewrite", rewrite_row)):
        if time.perf_counter() > deadline:
            rows.append({"phase": "online", "what": f"stage: {what}", "note": "skipped: the phase's limit is spent"})
            continue
        rows.append(fn(dev, tiny))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
