"""The tiny model zoo: every model the pipeline uses, same classes as the real ones.

`build_zoo(DIR, seed)` writes, in Hugging Face layout:

    sd15/                  StableDiffusionPipeline folder, epsilon prediction, 32-d text context
    sd21/                  same, v prediction, 48-d text context (mirrors 768-d vs 1024-d)
    controlnet-sd15-seg/   ControlNetModel.from_unet(sd15 UNet), zero convolutions perturbed
    controlnet-sd21-seg/   the same for sd21
    blip2/                 Blip2ForConditionalGeneration (OPT) + Blip2Processor, briefly trained
    llama/                 LlamaForCausalLM + tokenizer, briefly trained on SRP completion
    upernet/               UperNetForSemanticSegmentation (ConvNeXt), 150 ADE20K labels
    clip/                  CLIPModel + CLIPProcessor
    zoo.json               seed, library versions, sha256 of every file

The build is byte-identical for the same seed and library versions: every model is
initialised from a seed derived from (seed, model name), training runs on one thread
in a fixed order, and tokenizers use a fixed vocabulary (all 256 byte symbols plus
merges for a fixed word list) rather than a trained BPE, which was not reproducible
across processes. The loaders at the bottom (`load_*`) are the ones the pipeline uses
for tiny and real checkpoints alike: they check the folder first and name what is
missing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.utils import atomic_write_json, derive_seed, file_sha256

log = logging.getLogger(__name__)

ZOO_FORMAT = 1
TINY_RESOLUTION = 64  # pixel side the tiny diffusion models are built for
SD15_CONTEXT = 32  # text context width of the tiny SD-1.5 stand-in (real: 768)
SD21_CONTEXT = 48  # ... of the tiny SD-2.1 stand-in (real: 1024)
BLIP2_QUERY_TOKENS = 8
FOLDERS = ("sd15", "sd21", "controlnet-sd15-seg", "controlnet-sd21-seg", "blip2", "llama",
           "upernet", "clip")


# ============================================================================ tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (used by CLIP and OPT BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHARS = _bytes_to_unicode()
_BASE_WORDS = (
    "a an the and or of in on at to with by for from is are was were be been it its this that "
    "these those there here what which who picture photo image describe describes detail "
    "question answer please objects included shown show shows black white grey gray dark light "
    "red green blue yellow brown small large big long short one two three man woman person "
    "people child boy girl dog cat bird car tree house street room table water sky background "
    "standing sitting lying holding wearing near next beside behind under over front top "
    "picture of clothing garment fashion item"
).split()


def _tiny_corpus_words(scope: str = "all") -> list[str]:
    """Words the tiny tokenizers hold as single tokens where possible, in a fixed order.

    scope "caption": the SEPs and the tiny captions only (the captioner's vocabulary stays
    small, which keeps its training cheap); "all": also the SRP pool, system lines and
    ADE20K names. Any other text still tokenizes, byte by byte.
    """
    from sasi_online.semantics import srp_pool, tiny_captions
    from sasi_online.semantics.prompts import SEPS
    from sasi_online.visual.palette import ADE20K_CLASSES

    texts: list[str] = list(_BASE_WORDS) + list(SEPS.values())
    for c, r, e in tiny_captions.rewrite_pairs():
        texts += [c] if scope == "caption" else [c, r, e]
    if scope != "caption":
        texts += [srp_pool.SYSTEM_REWRITE, srp_pool.SYSTEM_EXPANSION, srp_pool.ARROW]
        for c, r, e in srp_pool.POOL:
            texts += [c, r, e]
        texts += list(ADE20K_CLASSES) + list(tiny_captions.FASHION_CLASSES)
    words: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]", t):
            words.setdefault(w, None)
    return list(words)


def _bpe_segment(symbols: list[str], ranks: dict) -> list[str]:
    """Apply BPE merges (lowest rank first), as the tokenizers library does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = min(range(len(symbols) - 1),
                   key=lambda i: ranks.get((symbols[i], symbols[i + 1]), float("inf")))
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def _add_word(symbols: list[str], merges: dict, vocab: dict) -> None:
    """Append the merges that make `symbols` one token.

    The word is first segmented with the merges so far; new merges join those segments
    left to right and rank after every existing merge, so they can never fire while an
    earlier word is still being merged: every word added stays one token.
    """
    segments = _bpe_segment(symbols, merges)
    cur = segments[0]
    for seg in segments[1:]:
        merges.setdefault((cur, seg), len(merges))
        cur = cur + seg
        vocab.setdefault(cur, len(vocab))


