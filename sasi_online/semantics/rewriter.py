"""Semantic augmentation: a causal LM rewrites each caption z' into z* from an SRP.

Plain few-shot completion (no chat template) over any local `AutoModelForCausalLM`
folder (the tiny zoo's LLaMA or a real one), optionally 8-bit through bitsandbytes.
Several rewrites per image are "variants": each variant draws its own SRP examples
(and, when sampling, its own random stream), so (image, variant) is reproducible no
matter how images are batched. Unusable outputs fall back to the caption and are
counted in `RewriteStats`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from sasi_online.errors import UserInputError
from sasi_online.semantics import srp_pool
from sasi_online.utils import derive_seed

NEUTRAL_PROMPT = "a photo"  # z* for an image whose caption came out empty


@dataclass
class RewriteStats:
    rewritten: int = 0
    fallback_unusable: int = 0  # output empty, a copy of the prompt or of an example
    fallback_empty_caption: int = 0  # nothing to rewrite: z* = NEUTRAL_PROMPT

    @property
    def total(self) -> int:
        return self.rewritten + self.fallback_unusable + self.fallback_empty_caption

    @property
    def fallback_rate(self) -> float:
        return (self.fallback_unusable + self.fallback_empty_caption) / max(1, self.total)

    def as_dict(self) -> dict:
        return {**asdict(self), "fallback_rate": self.fallback_rate}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def clean_rewrite(generated: str, caption: str, examples: Sequence[tuple[str, str]] = (),
                  prompt: str = "") -> Optional[str]:
    """The usable rewrite in `generated`, or None.

    Keeps the first line and, within it, the first sentence; drops a next example the
    model may have started ('... → ...'). Refuses text without letters and copies: the
    caption itself, an in-prompt example (either side), or any piece of the prompt.
    """
    line = generated.strip().split("\n", 1)[0]
    line = line.split(srp_pool.ARROW, 1)[0]
    m = re.match(r"(.+?[.!?])(\s|$)", line)
    text = (m.group(1) if m else line).strip().strip("\"'").strip()
    if not re.search(r"[A-Za-z]", text):
        return None
    norm = _norm(text)
    if not norm or norm == _norm(caption):
        return None
    if any(norm in (_norm(c), _norm(r)) for c, r in examples):
        return None
    if prompt and norm in _norm(prompt):
        return None
    return text


class Rewriter:
    """z' → z* with an SRP of `num_examples` pool examples (modes: rewrite, expansion, none)."""

    def __init__(self, model_dir: str | Path | None, mode: str = "rewrite", num_examples: int = 5,
                 load_in_8bit: bool = False, device: Any = "cpu", batch_size: int = 16,
                 max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 0.7,
                 top_p: float = 0.9, seed: int = 0, dtype: Any = None, variant: Optional[str] = None):
        self.mode = srp_pool.check_mode(mode)
        if batch_size < 1 or max_new_tokens < 1:
            raise UserInputError(
                f"rewriter batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1 "
                f"(semantics.batch_size, semantics.max_new_tokens_rewrite)")
        if mode != "none" and not 1 <= num_examples <= len(srp_pool.POOL):
            raise UserInputError(
                f"semantics.num_examples={num_examples} must be between 1 and {len(srp_pool.POOL)}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.device = device
        self.stats = RewriteStats()
        self.tokenizer = self.model = None
        if mode != "none":  # rewriter off: no model needed
            if model_dir is None:
                raise UserInputError("the rewriter needs a model folder (models.rewriter) unless "
                                     "semantics.rewrite_mode=none")
            from sasi_online.zoo import load_rewriter

            self.tokenizer, self.model = load_rewriter(model_dir, device=device, load_in_8bit=load_in_8bit,
                                                       dtype=dtype, variant=variant)

    @classmethod
    def from_config(cls, cfg: Any, device: Any = None) -> "Rewriter":
        """The rewriter `cfg` asks for: models.rewriter / models.variant, semantics.* (device
        `auto` = `device` when given, e.g. the generator's)."""
        from sasi_online.semantics.runtime import device_and_dtype

        sc = cfg.semantics
        dev, dtype = device_and_dtype(sc, "semantics", device)
        return cls(cfg.models.path("rewriter") if sc.rewrite_mode != "none" else None, mode=sc.rewrite_mode,
                   num_examples=sc.num_examples, load_in_8bit=sc.load_in_8bit, device=dev,
                   batch_size=sc.batch_size, max_new_tokens=sc.max_new_tokens_rewrite, do_sample=sc.do_sample,
                   temperature=sc.temperature, top_p=sc.top_p, seed=sc.seed, dtype=dtype,
                   variant=getattr(cfg.models, "variant", None))

    # ------------------------------------------------------------------ generation
    def _stop_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id]
        nl = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        return [i for i in ids + nl[-1:] if i is not None]

    def _generate(self, prompts: list[str], seeds: list[int]) -> list[str]:
        import torch

        kw = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self._stop_ids(),
                  pad_token_id=self.tokenizer.pad_token_id)
        if not self.do_sample:
            return self._run(prompts, dict(kw, do_sample=False, num_beams=1))
        out = []
        for prompt, seed in zip(prompts, seeds):
            # one item at a time under its own seed: a sample must not depend on its batch
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out += self._run([prompt], dict(kw, do_sample=True, temperature=self.temperature,
                                                top_p=self.top_p))
        return out

    def _run(self, prompts: list[str], kw: dict) -> list[str]:
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**enc, **kw)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    # ------------------------------------------------------------------ public
    def rewrite(self, captions: Sequence[str], image_ids: Sequence[Any], variant: int = 0,
                progress: bool = False) -> list[str]:
        """One z* per caption for semantic-augmentation variant `variant`."""
        if len(captions) != len(image_ids):
            raise UserInputError(f"got {len(captions)} captions but {len(image_ids)} image ids")
        result: list[Optional[str]] = [None] * len(captions)
        jobs = []
        for i, cap in enumerate(captions):
            cap = (cap or "").strip()
            if not cap:
                result[i] = NEUTRAL_PROMPT
                self.stats.fallback_empty_caption += 1
            elif self.mode == "none":
                result[i] = cap
                self.stats.rewritten += 1  # z* = z' by choice, not a fallback
            else:
                srp = srp_pool.build_srp(cap, image_ids[i], variant, self.mode, self.num_examples,
                                         self.seed)
                jobs.append((i, cap, srp))
        from tqdm.auto import tqdm

        starts = range(0, len(jobs), self.batch_size)
        for s in tqdm(starts, desc="rewrites", unit="batch", disable=not progress or None):
            chunk = jobs[s:s + self.batch_size]
            seeds = [derive_seed("rewrite", self.seed, image_ids[i], variant) for i, _, _ in chunk]
            for (i, cap, srp), gen in zip(chunk, self._generate([j[2].text for j in chunk], seeds)):
                text = clean_rewrite(gen, cap, srp.examples, srp.text)
                if text is None:
                    result[i] = cap
                    self.stats.fallback_unusable += 1
                else:
                    result[i] = text
                    self.stats.rewritten += 1
        return [r for r in result]  # every slot is filled above

    def rewrite_variants(self, captions: Sequence[str], image_ids: Sequence[Any], variants: int,
                         progress: bool = False) -> list[list[str]]:
        """`variants` rewrites per caption: out[i][v] is variant v of caption i."""
        if variants < 1:
            raise UserInputError(f"semantics.variants={variants} must be >= 1")
        per_variant = [self.rewrite(captions, image_ids, v, progress) for v in range(variants)]
        return [list(vs) for vs in zip(*per_variant)]
