"""Checkpoints that resume exactly, loaded without unpickling arbitrary objects.

DeepSpeed writes model, optimizer (ZeRO partitions included) and scheduler state; its
own loader calls `torch.load(weights_only=False)`, so the engine's checkpoint engine is
wrapped to load with `weights_only=True` (a few DeepSpeed enums are allow-listed).
Beside them each tag folder holds `meta.json` (step, config hash — checked before any
state is touched), one `rng_rank{r}.pt` per trainer (python/numpy/torch RNG states) and
one `client_rank{r}.json` per trainer: state that differs between trainers (its SASI
outcome counters, its SASI source). DeepSpeed's client state is the first trainer's only.

bf16 at train.zero_stage=0 now runs at ZeRO stage 1 (engine.zero_stage_for); a checkpoint
written before, at stage 0, holds the optimizer in the model-states file (DeepSpeed's
FP16_UnfusedOptimizer: fp32 master weights and the torch optimizer's per-parameter state).
`load` moves those into the stage-1 optimizer's partitions (`_load_stage0_optimizer`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from sasi_online.errors import UserInputError
from sasi_online.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# Keys that may change between a run and its resume without changing what is trained.
# Keys a resumed run may change: they steer logging, length or fault drills, not the model.
_VOLATILE = {("train", k) for k in ("steps", "out", "log_every", "ckpt_every", "knn_every", "resume",
                                    "num_workers")} | {
    ("online", k) for k in ("fault_batch", "fault_loop_after", "fault_producer", "fault_delay_s",
                            "fault_delay_producer", "fault_load", "plots", "first_sasi_timeout_s",
                            "allow_fallback_only")} | {("train", "dist_timeout_s")}
# Keys added after checkpoints were written, with the value that keeps what those runs did:
# hashed only when set to something else, so that the older checkpoints still resume.
_ADDED_KEYS = {("online", "producers_per_node"): 0}
KEEP_LAST = 2


class CheckpointMismatchError(UserInputError):
    """A checkpoint written by a run with another config."""


def config_hash(cfg) -> str:
    import copy

    from sasi_online.config import resolve_recipe

    d = resolve_recipe(copy.deepcopy(cfg)).to_dict()  # a field left None = its recipe value
    for section, key in _VOLATILE:
        d.get(section, {}).pop(key, None)
    for (section, key), default in _ADDED_KEYS.items():
        if d.get(section, {}).get(key) == default:
            d[section].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def deepspeed_safe_globals() -> list:
    """DeepSpeed classes its ZeRO checkpoints name (plain state holders, no code on load)."""
    import importlib

    out = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - other DeepSpeed versions
            pass
    return out


class SafeCheckpointEngine:
    """Delegates to DeepSpeed's checkpoint engine; loads with `weights_only=True`."""

    def __init__(self, inner: Any):
        self._inner = inner

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def tag_of(step: int) -> str:
    """The tag (folder name) of the checkpoint after `step` optimizer steps: DeepSpeed's own
    convention, so its tools (zero_to_fp32 --tag, load_checkpoint) read it as written."""
    return f"global_step{int(step)}"


_LEGACY_TAG = re.compile(r"^step_(\d{7,})$")  # tags written before the rename


def _step_of_tag(name: str) -> Optional[int]:
    m = re.match(r"^global_step(\d+)$", name) or _LEGACY_TAG.match(name)
    return int(m.group(1)) if m else None


def _migrate_legacy(ckpt_dir: Path) -> None:
    """Rename `step_0000004/` folders (earlier versions) to `global_step4/` and point the
    latest-files at the new name. Safe for every rank to call at once: a rename another
    rank did first is skipped, and both latest-files are rewritten with the same content."""
    renamed = False
    for old in ckpt_dir.glob("step_*"):
        m = _LEGACY_TAG.match(old.name)
        if not m or not old.is_dir():
            continue
        new = ckpt_dir / tag_of(int(m.group(1)))
        try:
            if not new.exists():
                old.rename(new)
                renamed = True
        except FileNotFoundError:  # another rank renamed it a moment ago
            renamed = True
    latest_json = ckpt_dir / "latest.json"
    if not latest_json.is_file():
        return
    try:
        info = json.loads(latest_json.read_text())
    except ValueError:
        return
    step = _step_of_tag(str(info.get("tag", "")))
    if step is not None and _LEGACY_TAG.match(str(info["tag"])):
        atomic_write_json(latest_json, {**info, "tag": tag_of(step)})
        atomic_write_text(ckpt_dir / "latest", tag_of(step))  # DeepSpeed's own latest-file
        renamed = True
    if renamed:
        log.info("checkpoints in %s renamed to DeepSpeed's global_stepN tags", ckpt_dir)


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])


