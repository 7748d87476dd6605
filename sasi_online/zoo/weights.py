"""Which weight files a loader opens in a Hugging Face folder, decided before loading.

Real snapshots hold several copies of one model (`model.safetensors` beside
`pytorch_model.bin`, `*.fp16.*` and `*.non_ema.*` variants, sharded checkpoints with an
index). The loaders pick exactly one set here and tell `from_pretrained` which
(`variant=`, `use_safetensors=`), so the files hashed for a model's identity are the
files actually read, and a folder without usable weights is refused with a message
naming the file expected before anything loads.

Rules: the variant asked for (`models.variant`) where that folder has it, else the plain
weights; with no variant asked and no plain weights, the one variant present (fp16
preferred). safetensors before `.bin`; a sharded index's shards must all be there.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sasi_online.errors import ModelFolderError

# library -> (safetensors file, pickle file) of one unsharded checkpoint
STEMS = {"transformers": ("model.safetensors", "pytorch_model.bin"),
         "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")}
PREFERRED_VARIANTS = ("fp16", "bf16")


def add_variant(name: str, variant: Optional[str]) -> str:
    """'model.safetensors' + 'fp16' -> 'model.fp16.safetensors' (the hub's naming)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


@dataclass(frozen=True)
class WeightChoice:
    folder: Path
    files: tuple[Path, ...]  # the weight files from_pretrained will open (shards included)
    variant: Optional[str]
    use_safetensors: bool

    def kwargs(self) -> dict:
        """What from_pretrained needs to open exactly these files."""
        return {"variant": self.variant, "use_safetensors": self.use_safetensors}


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"cannot read the shard index '{index}' ({exc}): download it again") from exc
    files = tuple(index.parent / name for name in sorted(set(weight_map.values())))
    missing = [f.name for f in files if not f.exists() and not f.is_symlink()]
    if missing:
        raise ModelFolderError(
            f"'{index.parent}' is incomplete: {index.name} names {', '.join(missing)}, which is not "
            f"there. Download the missing shard(s) again (the hub's snapshot_download resumes).")
    return files


def _usable(path: Path) -> bool:
    """True for a weight file that is there; a dangling hub link or an empty file is refused."""
    if path.is_symlink() and not path.exists():
        raise ModelFolderError(f"'{path}' links to a blob that is not there (an interrupted download): "
                               f"download this snapshot again")
    if path.is_file() and path.stat().st_size == 0:
        raise ModelFolderError(f"'{path}' is empty (an interrupted download or a placeholder): download it again")
    return path.is_file()


def _try(folder: Path, library: str, variant: Optional[str]) -> Optional[WeightChoice]:
    for name, safe in zip(STEMS[library], (True, False)):
        single = folder / add_variant(name, variant)
        if _usable(single):
            return WeightChoice(folder, (single,), variant, safe)
        index = folder / add_variant(name + ".index.json", variant)
        if index.is_file():
            shards = _shards(index)
            for shard in shards:
                _usable(shard)
            return WeightChoice(folder, shards, variant, safe)
    return None


def variants_present(folder: Path, library: str) -> list[str]:
    """Variant names that have weights in `folder` ('fp16', 'non_ema', ...)."""
    found = set()
    for name in STEMS[library]:
        stem, ext = name.rsplit(".", 1)
        for p in folder.glob(f"{stem}.*.{ext}"):
            found.add(p.name[len(stem) + 1:-len(ext) - 1])
        for p in folder.glob(f"{stem}.{ext}.index.*.json"):
            found.add(p.name[len(name) + len(".index."):-len(".json")])
    found = {v for v in found if re.fullmatch(r"[A-Za-z0-9_]+", v)}  # not shard names
    return sorted(found, key=lambda v: (v not in PREFERRED_VARIANTS, PREFERRED_VARIANTS.index(v)
                                        if v in PREFERRED_VARIANTS else 0, v))


def resolve_weights(folder: str | Path, library: str = "transformers",
                    variant: Optional[str] = None) -> WeightChoice:
    """The weight files to load from `folder`, or a ModelFolderError naming what is expected."""
    folder = Path(folder)
    if variant:
        choice = _try(folder, library, variant)
        if choice is not None:
            return choice
    choice = _try(folder, library, None)
    if choice is not None:
        return choice
    present = [v for v in variants_present(folder, library) if v != "non_ema"]
    if present and not variant:
        return _try(folder, library, present[0])  # e.g. a `variant="fp16"` download
    safe, pickled = STEMS[library]
    extra = f" (models.variant={variant} was asked for: none of {add_variant(safe, variant)} either)" \
        if variant else ""
    raise ModelFolderError(
        f"'{folder}' has no weights: expected {safe} or {pickled}, sharded with an .index.json, or a "
        f"variant such as {add_variant(safe, 'fp16')}{extra}. Download the weights of this folder, "
        f"or point models.root at a complete snapshot.")
