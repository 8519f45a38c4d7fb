"""The shared Stable Diffusion pipeline wrapper: the only package that knows diffusers' internals."""

from .tokenizer import clean_prompt, offline_clip_tokenizer

__all__ = ["clean_prompt", "offline_clip_tokenizer"]
