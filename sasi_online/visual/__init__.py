"""Visual prompts: segmenter → ADE20K mask maps; the four VP kinds; VP augmentation;
per-(image, variant) seeds. transformers is imported only when a Segmenter is built."""
from sasi_online.visual.augment import augment_visual_prompt
from sasi_online.visual.palette import ADE20K_CLASSES, ADE20K_PALETTE, colorize
from sasi_online.visual.prompts import (VP_KINDS, VisualPrompt, build_visual_prompts, make_visual_prompt,
                                        needs_mask, validate_visual_config)
from sasi_online.visual.segmenter import Segmenter
from sasi_online.visual.variants import VariantPlan, plan_variant, variant_seed, variants_per_image

__all__ = ["ADE20K_CLASSES", "ADE20K_PALETTE", "Segmenter", "VP_KINDS", "VariantPlan", "VisualPrompt",
           "augment_visual_prompt", "build_visual_prompts", "colorize", "make_visual_prompt", "needs_mask",
           "plan_variant", "validate_visual_config", "variant_seed", "variants_per_image"]
