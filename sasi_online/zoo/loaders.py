"""Loaders the pipeline uses for tiny and real checkpoints alike: each checks the local
Hugging Face folder first (configs and the weight files it will open) and names what is
missing; each loads in the dtype and on the device asked for, and takes a weight variant
(`models.variant`; a folder holding only `*.fp16.*` weights is used as it is). Plus the
ControlNet/UNet fit check; the model identity is in identity.py."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from sasi_online.errors import ModelFolderError, UserInputError

from .identity import SD_COMPONENTS
from .weights import resolve_weights

log = logging.getLogger(__name__)


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


def _weights(folder: Path, variant: Optional[str], library: str = "transformers") -> dict:
    """from_pretrained kwargs that open exactly the weights `resolve_weights` picks (or refuses)."""
    return resolve_weights(folder, library, variant).kwargs()


def _dtype(dtype: Any) -> Any:
    """None means float32: never the checkpoint's own dtype by accident (transformers 5 keeps
    it, fp16 for Llama-2 even on a CPU; an fp16 variant would stay fp16)."""
    import torch

    return torch.float32 if dtype is None else dtype


def _dtype_kw(dtype: Any) -> dict:
    return {"dtype": _dtype(dtype)}


def _eight_bit(device: Any) -> dict:
    """from_pretrained kwargs for a bitsandbytes 8-bit model on `device`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserInputError(
            "semantics.load_in_8bit=true is unavailable because bitsandbytes is not installed: "
            "`pip install bitsandbytes` or set semantics.load_in_8bit=false") from exc
    from transformers import BitsAndBytesConfig

    # fp32 activations are cast to fp16 for the int8 matmul on purpose; bitsandbytes logs
    # that on every forward call, which would bury the progress output
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": str(device)}}


def _image_token(folder: Path, processor: Any, config: Any) -> None:
    """Give an old BLIP-2 snapshot (before the hub's 2024-11 update: no processor_config.json,
    image_token_index null, no `<image>` token) what generation needs: the processor's query
    token count and the `<image>` id in the config. Embeddings grow only if the id does not fit."""
    if processor.num_query_tokens is None:
        # without it the processor silently leaves the image out of the text
        processor.num_query_tokens = config.num_query_tokens
    tok = processor.tokenizer
    token = getattr(processor, "image_token", None)
    token_id = tok.convert_tokens_to_ids(getattr(token, "content", token) or "<image>")
    if token_id is None or token_id == tok.unk_token_id:
        raise ModelFolderError(f"captioner '{folder}': its tokenizer has no <image> token; download "
                               f"the current snapshot (with processor_config.json) of this model")
    if config.image_token_index is None:
        log.info("captioner %s: old snapshot without image_token_index; using the tokenizer's "
                 "<image> id %d", folder, token_id)
        config.image_token_index = token_id
    elif config.image_token_index != token_id:
        raise ModelFolderError(
            f"captioner '{folder}': config.json says image_token_index={config.image_token_index} but "
            f"the tokenizer's <image> is {token_id}; the folder mixes two snapshots: download it again")


