"""A LoRA in diffusers' layout, checked against the UNet it is meant for and fused into it.

The folder holds `pytorch_lora_weights.safetensors`, as the latent-consistency/lcm-lora-sdv1-5
snapshot ships it (or the file is named directly). It is loaded with diffusers'
`load_lora_weights` (which needs peft), fused into the weights, and the LoRA layers removed
again: the UNet is a plain UNet afterwards, so a step costs what it cost before, and the
compiled, ONNX and TensorRT paths see ordinary modules holding the fused weights.

Before any weight moves, every adapted layer's shape is compared with the UNet's: a LoRA
trained for another base (an SD-1.5 LoRA on SD-2.1, whose cross-attention is 1024 wide, not
768) is refused with the file and the first mismatching layer named.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any, Optional

from sasi_online.errors import ModelFolderError, UserInputError

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
# peft (lora_A / lora_B), diffusers' older (lora.down / lora.up) and kohya (lora_down / lora_up) names
_ROLE = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$")
_DOWN = ("lora_A", "lora.down", "lora_down")


def require_lora_file(path: str | Path) -> Path:
    """The LoRA's safetensors file: `path` itself, or `path/pytorch_lora_weights.safetensors`."""
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise ModelFolderError(
            f"models.lora='{path}': no {LORA_FILE} there. Point models.lora at a LoRA folder in "
            f"diffusers' layout (e.g. a local copy of latent-consistency/lcm-lora-sdv1-5), or unset it")
    if file.suffix != ".safetensors":
        raise UserInputError(f"models.lora='{file}' is not a .safetensors file: only safetensors LoRAs load")
    return file


def _unet_shapes(file: Path) -> dict[str, dict[str, tuple]]:
    """module path in the UNet -> {'down': shape, 'up': shape}, read from the file's header only."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple]] = {}
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():
            if not key.startswith("unet."):
                continue
            match = _ROLE.match(key[len("unet."):])
            if match:
                role = "down" if match["role"] in _DOWN else "up"
                out.setdefault(match["module"], {})[role] = tuple(handle.get_slice(key).get_shape())
    return out


def _mismatch(module: Any, shapes: dict[str, tuple]) -> Optional[str]:
    """Why the LoRA's (down, up) shapes do not fit `module` (Linear or Conv2d), or None."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return f"{type(module).__name__} has no weight"
    out_dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
    down, up = shapes.get("down"), shapes.get("up")
    if down is None or up is None:
        return "only one of its two LoRA matrices is in the file"
    if down[1] != in_dim or up[0] != out_dim or down[0] != up[1]:
        return f"LoRA {down[1]} -> {up[0]} (rank {down[0]}), layer {in_dim} -> {out_dim}"
    return None


def check_lora_matches(file: Path, unet: Any, family: str, unet_folder: Any) -> int:
    """Refuse a LoRA whose layers do not exist in, or do not fit, `unet`; return how many fit."""
    shapes = _unet_shapes(file)
    if not shapes:
        raise UserInputError(f"LoRA '{file}' holds no UNet layers (no 'unet.*.lora_A/lora_B' keys): "
                             f"it is not a diffusers-layout LoRA for a Stable Diffusion UNet")
    modules = dict(unet.named_modules())
    bad = []
    for name, pair in sorted(shapes.items()):
        why = "the UNet has no such layer" if name not in modules else _mismatch(modules[name], pair)
        if why:
            bad.append(f"{name}: {why}")
    if bad:
        raise UserInputError(
            f"LoRA '{file}' does not fit the {family} UNet in '{unet_folder}': {len(bad)} of {len(shapes)} "
            f"adapted layers differ (first: {bad[0]}). It was trained for another base; LCM-LoRA for SD-1.5 "
            f"fits the sd15 family only: set generation.family=sd15, or models.lora to a LoRA made for {family}")
    return len(shapes)


def fuse_lora(file: Path, *, unet: Any, text_encoder: Any, tokenizer: Any, vae: Any,
              scheduler_config: dict, family: str, unet_folder: Any) -> int:
    """Check, load (diffusers' `load_lora_weights`), fuse and unload the LoRA, in place; returns
    the number of UNet layers it changed."""
    if importlib.util.find_spec("peft") is None:
        raise UserInputError(f"models.lora='{file}' needs the peft package (diffusers loads LoRAs through it): "
                             f"pip install peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    layers = check_lora_matches(file, unet, family, unet_folder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="fused")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    log.info("LoRA %s fused into the %s UNet (%d layers)", file, family, layers)
    return layers
