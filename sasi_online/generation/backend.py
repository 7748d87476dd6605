"""How the generator's loop calls its models: the UNet backend, the decoder, the attention
kernel and the memory layout.

The loop never calls the UNet module directly: it calls a backend,
`backend(sample, t, encoder_hidden_states, down_residuals, mid_residual) -> noise_pred`.
`sasi_online.engines` builds them (eager, torch.compile, onnxruntime, TensorRT,
torch-tensorrt) and picks the attention kernel. A backend whose `fuses_controlnet` is True
also runs ControlNet + UNet as one compiled graph or engine (`backend.controlled(...)`);
its ControlNet is loaded at the first mask/mix batch, so a family the profile never gives
such prompts (SD-2.1 in the paper profile) never loads one. A `backend_hook` given to the
generator wraps whatever was built (fault injection in tests, instrumentation).

The decoder (`build_decoder`) turns final latents into images: the family's VAE, or the
tiny autoencoder (TAESD, diffusers' AutoencoderTiny, `generation.decoder=tiny`), compiled
too when `generation.backend=compile`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from sasi_online.errors import UserInputError

log = logging.getLogger(__name__)

COMPILING = ("compile", "tensorrt", "torch_tensorrt")  # backends that specialise on shapes
DECODERS = ("vae", "tiny")
_SWITCH = ("auto", "on", "off")


def _switch(gen_cfg: Any, key: str, auto: bool) -> bool:
    value = str(getattr(gen_cfg, key, "auto")).lower()
    if value not in _SWITCH:
        raise UserInputError(f"generation.{key}='{value}' is not known; use auto, on or off")
    return auto if value == "auto" else value == "on"


def pads_batches(gen_cfg: Any) -> bool:
    """Whether partial batches are padded to `batch_size` (`generation.pad_batches`): by default
    for backends that compile per shape, so one graph / engine profile serves the whole run."""
    return _switch(gen_cfg, "pad_batches", gen_cfg.backend in COMPILING)


def uses_channels_last(gen_cfg: Any, device: torch.device) -> bool:
    return _switch(gen_cfg, "channels_last", device.type == "cuda")


def prepare_module(gen_cfg: Any, module: Any, device: torch.device) -> Any:
    """channels_last (`generation.channels_last`) for a convolutional model, in place."""
    if module is not None and uses_channels_last(gen_cfg, device):
        module.to(memory_format=torch.channels_last)
    return module


def _compile_mode(gen_cfg: Any, device_type: str) -> str:
    from sasi_online.engines.backends import compile_mode_for

    return compile_mode_for(device_type, getattr(gen_cfg, "compile_mode", "auto"))[0]


def weights_identity(fam: Any) -> str:
    """The identity of the UNet weights a family runs (its folder, plus a fused LoRA): exports
    and engines are cached under it, one per fused weight set, so switching a LoRA on or off
    finds its own engine instead of replacing the other's."""
    from sasi_online.zoo import model_hash

    return model_hash(fam.folder, getattr(fam, "variant", None), getattr(fam, "lora_file", None))


def build_backend(gen_cfg: Any, fam: Any) -> Callable:
    """The UNet backend for family `fam`, as `generation.backend` asks."""
    from sasi_online.engines.backends import BackendRequest, select_backend

    name = gen_cfg.backend
    if gen_cfg.deep_cache_interval > 1:
        if name != "eager":
            raise UserInputError(f"generation.deep_cache_interval={gen_cfg.deep_cache_interval} works with "
                                 f"generation.backend=eager only (got {name}); set one of them back")
        from sasi_online.engines.deepcache import DeepCacheUNet

        backend = DeepCacheUNet(fam.unet, gen_cfg.deep_cache_interval)
        log.info("UNet backend for %s: %s", fam.name, backend.reason)
        return backend
    loader = (lambda: fam.controlnet) if Path(fam.controlnet_folder).is_dir() else None
    res = gen_cfg.resolution
    batch = 2 * gen_cfg.batch_size if gen_cfg.guidance > 1.0 else gen_cfg.batch_size
    # padded batches: one static profile per (batch, resolution), so TensorRT captures CUDA graphs
    low = batch if pads_batches(gen_cfg) else 1
    engine_dir = Path(gen_cfg.engine_dir) / fam.name / weights_identity(fam) if gen_cfg.engine_dir else None
    request = BackendRequest(engine_dir=engine_dir, batch=(low, batch, batch), height=(res, res, res),
                             width=(res, res, res), text_len=fam.tokenizer.model_max_length,
                             vae_factor=fam.vae_scale_factor)
    backend = select_backend(name, fam.unet, controlnet_loader=loader, request=request,
                             compile_mode=_compile_mode(gen_cfg, fam.device.type))
    log.info("UNet backend for %s: %s (%s)", fam.name, getattr(backend, "name", name),
             getattr(backend, "reason", ""))
    return backend


