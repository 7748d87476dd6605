"""Which SASI a (image index, variant) pair stands for, and its seed.

Paper Table 11: more SASI per image help, from semantic augmentation (several
rewrites of a caption) and VP augmentation (noised or cropped visual prompts).
Variants are numbered from 0 with no upper bound, so an online run can keep adding
them; the mapping below is a pure function, so any process agrees on it.

    rewrite_index = variant % semantic_variants
    vp_index      = (variant // semantic_variants) % vp_variants
    augmented     = vp_index > 0 and augment != "none"

vp_index 0 is the plain visual prompt (the paper's one-SASI setting); past
semantic_variants × vp_variants the pattern repeats with fresh seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

from sasi_online.errors import UserInputError
from sasi_online.utils import derive_seed

AUGMENT_MODES = ("none", "noise", "crop")


def variant_seed(image_index: int, variant: int, base_seed: int) -> int:
    """The seed of SASI (image_index, variant): stable across processes, runs and machines."""
    return derive_seed("sasi-variant", int(base_seed), int(image_index), int(variant))


@dataclass(frozen=True)
class VariantPlan:
    image_index: int
    variant: int
    rewrite_index: int  # which semantic-augmentation rewrite of the caption
    vp_index: int  # 0 = plain visual prompt, > 0 = an augmented one
    augment: str  # VP augmentation applied: none | noise | crop
    seed: int  # generation seed; VP augmentation draws from a seed derived from it


def variants_per_image(semantic_variants: int = 1, vp_variants: int = 1) -> int:
    """SASI per image in an offline run (semantic × VP augmentation, Table 11)."""
    return int(semantic_variants) * int(vp_variants)


def plan_variant(image_index: int, variant: int, *, semantic_variants: int = 1, vp_variants: int = 1,
                 augment: str = "none", base_seed: int = 0) -> VariantPlan:
    if variant < 0:
        raise UserInputError(f"variant numbers start at 0; got {variant}")
    if semantic_variants < 1 or vp_variants < 1:
        raise UserInputError(
            f"semantics.variants and visual.variants must be >= 1; got {semantic_variants} and {vp_variants}"
        )
    if augment not in AUGMENT_MODES:
        raise UserInputError(f"visual.augment='{augment}' is not known; use one of {', '.join(AUGMENT_MODES)}")
    rewrite_index = variant % semantic_variants
    vp_index = (variant // semantic_variants) % vp_variants
    applied = augment if vp_index > 0 else "none"
    return VariantPlan(int(image_index), int(variant), rewrite_index, vp_index, applied,
                       variant_seed(image_index, variant, base_seed))