def load_captioner(path: str | Path, device: Any = "cpu", dtype: Any = None,
                   variant: Optional[str] = None, load_in_8bit: bool = False):
    """(Blip2Processor, Blip2ForConditionalGeneration) from a local folder, old snapshots too."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    folder = require_model_folder(path, ("config.json",), (_PROCESSOR,), what="captioner (BLIP-2)")
    kw = dict(local_files_only=True, **_weights(folder, variant), **_dtype_kw(dtype))
    config = Blip2Config.from_pretrained(str(folder), local_files_only=True)
    processor = Blip2Processor.from_pretrained(str(folder), local_files_only=True)
    _image_token(folder, processor, config)
    if load_in_8bit:
        kw.update(_eight_bit(device))
    model = Blip2ForConditionalGeneration.from_pretrained(str(folder), config=config, **kw)
    if config.image_token_index >= model.get_input_embeddings().num_embeddings:
        log.info("captioner %s: growing the text embeddings to %d for <image>", folder, len(processor.tokenizer))
        model.resize_token_embeddings(len(processor.tokenizer))
    if not load_in_8bit:
        model = model.to(device)
    return processor, model.eval()


def _not_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing
        return True


def _require_tokenizer(folder: Path) -> None:
    """A tokenizer the rewriter can read: tokenizer.json, BPE files, or a sentencepiece model
    with the packages that convert it (transformers otherwise blames a missing tiktoken)."""
    if (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists():
        return
    if (folder / "tokenizer.model").exists():
        missing = [m for m in ("sentencepiece", "google.protobuf") if _not_installed(m)]
        if missing:
            raise ModelFolderError(
                f"'{folder}' has a sentencepiece tokenizer (tokenizer.model) and no tokenizer.json; reading "
                f"it needs {' and '.join(missing)}: `pip install sentencepiece protobuf`")
        return
    raise ModelFolderError(f"'{folder}' has no tokenizer (tokenizer.json or tokenizer.model): {_hint(folder)}")


def load_rewriter(path: str | Path, device: Any = "cpu", load_in_8bit: bool = False, dtype: Any = None,
                  variant: Optional[str] = None):
    """(tokenizer, causal LM) from a local folder; 8-bit through bitsandbytes on request."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_model_folder(path, ("config.json",), what="rewriter (causal LM)")
    _require_tokenizer(folder)
    kw = dict(local_files_only=True, **_weights(folder, variant), **_dtype_kw(dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"  # decoder-only batched generation
    if load_in_8bit:
        kw.update(_eight_bit(device))
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    if not load_in_8bit:
        model = model.to(device)
    return tokenizer, model.eval()


def load_segmenter(path: str | Path, device: Any = "cpu", dtype: Any = None, variant: Optional[str] = None):
    """(image processor, UperNetForSemanticSegmentation) from a local folder."""
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    folder = require_model_folder(path, ("config.json",), (_PROCESSOR,), what="segmenter (UperNet)")
    kw = dict(local_files_only=True, **_weights(folder, variant), **_dtype_kw(dtype))
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    model = UperNetForSemanticSegmentation.from_pretrained(str(folder), **kw)
    return processor, model.to(device).eval()


def load_clip(path: str | Path, device: Any = "cpu", dtype: Any = None, variant: Optional[str] = None):
    """(CLIPProcessor, CLIPModel) from a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    folder = require_model_folder(path, ("config.json",), (_PROCESSOR,), what="CLIP")
    kw = dict(local_files_only=True, **_weights(folder, variant), **_dtype_kw(dtype))
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    model = CLIPModel.from_pretrained(str(folder), **kw)
    return processor, model.to(device).eval()


def require_sd_folder(path: str | Path, variant: Optional[str] = None) -> Path:
    """Check a StableDiffusionPipeline folder: model_index.json, each component's config and
    the weights of the components loaded (UNet, VAE, text encoder)."""
    folder = require_model_folder(path, ("model_index.json",), what="Stable Diffusion")
    for sub, cfg in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                     ("scheduler", "scheduler_config.json")):
        require_model_folder(folder / sub, (cfg,), what=f"Stable Diffusion {sub}")
    for sub, library in SD_COMPONENTS.items():
        resolve_weights(folder / sub, library, variant)  # raises, naming the file expected
    tok = folder / "tokenizer"
    if not tok.is_dir() or not any((tok / f).exists() for f in ("tokenizer.json", "vocab.json")):
        raise ModelFolderError(f"'{tok}' has no tokenizer.json or vocab.json: {_hint(folder)}")
    return folder


def sd_component_kwargs(folder: Path, sub: str, variant: Optional[str]) -> dict:
    """from_pretrained kwargs for component `sub` (unet | vae | text_encoder) of an SD folder."""
    return _weights(folder / sub, variant, SD_COMPONENTS[sub])


def load_sd_pipeline(path: str | Path, device: Any = "cpu", dtype: Any = None, variant: Optional[str] = None):
    """The StableDiffusionPipeline in a local folder (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    folder = require_sd_folder(path, variant)
    kw = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False,
              torch_dtype=_dtype(dtype), **_weights(folder / "unet", variant, "diffusers"))
    return StableDiffusionPipeline.from_pretrained(str(folder), **kw).to(device)


def load_controlnet(path: str | Path, device: Any = "cpu", dtype: Any = None, variant: Optional[str] = None):
    from diffusers import ControlNetModel

    folder = require_model_folder(path, ("config.json",), what="ControlNet")
    kw = dict(local_files_only=True, torch_dtype=_dtype(dtype), **_weights(folder, variant, "diffusers"))
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
