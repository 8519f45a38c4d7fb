"""The sampler's default settings for every model, importable without torch (the scripts' argument parsers print
them in their help before any model loads).

Generation, audits, erasure checks and the micro model's evaluation all start from these, so "default settings" means
one thing. The guidance is diffusers' own default, so a plain ``pipe(prompt)`` samples as the toolkit does; larger
scales were tried on the micro model and gave the scorer nothing beyond sampling spread (the micro model's card has
the figures).
"""

from __future__ import annotations

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_STEPS"]

#: scheduler steps
DEFAULT_STEPS: int = 20
#: classifier-free guidance scale
DEFAULT_GUIDANCE: float = 7.5
