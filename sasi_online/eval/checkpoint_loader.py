"""Load a trained encoder for evaluation: `load_encoder(path) -> (method, Config)`.

Accepted layouts (weights only, never pickled code: `torch.load(weights_only=True)`):
- a file holding `{"config": <Config as dict>, "model": <method state dict>}`;
- a consolidated state dict (names -> tensors: DeepSpeed's `zero_to_fp32` output,
  `pytorch_model.bin` or `model.safetensors`), its config beside it or passed in;
- a DeepSpeed checkpoint (`sasi train`): its folder (with `latest.json` or DeepSpeed's
  `latest` tag file, or a tag named), a tag folder, or the `mp_rank_00_model_states.pt` file itself; the
  state dict is under "module"; the config under "config" (client state) or, failing
  that, in the nearest `config.yaml` of the tag folder, the checkpoint folder or the run
  folder. A tag folder's `meta.json` config hash is checked against that config.
Every failure names the file and says what was expected.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sasi_online.config import Config, ConfigError, config_from_dict, load_config
from sasi_online.errors import UserInputError
from sasi_online.training.checkpoint import deepspeed_safe_globals

MODEL_STATES = "mp_rank_00_model_states.pt"
STATE_KEYS = ("model", "module", "state_dict")


class CheckpointError(UserInputError):
    """A checkpoint that is missing, unreadable, or does not fit the config it carries."""


def _latest_tag(folder: Path) -> str | None:
    """The newest complete tag: `latest.json` ({"tag": ...}, written last by the trainer)
    or DeepSpeed's plain-text `latest`."""
    if (folder / "latest.json").is_file():
        try:
            return str(json.loads((folder / "latest.json").read_text(encoding="utf-8"))["tag"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"'{folder / 'latest.json'}' is damaged (expected {{\"tag\": ...}}); "
                                  "pass a tag folder such as global_step100 instead") from None
    if (folder / "latest").is_file():
        return (folder / "latest").read_text(encoding="utf-8").strip()
    return None


def _config_beside(file: Path) -> tuple[Config, Path] | None:
    """The nearest config.yaml of the tag folder, checkpoint folder or run folder."""
    for folder in (file.parent, file.parent.parent, file.parent.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            try:
                return load_config(candidate), candidate
            except ConfigError as exc:
                raise CheckpointError(f"checkpoint '{file}': its run config '{candidate}' cannot be "
                                      f"used by this version: {exc}") from None
    return None


def _check_meta_hash(file: Path, cfg: Config, source: Path) -> None:
    """A tag folder's meta.json records the hash of the config it was trained with."""
    meta = file.parent / "meta.json"
    if not meta.is_file():
        return
    try:
        from sasi_online.training.checkpoint import config_hash
    except ImportError:
        return
    try:
        want = json.loads(meta.read_text(encoding="utf-8")).get("config_hash")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"'{meta}' is damaged; the checkpoint '{file}' cannot be checked") from None
    if want and want != config_hash(cfg):
        raise CheckpointError(f"checkpoint '{file}' was written with another config than '{source}' "
                              f"(hash {want} vs {config_hash(cfg)}); point at the run folder that "
                              "wrote it")


def resolve_checkpoint_file(path: str | Path, tag: str | None = None) -> Path:
    """The file that holds the weights, for a file path or a DeepSpeed folder / tag folder
    (`tag`: that DeepSpeed tag of the checkpoint folder, e.g. global_step100)."""
    path = Path(path).expanduser()
    if tag is not None:
        if not (path / tag / MODEL_STATES).is_file():
            have = sorted(p.name for p in path.glob("*") if (p / MODEL_STATES).is_file()) if path.is_dir() else []
            raise CheckpointError(f"checkpoint folder '{path}' has no tag '{tag}' ({path / tag / MODEL_STATES} "
                                  f"is missing); its tags: {', '.join(have) or 'none'}")
        return path / tag / MODEL_STATES
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MODEL_STATES).is_file():
            return path / MODEL_STATES
        tag = _latest_tag(path)
        if tag is not None:
            if (path / tag / MODEL_STATES).is_file():
                return path / tag / MODEL_STATES
            raise CheckpointError(f"checkpoint folder '{path}': 'latest' names tag '{tag}' but "
                                  f"'{path / tag / MODEL_STATES}' does not exist (incomplete save?)")
        raise CheckpointError(f"checkpoint folder '{path}' holds neither '{MODEL_STATES}' nor a "
                              "'latest.json'/'latest' tag file; pass the checkpoint file or the "
                              "trainer's checkpoint folder")
    raise CheckpointError(f"checkpoint '{path}' not found; pass a checkpoint file written by "
                          "`sasi train` (or its checkpoint folder)")


def run_folder(file: Path) -> Path:
    """The run a checkpoint file belongs to: its folder, or for DeepSpeed's
    RUN[/checkpoints]/TAG/mp_rank_00_model_states.pt the RUN folder. Names the run and
    holds its default eval/ output."""
    if file.name != MODEL_STATES:
        return file.parent
    folder = file.parent.parent
    return folder.parent if folder.name in ("checkpoints", "ckpt", "ckpts") else folder