def save(engine, ckpt_dir: Path, step: int, cfg, client_state: dict, trainer_rank: int, group,
         rank_state: Optional[dict] = None) -> None:
    """Collective over the trainers (DeepSpeed's save is). `group` is the trainers' gloo
    control group (roles.control_group): our barriers run there, and DeepSpeed's own world
    barriers are routed there for the duration of the save (groups.barriers_on_control).
    `rank_state` (JSON-able) is this trainer's own; `load` returns it merged over the
    shared `client_state`."""
    from sasi_online.online.groups import barriers_on_control, current

    tag = tag_of(step)
    folder = ckpt_dir / tag
    if trainer_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier(group=group)
    torch.save(_rng_state(), folder / f".rng_rank{trainer_rank}.tmp")
    (folder / f".rng_rank{trainer_rank}.tmp").replace(folder / f"rng_rank{trainer_rank}.pt")
    atomic_write_json(folder / f"client_rank{trainer_rank}.json", rank_state or {})
    groups = current()
    with barriers_on_control(groups) if groups is not None else _no_routing():
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier(group=group)
    if trainer_rank == 0:
        # meta.json last: a tag folder without it is incomplete and never resumed from
        atomic_write_json(folder / "meta.json", {"step": step, "config_hash": config_hash(cfg)})
        atomic_write_json(ckpt_dir / "latest.json", {"tag": tag, "step": step})
        tags = sorted((p for p in ckpt_dir.iterdir() if _step_of_tag(p.name) is not None
                       and (p / "meta.json").is_file()), key=lambda p: _step_of_tag(p.name))
        for old in tags[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier(group=group)


@contextlib.contextmanager
def _no_routing():
    yield


def latest(ckpt_dir: Path) -> Optional[tuple[str, dict]]:
    """(tag, meta) of the newest complete checkpoint, or None. Checkpoints written with the
    earlier tag names (step_0000004) are renamed to DeepSpeed's (global_step4) first."""
    p = ckpt_dir / "latest.json"
    if not p.is_file():
        return None
    _migrate_legacy(ckpt_dir)
    tag = json.loads(p.read_text())["tag"]
    meta_path = ckpt_dir / tag / "meta.json"
    if not meta_path.is_file():
        return None
    return tag, json.loads(meta_path.read_text())


def check_config(ckpt_dir: Path, cfg) -> None:
    """Refuse a checkpoint written with another config (cheap: reads meta.json only)."""
    found = latest(ckpt_dir)
    if found is None:
        return
    tag, meta = found
    want = config_hash(cfg)
    if meta["config_hash"] != want:
        raise CheckpointMismatchError(
            f"the checkpoint '{ckpt_dir / tag}' was written with another config (hash "
            f"{meta['config_hash']}, this config {want}). Use the same config and overrides to "
            f"resume, or a new train.out folder (or train.resume=false) to start afresh")


def load(engine, ckpt_dir: Path, cfg, trainer_rank: int) -> Optional[dict]:
    """Resume from the latest complete checkpoint; None if there is none."""
    found = latest(ckpt_dir)
    if found is None:
        return None
    tag, _ = found
    check_config(ckpt_dir, cfg)
    across = _written_without_zero(engine, ckpt_dir / tag)
    # across the stage mapping DeepSpeed finds no ZeRO files: it loads the module and the
    # schedule, and hands the stage-0 optimizer back in the client state (not loaded)
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True,
                                       load_optimizer_states=not across, load_lr_scheduler_states=True)
    if client is None:
        raise UserInputError(f"checkpoint '{ckpt_dir / tag}' could not be read; delete it to "
                             f"fall back to the one before")
    if across:
        _load_stage0_optimizer(engine, client.pop("optimizer", None), ckpt_dir / tag)
    rng_file = ckpt_dir / tag / f"rng_rank{trainer_rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    own = ckpt_dir / tag / f"client_rank{trainer_rank}.json"
    if own.is_file():  # this trainer's counters, not the first trainer's
        client = {**client, **json.loads(own.read_text())}
    return client


