"""The tiny model zoo: every model the pipeline uses, same classes as the real ones.

`build_zoo(DIR, seed)` writes, in Hugging Face layout:

    sd15/                  StableDiffusionPipeline folder, epsilon prediction, 32-d text context
    sd21/                  same, v prediction, 48-d text context (mirrors 768-d vs 1024-d)
    controlnet-sd15-seg/   ControlNetModel.from_unet(sd15 UNet), zero convolutions perturbed
    controlnet-sd21-seg/   the same for sd21
    taesd/                 AutoencoderTiny (TAESD layout), the optional fast decoder of both families
    blip2/                 Blip2ForConditionalGeneration (OPT) + Blip2Processor, briefly trained
    llama/                 LlamaForCausalLM + tokenizer, briefly trained on SRP completion
    upernet/               UperNetForSemanticSegmentation (ConvNeXt), 150 ADE20K labels
    clip/                  CLIPModel + CLIPProcessor
    zoo.json               seed, library versions, sha256 of every file

The build is byte-identical for the same seed and library versions: every model is
initialised from a seed derived from (seed, model name), training runs on one thread
in a fixed order, and tokenizers use a fixed vocabulary (all 256 byte symbols plus
merges for a fixed word list) rather than a trained BPE, which was not reproducible
across processes. The loaders (`load_*`) are the ones the pipeline uses for tiny and
real checkpoints alike: they check the folder first and name what is missing.

Modules, one job each:

    tokenizers.py   the deterministic CLIP, GPT-2 (OPT) and LLaMA tokenizers
    seeding.py      the seeded one-thread context each model is built in
    tiny_lm.py      the tiny BLIP-2 and LLaMA, and their brief training
    build.py        build_zoo / verify_zoo, the other builders, zoo.json and hashing
    weights.py      which weight files a loader opens (variants, shards, .bin or .safetensors)
    loaders.py      folder checks, load_*, check_controlnet_matches
    identity.py     model_hash: the identity of what is loaded, file hashes cached on disk
    micro/          the micro set: these models trained on Fashion-MNIST (train_micro),
                    shipped under assets/micro_zoo/ and written by build_micro
"""
from __future__ import annotations

from .build import (
    FOLDERS,
    SD15_CONTEXT,
    SD21_CONTEXT,
    TINY_RESOLUTION,
    ZOO_FORMAT,
    build_zoo,
    verify_zoo,
)
from .identity import legacy_model_hash, model_hash
from .loaders import (
    check_controlnet_matches,
    load_captioner,
    load_clip,
    load_controlnet,
    load_rewriter,
    load_sd_pipeline,
    load_segmenter,
    require_model_folder,
    require_sd_folder,
)
from .weights import resolve_weights
from .tiny_lm import BLIP2_QUERY_TOKENS, _fashion_subset  # noqa: F401  (tests read the images)

__all__ = [
    "BLIP2_QUERY_TOKENS", "FOLDERS", "SD15_CONTEXT", "SD21_CONTEXT", "TINY_RESOLUTION", "ZOO_FORMAT",
    "build_zoo", "verify_zoo",
    "check_controlnet_matches", "load_captioner", "load_clip", "load_controlnet", "load_rewriter",
    "load_sd_pipeline", "load_segmenter", "model_hash", "legacy_model_hash", "require_model_folder",
    "require_sd_folder", "resolve_weights",
]
