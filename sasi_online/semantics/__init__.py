"""Semantic extraction (captioner + SEPs) and semantic augmentation (rewriter + SRP pool)."""
from sasi_online.semantics.prompts import DEFAULT_SEP, SEPS, resolve_sep  # noqa: F401
