"""CLIP image-image cosine between each SASI and its real image (paper Appendix A).

Uses CLIPModel's projected image embedding (`get_image_features(...).pooler_output` in
transformers 5). Scores are stored in the SASI manifest as new record versions, so a
rerun only scores what is new and `sasi filter` can re-threshold without recomputing.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sasi_online.utils import chunked, save_figure

log = logging.getLogger(__name__)


class ClipSimilarity:
    """Batched, L2-normalised CLIP image embeddings and their cosines."""

    def __init__(self, model_dir: Any, device: Any = "cpu", batch_size: int = 32, dtype: Any = None,
                 variant: Optional[str] = None):
        from sasi_online.zoo import load_clip  # checks the folder, names what is missing

        self.processor, self.model = load_clip(model_dir, device=device, dtype=dtype, variant=variant)
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype  # `dtype`, float32 when None
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: Any, batch_size: int = 32) -> "ClipSimilarity":
        """models.clip / models.variant on filter.device in filter.dtype."""
        from sasi_online.semantics.runtime import device_and_dtype

        device, dtype = device_and_dtype(cfg.filter, "filter")
        return cls(cfg.models.path("clip"), device=device, batch_size=batch_size, dtype=dtype,
                   variant=getattr(cfg.models, "variant", None))

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            feats = self.model.get_image_features(pixel_values=pixels)
            feats = getattr(feats, "pooler_output", feats)  # an output object in transformers 5
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def cosine(self, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> np.ndarray:
        """Cosine of a[i] and b[i] for each i."""
        if len(a) != len(b):
            raise ValueError(f"cosine needs pairs: got {len(a)} and {len(b)} images")
        return (self.embed(a) * self.embed(b)).sum(-1).numpy()


def score_store(store: Any, dataset: Any, scorer: ClipSimilarity, batch_size: int = 32,
                progress: bool = True, rescore: bool = False) -> int:
    """Append a CLIP similarity to every SASI record that has none yet; return how many."""
    from tqdm.auto import tqdm

    todo = [r for r in store.iter_records() if rescore or r.similarity is None]
    with tqdm(total=len(todo), desc="CLIP similarity", unit="img", disable=not progress) as bar:
        for batch in chunked(todo, batch_size):
            sasi = [store.get(r.index, r.variant) for r in batch]
            real = [dataset[r.index].image for r in batch]
            sims = scorer.cosine(real, sasi)
            store.update_many([(r.index, r.variant, {"similarity": round(float(s), 6)})
                               for r, s in zip(batch, sims)])
            bar.update(len(batch))
    return len(todo)


def flag_fishy(store: Any, threshold: float) -> dict:
    """Flag SASI with similarity < threshold as fishy, unflag the rest (nothing is deleted).

    Only records whose flag changes get a new manifest line. Returns counts.
    """
    changes = []
    counts = {"scored": 0, "fishy": 0, "changed": 0}
    for r in store.iter_records():
        if r.similarity is None:
            continue
        counts["scored"] += 1
        fishy = bool(r.similarity < threshold)
        counts["fishy"] += fishy
        if fishy != bool(r.fishy):
            changes.append((r.index, r.variant, {"fishy": fishy, "filter_threshold": threshold}))
    if changes:
        store.update_many(changes)
    counts["changed"] = len(changes)
    return counts


def similarity_histogram(similarities: Sequence[float], threshold: float, path: Any,
                         title: Optional[str] = None) -> Any:
    """Histogram PNG of the similarities with the threshold marked (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = np.asarray(list(similarities), dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(sims, bins=min(50, max(5, len(sims) // 4 or 5)), color="#4a7ebb")
    ax.axvline(threshold, color="#c0392b", linestyle="--",
               label=f"threshold {threshold:g}: {int((sims < threshold).sum())} of {len(sims)} fishy")
    ax.set_xlabel("CLIP cosine (SASI vs real image)")
    ax.set_ylabel("SASI")
    ax.set_title(title or "SASI similarity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=96)
