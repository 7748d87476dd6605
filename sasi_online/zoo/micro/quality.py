"""Reading the garment and the shade back from text, for the micro set's quality checks."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# Fashion-MNIST class -> the words the captions and rewrites use for it
_GARMENT = (
    (0, r"\bt-shirt\b"), (1, r"\btrousers\b"), (2, r"\bpullover\b"), (3, r"\bdress\b"),
    (4, r"\bcoat\b"), (5, r"\bsandal\b"), (6, r"(?<!t-)\bshirt\b"), (7, r"\bsneaker\b|\brunning shoe\b"),
    (8, r"\b(?:hand)?bag\b"), (9, r"\bankle boot\b"),
)
_SHADE = ((0, r"\bdark\b"), (1, r"\bgr[ae]y\b"), (2, r"\bwhite\b|\blight\b"))


def _only(text: str, table) -> Optional[int]:
    found = {k for k, pattern in table if re.search(pattern, text.lower())}
    return found.pop() if len(found) == 1 else None


def garment_of(text: str) -> Optional[int]:
    """The one Fashion-MNIST class `text` names, or None (none or several)."""
    return _only(text, _GARMENT)


def shade_of(text: str) -> Optional[int]:
    """The one shade (0 dark, 1 grey, 2 white/light) `text` names, or None."""
    return _only(text, _SHADE)


# ---------------------------------------------------------------- measured through the
# project's own classes (Captioner, Rewriter, Segmenter, ClipSimilarity), as the pipeline uses them

def _pil(images):
    import numpy as np
    from PIL import Image

    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]


def caption_scores(zoo, images, labels, sep=None) -> dict:
    """Share of captions naming the image's garment class, and its shade (tone_of)."""
    import numpy as np

    from sasi_online.semantics.captioner import Captioner
    from sasi_online.semantics.tiny_captions import TONES, tone_of

    captions = Captioner(Path(zoo) / "blip2", sep=sep, batch_size=50).caption(_pil(images))
    garment = np.mean([garment_of(c) == int(y) for c, y in zip(captions, labels)])
    shade = np.mean([shade_of(c) == TONES.index(tone_of(im)) for c, im in zip(captions, images)])
    return {"garment": float(garment), "shade": float(shade), "captions": captions}


def rewrite_scores(zoo, captions) -> dict:
    """Share of rewrites naming the caption's garment, and of captions really rewritten
    (neither a fallback to the caption nor a copy of it)."""
    import numpy as np

    from sasi_online.semantics.rewriter import Rewriter

    rw = Rewriter(Path(zoo) / "llama", batch_size=25)
    out = rw.rewrite(captions, list(range(len(captions))))
    keep = np.mean([garment_of(r) is not None and garment_of(r) == garment_of(c) for c, r in zip(captions, out)])
    differ = np.mean([r.strip() != c.strip() for c, r in zip(captions, out)])
    return {"keep": float(keep), "differ": float(differ), "fallback_rate": rw.stats.fallback_rate,
            "rewrites": out}


def mask_iou(zoo, images, threshold: int = 40) -> dict:
    """Mean garment-region IoU of the segmenter's maps (anything but the background class)
    against foreground masks drawn at `threshold` (the segmenter learned at another one)."""
    import numpy as np

    from sasi_online.visual.palette import ADE20K_CLASSES
    from sasi_online.visual.segmenter import Segmenter

    from .segmenter import BACKGROUND

    maps = Segmenter(Path(zoo) / "upernet", batch_size=50).segment(_pil(images))
    bg = ADE20K_CLASSES.index(BACKGROUND)
    ious = []
    for m, im in zip(maps, images):
        pred, truth = m != bg, np.asarray(im) > threshold
        union = (pred | truth).sum()
        ious.append((pred & truth).sum() / union if union else 1.0)
    return {"iou": float(np.mean(ious)), "maps": maps}


def auroc(pos, neg) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U)."""
    import numpy as np

    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    values, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # the average 1-based rank of each tie group
    rank_sum = mid_rank[inverse[:len(pos)]].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def clip_auroc(zoo, images, others, seed: int = 0) -> float:
    """AUROC of CLIP image-image cosine: each image against its own counterpart in `others`
    (e.g. its SASI) versus every other image's counterpart."""
    import numpy as np

    from sasi_online.eval.similarity import ClipSimilarity

    sim = ClipSimilarity(Path(zoo) / "clip", batch_size=100)
    a, b = sim.embed(_pil(images)).numpy(), sim.embed(_pil(others)).numpy()
    cos = a @ b.T
    mask = ~np.eye(len(a), dtype=bool)
    return auroc(np.diag(cos), cos[mask])
