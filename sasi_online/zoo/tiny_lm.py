"""The two tiny language models, briefly trained so their outputs mean something:
BLIP-2 (OPT) captions the embedded Fashion-MNIST images in each SEP's style, LLaMA
completes few-shot SRPs with the rewrite (or expansion) of a tiny caption."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .seeding import _deterministic
from .tokenizers import _gpt2_tokenizer, _llama_tokenizer

log = logging.getLogger(__name__)

BLIP2_QUERY_TOKENS = 8


def _fashion_subset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` embedded Fashion-MNIST training images (28x28 uint8) and labels."""
    path = Path(__file__).parent.parent / "assets" / "fashion_mnist" / "subset.npz"
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
