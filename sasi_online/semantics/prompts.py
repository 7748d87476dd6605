"""Semantic Extraction Prompts (SEP): the text that tells the captioner what to describe.

The paper's three SEPs (Table 9) are built in under short names; any other string is
accepted as a SEP too (it is passed to the captioner verbatim).
"""
from __future__ import annotations

from sasi_online.errors import UserInputError

SEP_QUESTION = "Question: What does this picture describe? Answer:"
SEP_DETAIL = "Please describe the picture in detail."  # the paper's default
SEP_OBJECTS = "What objects are included in this picture?"

SEPS = {
    "question": SEP_QUESTION,
    "detail": SEP_DETAIL,
    "objects": SEP_OBJECTS,
}
DEFAULT_SEP = SEP_DETAIL


def resolve_sep(sep: str | None) -> str:
    """A SEP name ('question', 'detail', 'objects') or any literal prompt → the prompt text."""
    if sep is None:
        return DEFAULT_SEP
    if not isinstance(sep, str) or not sep.strip():
        raise UserInputError(
            f"semantic extraction prompt {sep!r} is empty: give one of {', '.join(SEPS)} "
            f"or the literal prompt text (semantics.sep=...)"
        )
    return SEPS.get(sep.strip().lower(), sep.strip())
