"""Turn the generator's UNet-hook arguments into the named inputs of an exported graph.

Shared by every engine backend (onnxruntime, TensorRT), so they accept exactly the same
calls as the eager UNet.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sasi_online.engines.graphs import GraphSpec
from sasi_online.errors import UserInputError


def timestep_batch(t, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """A scalar or per-sample timestep as the (batch,) float tensor the graphs take."""
    tt = torch.as_tensor(t, device=device).detach().reshape(-1).to(dtype)
    if tt.numel() == 1:
        return tt.expand(batch).contiguous()
    if tt.numel() != batch:
        raise UserInputError(f"timestep has {tt.numel()} values for a batch of {batch}")
    return tt.contiguous()


def unet_feeds(spec: GraphSpec, where: str, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
               down_residuals: Sequence[torch.Tensor] | None,
               mid_residual: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Inputs of a `unet` graph. Without residuals a graph that takes them gets zeros,
    which leave the UNet's result unchanged."""
    batch = sample.shape[0]
    feeds = {"sample": sample, "timestep": timestep_batch(t, batch, sample.dtype, sample.device),
             "encoder_hidden_states": encoder_hidden_states.to(sample.dtype)}
    has_residuals = down_residuals is not None or mid_residual is not None
    if has_residuals and not spec.with_residuals:
        raise UserInputError(f"the UNet graph in '{where}' was exported without ControlNet residual "
                             f"inputs; export it with with_residuals=True (or use the fused "
                             f"unet_controlnet graph)")
    if not spec.with_residuals:
        return feeds
    if has_residuals:
        if down_residuals is None or mid_residual is None or len(down_residuals) != len(spec.residuals):
            got = "none" if down_residuals is None else len(down_residuals)
            raise UserInputError(f"the UNet graph in '{where}' takes {len(spec.residuals)} down residuals "
                                 f"and one mid residual; got {got} down and "
                                 f"{'no' if mid_residual is None else 'one'} mid")
        feeds.update({f"down_residual_{i}": r.to(sample.dtype) for i, r in enumerate(down_residuals)})
        feeds["mid_residual"] = mid_residual.to(sample.dtype)
        return feeds
    h, w = sample.shape[-2:]
    f = spec.vae_scale_factor
    for name, shape in spec.input_shapes(batch, h * f, w * f).items():
        if name.startswith("down_residual_") or name == "mid_residual":
            feeds[name] = sample.new_zeros(shape)
    return feeds


_SCALES: dict[tuple, torch.Tensor] = {}


def scale_tensor(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (1,) conditioning-scale input, made once per (value, dtype, device): building it
    from a Python float every step would be a host-to-device copy inside the loop."""
    key = (float(value), dtype, str(device))
    if key not in _SCALES:
        _SCALES[key] = torch.full((1,), float(value), dtype=dtype, device=device)
    return _SCALES[key]


def controlled_feeds(sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                     control_image: torch.Tensor, conditioning_scale: float) -> dict[str, torch.Tensor]:
    """Inputs of the fused `unet_controlnet` graph."""
    return {"sample": sample, "timestep": timestep_batch(t, sample.shape[0], sample.dtype, sample.device),
            "encoder_hidden_states": encoder_hidden_states.to(sample.dtype),
            "control_image": control_image.to(device=sample.device, dtype=sample.dtype),
            "conditioning_scale": scale_tensor(conditioning_scale, sample.dtype, sample.device)}
