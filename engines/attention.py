"""Attention kernels for the UNet and ControlNet: xformers where it is installed AND the
models are on a CUDA device, torch's scaled_dot_product_attention (diffusers'
AttnProcessor2_0) otherwise. The choice comes back with the reason, for the log line.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sasi_online.engines.availability import BackendUnavailable, xformers_status

PREFERENCES = ("auto", "sdpa", "xformers")


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # "sdpa" | "xformers"
    reason: str

    def __str__(self) -> str:
        return f"attention: {self.name} ({self.reason})"


def configure_attention(unet: nn.Module, controlnet: nn.Module | None = None,
                        preference: str = "auto", fuse_qkv: bool = False) -> AttentionChoice:
    """Set the attention processor of `unet` (and `controlnet`) and say what and why.

    preference: "auto" (xformers if possible, else SDPA), "sdpa", or "xformers" (an
    explicit request that cannot be met raises BackendUnavailable with the reason).
    fuse_qkv: fuse the q/k/v (cross-attention: k/v) projections into one matmul and run
    diffusers' FusedAttnProcessor2_0 (SDPA). xformers processors are never put on fused
    layers: with "auto" fusing picks SDPA; an explicit "xformers" request wins and skips fusing.
    """
    if preference not in PREFERENCES:
        raise BackendUnavailable(f"attention preference '{preference}' is unknown; choose one of "
                                 f"{', '.join(PREFERENCES)} (config key generation.attention)")
    models = [m for m in (unet, controlnet) if m is not None]
    device_type = _device_type(unet)
    xf = xformers_status(device_type)
    if preference == "xformers" and not xf.available:
        raise BackendUnavailable(f"attention 'xformers' was requested but {xf.reason}; "
                                 f"set generation.attention=sdpa or auto")
    if preference == "xformers" or (preference == "auto" and xf.available and not fuse_qkv):
        for m in models:
            m.enable_xformers_memory_efficient_attention()
        note = "; QKV projections not fused (xformers requested)" if fuse_qkv else ""
        return AttentionChoice("xformers", xf.reason + note)
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in models:
        m.set_attn_processor(AttnProcessor2_0())
        if fuse_qkv:
            m.fuse_qkv_projections()  # sets FusedAttnProcessor2_0 (SDPA on the fused projections)
    if preference == "sdpa":
        why = "requested"
    elif fuse_qkv:
        why = "fused QKV projections run on SDPA (xformers processors are not used on fused layers)"
    else:
        why = f"xformers not used: {xf.reason}"
    return AttentionChoice("sdpa", why + ("; QKV projections fused" if fuse_qkv else "")
                           + "; torch scaled_dot_product_attention picks its own fused kernel per device")


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"
