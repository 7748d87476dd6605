"""Build folders laid out like real hub snapshots, with tiny weights.

Each layout in tests/fixtures/real_checkpoints/ (copied from the project's notes on real
snapshots) holds the snapshot's file list (FILES.txt) and its config files, size keys
shrunk. A built folder has: those config files as they are; tiny random weights, made
from those configs with the same model classes the zoo builds, written under the name the
snapshot uses for the weights a loader should open (fp16 where the snapshot only has
fp16); tiny deterministic tokenizers; and every other listed file (other weight copies,
variants, safety checker, .ckpt files) as an empty placeholder: a loader that opened one
would fail.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "real_checkpoints"
SD_LAYOUTS = ("sd15", "sd15-2022", "sd15-fp16", "sd21", "sd21-fp16", "sd21-base")
CONTROLNET_LAYOUTS = ("controlnet-sd15-seg", "controlnet-v11p-sd15-seg")
CAPTIONER_LAYOUTS = ("blip2", "blip2-2023")
REWRITER_LAYOUTS = ("llama", "llama-spm")
OPT_VOCAB = 668  # tokens before <image> (the shrunk configs' image_token_index)
WORDS = "a the of photo picture grey coat shirt dress black white dark light on in and is".split()


def files_of(layout: str) -> list[str]:
    return (FIXTURES / layout / "FILES.txt").read_text().split()


def _opened(names: list[str], stem: str) -> str | None:
    """The weight file a loader must open among `names`: plain safetensors, plain .bin, fp16."""
    for ext in (".safetensors", ".bin", ".fp16.safetensors"):
        if stem + ext in names:
            return stem + ext
    return None


def _save(state: dict, path: Path, dtype=None) -> None:
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
             for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)


def _save_sharded(state: dict, folder: Path, index_name: str, dtype=None) -> None:
    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        _save({k: v for k, v in state.items() if weight_map.get(k) == shard}, folder / shard, dtype)


def _skeleton(layout: str, dest: Path) -> list[str]:
    """Config files copied, every other listed file present and empty."""
    src = FIXTURES / layout
    for path in src.rglob("*"):
        if path.is_file() and path.name != "FILES.txt":
            (dest / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / path.relative_to(src))  # contents only: fixtures may be read-only
    names = files_of(layout)
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).touch(exist_ok=True)
    return names


# ----------------------------------------------------------------------------- tokenizers
def clip_tokenizer():
    """A CLIPTokenizer of a few hundred tokens (the shrunk text encoders have 712); with its
    vocabulary and merges, to write vocab.json and merges.txt."""
    from transformers import CLIPTokenizer

    from sasi_online.zoo.tokenizers import _BYTE_CHARS, _add_word, _word_order

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _BYTE_CHARS.values():
        vocab.setdefault(ch, len(vocab))
    for ch in _BYTE_CHARS.values():
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: dict = {}
    for w in _word_order(WORDS):
        sym = [_BYTE_CHARS[b] for b in w.encode()]
        sym[-1] += "</w>"
        _add_word(sym, merges, vocab)
    merges = sorted(merges, key=merges.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), vocab, merges


def opt_tokenizer(size: int = OPT_VOCAB):
    """A GPT2Tokenizer as OPT uses it, padded to exactly `size` tokens (+ vocab, merges)."""
    from transformers import GPT2Tokenizer

    from sasi_online.zoo.tokenizers import _BYTE_CHARS, _add_word, _word_order

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _BYTE_CHARS.values():
        vocab.setdefault(ch, len(vocab))
    merges: dict = {}
    for form in _word_order(WORDS + [" " + w for w in WORDS]):
        _add_word([_BYTE_CHARS[b] for b in form.encode()], merges, vocab)
    while len(vocab) < size:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    merges = sorted(merges, key=merges.get)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                        pad_token="<pad>")
    return tok, vocab, merges


def sentencepiece_model(path: Path, vocab_size: int = 320) -> None:
    """A tiny sentencepiece BPE model with byte fallback, as LLaMA ships tokenizer.model."""
    import io

    import sentencepiece as spm

    from sasi_online.semantics import srp_pool

    lines = [t for c, r, e in srp_pool.POOL for t in (c, r, e)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, num_threads=1,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())


def _write_tokenizer(tok, dest: Path, names: list[str], vocab: dict | None = None,
                     merges: list | None = None) -> None:
    """The tokenizer files the snapshot lists (tokenizer.json, vocab.json, merges.txt); the
    snapshot's own tokenizer configs stay as copied."""
    if "tokenizer.json" in names:
        tmp = dest.with_name(dest.name + ".tok")
        tok.save_pretrained(str(tmp))
        shutil.copy(tmp / "tokenizer.json", dest / "tokenizer.json")
        shutil.rmtree(tmp)
    if "vocab.json" in names:
        (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    if "merges.txt" in names:
        (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# ----------------------------------------------------------------------------- builders
def build_sd(layout: str, dest: Path, seed: int = 0) -> dict:
    """An SD pipeline folder; returns {component: state dict written}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    names = _skeleton(layout, dest)
    written = {}
    for sub, make, stem in (
            ("unet", lambda d: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d)),
             "diffusion_pytorch_model"),
            ("vae", lambda d: AutoencoderKL.from_config(AutoencoderKL.load_config(d)), "diffusion_pytorch_model"),
            ("text_encoder", lambda d: CLIPTextModel(CLIPTextConfig.from_pretrained(d)), "model")):
        torch.manual_seed(seed)
        state = make(str(dest / sub)).state_dict()
        sub_names = [n.split("/", 1)[1] for n in names if n.startswith(sub + "/")]
        pickled = "pytorch_model" if stem == "model" else stem
        name = _opened(sub_names, stem) or _opened(sub_names, pickled)
        _save(state, dest / sub / name, torch.float16 if ".fp16." in name else None)
        written[sub] = state
    tok, vocab, merges = clip_tokenizer()
    _write_tokenizer(tok, dest / "tokenizer", [n.split("/", 1)[1] for n in names if n.startswith("tokenizer/")],
                     vocab, merges)
    return written


def build_controlnet(layout: str, dest: Path, seed: int = 0) -> dict:
    from diffusers import ControlNetModel

    names = _skeleton(layout, dest)
    torch.manual_seed(seed)
    cn = ControlNetModel.from_config(ControlNetModel.load_config(str(dest)))
    with torch.no_grad():  # a fresh ControlNet outputs exactly zero: make it matter
        for pname, p in cn.named_parameters():
            if pname.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.05)
    state = cn.state_dict()
    _save(state, dest / _opened(names, "diffusion_pytorch_model"))
    return state


def build_blip2(layout: str, dest: Path, seed: int = 0, vocab: int = OPT_VOCAB) -> dict:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    names = _skeleton(layout, dest)
    tok, tok_vocab, merges = opt_tokenizer(vocab)
    if "added_tokens.json" in names:  # the current snapshot: <image> is in the tokenizer
        tok.add_tokens(["<image>"], special_tokens=True)
    _write_tokenizer(tok, dest, names, tok_vocab, merges)
    torch.manual_seed(seed)
    state = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(str(dest))).state_dict()
    _save_sharded(state, dest, "model.safetensors.index.json")
    return state


def build_llama(layout: str, dest: Path, seed: int = 0) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    names = _skeleton(layout, dest)
    sentencepiece_model(dest / "tokenizer.model")
    if "tokenizer.json" in names:
        (dest / "tokenizer.json").unlink()
        tok = AutoTokenizer.from_pretrained(str(dest))  # converted from tokenizer.model
        _write_tokenizer(tok, dest, names)
    torch.manual_seed(seed)
    state = LlamaForCausalLM(LlamaConfig.from_pretrained(str(dest))).state_dict()
    _save_sharded(state, dest, "model.safetensors.index.json", torch.float16)  # saved in fp16, as Llama-2
    return state


def build_upernet(dest: Path, seed: int = 0) -> dict:
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    _skeleton("upernet", dest)
    torch.manual_seed(seed)
    state = UperNetForSemanticSegmentation(UperNetConfig.from_pretrained(str(dest))).state_dict()
    _save(state, dest / "pytorch_model.bin")
    return state


def build_clip(dest: Path, seed: int = 0) -> dict:
    from transformers import CLIPConfig, CLIPModel

    names = _skeleton("clip", dest)
    tok, vocab, merges = clip_tokenizer()
    _write_tokenizer(tok, dest, names, vocab, merges)
    torch.manual_seed(seed)
    state = CLIPModel(CLIPConfig.from_pretrained(str(dest))).state_dict()
    _save(state, dest / "model.safetensors")
    return state


# ----------------------------------------------------------------------------- hub cache
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def to_hub_cache(folder: Path, cache_root: Path, repo: str, commit: str = "1d0c4ebf6ff58a5caecab40fa1406526bca4b5b9") -> Path:
    """`folder` as the hub cache stores it: models--ORG--NAME/{blobs,refs,snapshots/<commit>},
    each snapshot file a relative link into blobs/ (large files named by their sha256, small
    ones by git's SHA-1). Returns the snapshot folder."""
    repo_dir = cache_root / ("models--" + repo.replace("/", "--"))
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        lfs = path.suffix in (".safetensors", ".bin", ".ckpt", ".model")
        name = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        if not (blobs / name).exists():
            (blobs / name).write_bytes(data)
        link = snap / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blobs / name, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap
