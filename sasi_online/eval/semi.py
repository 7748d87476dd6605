"""Label subsets for semi-supervised evaluation (paper Table 7: 1 % and 10 % of labels).

Two sources of subsets:
- `balanced_subset`: deterministic, class-balanced, seeded. Each class gets ONE seeded
  permutation that does not depend on the fraction, and a fraction takes its first
  round(fraction * class size) images (at least one). Hence, for one seed, the 1 % subset
  is contained in the 10 % subset (nested), and the same seed gives the same subset on
  every machine (`utils.derive_seed`, numpy's PCG64).
- SimCLR's published ImageNet split files (`1percent.txt`, `10percent.txt`: one image
  file name per line, e.g. `n01440764_9981.JPEG`), matched against the dataset's
  relative paths.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from sasi_online.errors import UserInputError
from sasi_online.utils import derive_seed

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def balanced_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int,
                    min_per_class: int = 1, max_fraction_per_class: float | None = None) -> np.ndarray:
    """Sorted indices of a class-balanced subset holding `fraction` of each class.

    Every class present gets max(min_per_class, round(fraction * n_c)) images, never more
    than it has. `max_fraction_per_class` caps that at max(1, floor(cap * n_c)) so a
    hold-out split leaves images to fit on.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserInputError(f"a label fraction must be in (0, 1], got {fraction} "
                             "(eval.semi_fractions, e.g. [0.01, 0.1])")
    labels = np.asarray(labels).astype(np.int64)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        order = np.random.default_rng(derive_seed("semi-split", seed, int(cls))).permutation(len(members))
        take = max(min_per_class, int(round(fraction * len(members))))
        if max_fraction_per_class is not None:
            take = min(take, max(1, int(max_fraction_per_class * len(members))))
        chosen.append(members[order[:min(take, len(members))]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def fraction_label(fraction: float) -> str:
    """0.01 -> '1%', 0.1 -> '10%', 0.005 -> '0.5%': the key results are stored under."""
    return f"{fraction * 100:g}%"


def read_split_file(path: str | Path) -> list[str]:
    """Image names from a SimCLR-style split file: one per line; blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"split file '{path}' not found; pass a text file with one image file "
                             "name per line (e.g. SimCLR's 1percent.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"split file '{path}' is not UTF-8 text ({exc}); it should list one "
                             "image file name per line") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise UserInputError(f"split file '{path}' lists no image names")
    return names


def split_file_label(path: str | Path) -> str:
    """'1percent.txt' -> '1%', '10percent.txt' -> '10%'; any other file -> its stem."""
    stem = Path(path).stem
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:percent|pct|%)", stem, flags=re.IGNORECASE)
    return f"{float(m.group(1)):g}%" if m else stem


def _key(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.with_suffix("") if p.suffix.lower() in _IMAGE_SUFFIXES else p


def match_split(names: Sequence[str], relpaths: Sequence[str], source: str = "split file") -> tuple[np.ndarray, int]:
    """Indices of the dataset images the split names, and how many names matched nothing.

    A name matches a relative path when its file name (extension dropped) equals the
    path's last part and any folders it gives are the path's trailing folders
    (`n01440764_9981.JPEG` and `n01440764/n01440764_9981.JPEG` both match
    `train/n01440764/n01440764_9981`). Names absent from the dataset (e.g. ImageNet-1k
    names on an ImageNet-100 subset) are counted and skipped; none matching is an error.
    """
    by_stem: dict[str, list[int]] = {}
    keys = [_key(r) for r in relpaths]
    for i, k in enumerate(keys):
        by_stem.setdefault(k.name, []).append(i)
    found, missing = set(), 0
    for name in names:
        key = _key(name)
        hits = [i for i in by_stem.get(key.name, []) if keys[i].parts[-len(key.parts):] == key.parts]
        if not hits:
            missing += 1
            continue
        if len(hits) > 1:
            raise UserInputError(
                f"{source}: '{name}' matches {len(hits)} images "
                f"({', '.join(str(keys[i]) for i in hits[:3])}); write it with its class folder, "
                "e.g. 'CLASS/NAME.JPEG'")
        found.add(hits[0])
    if not found:
        raise UserInputError(
            f"{source}: none of its {len(names)} names (e.g. '{names[0]}') is in the dataset "
            f"(e.g. '{relpaths[0] if relpaths else '-'}'); check that data.name/data.root point at "
            "the ImageFolder the split was written for")
    if missing:
        warnings.warn(f"{source}: {missing} of {len(names)} names are not in the dataset and were skipped",
                      stacklevel=2)
    return np.array(sorted(found), dtype=np.int64), missing
