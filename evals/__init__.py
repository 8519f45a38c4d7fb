"""Evaluations: the CLIP scorer every audit goes through, probes, prompt suites, metrics and audits; the micro world
(its generator, micro CLIP, judge and their training) is the subpackage ``evals.microworld``."""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first access, so ``import evals.microworld.world`` does not pull in transformers and open_clip.
# Maps name -> submodule; add entries here rather than defining a second module ``__getattr__``.
_LAZY_EXPORTS: dict[str, str] = {
    "ClipScorer": "scorer",
    "DEFAULT_TEMPLATES": "scorer",
    "TEMPLATES": "scorer",
    "ZeroShotResult": "scorer",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
