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
  "lr"            present only on groups with their own base learning rate; the trainer
                  applies its schedule multiplier but not the batch scaling;
  "fixed_lr"      True where the learning rate must not follow the schedule (SimSiam's
                  predictor);
  "lr_scale"      a factor on the batch-scaled rate (Barlow Twins' biases);
  "kind"          "decay" or "no_decay" for the default groups: with optim.exclude_bias_norm
                  false (MoCo-v2, SimSiam, SwAV, AdCo) the optimizer merges them.

Precision: target networks, queues, banks and centres keep fp32 state under bf16.
DeepSpeed casts every parameter (and, with `buffer_dtype`, every buffer) of the module it
wraps; `keep_fp32_state()`, called right after `deepspeed.initialize`, casts the modules of
`fp32_modules()` and the buffers named in `fp32_buffers` back. Targets then run their
forward under autocast (`run_target`), and EMA updates accumulate in fp32 (the online
weights, bf16 copies of the optimizer's fp32 masters, are widened first).

Epoch-valued knobs (`*_epochs` extras) become steps with `steps_per_epoch`, which the
trainer sets (training images // images per optimizer step); 1 until it does.
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


def run_target(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` for an fp32 target fed low-precision views: the weights stay fp32, the
    arithmetic runs in the views' dtype under autocast; the output comes back in it."""
    p = next(module.parameters(), None)
    if p is None or p.dtype == x.dtype or not x.is_floating_point():
        return module(x)
    with torch.autocast(device_type=x.device.type, dtype=x.dtype):
        return module(x).to(x.dtype)


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target ← momentum·target + (1-momentum)·online, parameter by parameter.

    Buffers (BatchNorm running statistics) are not averaged: the target keeps its own,
    as MoCo and BYOL do.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach().to(t.dtype) for p, t in zip(online.parameters(), t_params)]
    if len(t_params) != len(list(online.parameters())):
        raise RuntimeError("momentum pair with different parameter lists")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


@torch.no_grad()
def shuffled_keys(key_net, x: Tensor, out_dim: int, splits: int) -> Tensor:
    """Key embeddings with shuffle-BN (MoCo, AdCo): across trainers the key batch is
    shuffled before the key encoder and unshuffled after, so BatchNorm statistics never
    come from the queries' own images; in one process the shuffled batch is split into
    `splits` sub-batches with their own statistics (MoCo's SplitBatchNorm idea)."""
    from sasi_online.ssl import distributed as D

    if D.world_size() > 1:
        shuffled, undo = D.shuffle_batch(x)
        return D.unshuffle_batch(key_net(shuffled), undo)
    perm = torch.randperm(x.shape[0], device=x.device)
    k = torch.empty(x.shape[0], out_dim, device=x.device, dtype=x.dtype)
    for idx in perm.chunk(max(1, int(splits))):
        k[idx] = key_net(x[idx]).to(k.dtype)
    return k


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
    uses_momentum: bool = False  # has EMA target networks (README table)
    uses_temperature: bool = False  # reads method.temperature (README table)
    fp32_buffers: tuple[str, ...] = ()  # buffers that keep fp32 state under bf16 (queues, centres)

    def __init__(self, cfg: MethodConfig, backbone: nn.Module, feat_dim: int):
        super().__init__()
        from sasi_online.ssl.recipes import fill_method_config

        self.cfg = fill_method_config(cfg)  # None fields: the published recipe
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.extra = self._resolve_extra(cfg.extra or {})
        self.temperature = cfg.temperature if cfg.temperature is not None else self.default_temperature
        self.base_momentum = cfg.momentum if cfg.momentum is not None else self.default_momentum
        self.last_momentum = self.base_momentum
        self.steps_per_epoch = 1  # the trainer sets it (see the module docstring)
        # host mirrors of counter buffers (queue pointers): read once, never synced per step
        self._host_counts: dict[str, int] = {}
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self._host_counts.clear())

    # ------------------------------------------------------------------ contract
    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Backbone features (no head) for kNN and linear probes."""
        return self.backbone(x)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def param_groups(self) -> list[dict]:
        """Weights with the optimizer's decay; biases/norms (and ViT tokens) without it
        (the optimizer merges the two where the recipe decays everything)."""
        special = self._special_groups()
        taken = {id(p) for g in special for p in g["params"]}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in taken:
                continue
            is_token = name.endswith(("class_token", "pos_embedding"))
            (no_decay if p.ndim <= 1 or is_token else decay).append(p)
        groups = [{"name": "decay", "kind": "decay", "params": decay, "lars_exclude": False},
                  {"name": "no_decay", "kind": "no_decay", "params": no_decay, "weight_decay": 0.0,
                   "lars_exclude": True}]
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

    def host_count(self, name: str) -> int:
        """The value of counter buffer `name`, read from the device once (after a build or
        a resume) and mirrored on the host afterwards: no per-step sync."""
        if name not in self._host_counts:
            self._host_counts[name] = int(getattr(self, name))
        return self._host_counts[name]

    @torch.no_grad()
    def set_count(self, name: str, value: int) -> None:
        self._host_counts[name] = int(value)
        getattr(self, name).fill_(int(value))

    def epochs_to_steps(self, epochs: float) -> int:
        """An epoch-valued knob in optimizer steps of this run."""
        return int(round(float(epochs) * max(int(self.steps_per_epoch), 1)))

    def fp32_modules(self) -> list[nn.Module]:
        """Modules whose state stays fp32 under bf16: the EMA targets."""
        return [target for _, target in self.momentum_pairs()]

    @torch.no_grad()
    def keep_fp32_state(self) -> None:
        """Cast targets and fp32 buffers back to float32 (after DeepSpeed's bf16 cast)."""
        for m in self.fp32_modules():
            m.float()
        for name in self.fp32_buffers:
            buf = getattr(self, name)
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())

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
