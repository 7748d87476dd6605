"""DeepCache (Ma et al., 2024): reuse the UNet's deep features across denoising steps.

Adjacent steps change the deep (low-resolution) features of a UNet little. Every
`interval` steps the full UNet runs and the hidden state entering the outermost
`depth` up block(s) is cached; on the steps between, only the shallow path runs —
conv_in, the first `depth` down blocks, then those up blocks on the cached deep feature
and the new skip connections — and the rest of the network is skipped.

The wrapper has the generator's UNet-hook signature. A new denoising run is detected
when the timestep goes up (timesteps fall within a run) or the shapes change; call
`reset()` to be explicit. ControlNet residuals feed the shallow skips they belong to;
the mid residual only enters on full steps (it lives in the skipped part).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sasi_online.errors import UserInputError


class DeepCacheUNet:
    name = "deepcache"
    fuses_controlnet = False

    def __init__(self, unet: nn.Module, interval: int, depth: int = 1):
        if interval < 1:
            raise UserInputError(f"DeepCache interval must be >= 1 (1 = off), got {interval}")
        n_levels = len(unet.down_blocks)
        if not 1 <= depth < n_levels:
            raise UserInputError(f"DeepCache depth must be between 1 and {n_levels - 1} for this UNet, got {depth}")
        cfg = unet.config
        unsupported = [k for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type")
                       if cfg.get(k) is not None]
        if unsupported or cfg.get("center_input_sample"):
            raise UserInputError(f"DeepCache supports SD-1.x/2.x-style UNets; this one sets {unsupported or ['center_input_sample']}")
        self.unet = unet
        self.interval = interval
        self.depth = depth
        self.reason = f"DeepCache: full UNet every {interval} steps, shallow depth {depth} in between"
        self.full_steps = 0
        self.shallow_steps = 0
        self._captured: torch.Tensor | None = None
        self._hook = unet.up_blocks[-depth].register_forward_pre_hook(self._capture, with_kwargs=True)
        self._capturing = False
        self.reset()

    # -- state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache: the next call runs the full UNet."""
        self._cache: torch.Tensor | None = None
        self._since_full = 0
        self._last_t: float | None = None
        self._shape: tuple | None = None

    def remove(self) -> None:
        """Detach from the UNet (removes the capture hook)."""
        self._hook.remove()

    def _capture(self, module, args, kwargs):
        if self._capturing:
            self._captured = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    # -- call ------------------------------------------------------------------------
    def __call__(self, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                 down_residuals: Sequence[torch.Tensor] | None = None,
                 mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        t_now = float(torch.as_tensor(t).reshape(-1)[0])
        shape = (tuple(sample.shape), tuple(encoder_hidden_states.shape))
        if self._last_t is not None and (t_now > self._last_t or shape != self._shape):
            self.reset()  # a new denoising run
        self._last_t, self._shape = t_now, shape
        if self._cache is None or self._since_full >= self.interval - 1:
            return self._full(sample, t, encoder_hidden_states, down_residuals, mid_residual)
        self._since_full += 1
        self.shallow_steps += 1
        return self._shallow(sample, t, encoder_hidden_states, down_residuals)

    def _full(self, sample, t, ehs, down_residuals, mid_residual):
        self._capturing = True
        try:
            out = self.unet(sample, t, ehs, down_block_additional_residuals=down_residuals,
                            mid_block_additional_residual=mid_residual, return_dict=False)[0]
        finally:
            self._capturing = False
        self._cache, self._captured = self._captured, None
        self._since_full = 0
        self.full_steps += 1
        return out

    def _shallow(self, sample, t, ehs, down_residuals):
        # Same steps as UNet2DConditionModel.forward, for the outer `depth` levels only.
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=t)
        emb = unet.time_embedding(t_emb, None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        skips: tuple = (hidden,)
        for block in unet.down_blocks[: self.depth]:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=ehs)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            skips += res
        # The last downsampler's output feeds the deeper, skipped up block: drop it.
        skips = skips[:-1]
        if down_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_residuals))
        hidden = self._cache
        for block in unet.up_blocks[-self.depth:]:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=ehs)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)