def _word_order(words: Iterable[str]) -> list[str]:
    # short words first: their merges rank low and become the pieces of longer words
    return sorted(set(words), key=lambda w: (len(w), w))


def _clip_tokenizer(model_max_length: int = 77):
    """CLIPTokenizer: byte symbols and their '</w>' forms, merges for the corpus words."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _BYTE_CHARS.values():
        vocab.setdefault(ch, len(vocab))
    for ch in _BYTE_CHARS.values():
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: dict = {}
    for w in _word_order(w.lower() for w in _tiny_corpus_words()):
        sym = [_BYTE_CHARS[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        _add_word(sym, merges, vocab)
    return CLIPTokenizer(vocab=vocab, merges=sorted(merges, key=merges.get), model_max_length=model_max_length)


def _gpt2_tokenizer():
    """GPT2Tokenizer as OPT uses it (byte-level BPE), specials placed as in OPT."""
    from transformers import GPT2Tokenizer

    vocab: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _BYTE_CHARS.values():
        vocab.setdefault(ch, len(vocab))
    merges: dict = {}
    space = _BYTE_CHARS[ord(" ")]
    words = _tiny_corpus_words("caption")
    for form in _word_order([w for w in words] + [" " + w for w in words]):
        _add_word([_BYTE_CHARS[b] for b in form.encode("utf-8")], merges, vocab)
    assert space in vocab
    return GPT2Tokenizer(vocab=vocab, merges=sorted(merges, key=merges.get), bos_token="</s>", eos_token="</s>",
                         unk_token="<unk>", pad_token="<pad>", model_max_length=512)


def _llama_tokenizer():
    """LlamaTokenizer (metaspace BPE with byte fallback), specials as in LLaMA."""
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    vocab.setdefault("▁", len(vocab))
    words = _tiny_corpus_words()
    for ch in sorted({c for w in words for c in w} | {chr(i) for i in range(33, 127)}):
        vocab.setdefault(ch, len(vocab))
    merges: dict = {}
    # '▁word' inside a line, 'word' at the start of a line (after a newline)
    for form in _word_order(["▁" + w for w in words] + words):
        _add_word(list(form), merges, vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=sorted(merges, key=merges.get), model_max_length=1024)
    tok.pad_token = tok.unk_token  # LLaMA has no pad token; generation pads on the left
    tok.padding_side = "left"
    return tok


# ============================================================================ builders
@contextlib.contextmanager
def _deterministic(seed: int, name: str):
    """Seed torch for one model and run on one thread, so bytes do not depend on the host."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(derive_seed("zoo", seed, name))
    try:
        yield torch.Generator().manual_seed(derive_seed("zoo-gen", seed, name))
    finally:
        torch.set_num_threads(threads)


