"""Concept strings as erasure reads them: checked and compared without torch, so the scripts refuse bad input before
a model loads.
"""

from __future__ import annotations

import unicodedata

__all__ = ["check_concept_text", "concept_key"]


def concept_key(text: str) -> str:
    """What a concept is up to case and spacing, as CLIP's tokenizer reads it ("Van  Gogh" and "van gogh" agree)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def check_concept_text(text: object, what: str) -> str:
    """``text`` stripped, or ``ValueError`` when it is not a string, empty, invisible or holds control characters."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise ValueError(f"{what} {text!r} contains a control character")
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in text):
        raise ValueError(f"{what} {text!r} has no visible characters")
    return text