# ----------------------------------------------------------------------------- stage 0 -> ZeRO
def _written_without_zero(engine, folder: Path) -> bool:
    """The engine partitions its optimizer (ZeRO >= 1) but the checkpoint has no ZeRO files:
    written at stage 0 (bf16 at train.zero_stage=0 before it mapped to stage 1)."""
    zero = bool(getattr(engine, "zero_optimization", lambda: False)())
    return zero and not any(folder.glob("*zero_pp_rank_*_optim_states.pt"))


def _stage0_error(folder: Path, why: str) -> UserInputError:
    return UserInputError(f"checkpoint '{folder}' was written at ZeRO stage 0 and cannot resume at stage 1 "
                          f"({why}). Resume it with the version that wrote it, or start afresh with a new "
                          f"train.out (or train.resume=false)")


# how the torch optimizer runs here, not what it computes: kept from this run's optimizer
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _load_stage0_optimizer(engine, state: Optional[dict], folder: Path) -> None:
    """Stage-0 bf16 optimizer state (FP16_UnfusedOptimizer.state_dict(): `fp32_groups` and the
    torch optimizer's `optimizer_state_dict`) into the ZeRO optimizer: each trainer copies its
    own slice of every fp32 master weight and every per-parameter state tensor; step counts
    and the groups' settings (lr, weight decay, momentum) are taken as they were."""
    if not isinstance(state, dict) or "fp32_groups" not in state or "optimizer_state_dict" not in state:
        raise _stage0_error(folder, "its model-states file holds no bf16 optimizer state")
    zero = engine.optimizer
    masters, saved = state["fp32_groups"], state["optimizer_state_dict"]
    if len(masters) != len(zero.bit16_groups) or len(saved["param_groups"]) != len(masters):
        raise _stage0_error(folder, f"{len(masters)} parameter groups there, {len(zero.bit16_groups)} here")
    states, groups, first = {}, [], 0  # the saved state numbers parameters across groups, in order
    for g, (params, fulls) in enumerate(zip(zero.bit16_groups, masters)):
        if [tuple(p.shape) for p in params] != [tuple(f.shape) for f in fulls]:
            raise _stage0_error(folder, f"parameter group {g} has other shapes")
        per_param = [saved["state"].get(first + j, {}) for j in range(len(fulls))]
        states[g] = _partition_state(params, fulls, per_param, zero.single_partition_of_fp32_groups[g])
        here = zero.optimizer.param_groups[g]
        groups.append({**saved["param_groups"][g], **{k: here[k] for k in _IMPLEMENTATION_KEYS if k in here},
                       "params": [g]})
        first += len(fulls)
    zero.optimizer.load_state_dict({"state": states, "param_groups": groups})  # torch's own placement rules
    log.info("checkpoint %s: stage-0 optimizer state loaded into the ZeRO stage-1 optimizer", folder)


def _partition_state(params: list, fulls: list, per_param: list[dict], flat: torch.Tensor) -> dict:
    """This trainer's flat partition: fp32 masters copied into `flat`; returns the torch
    optimizer's state for it (per-parameter tensors laid out as `flat`, the rest as is)."""
    out: dict = {}
    for p, full, st in zip(params, fulls, per_param):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # this parameter lies in other trainers' partitions
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat.data.narrow(0, hp.start, hp.numel).copy_(full.flatten().narrow(0, lp.start, lp.numel))
        for key, value in st.items():
            if key != "step" and torch.is_tensor(value) and value.shape == full.shape:
                buf = out.setdefault(key, torch.zeros_like(flat))
                buf.narrow(0, hp.start, hp.numel).copy_(value.flatten().narrow(0, lp.start, lp.numel))
            else:  # step counts (one per group in the flat optimizer), None buffers
                out.setdefault(key, value)
    return out
