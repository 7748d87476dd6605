"""How the generator's loop calls the UNet, and which attention kernel it uses.

The loop never calls the UNet module directly: it calls a backend,
`backend(sample, t, encoder_hidden_states, down_residuals, mid_residual) -> noise_pred`.
`sasi_online.engines` builds them (eager, torch.compile, onnxruntime, TensorRT,
torch-tensorrt) and picks the attention kernel; a backend whose `fuses_controlnet` is
True also runs the ControlNet inside its graph (`backend.controlled(...)`). A
`backend_hook` given to the generator wraps whatever was built (fault injection in tests,
instrumentation).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from sasi_online.errors import UserInputError

log = logging.getLogger(__name__)


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
    controlnet = None
    if name in ("onnxruntime", "tensorrt") and fam.controlnet_folder.is_dir():
        controlnet = fam.controlnet  # traced inside the engine graph
    res = gen_cfg.resolution
    batch = 2 * gen_cfg.batch_size if gen_cfg.guidance > 1.0 else gen_cfg.batch_size
    engine_dir = Path(gen_cfg.engine_dir) / fam.name if gen_cfg.engine_dir else None
    request = BackendRequest(engine_dir=engine_dir, batch=(1, batch, batch), height=(res, res, res),
                             width=(res, res, res), text_len=fam.tokenizer.model_max_length,
                             vae_factor=fam.vae_scale_factor,
                             precision="fp32" if fam.dtype.is_floating_point and fam.dtype.itemsize == 4 else "fp16")
    backend = select_backend(name, fam.unet, controlnet=controlnet, request=request)
    log.info("UNet backend for %s: %s (%s)", fam.name, getattr(backend, "name", name),
             getattr(backend, "reason", ""))
    return backend


def apply_attention(gen_cfg: Any, unet: Any, controlnet: Any = None) -> str:
    """Set the attention kernel (`generation.attention`) and log which one and why."""
    from sasi_online.engines.attention import configure_attention

    choice = configure_attention(unet, controlnet, gen_cfg.attention)
    log.info("%s", choice)
    return str(choice)
