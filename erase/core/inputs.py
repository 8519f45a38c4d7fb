"""User input checked without torch, so the scripts refuse bad input before a model loads: concept strings as
erasure reads them, and ``KEY=VALUE`` overrides of a method's config.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, fields

from pipelines.checks import (
    check_config_fields,
    check_number,
    check_number_fields,
    check_number_values,
    check_option_minimums,
    check_text_fields,
    error_line,
)
from pipelines.tokenizer import concept_text

__all__ = [
    "CONCEPT_TYPES",
    "DEFAULT_CONCEPT_TYPE",
    "PRESERVE_SETS",
    "ConceptType",
    "check_concept_text",
    "concept_key",
    "check_config_fields",
    "check_number",
    "check_number_fields",
    "check_number_values",
    "check_option_minimums",
    "check_text_fields",
    "error_line",
    "check_templates",
    "config_from_overrides",
    "parse_config_overrides",
]


def concept_key(text: str) -> str:
    """The one reading of a concept (``pipelines.tokenizer.concept_text``): what is tokenised, compared, looked up
    and named on disk ("Van  Gogh", "van gogh" and its fullwidth spelling agree)."""
    return concept_text(text)


def check_concept_text(text: object, what: str) -> str:
    """``text``'s reading (``concept_key``), or ``ValueError`` when it is not a string, or is empty, invisible, holds
    control characters or reads as nothing (``"&nbsp;"``)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise ValueError(f"{what} {text!r} contains a control character")
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in text):
        raise ValueError(f"{what} {text!r} has no visible characters")
    reading = concept_key(text)
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in reading):
        raise ValueError(f"{what} {text!r} reads as empty text to the tokenizer")
    return reading


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Prompt templates as a tuple; ``ValueError`` unless there is at least one and each holds one ``{}``."""
    templates = tuple(templates)
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError(f"templates must each hold one '{{}}', got {templates!r}")
    return templates


#: Python's spellings of the JSON constants, which users type as often (``--set facilitated_transport=False``)
_PYTHON_CONSTANTS: dict[str, object] = {"True": True, "False": False, "None": None}


def parse_config_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as a dict, VALUE read as JSON where it parses (lists become tuples), ``True`` / ``False`` /
    ``None`` as Python reads them, else as a string."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            value = _PYTHON_CONSTANTS[raw.strip()] if raw.strip() in _PYTHON_CONSTANTS else json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key.strip()] = tuple(value) if isinstance(value, list) else value
    return overrides


def config_from_overrides(config_class: type, overrides: dict[str, object], owner: str) -> object:
    """``config_class(**overrides)`` with every number, switch and text checked (``check_config_fields``; texts
    before the class's own checks read them); a key it has no field for is a ``ValueError`` naming ``owner``'s
    settings."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{owner} has no setting {unknown[0]!r}; it has {', '.join(sorted(known))}")
    check_text_fields(config_class, overrides)
    config = config_class(**overrides)
    check_config_fields(config)
    return config


@dataclass(frozen=True)
class ConceptType:
    """What the reference UCE script does by ``--concept_type``: the default guide, and the templates its
    ``--expand_prompts`` adds around each concept (and around its guide)."""

    guide: str
    expand_templates: tuple[str, ...]


#: The reference's concept types (``trainscripts/uce_sd_erase.py``); "other" is ours: no guide, nothing to expand.
CONCEPT_TYPES: dict[str, ConceptType] = {
    "art": ConceptType("art", ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")),
    "object": ConceptType("", ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")),
    "other": ConceptType("", ()),
}
DEFAULT_CONCEPT_TYPE = "art"
PRESERVE_SETS = ("world", "generic")
