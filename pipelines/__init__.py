"""The shared Stable Diffusion pipeline wrapper: the only package that knows diffusers' internals.

The public names load on first use (PEP 562), so ``pipelines.checks`` and ``pipelines.files`` serve input checks
before torch and diffusers are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "resolve_device": "runtime",
    "set_library_verbosity": "runtime",
    "clean_prompt": "tokenizer",
    "offline_clip_tokenizer": "tokenizer",
    "CROSS_ATTENTION_PATTERNS": "wrapper",
    "DEFAULT_GUIDANCE": "wrapper",
    "DEFAULT_STEPS": "wrapper",
    "HOOK_POINT_PATTERNS": "wrapper",
    "LORA_TARGETS": "wrapper",
    "CrossAttentionLayer": "wrapper",
    "HookHandles": "wrapper",
    "LoraAdapters": "wrapper",
    "ModelNotFoundError": "wrapper",
    "PipelineWrapper": "wrapper",
    "PromptEncoding": "wrapper",
    "check_model_reference": "wrapper",
    "load_pipeline": "wrapper",
    "micro_model_path": "wrapper",
    "world_file": "wrapper",
    "wrap_pipeline": "wrapper",
}

__all__ = [
    "CROSS_ATTENTION_PATTERNS",
    "CrossAttentionLayer",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "HOOK_POINT_PATTERNS",
    "HookHandles",
    "LORA_TARGETS",
    "LoraAdapters",
    "ModelNotFoundError",
    "PipelineWrapper",
    "PromptEncoding",
    "check_model_reference",
    "clean_prompt",
    "load_pipeline",
    "micro_model_path",
    "offline_clip_tokenizer",
    "resolve_device",
    "set_library_verbosity",
    "world_file",
    "wrap_pipeline",
]

if TYPE_CHECKING:
    from .runtime import resolve_device, set_library_verbosity
    from .tokenizer import clean_prompt, offline_clip_tokenizer
    from .wrapper import (
        CROSS_ATTENTION_PATTERNS,
        DEFAULT_GUIDANCE,
        DEFAULT_STEPS,
        HOOK_POINT_PATTERNS,
        LORA_TARGETS,
        CrossAttentionLayer,
        HookHandles,
        LoraAdapters,
        ModelNotFoundError,
        PipelineWrapper,
        PromptEncoding,
        check_model_reference,
        load_pipeline,
        micro_model_path,
        world_file,
        wrap_pipeline,
    )

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
