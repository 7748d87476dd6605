"""Deterministic tokenizers for the tiny models: CLIP, GPT-2 (as OPT uses it) and LLaMA.

They use a fixed vocabulary (all 256 byte symbols plus merges for a fixed word list)
rather than a trained BPE, which was not reproducible across processes.
"""
from __future__ import annotations

import re
from typing import Iterable


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
