"""Small composable heads: projectors, predictors, SwAV prototypes, the DINO head.

`mlp(dims, ...)` builds every projector/predictor the methods use (like lightly's heads):
hidden layers are Linear → BatchNorm → ReLU; the last layer is Linear, optionally
followed by a BatchNorm (SimSiam, MoCo-v3 and Barlow Twins put one there).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(dims: Sequence[int], *, batch_norm: bool = True, last_norm: str = "none") -> nn.Sequential:
    """dims = [in, hidden..., out]. last_norm: 'none' | 'bn' | 'bn_noaffine'."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least [in, out] dims, got {list(dims)}")
    if last_norm not in ("none", "bn", "bn_noaffine"):
        raise ValueError(f"last_norm must be 'none', 'bn' or 'bn_noaffine', got {last_norm!r}")
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        # A bias before BatchNorm is cancelled by its mean subtraction.
        layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_norm == "none"))
    if last_norm != "none":
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_norm == "bn"))
    return nn.Sequential(*layers)


class Prototypes(nn.Module):
    """SwAV's prototypes: a bias-free linear layer whose rows are kept on the unit sphere."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.layer = nn.Linear(dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        # Frozen (SwAV's first iterations): scores still flow to z, not to the prototypes.
        # The rows are used at unit norm here too: `normalize()` after each step cannot reach
        # an optimizer's master copy (DeepSpeed ZeRO / bf16), this can; at unit norm (the plain
        # path) it changes nothing.
        w = self.layer.weight
        w = w / w.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
        return F.linear(z, w.detach() if frozen else w)


class DINOHead(nn.Module):
    """DINO's head: MLP to a bottleneck, L2-normalise, weight-normalised last layer.

    The last layer's magnitude is fixed to 1 (DINO's norm_last_layer=True); it can be
    frozen for the first steps, which DINO found to stabilise training.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, freeze_last: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.last_layer.weight
        return F.linear(x, w.detach() if freeze_last else w)
