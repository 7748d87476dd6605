"""Is an online run getting SASI? A run that asked for them and gets none stops, loudly.

Checked by every trainer on log steps (one small reduce on the control group, so all
trainers decide alike) and once more at the last step. Three signs, each voted per trainer:

- `stopped`    the producers this trainer depends on have all stopped with an error (launched:
               STOP from every producer before the end; co-located: its own producer);
- `timed_out`  no SASI reached this trainer within `online.first_sasi_timeout_s` after the
               producers reported their models loaded (loading includes compiles and engine
               builds, so a slow one is no failure);
- `none`       the run's last step came and this launch received no SASI at all.

Any vote stops the run: the loop writes a checkpoint (nothing is lost), the first trainer
publishes the reason for the producers (protocol.py `failure`), every rank ends the job's
protocol and exits non-zero with the producers' errors in the message.
`online.allow_fallback_only=true` (drills) logs the same reason once and goes on.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Optional

from .groups import control_reduce


class SupplyWatch:
    """Per trainer: when the producers' models were first seen loaded, SASI this launch."""

    def __init__(self, online_cfg: Any):
        self.timeout_s = float(online_cfg.first_sasi_timeout_s)
        self.allow = bool(online_cfg.allow_fallback_only)
        self.received_at_start = 0
        self.loaded_since: Optional[float] = None
        self.warned = False

    def start(self, received: int) -> None:
        """At this launch's first step (a resume starts counting afresh)."""
        self.received_at_start = received

    def note_loaded(self, loaded: bool) -> None:
        if loaded and self.loaded_since is None:
            self.loaded_since = time.perf_counter()

    def timed_out(self, received: int) -> bool:
        return (received == self.received_at_start and self.loaded_since is not None
                and time.perf_counter() - self.loaded_since > self.timeout_s)

    def votes(self, exhausted: bool, received: int, final: bool) -> list[float]:
        return [float(exhausted), float(self.timed_out(received)),
                float(final and received == self.received_at_start)]

    def problem(self, votes: list[float], mode: str, producer_stats: list[dict]) -> Optional[str]:
        """The reason to stop, from the votes summed over all trainers; None to go on."""
        stopped, timed_out, none = (v > 0 for v in votes)
        reasons = []
        if stopped:
            reasons.append("every producer stopped with an error" if mode == "launched"
                           else "a trainer's co-located producer stopped with an error")
        if timed_out:
            reasons.append(f"no SASI reached a trainer within online.first_sasi_timeout_s={self.timeout_s:g} s "
                           f"of the producers loading their models")
        if none and not reasons:
            reasons.append("the run ended without a single SASI reaching a trainer")
        if not reasons:
            return None
        errors = [f"producer {i}: {s['error']}" for i, s in enumerate(producer_stats) if s.get("error")]
        message = (f"online generation gave this run no SASI: {'; '.join(reasons)}"
                   + (f" ({'; '.join(errors)})" if errors else ""))
        if self.allow:
            if not self.warned:
                warnings.warn(f"{message}; online.allow_fallback_only=true: training goes on with pool draws "
                              f"and classic second views")
                self.warned = True
            return None
        return message


def supply_problem(online: Any, final: bool) -> Optional[str]:
    """Collective over the trainers' control group: the reason to stop, or None."""
    watch = online.watch
    watch.note_loaded(online.feed.models_loaded())
    received = int(online.counts["received"])
    totals = control_reduce(watch.votes(online.feed.exhausted, received, final), "sum").tolist()
    return watch.problem(totals, online.cfg.online.mode, online.producer_stats())


def how_to_resume(message: str, step: int, ckpt: str) -> str:
    return (f"{message}. The run stopped at step {step} with its checkpoint in '{ckpt}': fix the cause and run "
            f"the same command again to resume, or set online.allow_fallback_only=true to train on pool draws "
            f"and classic second views")