def _load_blob(file: Path):
    if file.suffix == ".safetensors":  # zero_to_fp32 --safe_serialization
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    # Importing DeepSpeed takes seconds: only its own files need its enums allowed.
    allowed = deepspeed_safe_globals() if file.name == MODEL_STATES else []
    with torch.serialization.safe_globals(allowed):
        return torch.load(file, map_location="cpu", weights_only=True)


class ConsolidatedState(dict):
    """A state dict consolidated by DeepSpeed's zero_to_fp32: the trained parameters (and
    buffers); untrained state (momentum targets, queues) may be absent."""


def _untrained_names(method: torch.nn.Module) -> set:
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    return frozen | {n for n, _ in method.named_buffers()}


def _is_flat_state_dict(blob: dict) -> bool:
    """A consolidated state dict (DeepSpeed's zero_to_fp32 output): names -> tensors only."""
    return bool(blob) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items())


def read_checkpoint(path: str | Path, tag: str | None = None,
                    config: str | Path | None = None) -> tuple[dict, Config, Path]:
    """(state dict, Config, file) from a checkpoint, with clear errors for bad files.
    `config`: the run's config.yaml, for a file that carries none and has none nearby."""
    file = resolve_checkpoint_file(path, tag)
    try:
        blob = _load_blob(file)
    except Exception as exc:  # truncated zip, random bytes, a pickle with code objects ...
        raise CheckpointError(
            f"checkpoint '{file}' cannot be read as a weights-only torch file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "it may be truncated or not a checkpoint. Use the file `sasi train` wrote.") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"checkpoint '{file}' holds a {type(blob).__name__}, expected a dict "
                              "with 'config' and 'model' entries")
    state_key = next((k for k in STATE_KEYS if isinstance(blob.get(k), dict)), None)
    if state_key is None and _is_flat_state_dict(blob):
        blob, state_key = {"model": ConsolidatedState(blob)}, "model"
    if state_key is None:
        raise CheckpointError(f"checkpoint '{file}' holds no model state dict (one of {list(STATE_KEYS)}); "
                              f"its keys are {sorted(map(str, blob))[:10]}")
    if config is not None:
        try:
            cfg, source = load_config(config), Path(config)
        except ConfigError as exc:
            raise CheckpointError(f"--config '{config}' cannot be used for checkpoint '{file}': {exc}") from None
    elif isinstance(blob.get("config"), dict):
        try:
            cfg, source = config_from_dict(blob["config"]), file
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint '{file}' carries a config this version cannot use: {exc}. "
                                  "It was written by another version of sasi_online; evaluate it with "
                                  "that version or retrain.") from None
    else:
        found = _config_beside(file)
        if found is None:
            raise CheckpointError(f"checkpoint '{file}' carries no 'config' entry and no config.yaml "
                                  "sits in its folder or the two above; pass the run's config "
                                  "(--config RUN/config.yaml) or copy it next to the file")
        cfg, source = found
    _check_meta_hash(file, cfg, source)
    return blob[state_key], cfg, file


def load_encoder(checkpoint_path: str | Path, device: str | torch.device = "cpu", tag: str | None = None,
                 config: str | Path | None = None):
    """(method in eval mode on `device`, its Config). `method.encode(x)` gives features."""
    state, cfg, file = read_checkpoint(checkpoint_path, tag, config)
    try:
        from sasi_online.ssl import build_method
    except ImportError as exc:
        raise CheckpointError(f"cannot rebuild the model of '{file}': sasi_online.ssl is unavailable "
                              f"because {exc}") from None
    try:
        method = build_method(cfg.method)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint '{file}': its config names a model this version cannot "
                              f"build ({exc})") from None
    # DeepSpeed saves from a wrapper in some set-ups: strip a leading "module." if every key has it.
    if state and all(k.startswith("module.") for k in state):
        state = type(state)({k[len("module."):]: v for k, v in state.items()})
    try:
        result = method.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise CheckpointError(f"checkpoint '{file}' does not match the model its config describes "
                              f"(method.name={cfg.method.name}, method.backbone={cfg.method.backbone}): "
                              f"{str(exc).splitlines()[-1].strip()[:300]}. Was the file written with "
                              "another config?") from None
    missing = list(result.missing_keys)
    if isinstance(state, ConsolidatedState) and set(missing) <= _untrained_names(method):
        if missing:
            import logging

            logging.getLogger(__name__).info(
                "checkpoint '%s': %d untrained entries (momentum targets, queues) are not in the "
                "consolidated file and keep their initial values", file, len(missing))
        missing = []
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint '{file}' does not match the model its config describes "
            f"(method.name={cfg.method.name}, method.backbone={cfg.method.backbone}): "
            f"missing {len(missing)} keys (e.g. {missing[:3]}), "
            f"unexpected {len(result.unexpected_keys)} (e.g. {result.unexpected_keys[:3]}). "
            "Was the file written with another config?")
    return method.to(device).eval(), cfg
