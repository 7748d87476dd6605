"""Model families: one Stable Diffusion base (+ its seg ControlNet) loaded from a local folder.

The paper names SD-2.1 and ControlNet-sd15-seg, which cannot share one UNet (1024-d vs
768-d text context). The paper profile therefore uses two families: SD-2.1 for the
image and noise visual prompts, SD-1.5 + its seg ControlNet for mask and mix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sasi_online.errors import UserInputError

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sd21")
# family name -> (ModelsConfig field of the base folder, field of its seg ControlNet folder)
FAMILY_FOLDERS = {"sd15": ("sd15", "controlnet_sd15"), "sd21": ("sd21", "controlnet_sd21")}
# the paper profile (generation.family = auto): which family serves which VP kind
PAPER_FAMILY = {"image": "sd21", "noise": "sd21", "direct": "sd21", "mask": "sd15", "mix": "sd15"}
VP_KINDS = tuple(PAPER_FAMILY)


def family_for(kind: str, choice: str) -> str:
    """The family that generates a visual prompt of `kind` under `generation.family = choice`."""
    if kind not in PAPER_FAMILY:
        raise UserInputError(f"unknown visual prompt kind '{kind}'; use one of {', '.join(VP_KINDS)}")
    if choice == "auto":
        return PAPER_FAMILY[kind]
    if choice not in FAMILIES:
        raise UserInputError(f"generation.family='{choice}' is not known; use auto, sd15 or sd21")
    return choice


@dataclass
class Family:
    """The components of one family, loaded from `<models.root>/<folder>` (HF layout)."""

    name: str
    folder: Path
    controlnet_folder: Path
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    device: Any
    dtype: Any
    image_processor: Any = None
    control_image_processor: Any = None
    variant: Optional[str] = None  # weight variant asked for (models.variant)
    lora_file: Optional[Path] = None  # the LoRA fused into the UNet at load (models.lora)
    _controlnet: Optional[Any] = field(default=None, repr=False)
    on_controlnet_load: Optional[Any] = field(default=None, repr=False)  # e.g. set its attention

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def controlnet(self) -> Any:
        """The seg ControlNet, loaded on first use and checked against the UNet."""
        if self._controlnet is None:
            from sasi_online.zoo import check_controlnet_matches, load_controlnet

            # configs only: a mismatched pair is refused before any weights load
            check_controlnet_matches(self.folder, self.controlnet_folder)
            self._controlnet = load_controlnet(self.controlnet_folder, self.device, self.dtype, self.variant)
            if self.on_controlnet_load is not None:
                self.on_controlnet_load(self._controlnet)
        return self._controlnet


def _fuse_lora(models_cfg: Any, name: str, folder: Path, unet: Any, text_encoder: Any, tokenizer: Any,
               vae: Any, scheduler_config: dict) -> Optional[Path]:
    """models.lora, checked against this family's UNet and fused into it before anything else
    (attention fusing, channels_last, compiling) sees the UNet; None without a LoRA."""
    path = models_cfg.lora_path() if hasattr(models_cfg, "lora_path") else None
    if path is None:
        return None
    from sasi_online.zoo.lora import fuse_lora, require_lora_file

    file = require_lora_file(path)
    fuse_lora(file, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
              scheduler_config=scheduler_config, family=name, unet_folder=folder / "unet")
    return file


def load_family(name: str, models_cfg: Any, device: Any, dtype: Any) -> Family:
    """Load the base components of family `name` (sd15 | sd21) from local folders only, in
    `dtype` on `device`; the weight files (variant, format) are chosen by the zoo's loaders
    (an fp16-only download works as it is)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from transformers import AutoTokenizer, CLIPTextModel

    from sasi_online.zoo import require_sd_folder
    from sasi_online.zoo.loaders import sd_component_kwargs

    base_field, cn_field = FAMILY_FOLDERS[name]
    variant = getattr(models_cfg, "variant", None)
    folder = require_sd_folder(models_cfg.path(base_field), variant)
    kw = dict(local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), **kw)
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype, **kw,
                                                 **sd_component_kwargs(folder, "text_encoder", variant))
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype, **kw,
                                                **sd_component_kwargs(folder, "unet", variant))
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype, **kw,
                                        **sd_component_kwargs(folder, "vae", variant))
    scheduler_config = dict(DDIMScheduler.load_config(str(folder / "scheduler"), **kw))
    lora = _fuse_lora(models_cfg, name, folder, unet, text_encoder, tokenizer, vae, scheduler_config)
    fam = Family(
        name=name, folder=folder, controlnet_folder=models_cfg.path(cn_field), tokenizer=tokenizer,
        text_encoder=text_encoder.to(device).eval(), unet=unet.to(device).eval(),
        vae=vae.to(device).eval(), scheduler_config=scheduler_config, device=device, dtype=dtype,
        variant=variant, lora_file=lora,
    )
    # diffusers' own processors, so resizing/normalising matches its pipelines exactly
    fam.image_processor = VaeImageProcessor(vae_scale_factor=fam.vae_scale_factor)
    fam.control_image_processor = VaeImageProcessor(
        vae_scale_factor=fam.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    log.info("loaded family %s from %s (prediction: %s)", name, folder,
             scheduler_config.get("prediction_type", "epsilon"))
    return fam
