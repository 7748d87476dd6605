"""Semantic segmentation into ADE20K class ids, for mask-map visual prompts.

UperNet (ADE20K, 150 classes) through transformers: ControlNet-seg was trained on
mask maps from an ADE20K segmenter, and YOSO, the paper's choice, is not in
transformers. Loads only from a local folder in Hugging Face layout.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from sasi_online.errors import ModelFolderError
from sasi_online.visual.palette import NUM_CLASSES, colorize

log = logging.getLogger(__name__)


class Segmenter:
    """Batched class-id maps from a `UperNetForSemanticSegmentation` folder.

    `size` is the side the network sees (None: the image processor's own setting);
    maps come back at each image's own size, or at `out_size` when given.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 16,
                 size: Optional[int] = None, dtype: Any = None, variant: Optional[str] = None):
        import torch

        from sasi_online.zoo import load_segmenter  # checks the folder, names what is missing

        model_dir = Path(model_dir)
        self.processor, self.model = load_segmenter(model_dir, device=device, dtype=dtype, variant=variant)
        num_labels = self.model.config.num_labels
        if num_labels > NUM_CLASSES:
            raise ModelFolderError(
                f"segmenter '{model_dir}' predicts {num_labels} classes; mask maps use the ADE20K "
                f"palette of {NUM_CLASSES} classes that ControlNet-seg was trained on. Use an ADE20K model."
            )
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype  # `dtype`, float32 when None
        self.batch_size = max(1, int(batch_size))
        self.size = size
        self.model_dir = model_dir
        log.info("segmenter %s: %d classes, input side %s", model_dir, num_labels, size or "processor default")

    @classmethod
    def from_config(cls, models_cfg: Any, visual_cfg: Any, device: Any = "cpu", batch_size: int = 16,
                    dtype: Any = None) -> "Segmenter":
        """On `device` in `dtype` (the generator's, where it runs beside one; float32 when None)."""
        return cls(models_cfg.path("segmenter"), device=device, batch_size=batch_size,
                   size=visual_cfg.segment_size, dtype=dtype, variant=getattr(models_cfg, "variant", None))

    def _size_kwargs(self) -> dict:
        """The processor's own size schema, set to `self.size` (processors name it differently)."""
        if self.size is None:
            return {}
        current = dict(getattr(self.processor, "size", {}) or {})
        if "shortest_edge" in current:
            return {"size": {"shortest_edge": self.size}}
        return {"size": {"height": self.size, "width": self.size}}

    def segment(self, images: Sequence[Image.Image], out_size: Optional[tuple[int, int]] = None,
                progress: bool = False) -> list[np.ndarray]:
        """Class-id maps (H, W) uint8, one per image; (H, W) = `out_size` or the image's size."""
        import torch
        from tqdm.auto import tqdm

        images = [im.convert("RGB") for im in images]
        maps: list[np.ndarray] = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="segment", unit="batch", disable=not progress):
            chunk = images[start:start + self.batch_size]
            inputs = self.processor(images=chunk, return_tensors="pt", **self._size_kwargs())
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            with torch.inference_mode():
                outputs = self.model(pixel_values=pixels)
            # (width, height) from PIL → (height, width) for the processor
            targets = [out_size if out_size else (im.height, im.width) for im in chunk]
            outputs.logits = outputs.logits.float()
            for seg in self.processor.post_process_semantic_segmentation(outputs, target_sizes=targets):
                maps.append(seg.to("cpu", torch.uint8).numpy())
        return maps

    def mask_maps(self, images: Sequence[Image.Image], out_size: Optional[tuple[int, int]] = None,
                  progress: bool = False) -> list[Image.Image]:
        """ADE20K-palette RGB mask maps, one per image."""
        return [Image.fromarray(colorize(ids)) for ids in self.segment(images, out_size, progress)]
