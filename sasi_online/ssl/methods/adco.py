"""AdCo (Hu et al. 2021): negatives are a learnable memory bank trained ADVERSARIALLY:
the encoder descends on the contrastive loss while the bank ascends on it.

As AdCo's code does, the bank is no optimizer parameter: it is an fp32 buffer (with its
velocity) stepped in `on_step_end` by its own momentum-SGD ascent at a CONSTANT learning rate
(extra.mem_lr), weight decay extra.mem_weight_decay and the optimizer's momentum 0.9:
    v ← 0.9·v − ∂L_bank/∂W + wd·W,   W ← W − mem_lr·v
The bank's gradient comes from the same backward as the encoder's (a leaf tensor whose
gradient a hook accumulates over micro-steps), averaged over trainers. The bank starts as
keys: its rows are filled from the gathered keys of the first steps, and it is not moved
adversarially during the first extra.init_epochs epochs (AdCo's `init_memory` epoch).
Keys use shuffle-BN (method.shuffle_bn, on by default as in AdCo's model/AdCo.py).

extra: mem_temperature (0.02), mem_lr (3.0), mem_weight_decay (1e-4), bank_size
(None = method.queue_size), symmetric (False), init_epochs (1), bank_momentum (0.9),
bn_splits (2: shuffle-BN in one process).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasi_online.errors import UserInputError
from sasi_online.ssl import distributed as D
from sasi_online.ssl.heads import mlp
from sasi_online.ssl.losses import adco_loss
from sasi_online.ssl.methods.base import Method, make_target, run_target, shuffled_keys

Tensor = torch.Tensor


class AdCo(Method):
    name = "adco"
    default_temperature = 0.12
    default_momentum = 0.999  # AdCo's ops/argparser.py --moco_m
    default_momentum_final = None  # a fixed momentum, as MoCo-v2
    uses_momentum = uses_temperature = True
    fp32_buffers = ("memory_bank", "bank_velocity")
    extra_defaults = {"mem_temperature": 0.02, "mem_lr": 3.0, "mem_weight_decay": 1e-4,
                      "bank_size": None, "symmetric": False, "init_epochs": 1, "bank_momentum": 0.9,
                      "bn_splits": 2}

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        self.projector = mlp([feat_dim, cfg.proj_hidden, cfg.proj_dim], batch_norm=False)
        self.target_backbone = make_target(backbone)
        self.target_projector = make_target(self.projector)
        size = self.extra["bank_size"] or cfg.queue_size
        if int(size) < 1:
            raise UserInputError(f"method.extra.bank_size (or method.queue_size) must be >= 1, got {size}")
        self.register_buffer("memory_bank", F.normalize(torch.randn(int(size), cfg.proj_dim), dim=1))
        self.register_buffer("bank_velocity", torch.zeros(int(size), cfg.proj_dim))
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))  # rows filled from keys
        self._bank_grad: Tensor | None = None
        self._pending_keys: list[Tensor] = []

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def _key_net(self, x: Tensor) -> Tensor:
        return F.normalize(run_target(self.target_projector, run_target(self.target_backbone, x)), dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        if not self.cfg.shuffle_bn:
            return self._key_net(x)
        return shuffled_keys(self._key_net, x, self.cfg.proj_dim, self.extra["bn_splits"])

    def _bank_leaf(self) -> Tensor:
        """The bank as a leaf whose gradient (of the bank's own loss) is accumulated."""
        leaf = self.memory_bank.detach().requires_grad_(True)
        if self.training and torch.is_grad_enabled():
            if self._bank_grad is None or self._bank_grad.shape != leaf.shape:
                self._bank_grad = torch.zeros_like(self.memory_bank)
            leaf.register_hook(lambda g: self._bank_grad.add_(g.to(self._bank_grad.dtype)))
        return leaf

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self._check_views(views)
        pairs = [(0, 1), (1, 0)] if self.extra["symmetric"] else [(0, 1)]
        bank_leaf = self._bank_leaf()
        enc_losses, bank_losses = [], []
        for qi, ki in pairs:
            q = F.normalize(self.projector(self.backbone(views[qi])), dim=1)
            k = self.keys(views[ki])
            enc_losses.append(adco_loss(q, k, self.memory_bank.detach(), self.temperature))
            bank_losses.append(adco_loss(q.detach(), k, bank_leaf, self.extra["mem_temperature"]))
            if self.training:
                self._pending_keys.append(D.gather(k))
        enc = sum(enc_losses) / len(enc_losses)
        bank = sum(bank_losses) / len(bank_losses)
        loss = enc + (bank - bank.detach())  # value: enc; the bank's gradient reaches bank_leaf only
        return {"loss": loss, "bank_loss": bank.detach(), "q_std": self._std_metric(q)}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        grad, self._bank_grad = self._bank_grad, None
        size = self.memory_bank.shape[0]
        filling = self.host_count("bank_filled") < size
        for keys in self._pending_keys:
            self._fill(keys)
        self._pending_keys.clear()
        if grad is None or filling or step < self.epochs_to_steps(self.extra["init_epochs"]):
            return
        grad = D.all_reduce_sum(grad) / D.world_size()
        e = self.extra
        # ascent on the bank's loss: the velocity follows MINUS its gradient
        self.bank_velocity.mul_(float(e["bank_momentum"])).sub_(grad).add_(
            self.memory_bank, alpha=float(e["mem_weight_decay"]))
        self.memory_bank.sub_(self.bank_velocity, alpha=float(e["mem_lr"]))

    @torch.no_grad()
    def _fill(self, keys: Tensor) -> None:
        start, size = self.host_count("bank_filled"), self.memory_bank.shape[0]
        if start >= size:
            return
        n = min(keys.shape[0], size - start)
        self.memory_bank[start:start + n] = keys[:n].to(self.memory_bank.dtype)
        self.set_count("bank_filled", start + n)