def apply_attention(gen_cfg: Any, unet: Any, controlnet: Any = None) -> str:
    """Set the attention kernel (`generation.attention`, `generation.fuse_qkv`) and log it."""
    from sasi_online.engines.attention import configure_attention

    choice = configure_attention(unet, controlnet, gen_cfg.attention,
                                 fuse_qkv=bool(getattr(gen_cfg, "fuse_qkv", False)))
    log.info("%s", choice)
    return str(choice)


class Decoder:
    """Final latents → images in [-1, 1]: `module.decode(latents / scaling_factor)`, compiled
    when the backend compiles (diffusers' inductor settings, CUDA graphs on a GPU)."""

    def __init__(self, module: Any, name: str, compile_mode: str | None = None):
        self.module, self.name = module, name
        self.scaling = float(module.config.scaling_factor)
        self.cuda_graphs = False
        self._fn = self._decode
        if compile_mode is not None:
            from sasi_online.engines.backends import inductor_options

            options = inductor_options(compile_mode)
            self.cuda_graphs = bool(options.get("triton.cudagraphs")) and module.device.type == "cuda"
            self._fn = torch.compile(self._decode, dynamic=False, options=options)
            self.name += f" (compiled, {compile_mode})"

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents / self.scaling, return_dict=False)[0]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._fn(latents).clone()
        return self._fn(latents)


def load_tiny_decoder(models_cfg: Any, fam: Any) -> Any:
    """diffusers' AutoencoderTiny (TAESD) from `models.root/models.taesd`, local files only."""
    from diffusers import AutoencoderTiny

    from sasi_online.zoo import require_model_folder

    folder = require_model_folder(models_cfg.path("taesd"), what="tiny autoencoder (TAESD, models.taesd)")
    tiny = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=fam.dtype, local_files_only=True)
    if tiny.config.latent_channels != fam.vae.config.latent_channels:
        raise UserInputError(f"the tiny autoencoder in '{folder}' has {tiny.config.latent_channels} latent channels, "
                             f"the {fam.name} VAE {fam.vae.config.latent_channels}: use a TAESD trained for "
                             f"this family's latents (or generation.decoder=vae)")
    return tiny.to(fam.device).eval()


COMPILE_DECODER_ENV = "SASI_COMPILE_DECODER"  # 0: keep the decoder eager under backend=compile


def build_decoder(gen_cfg: Any, models_cfg: Any, fam: Any) -> Decoder:
    """The decoder `generation.decoder` names, compiled under `generation.backend=compile`
    (unless SASI_COMPILE_DECODER=0: one compile fewer, as the GPU check runs it)."""
    choice = getattr(gen_cfg, "decoder", "vae")
    if choice not in DECODERS:
        raise UserInputError(f"generation.decoder='{choice}' is not known; use one of {', '.join(DECODERS)}")
    module = fam.vae if choice == "vae" else load_tiny_decoder(models_cfg, fam)
    prepare_module(gen_cfg, module, fam.device)
    compile_decoder = os.environ.get(COMPILE_DECODER_ENV, "1").strip().lower() not in ("0", "off", "false", "no")
    mode = _compile_mode(gen_cfg, fam.device.type) if gen_cfg.backend == "compile" and compile_decoder else None
    decoder = Decoder(module, "VAE" if choice == "vae" else "tiny autoencoder (TAESD)", mode)
    log.info("decoder for %s: %s", fam.name, decoder.name)
    return decoder
