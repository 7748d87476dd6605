"""Speed settings of the trainer that depend on its device, chosen explicitly by device.

On CUDA:
- CNN backbones train channels_last (weights and the views fed to them) with cuDNN's
  autotuner on (`torch.backends.cudnn.benchmark`): the views keep their shapes for the
  whole run, so the first step's search pays for itself;
- the torch optimizers (SGD, AdamW) step with their fused kernels: one launch for all
  parameters instead of a loop of per-tensor ops.
On a CPU nothing changes: the defaults are the fast path there.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_convolutional(module: nn.Module) -> bool:
    """A CNN: more than one 2-d convolution (a ViT has a single one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


def memory_format_for(backbone: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for a CNN on CUDA; otherwise each tensor keeps its layout."""
    if torch.device(device).type == "cuda" and is_convolutional(backbone):
        return torch.channels_last
    return torch.preserve_format


def apply_backbone_settings(method: nn.Module, device: torch.device) -> torch.memory_format:
    """Before the engine is built: the method's 4-d weights channels_last and cuDNN's
    autotuner on, for a CNN on CUDA. Returns the memory format the views take."""
    fmt = memory_format_for(getattr(method, "backbone", method), device)
    if fmt == torch.channels_last:
        method.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return fmt


def optimizer_kernels(device: torch.device) -> dict:
    """Keyword arguments of torch.optim.SGD / AdamW for the trainer's device."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}
