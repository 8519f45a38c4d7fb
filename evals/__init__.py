"""Evaluations: the micro world, the micro CLIP and the CLIP scorer every audit goes through."""

from __future__ import annotations

import importlib
from typing import Any

# Public names resolved on first access, so ``import evals.world`` does not pull in transformers and open_clip.
# Maps name -> submodule; add entries here rather than defining a second module ``__getattr__``.
_LAZY_EXPORTS: dict[str, str] = {
    "ClipScorer": "scorer",
    "DEFAULT_TEMPLATES": "scorer",
    "TEMPLATES": "scorer",
    "ZeroShotResult": "scorer",
    "micro_clip_path": "micro_clip",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
