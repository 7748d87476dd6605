"""The contract every self-supervised method honours, and what they share.

A method owns its backbone, heads and any target (momentum) networks, queues and banks.
The trainer only: calls `forward(views, step, total_steps)` and backpropagates
`out["loss"]`; builds its optimizer from `param_groups()`; calls `on_step_end(step,
total_steps)` after each optimizer step; checkpoints `state_dict()` (queues and banks are
buffers or parameters, so they travel with it) plus `extra_state_for_checkpoint()`.

Parameter groups (dicts for torch optimizers) carry, besides "params":
  "name"          a label for logs;
  "weight_decay"  present only where it must differ from the optimizer's (0.0 on biases
                  and normalisation parameters);
  "lars_exclude"  True where LARS must not adapt the learning rate (biases, norms, banks);
  "lr"            present only on groups with their own base learning rate (AdCo's bank);
                  the trainer applies its schedule multiplier but not the batch scaling;
  "fixed_lr"      True where the learning rate must not follow the schedule (SimSiam's
                  predictor).
"""
from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Optional

import torch
import torch.nn as nn

from sasi_online.config import MethodConfig
from sasi_online.errors import UserInputError
from sasi_online.ssl.monitor import feature_std

Tensor = torch.Tensor


def cosine_momentum(base: float, final: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: `base` at step 0 rising to `final` at the last step along a cosine."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of `online` to be moved by EMA (gradients never reach it)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target ← momentum·target + (1-momentum)·online, parameter by parameter.

    Buffers (BatchNorm running statistics) are not averaged: the target keeps its own,
    as MoCo and BYOL do.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise RuntimeError("momentum pair with different parameter lists")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


class Method(nn.Module):
    name: str = "base"
    num_global_views: int = 2
    multi_crop: bool = False  # accepts local views after the global ones
    # Method-specific knobs read from `method.extra`, with their defaults. Unknown keys
    # are refused, so a typo never silently falls back to a default.
    extra_defaults: dict[str, Any] = {}
    default_temperature: float = 0.2  # used when method.temperature is None
    default_momentum: float = 0.99  # used when method.momentum is None
    # where the EMA momentum ends when method.momentum_final is None; None keeps it constant
    default_momentum_final: Optional[float] = 1.0

    def __init__(self, cfg: MethodConfig, backbone: nn.Module, feat_dim: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.extra = self._resolve_extra(cfg.extra or {})
        self.temperature = cfg.temperature if cfg.temperature is not None else self.default_temperature
        self.base_momentum = cfg.momentum if cfg.momentum is not None else self.default_momentum
        self.last_momentum = self.base_momentum

    # ------------------------------------------------------------------ contract
    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Backbone features (no head) for kNN and linear probes."""
        return self.backbone(x)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def param_groups(self) -> list[dict]:
        """Weights with the optimizer's decay; biases/norms (and ViT tokens) without it."""
        special = self._special_groups()
        taken = {id(p) for g in special for p in g["params"]}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in taken:
                continue
            is_token = name.endswith(("class_token", "pos_embedding"))
            (no_decay if p.ndim <= 1 or is_token else decay).append(p)
        groups = [{"name": "decay", "params": decay, "lars_exclude": False},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
        return [g for g in groups + special if g["params"]]

    def momentum_at(self, step: int, total_steps: int) -> float:
        final = self.cfg.momentum_final if self.cfg.momentum_final is not None else self.default_momentum_final
        return cosine_momentum(self.base_momentum, self.base_momentum if final is None else final, step, total_steps)

    @classmethod
    def validate_global_batch(cls, cfg: MethodConfig, global_batch: int) -> None:
        """Start-up check of the global batch (images per step over all trainers); runs
        before anything is built, so a bad config fails fast."""

    def check_global_batch(self, global_batch: int) -> None:
        self.validate_global_batch(self.cfg, global_batch)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After each optimizer step: EMA of the target networks, queue pushes, ..."""
        pairs = self.momentum_pairs()
        if pairs:
            m = self.momentum_at(step, total_steps)
            for online, target in pairs:
                ema_update(online, target, m)
            self.last_momentum = m

    def extra_state_for_checkpoint(self) -> dict:
        """Small non-tensor state to save beside `state_dict()` (tensors live in it)."""
        return {"method": self.name}

    def load_extra_state_from_checkpoint(self, state: dict) -> None:
        saved = state.get("method")
        if saved is not None and saved != self.name:
            raise UserInputError(
                f"the checkpoint was trained with method '{saved}' but method.name is "
                f"'{self.name}': resume with method.name={saved} or start a new run folder")

    # ------------------------------------------------------------------ helpers
    def _forward_grouped(self, fn, views: list[Tensor]) -> list[Tensor]:
        """Apply `fn` to the views, one call per run of same-sized views (multi-crop):
        BatchNorm sees each resolution as one batch and the call count stays small."""
        outs: list[Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            out = fn(torch.cat(views[start:end]))
            outs.extend(out.chunk(end - start))
            start = end
        return outs

    def _special_groups(self) -> list[dict]:
        """Groups with their own settings (subclasses); their params leave the defaults."""
        return []

    def _resolve_extra(self, given: dict) -> dict:
        unknown = [k for k in given if k not in self.extra_defaults]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), list(self.extra_defaults), n=1)
            hint = f" Did you mean 'method.extra.{close[0]}'?" if close else ""
            valid = ", ".join(self.extra_defaults) or "none"
            raise UserInputError(
                f"unknown key 'method.extra.{key}' for method '{self.name}'.{hint} "
                f"Valid keys: {valid}")
        return {**self.extra_defaults, **given}

    def _check_views(self, views: list[Tensor]) -> None:
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError(f"{self.name} needs a list of at least 2 views, got "
                             f"{type(views).__name__} of {len(views) if hasattr(views, '__len__') else '?'}")
        if not self.multi_crop and len(views) != 2:
            raise ValueError(f"{self.name} takes exactly 2 views, got {len(views)} "
                             f"(multi-crop is for dino and swav)")
        b = views[0].shape[0]
        for i, v in enumerate(views):
            if v.ndim != 4 or v.shape[1] != 3 or v.shape[0] != b:
                raise ValueError(f"view {i} must be [B={b}, 3, H, W], got {list(v.shape)}")

    @staticmethod
    def _std_metric(z: Tensor) -> Tensor:
        """Mean per-dimension std of normalised embeddings (collapse → 0)."""
        return feature_std(z).mean()
