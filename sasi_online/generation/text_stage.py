"""Where a SASI's text comes from: the captioner + rewriter, or the class name.

`model` (the paper): BLIP-2 describes the image (caption z'), the LLM rewrites it (z*).
`class_name`: "a photo of a <class>" for both, no language models at all — a quick
baseline that needs only the diffusion models.
"""
from __future__ import annotations

from typing import Any, Sequence

from sasi_online.errors import UserInputError

TEXT_SOURCES = ("model", "class_name")


class ClassNameText:
    """Captions from labels: no captioner, no rewriter."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    def captions(self, samples: Sequence[Any]) -> list[str]:
        out = []
        for s in samples:
            name = self.classes[s.label] if 0 <= s.label < len(self.classes) else "object"
            out.append(f"a photo of a {name.lower()}")
        return out

    def rewrites(self, captions: Sequence[str], samples: Sequence[Any], rewrite_indices: Sequence[int]) -> list[str]:
        return list(captions)

    def model_folders(self) -> list[str]:
        return []  # no language models: nothing to name in a store header


class ModelText:
    """BLIP-2 captions (cached per image in `cache_path`, so reruns skip them) and LLM rewrites."""

    def __init__(self, cfg: Any, device: Any = None, cache_path: Any = None):
        from sasi_online.semantics.captioner import Captioner
        from sasi_online.semantics.rewriter import Rewriter

        # semantics.device / semantics.dtype; device `auto` = `device` (the generator's) when given
        self.cfg = cfg
        self.captioner = Captioner.from_config(cfg, device=device, cache_path=cache_path)
        self.rewriter = Rewriter.from_config(cfg, device=device)

    def model_folders(self) -> list[str]:
        """ModelsConfig fields of the language models in use (store headers name them)."""
        return text_model_folders(self.cfg)

    def captions(self, samples: Sequence[Any]) -> list[str]:
        # variants of one image sit side by side in a batch: caption each image once
        unique = {s.index: s for s in samples}
        texts = self.captioner.caption([s.image for s in unique.values()], image_ids=list(unique))
        by_index = dict(zip(unique, texts))
        return [by_index[s.index] for s in samples]

    def rewrites(self, captions: Sequence[str], samples: Sequence[Any], rewrite_indices: Sequence[int]) -> list[str]:
        out: list = [None] * len(captions)
        for r in sorted(set(rewrite_indices)):  # the rewriter takes one variant number per call
            pos = [j for j, ri in enumerate(rewrite_indices) if ri == r]
            texts = self.rewriter.rewrite([captions[j] for j in pos], [samples[j].index for j in pos], variant=r)
            for j, t in zip(pos, texts):
                out[j] = t
        return out


def text_model_folders(cfg: Any) -> list[str]:
    """ModelsConfig fields of the language models `generation.text` uses."""
    if cfg.generation.text != "model":
        return []
    return ["captioner"] + ([] if cfg.semantics.rewrite_mode == "none" else ["rewriter"])


def make_text_source(cfg: Any, dataset: Any, device: Any = None, cache_path: Any = None) -> Any:
    choice = cfg.generation.text
    if choice == "class_name":
        return ClassNameText(getattr(dataset, "classes", []))
    if choice == "model":
        return ModelText(cfg, device, cache_path)
    raise UserInputError(f"generation.text='{choice}' is not known; use one of {', '.join(TEXT_SOURCES)}")
