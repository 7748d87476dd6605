"""Visual prompts (VP): what initialises and conditions a SASI's generation.

| kind  | init_image (img2img start)          | control_image (ControlNet-seg) |
|-------|-------------------------------------|--------------------------------|
| image | the real image                      | None                           |
| mask  | None (pure noise)                   | the ADE20K mask map            |
| mix   | blend(real, mask map, alpha = 0.5)  | the mask map                   |
| noise | None (pure noise, text-to-image)    | None                           |

Everything is at the generation resolution, square. A non-square real image is
resized on its short side and centre-cropped; its mask map must be computed on that
prepared image (`build_visual_prompts` does so) so the two line up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from sasi_online.errors import UserInputError
from sasi_online.visual.palette import colorize
from sasi_online.visual.variants import AUGMENT_MODES, plan_variant

VP_KINDS = ("image", "mask", "mix", "noise")


@dataclass(frozen=True)
class VisualPrompt:
    kind: str  # image | mask | mix | noise
    init_image: Optional[Image.Image]  # RGB at the generation resolution, or None = pure noise
    control_image: Optional[Image.Image]  # ADE20K mask map for ControlNet-seg, or None
    seed: int  # the generation seed of this SASI
    augment: str = "none"  # VP augmentation that made it: none | noise | crop


def check_kind(kind: str) -> str:
    if kind not in VP_KINDS:
        raise UserInputError(f"visual.kind='{kind}' is not known; use one of {', '.join(VP_KINDS)}")
    return kind


def needs_mask(kind: str) -> bool:
    """Whether a VP of `kind` needs the segmenter (skip it for image and noise)."""
    return check_kind(kind) in ("mask", "mix")


def validate_visual_config(cfg: Any) -> None:
    """Refuse VisualConfig values that cannot work, naming the key and the fix."""
    check_kind(cfg.kind)
    if cfg.augment not in AUGMENT_MODES:
        raise UserInputError(f"visual.augment='{cfg.augment}' is not known; use one of {', '.join(AUGMENT_MODES)}")
    if not 0.0 <= cfg.mix_alpha <= 1.0:
        raise UserInputError(f"visual.mix_alpha must lie in [0, 1] (paper: 0.5); got {cfg.mix_alpha}")
    if not 0.0 <= cfg.noise_std <= 1.0:
        raise UserInputError(f"visual.noise_std is in [0, 1] image units; got {cfg.noise_std}")
    if not 0.0 < cfg.crop_scale <= 1.0:
        raise UserInputError(f"visual.crop_scale is the crop side as a fraction in (0, 1]; got {cfg.crop_scale}")
    if cfg.variants < 1:
        raise UserInputError(f"visual.variants must be >= 1; got {cfg.variants}")
    if cfg.segment_size < 8:
        raise UserInputError(f"visual.segment_size must be >= 8 pixels; got {cfg.segment_size}")


def _square(image: Image.Image, resolution: int, resample: int) -> Image.Image:
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((resolution, resolution), resample, box=(left, top, left + side, top + side))


def prepare_image(image: Image.Image, resolution: int) -> Image.Image:
    """Real image → RGB, centre square, `resolution` px (bicubic)."""
    return _square(image.convert("RGB"), resolution, Image.Resampling.BICUBIC)


def prepare_mask_map(mask: Any, resolution: int) -> Image.Image:
    """Mask map (PIL / HxWx3 array) or class-id map (HxW ints) → palette RGB at `resolution`.

    Nearest-neighbour only: any interpolation would invent colours outside the palette.
    """
    if isinstance(mask, Image.Image):
        img = mask.convert("RGB")
    else:
        arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        img = Image.fromarray(colorize(arr) if arr.ndim == 2 else arr.astype(np.uint8))
    return _square(img, resolution, Image.Resampling.NEAREST)


def blend(real: Image.Image, mask_map: Image.Image, alpha: float = 0.5) -> Image.Image:
    """(1 - alpha) * real + alpha * mask map: the mix VP's initial image."""
    return Image.blend(real, mask_map, alpha)


def make_visual_prompt(kind: str, image: Optional[Image.Image], mask_map: Any = None, *,
                       resolution: int, seed: int, mix_alpha: float = 0.5) -> VisualPrompt:
    """One plain VP per the table above; `image`/`mask_map` may be None where unused."""
    check_kind(kind)
    real = prepare_image(image, resolution) if image is not None and kind in ("image", "mix") else None
    if kind in ("image", "mix") and real is None:
        raise UserInputError(f"a '{kind}' visual prompt needs the real image")
    mask = None
    if needs_mask(kind):
        if mask_map is None:
            raise UserInputError(f"a '{kind}' visual prompt needs a mask map (run the segmenter first)")
        mask = prepare_mask_map(mask_map, resolution)
    if kind == "image":
        return VisualPrompt(kind, real, None, seed)
    if kind == "mask":
        return VisualPrompt(kind, None, mask, seed)
    if kind == "mix":
        return VisualPrompt(kind, blend(real, mask, mix_alpha), mask, seed)
    return VisualPrompt(kind, None, None, seed)


def build_visual_prompts(images: Sequence[Image.Image], image_indices: Sequence[int],
                         variants: Sequence[int], *, cfg: Any, resolution: int, base_seed: int,
                         segmenter: Any = None, semantic_variants: int = 1) -> list[VisualPrompt]:
    """VPs for a batch of (image, image index, variant), in input order.

    Each distinct image index is segmented once (only for mask / mix), on the prepared
    square image, so mask maps line up with what img2img starts from. Each variant's
    seed and VP augmentation follow `plan_variant`.
    """
    from sasi_online.visual.augment import augment_visual_prompt

    validate_visual_config(cfg)
    if not len(images) == len(image_indices) == len(variants):
        raise UserInputError(
            f"build_visual_prompts needs as many image indices and variants as images ({len(images)}); "
            f"got {len(image_indices)} and {len(variants)}"
        )
    first: dict[int, int] = {}
    for pos, idx in enumerate(image_indices):
        first.setdefault(int(idx), pos)
    prepared = {idx: prepare_image(images[pos], resolution) for idx, pos in first.items()}
    masks: dict[int, Image.Image] = {}
    if needs_mask(cfg.kind):
        if segmenter is None:
            raise UserInputError(f"visual.kind={cfg.kind} needs a segmenter (models.segmenter) for mask maps")
        order = list(prepared)
        for idx, m in zip(order, segmenter.mask_maps([prepared[i] for i in order], out_size=(resolution, resolution))):
            masks[idx] = m
    out = []
    for idx, variant in zip(image_indices, variants):
        plan = plan_variant(int(idx), int(variant), semantic_variants=semantic_variants,
                            vp_variants=cfg.variants, augment=cfg.augment, base_seed=base_seed)
        vp = make_visual_prompt(cfg.kind, prepared[int(idx)], masks.get(int(idx)), resolution=resolution,
                                seed=plan.seed, mix_alpha=cfg.mix_alpha)
        if plan.augment != "none":
            vp = augment_visual_prompt(vp, plan.augment, noise_std=cfg.noise_std, crop_scale=cfg.crop_scale)
        out.append(vp)
    return out


__all__ = ["VP_KINDS", "VisualPrompt", "check_kind", "needs_mask", "validate_visual_config",
           "prepare_image", "prepare_mask_map", "blend", "make_visual_prompt", "build_visual_prompts"]
