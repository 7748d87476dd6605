"""Checks of the `online` config section, run on every rank before any work."""
from __future__ import annotations

from typing import Any

from sasi_online.errors import UserInputError


MODES = ("launched", "colocated")


def online_enabled(cfg: Any) -> bool:
    """SASI are made during training: producer ranks (launched) or inside each trainer (colocated)."""
    return cfg.online.mode == "colocated" or cfg.online.producers > 0


def check_online_config(cfg: Any) -> None:
    o = cfg.online
    if o.mode not in MODES:
        raise UserInputError(f"online.mode must be one of {', '.join(MODES)}, got '{o.mode}'")
    if o.mode == "colocated" and o.producers != 0:
        raise UserInputError(f"online.mode=colocated generates inside each trainer and has no producer ranks; "
                             f"set online.producers=0 (got {o.producers}), or use online.mode=launched")
    if o.producers_per_node < 0 or (o.producers_per_node > 0 and o.mode != "launched"):
        raise UserInputError(f"online.producers_per_node places producer ranks (online.mode=launched) and must "
                             f"be >= 0; set online.producers_per_node=0 (got {o.producers_per_node}, "
                             f"online.mode={o.mode})")
    if o.colocated_every < 1:
        raise UserInputError(f"online.colocated_every must be >= 1, got {o.colocated_every}")
    if not online_enabled(cfg):
        return
    for name in ("ring_slots", "max_reuse", "max_age", "send_batch", "credits"):
        if getattr(o, name) < 1:
            raise UserInputError(f"online.{name} must be >= 1, got {getattr(o, name)}")
    if o.lookahead < 0 or o.start_sasi < 0:
        raise UserInputError("online.lookahead and online.start_sasi must be >= 0")
    if o.lookahead > 0 and o.max_age <= o.lookahead:
        raise UserInputError(
            f"online.max_age={o.max_age} must exceed online.lookahead={o.lookahead}: a SASI made for a step "
            f"that far ahead would expire before its step. Raise online.max_age or lower online.lookahead")
    per_trainer = o.lookahead * cfg.train.batch_size if o.lookahead else o.ring_slots  # micro-steps
    if o.start_sasi > min(per_trainer, o.ring_slots):
        raise UserInputError(
            f"online.start_sasi={o.start_sasi} can never be reached: producers plan at most "
            f"{min(per_trainer, o.ring_slots)} SASI per trainer before the first step (online.lookahead x "
            f"train.batch_size, capped by online.ring_slots). Lower online.start_sasi")
    if o.mode == "launched" and o.producers > 1 and cfg.store.write_online:
        raise UserInputError("store.write_online supports one producer (one writer per store manifest); "
                             "set online.producers=1 or store.write_online=false")
