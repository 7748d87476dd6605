"""Optimizers from the method's parameter groups: SGD, LARS, AdamW.

The base learning rate is given per 256 images and scaled by the global batch (Goyal et
al.); groups that carry their own "lr" keep it unscaled (see ssl/methods/base.py).

Per-layer rules under DeepSpeed. ZeRO-1/2 and the bf16 optimizer flatten each parameter
group into one tensor and give each trainer a slice of it, so an optimizer that measures
"a layer" by the tensor it is handed would see partitions. Where a rule is per layer (LARS
trust ratios, DINO's per-parameter gradient clip), every parameter therefore gets its own
group (`split_layers`): a flat tensor is then one layer, or one trainer's slice of it, and
`set_partitioned(group)` (called after `deepspeed.initialize` when the engine partitions)
makes the norms global with one all-reduce of all squared norms per step.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from sasi_online.errors import UserInputError

OPTIMIZERS = ("sgd", "lars", "adamw")


class _LayerNorms:
    """Norms of whole layers from the (possibly partitioned) tensors of one-layer groups."""

    norm_group: Any = None
    partitioned: bool = False

    def set_partitioned(self, group: Any) -> None:
        """Each tensor is this trainer's slice of a layer: sum squared norms over `group`."""
        self.partitioned, self.norm_group = True, group

    def _global_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """[len(tensors)] float32 L2 norms, summed over the trainers' slices when partitioned."""
        if not tensors:
            return torch.zeros(0)
        sq = torch.stack(torch._foreach_norm([t.detach() for t in tensors])).float().pow(2)
        if self.partitioned and dist.is_available() and dist.is_initialized():
            if dist.get_world_size(self.norm_group) > 1:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.norm_group)
        return sq.sqrt()

    @torch.no_grad()
    def _clip_layers(self) -> None:
        """DINO's rule: each layer's gradient norm at most `clip_grad` (dino utils.py L132)."""
        clip = float(self.defaults.get("clip_grad", 0.0) or 0.0)
        if clip <= 0:
            return
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = self._global_norms([p.grad for p in params])
        for p, n in zip(params, norms.to(params[0].device) if params else []):
            p.grad.mul_(torch.clamp(clip / (n + 1e-6), max=1.0).to(p.grad.dtype))


