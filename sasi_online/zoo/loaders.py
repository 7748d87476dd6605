"""Loaders the pipeline uses for tiny and real checkpoints alike: each checks the local
Hugging Face folder first and names what is missing; plus the ControlNet/UNet fit check
and a content hash of a model folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.utils import file_sha256


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