def _text_encoder(tokenizer, width: int, seed: int, name: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    with _deterministic(seed, name):
        cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=2, projection_dim=width,
                             max_position_embeddings=tokenizer.model_max_length,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return CLIPTextModel(cfg).eval()


def _build_sd(out: Path, family: str, seed: int) -> Any:
    """A StableDiffusionPipeline folder; returns its UNet (the ControlNet is made from it)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    v_pred = family == "sd21"
    width = SD21_CONTEXT if v_pred else SD15_CONTEXT
    tokenizer = _clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, width, seed, f"{family}/text_encoder")
    with _deterministic(seed, f"{family}/unet"):
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
            attention_head_dim=(2, 4) if v_pred else 4, norm_num_groups=16,
            use_linear_projection=v_pred,  # as in SD-2.x
        ).eval()
    with _deterministic(seed, f"{family}/vae"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=TINY_RESOLUTION,
        ).eval()
    # DDIM's config as SD-2.1 ships it (a DDPM-trained schedule; samplers are built from it with
    # from_config), with steps_offset=1 that img2img expects.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_pred else "epsilon", steps_offset=1,
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / family, safe_serialization=True)
    return unet


def _build_controlnet(out: Path, name: str, unet: Any, seed: int) -> None:
    """ControlNet copied from `unet`, with its zero convolutions set to small seeded values:
    a fresh ControlNet outputs exactly zero and would have no effect at all."""
    import torch
    from diffusers import ControlNetModel

    with _deterministic(seed, name) as gen:
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
        zero_convs = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
        with torch.no_grad():
            for pname, p in cn.named_parameters():
                if pname.startswith(zero_convs):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    cn.eval().save_pretrained(out / name, safe_serialization=True)


def _build_upernet(out: Path, seed: int) -> None:
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    from sasi_online.visual.palette import ADE20K_CLASSES

    with _deterministic(seed, "upernet"):
        backbone = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                  out_features=["stage1", "stage2", "stage3", "stage4"])
        cfg = UperNetConfig(backbone_config=backbone, hidden_size=32, auxiliary_in_channels=48,
                            auxiliary_channels=16, use_auxiliary_head=False,
                            num_labels=len(ADE20K_CLASSES),
                            id2label=dict(enumerate(ADE20K_CLASSES)),
                            label2id={n: i for i, n in enumerate(ADE20K_CLASSES)})
        model = UperNetForSemanticSegmentation(cfg).eval()
    model.save_pretrained(out / "upernet", safe_serialization=True)
    SegformerImageProcessor(size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
                            do_reduce_labels=False).save_pretrained(out / "upernet")


def _build_clip(out: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    with _deterministic(seed, "clip"):
        text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(out / "clip", safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(out / "clip")


def _fashion_subset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` embedded Fashion-MNIST training images (28x28 uint8) and labels."""
    path = Path(__file__).parent / "assets" / "fashion_mnist" / "subset.npz"
    with np.load(path) as data:
        return data["train_images"][:n], data["train_labels"][:n].astype(np.int64)


def _build_blip2(out: Path, seed: int, steps: int) -> None:
    """Tiny BLIP-2 (OPT), trained for `steps` small batches to caption Fashion-MNIST images in
    the style each SEP asks for."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessor, OPTConfig)

    from sasi_online.semantics import tiny_captions

    tokenizer = _gpt2_tokenizer()
    # The processor first: it adds '<image>' to the tokenizer, and only with num_query_tokens
    # does it put image placeholders into the text (without them the image is ignored).
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}, do_convert_rgb=True),
        tokenizer=tokenizer, num_query_tokens=BLIP2_QUERY_TOKENS)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    with _deterministic(seed, "blip2") as gen:
        text = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                         num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        cfg = Blip2Config(
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2),
            qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, encoder_hidden_size=32, vocab_size=len(tokenizer)),
            text_config=text.to_dict(), num_query_tokens=BLIP2_QUERY_TOKENS,
            image_token_index=image_token_index)
        model = Blip2ForConditionalGeneration(cfg)
        if steps > 0:
            _train_blip2(model, processor, tiny_captions, steps, gen)
    model.eval().save_pretrained(out / "blip2", safe_serialization=True)
    processor.save_pretrained(out / "blip2")


_BLIP2_LR = 5e-3


def _train_blip2(model, processor, tiny_captions, steps: int, gen) -> None:
    """Teacher-forced captioning on the embedded images; inputs are prepared once up front
    (image processing per step would cost more than the tiny model itself)."""
    import torch
    from PIL import Image

    images, labels = _fashion_subset(500)
    pixels = processor.image_processor([Image.fromarray(i).convert("RGB") for i in images],
                                       return_tensors="pt")["pixel_values"]
    tones = [tiny_captions.tone_of(i) for i in images]
    seps = tiny_captions.training_seps()
    tok = processor.tokenizer
    n_query = processor.num_query_tokens
    image_ids = [model.config.image_token_index] * n_query
    prompt_len = {sep: len(tok(sep)["input_ids"]) for sep in seps}
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    # As in BLIP-2's own recipe the image side stays frozen: its random features already
    # tell the images apart, while training it jointly for this few steps collapsed the
    # query outputs to an image-independent prefix. Only the projection and OPT learn.
    for part in (model.vision_model, model.qformer):
        part.requires_grad_(False)
    model.query_tokens.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=_BLIP2_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10) * (1 - i / steps))
    model.train()
    batch = 32
    for _ in range(steps):
        idx = rng.choice(len(images), batch, replace=False)
        rows, label_rows = [], []
        for i in idx:
            sep = seps[int(rng.integers(len(seps)))]
            templates = tiny_captions.caption_templates(int(labels[i]), sep)
            cap = templates[int(rng.integers(len(templates)))].format(c=tones[i])
            ids = tok(f"{sep} {cap}{tok.eos_token}")["input_ids"]
            rows.append(image_ids + ids)
            # loss on the caption only: the image placeholders and the SEP are context
            label_rows.append([-100] * (n_query + prompt_len[sep]) + ids[prompt_len[sep]:])
        width = max(map(len, rows))
        pad = tok.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        lab = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
        loss = model(pixel_values=pixels[torch.from_numpy(idx)], input_ids=input_ids,
                     attention_mask=attn, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info("tiny BLIP-2 trained %d steps, last loss %.3f", steps, loss.item())


def _build_llama(out: Path, seed: int, steps: int) -> None:
    """Tiny LLaMA trained for `steps` small batches on plain few-shot SRP completion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _llama_tokenizer()
    with _deterministic(seed, "llama") as gen:
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        if steps > 0:
            _train_llama(model, tokenizer, steps, gen)
    model.eval().save_pretrained(out / "llama", safe_serialization=True)
    tokenizer.save_pretrained(out / "llama")


# Number of pool examples in a training SRP and how often each occurs: mostly short
# prompts (the skill - rewrite the last line - is the same, at a fraction of the cost),
# the full 5-example form often enough that generation sees its usual prompt. Chosen
# by trying a few settings on this machine: greedy rewrites keep tone and garment.
_LLAMA_K = [0, 1, 2, 5]
_LLAMA_P = [0.55, 0.2, 0.1, 0.15]
_LLAMA_LR = 6e-3


def _train_llama(model, tokenizer, steps: int, gen) -> None:
    """Few-shot SRP completion: the prompt is a real SRP (random pool examples, rewrite or
    expansion mode) ending in a tiny caption, the target its rewrite (or expansion)."""
    import torch
    import torch.nn.functional as F

    from sasi_online.semantics import srp_pool, tiny_captions

    fashion = tiny_captions.rewrite_pairs()
    opt = torch.optim.AdamW(model.parameters(), lr=_LLAMA_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * (1 - i / steps))
    model.train()
    batch = 16
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1:]
    memo: dict = {}
    for step in range(steps):
        ids, n_prompt = [], []
        # one example count per batch: padding to the longest prompt would otherwise make
        # nearly every batch as long as a 5-example prompt
        k = int(rng.choice(_LLAMA_K, p=_LLAMA_P))
        for _ in range(batch):
            mode = "expansion" if rng.random() < 0.2 else "rewrite"
            cap, rw, ex = fashion[int(rng.integers(len(fashion)))]
            key = (cap, mode) if k == 0 else None  # example-free prompts repeat: tokenize once
            if key in memo:
                p_ids, t_ids = memo[key]
            else:
                srp = srp_pool.build_srp(cap, image_id=int(rng.integers(1 << 30)), mode=mode,
                                         num_examples=k)
                p_ids = tokenizer(srp.text)["input_ids"]  # with <s>, as at generation time
                # the target continues the prompt's text: ' rewrite', then a newline ends it
                t_ids = tokenizer(srp.text + " " + (ex if mode == "expansion" else rw))[
                    "input_ids"][len(p_ids):] + newline
                if key is not None:
                    memo[key] = (p_ids, t_ids)
            ids.append(p_ids + t_ids)
            n_prompt.append(len(p_ids))
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        # predict target tokens only, and run the vocabulary head only there (it dominates
        # the cost of a model this small)
        sel = torch.zeros(batch, width, dtype=torch.bool)
        for row, (x, n) in enumerate(zip(ids, n_prompt)):
            sel[row, width - len(x) + n - 1: width - 1] = True
        hidden = model.model(input_ids=input_ids, attention_mask=attn).last_hidden_state
        logits = model.lm_head(hidden[sel])
        loss = F.cross_entropy(logits, input_ids[:, 1:][sel[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info("tiny LLaMA trained %d steps, last loss %.3f", steps, loss.item())


def _library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _source_hash() -> str:
    """Hash of the code and text the zoo is built from: a zoo built by other code is rebuilt."""
    import hashlib

    here = Path(__file__).parent
    h = hashlib.sha256()
    for rel in ("zoo.py", "semantics/tiny_captions.py", "semantics/srp_pool.py",
                "semantics/prompts.py", "visual/palette.py"):
        h.update((here / rel).read_bytes())
    return h.hexdigest()[:16]


def _file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zoo.json"}


def build_zoo(out_dir: str | Path, seed: int = 0, force: bool = False,
              caption_steps: int = 150, rewrite_steps: int = 200) -> Path:
    """Write the complete tiny model set under `out_dir`; return its path.

    The set is built in a sibling temporary folder and renamed into place, so an
    interrupted build leaves nothing half-written. A folder that already holds a zoo of
    the same seed, format, library versions, builder source and training steps is kept as
    is (run again = no-op), so a cached zoo can be reused safely across test sessions.
    """
    out = Path(out_dir)
    manifest = out / "zoo.json"
    if out.exists():
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = {}
            same = (old.get("seed") == seed and old.get("format") == ZOO_FORMAT
                    and old.get("versions") == _library_versions()
                    and old.get("source") == _source_hash()
                    and old.get("steps") == [caption_steps, rewrite_steps])
            if same and not force:
                log.info("zoo at %s is already built (seed %d)", out, seed)
                return out
        elif any(out.iterdir()) and not force:
            raise UserInputError(
                f"'{out}' exists and is not a model zoo (no zoo.json): choose an empty or new "
                f"folder, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    steps = [
        ("sd15", lambda: _build_controlnet(tmp, "controlnet-sd15-seg", _build_sd(tmp, "sd15", seed), seed)),
        ("sd21", lambda: _build_controlnet(tmp, "controlnet-sd21-seg", _build_sd(tmp, "sd21", seed), seed)),
        ("upernet", lambda: _build_upernet(tmp, seed)),
        ("clip", lambda: _build_clip(tmp, seed)),
        ("blip2", lambda: _build_blip2(tmp, seed, caption_steps)),
        ("llama", lambda: _build_llama(tmp, seed, rewrite_steps)),
    ]
    from tqdm.auto import tqdm

    with tqdm(steps, desc="building tiny zoo", unit="model", disable=None) as bar:
        for name, build in bar:
            bar.set_postfix_str(name)
            build()
    atomic_write_json(tmp / "zoo.json", {
        "format": ZOO_FORMAT, "seed": seed, "versions": _library_versions(),
        "source": _source_hash(), "steps": [caption_steps, rewrite_steps],
        "resolution": TINY_RESOLUTION, "files": _file_hashes(tmp),
    })
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("tiny zoo built at %s in %.1f s", out, time.perf_counter() - t0)
    return out


def verify_zoo(root: str | Path) -> list[str]:
    """Files whose sha256 differs from zoo.json (empty list = intact)."""
    root = Path(root)
    manifest = root / "zoo.json"
    if not manifest.is_file():
        raise ModelFolderError(f"'{root}' has no zoo.json: run `sasi zoo build {root}`")
    want = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    have = _file_hashes(root)
    return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))


# ============================================================================ loaders
def _hint(folder: Path) -> str:
    return (f"run `sasi zoo build {folder.parent}` or point models.root at a full checkpoint")


def require_model_folder(folder: str | Path, files: Iterable[str] = ("config.json",),
                         any_of: Iterable[Iterable[str]] = (), what: str = "model") -> Path:
    """Check a local Hugging Face folder before loading: it exists and holds `files`, and for
    each group in `any_of` at least one of its files (e.g. weights in one of two formats)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{what} folder '{folder}' does not exist: {_hint(folder)}")
    for name in files:
        if not (folder / name).exists():
            raise ModelFolderError(f"'{folder}' has no {name}: {_hint(folder)}")
    for group in any_of:
        group = list(group)
        if not any((folder / g).exists() or list(folder.glob(g)) for g in group):
            raise ModelFolderError(
                f"'{folder}' has none of {', '.join(group)}: {_hint(folder)}")
    return folder


# transformers 5 saves processors as processor_config.json; older checkpoints as
# preprocessor_config.json: either will do.
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "*.safetensors")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors.index.json", "*.safetensors")


def load_captioner(path: str | Path, device: Any = "cpu", dtype: Any = None):
    """(Blip2Processor, Blip2ForConditionalGeneration) from a local folder."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    folder = require_model_folder(path, ("config.json",), (_WEIGHTS, _PROCESSOR),
                                  what="captioner (BLIP-2)")
    processor = Blip2Processor.from_pretrained(str(folder), local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(str(folder), local_files_only=True,
                                                          dtype=dtype)
    if processor.num_query_tokens is None:
        # Without it the processor silently leaves the image out of the text (logits would not
        # depend on the image): take it from the model.
        processor.num_query_tokens = model.config.num_query_tokens
    return processor, model.to(device).eval()


def load_rewriter(path: str | Path, device: Any = "cpu", load_in_8bit: bool = False, dtype: Any = None):
    """(tokenizer, causal LM) from a local folder; 8-bit through bitsandbytes on request."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_model_folder(path, ("config.json",), (_WEIGHTS,), what="rewriter (causal LM)")
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelFolderError(f"'{folder}' has no tokenizer (tokenizer.json or tokenizer.model): "
                               f"{_hint(folder)}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"  # decoder-only batched generation
    kw: dict = dict(local_files_only=True)
    if load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UserInputError(
                "semantics.load_in_8bit=true is unavailable because bitsandbytes is not installed: "
                "`pip install bitsandbytes` or set semantics.load_in_8bit=false") from exc
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # fp32 activations are cast to fp16 for the int8 matmul on purpose; bitsandbytes logs
        # that on every forward call, which would bury the progress output
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        kw["device_map"] = {"": device if str(device) != "cpu" else "cpu"}
    elif dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    if not load_in_8bit:
        model = model.to(device)
    return tokenizer, model.eval()


def load_segmenter(path: str | Path, device: Any = "cpu"):
    """(image processor, UperNetForSemanticSegmentation) from a local folder."""
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    folder = require_model_folder(path, ("config.json",), (_WEIGHTS, _PROCESSOR),
                                  what="segmenter (UperNet)")
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    model = UperNetForSemanticSegmentation.from_pretrained(str(folder), local_files_only=True)
    return processor, model.to(device).eval()


def load_clip(path: str | Path, device: Any = "cpu"):
    """(CLIPProcessor, CLIPModel) from a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    folder = require_model_folder(path, ("config.json",), (_WEIGHTS, _PROCESSOR),
                                  what="CLIP")
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    return processor, model.to(device).eval()


def require_sd_folder(path: str | Path) -> Path:
    """Check a StableDiffusionPipeline folder: model_index.json and each component's config."""
    folder = require_model_folder(path, ("model_index.json",), what="Stable Diffusion")
    for sub, cfg in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                     ("scheduler", "scheduler_config.json")):
        require_model_folder(folder / sub, (cfg,), what=f"Stable Diffusion {sub}")
    tok = folder / "tokenizer"
    if not tok.is_dir() or not any((tok / f).exists() for f in ("tokenizer.json", "vocab.json")):
        raise ModelFolderError(f"'{tok}' has no tokenizer.json or vocab.json: {_hint(folder)}")
    return folder


def load_sd_pipeline(path: str | Path, device: Any = "cpu", dtype: Any = None):
    """The StableDiffusionPipeline in a local folder (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    folder = require_sd_folder(path)
    kw = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False)
    if dtype is not None:
        kw["torch_dtype"] = dtype
    return StableDiffusionPipeline.from_pretrained(str(folder), **kw).to(device)


def load_controlnet(path: str | Path, device: Any = "cpu", dtype: Any = None):
    from diffusers import ControlNetModel

    folder = require_model_folder(path, ("config.json",), (_DIFFUSERS_WEIGHTS,), what="ControlNet")
    kw = dict(local_files_only=True)
    if dtype is not None:
        kw["torch_dtype"] = dtype
    return ControlNetModel.from_pretrained(str(folder), **kw).to(device).eval()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot read '{path}': {exc}") from exc


def check_controlnet_matches(unet_or_pipe_folder: str | Path, controlnet_folder: str | Path) -> None:
    """Refuse a ControlNet whose residuals cannot be added to the UNet in `unet_or_pipe_folder`
    (a pipeline folder or its unet/ folder): text context width, block layout, latent channels.
    Reads only the two config files, so it is cheap enough to run before loading anything."""
    base = Path(unet_or_pipe_folder)
    unet_dir = base / "unet" if (base / "unet").is_dir() else base
    require_model_folder(unet_dir, ("config.json",), what="UNet")
    cn_dir = require_model_folder(controlnet_folder, ("config.json",), what="ControlNet")
    u, c = _read_json(unet_dir / "config.json"), _read_json(cn_dir / "config.json")
    problems = []
    for key, label in (("cross_attention_dim", "text context width"),
                       ("block_out_channels", "block channels"),
                       ("down_block_types", "down blocks"),
                       ("layers_per_block", "layers per block"),
                       ("in_channels", "latent channels")):
        if u.get(key) != c.get(key):
            problems.append(f"{label}: UNet {u.get(key)} vs ControlNet {c.get(key)}")
    if problems:
        raise ModelFolderError(
            f"ControlNet '{controlnet_folder}' does not fit the base model '{unet_or_pipe_folder}' "
            f"({'; '.join(problems)}). Use the seg ControlNet trained for this base "
            f"(sd15 ↔ controlnet-sd15-seg, sd21 ↔ controlnet-sd21-seg).")


def model_hash(folder: str | Path) -> str:
    """A short content hash of a model folder's config and weights (cache keys)."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".bin", ".model")):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]