class LARS(_LayerNorms, torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    The update of each layer is scaled by trust = eta·||w|| / (||g|| + wd·||w||) (`trust="sum"`:
    You et al., LARC, SwAV, solo-learn) or eta·||w|| / ||g + wd·w|| (`trust="update"`: SimCLR,
    BYOL, MoCo-v3, Barlow Twins, VICReg), with the norms of whole layers, also under ZeRO (see
    the module docstring); `clip` is LARC's clipping
    (the layer's rate min(trust, lr), apex LARC / solo-learn clip_lr). Groups with
    `lars_exclude=True` (biases, norms, where the recipe says so) skip the adaptation and,
    when their weight_decay is 0, the decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, clip: bool = False, eps: float = 1e-8, clip_grad: float = 0.0,
                 trust: str = "sum"):
        if lr <= 0:
            raise ValueError(f"LARS lr must be positive, got {lr}")
        if trust not in ("sum", "update"):
            raise UserInputError(f"optim.lars_trust must be 'sum' or 'update', got {trust!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        lars_exclude=False, clip=clip, clip_grad=clip_grad, trust=trust)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._clip_layers()
        live = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        adapt = [(g, p) for g, p in live if not g["lars_exclude"]]
        grads = [p.grad.add(p, alpha=g["weight_decay"]) if g["trust"] == "update" else p.grad for g, p in adapt]
        norms = self._global_norms([p for _, p in adapt] + grads)
        w_norms, g_norms = norms[:len(adapt)], norms[len(adapt):]
        trust_of = {}
        for i, (group, p) in enumerate(adapt):
            w_n, g_n, wd = w_norms[i], g_norms[i], group["weight_decay"]
            denom = g_n if group["trust"] == "update" else g_n + wd * w_n
            trust = torch.where((w_n > 0) & (g_n > 0), group["eta"] * w_n / (denom + group["eps"]),
                                torch.ones_like(w_n))
            if group["clip"]:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            trust_of[id(p)] = trust
        for group, p in live:
            g = p.grad
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            if id(p) in trust_of:
                g = g.mul(trust_of[id(p)].to(device=g.device, dtype=g.dtype))
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(g)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


class _ClippedStep(_LayerNorms):
    """A torch optimizer (the next base class) with an optional per-layer gradient clip."""

    def __init__(self, params, lr: float, clip_grad: float = 0.0, **kw):
        super().__init__(params, lr=lr, **kw)
        self.defaults["clip_grad"] = clip_grad

    @torch.no_grad()
    def step(self, closure=None):
        self._clip_layers()
        return super().step(closure)


class SGD(_ClippedStep, torch.optim.SGD):
    """torch SGD with an optional per-layer gradient clip (`clip_grad`)."""


class AdamW(_ClippedStep, torch.optim.AdamW):
    """torch AdamW with an optional per-layer gradient clip (`clip_grad`)."""


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return base_lr * global_batch / 256.0


def split_layers(groups: list[dict]) -> list[dict]:
    """One group per parameter, each keeping its group's settings (see the module docstring)."""
    out = []
    for g in groups:
        for i, p in enumerate(g["params"]):
            out.append({**g, "params": [p], "name": f"{g.get('name', 'group')}.{i}"})
    return out


def _merge_decay(param_groups: list[dict], exclude_bias_norm: bool) -> list[dict]:
    """Where the recipe decays everything, biases and norms join the decayed group."""
    if exclude_bias_norm:
        return param_groups
    merged: dict = {"name": "all", "kind": "decay", "params": [], "lars_exclude": False}
    rest = []
    for g in param_groups:
        if g.get("kind") in ("decay", "no_decay"):
            merged["params"] += list(g["params"])
        else:
            rest.append(g)
    return ([merged] if merged["params"] else []) + rest


def build_optimizer(cfg_optim, param_groups: list[dict], global_batch: int,
                    device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """A torch optimizer (DeepSpeed gets it passed in: no FusedAdam build). `cfg_optim`
    fields must be resolved (`apply_recipe`); None ones fall back to plain values.
    `device`: the trainer's; on CUDA SGD and AdamW use their fused kernels (speed.py)."""
    from sasi_online.training.speed import optimizer_kernels

    kernels = optimizer_kernels(device) if device is not None else {}
    name = cfg_optim.name or "sgd"
    if name not in OPTIMIZERS:
        raise UserInputError(f"optim.name '{name}' is not one of {', '.join(OPTIMIZERS)}")
    base = cfg_optim.lr if cfg_optim.lr is not None else 0.03
    if base <= 0:
        raise UserInputError(f"optim.lr must be positive, got {base}")
    wd = cfg_optim.weight_decay if cfg_optim.weight_decay is not None else 0.0
    clip_grad = float(cfg_optim.clip_grad or 0.0)
    lr = scaled_lr(base, global_batch)
    exclude = True if cfg_optim.exclude_bias_norm is None else bool(cfg_optim.exclude_bias_norm)
    groups = []
    for g in _merge_decay(param_groups, exclude):
        g = dict(g)
        if not g["params"]:
            continue
        g["base_lr"] = g.get("lr", lr * float(g.get("lr_scale", 1.0)))  # the schedule multiplies this
        g["lr"] = g["base_lr"]
        g.setdefault("weight_decay", wd)
        g["base_weight_decay"] = g["weight_decay"]
        g.setdefault("fixed_lr", False)
        if name != "lars":
            g.pop("lars_exclude", None)
        groups.append(g)
    if name == "lars" or clip_grad > 0:
        groups = split_layers(groups)
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=cfg_optim.momentum, weight_decay=wd, clip_grad=clip_grad, **kernels)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=cfg_optim.momentum, weight_decay=wd,
                    eta=float(cfg_optim.lars_eta if cfg_optim.lars_eta is not None else 0.001),
                    clip=bool(cfg_optim.lars_clip), clip_grad=clip_grad,
                    trust=getattr(cfg_optim, "lars_trust", None) or "sum")
    return AdamW(groups, lr=lr, weight_decay=wd, clip_grad=clip_grad, **kernels)


def configure_partitioning(optimizer: Any, engine: Any, group: Optional[Any]) -> bool:
    """After `deepspeed.initialize`: when the engine hands the optimizer slices of layers
    (ZeRO stage >= 1: ZeRO and the bf16 optimizer both partition), make its per-layer norms
    global over the trainers' `group`. Returns True when it did."""
    if not isinstance(optimizer, _LayerNorms):
        return False
    stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
    if stage >= 1:
        optimizer.set_partitioned(group)
        return True
    return False
