"""A model's identity: a short hash of the config and weight files its loader opens.

Stores, caption caches and run headers record it, so outputs made by other weights are
never mixed in. Only what is loaded counts (a Stable Diffusion snapshot's safety checker,
its `.ckpt` files, `.bin` copies beside `.safetensors` and unused variants do not), each
file is hashed at most once per process, and file hashes are kept on disk keyed by
(path, size, mtime), so a later start reads nothing. In a hub cache
(`models--ORG--NAME/snapshots/<commit>/`) a large file is a link to `blobs/<sha256>`:
its name is its hash and the file is not read at all.

`legacy_model_hash` is the identity of earlier versions (every .json/.safetensors/.bin/
.model file of the folder): stores and caches made with it are still accepted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from sasi_online.utils import file_sha256

from .weights import resolve_weights

log = logging.getLogger(__name__)

CACHE_ENV = "SASI_CACHE_DIR"  # where the file-hash cache lives (default ~/.cache/sasi_online)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEMO: dict[str, str] = {}  # "path|size|mtime_ns" -> sha256, this process
_DISK: dict[str, object] = {}  # cache file path -> JsonlCache (None when unusable)
# small files the loaders read beside the weights (configs, tokenizers)
_SMALL = (".json", ".txt", ".model")
SD_COMPONENTS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers"}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sasi_online"


def _disk_cache():
    from sasi_online.semantics.cache import JsonlCache

    path = cache_dir() / "file_sha256.jsonl"
    key = str(path)
    if key not in _DISK:
        try:
            _DISK[key] = JsonlCache(path)
        except (OSError, ValueError) as exc:
            log.warning("file-hash cache %s unusable (%s): hashing without it", path, exc)
            _DISK[key] = None
    return _DISK[key]


def blob_sha256(path: Path) -> Optional[str]:
    """The sha256 a hub cache names a linked LFS file by, or None (not such a link)."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256.fullmatch(target.name):
        return target.name
    return None  # small files are named by git's SHA-1: hashed as usual


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content: from a hub blob name, this process, the disk cache, or read."""
    path = Path(path)
    named = blob_sha256(path)
    if named is not None:
        return named
    real = path.resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if key in _MEMO:
        return _MEMO[key]
    disk = _disk_cache()
    digest = disk.get(key) if disk is not None else None
    if digest is None:
        digest = file_sha256(real)
        if disk is not None:
            try:
                disk.put(key, digest)
            except OSError as exc:  # a full or read-only disk costs a re-read next time, nothing more
                log.warning("cannot record a file hash in %s: %s", disk.path, exc)
    _MEMO[key] = digest
    return digest


def _small_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _SMALL) if folder.is_dir() else []


def identity_files(folder: str | Path, variant: Optional[str] = None) -> list[Path]:
    """The files a loader opens in `folder`: configs, tokenizer files and the chosen weights."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():  # a Stable Diffusion pipeline
        files = [folder / "model_index.json"]
        for sub, library in SD_COMPONENTS.items():
            files += _small_files(folder / sub) + list(resolve_weights(folder / sub, library, variant).files)
        files += _small_files(folder / "tokenizer") + _small_files(folder / "scheduler")
        return files
    library = "transformers"
    config = folder / "config.json"
    if config.is_file() and '"_class_name"' in config.read_text(encoding="utf-8", errors="replace"):
        library = "diffusers"  # a diffusers model (ControlNet, UNet) rather than transformers
    return _small_files(folder) + list(resolve_weights(folder, library, variant).files)


def _combine(folder: Path, files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(set(files)):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()[:16]


def model_hash(folder: str | Path, variant: Optional[str] = None, lora: Optional[str | Path] = None) -> str:
    """The model identity of `folder` as its loader would open it (see the module doc); with
    `lora` (a LoRA file fused into it at load), the identity of the fused weights: the same
    folder with and without a LoRA, or with another LoRA, never share an identity."""
    folder = Path(folder)
    base = _combine(folder, identity_files(folder, variant))
    return base if lora is None else with_lora(base, lora)


def with_lora(identity: str, lora: str | Path) -> str:
    """The identity of weights `identity` with the LoRA file `lora` fused in (by its content)."""
    return hashlib.sha256(f"{identity}+lora:{file_digest(lora)}".encode()).hexdigest()[:16]


def legacy_model_hash(folder: str | Path) -> str:
    """The identity of earlier versions: every config and weight file in `folder`, read in full
    (through the same file-hash cache, so only the first check after an upgrade reads them)."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*")
             if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model")]
    return _combine(folder, files)
