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
    "HubUnreachableError": "hub",
    "offline_clip_tokenizer": "tokenizer",
    "ARCHITECTURES": "architectures",
    "ARCHITECTURE_NAMES": "architectures",
    "model_architecture": "architectures",
    "CROSS_ATTENTION_PATTERNS": "modules",
    "DEFAULT_GUIDANCE": "defaults",
    "DEFAULT_STEPS": "defaults",
    "HOOK_POINT_PATTERNS": "hooks",
    "LORA_TARGETS": "modules",
    "TEXT_PROJECTION_PATTERNS": "modules",
    "TINY_NAMES": "loading",
    "CrossAttentionLayer": "modules",
    "HookHandles": "hooks",
    "LoraAdapters": "weights",
    "TEXT_ENCODER_PREFIX": "weights",
    "TEXT_ENCODER_COMPONENTS": "weights",
    "text_encoder_component": "weights",
    "ModelNotFoundError": "loading",
    "PipelineWrapper": "wrapper",
    "PromptEncoding": "text",
    "check_model_reference": "loading",
    "load_pipeline": "wrapper",
    "micro_model_path": "loading",
    "world_file": "loading",
    "wrap_pipeline": "wrapper",
}

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NAMES",
    "CROSS_ATTENTION_PATTERNS",
    "CrossAttentionLayer",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "HOOK_POINT_PATTERNS",
    "HookHandles",
    "HubUnreachableError",
    "LORA_TARGETS",
    "LoraAdapters",
    "ModelNotFoundError",
    "PipelineWrapper",
    "PromptEncoding",
    "TEXT_ENCODER_COMPONENTS",
    "TEXT_ENCODER_PREFIX",
    "TEXT_PROJECTION_PATTERNS",
    "TINY_NAMES",
    "check_model_reference",
    "clean_prompt",
    "load_pipeline",
    "micro_model_path",
    "model_architecture",
    "offline_clip_tokenizer",
    "resolve_device",
    "set_library_verbosity",
    "text_encoder_component",
    "world_file",
    "wrap_pipeline",
]

if TYPE_CHECKING:
    from .architectures import ARCHITECTURE_NAMES, ARCHITECTURES, model_architecture
    from .defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from .hooks import HOOK_POINT_PATTERNS, HookHandles
    from .hub import HubUnreachableError
    from .loading import TINY_NAMES, ModelNotFoundError, check_model_reference, micro_model_path, world_file
    from .modules import (
        CROSS_ATTENTION_PATTERNS,
        LORA_TARGETS,
        TEXT_PROJECTION_PATTERNS,
        CrossAttentionLayer,
    )
    from .runtime import resolve_device, set_library_verbosity
    from .text import PromptEncoding
    from .tokenizer import clean_prompt, offline_clip_tokenizer
    from .weights import TEXT_ENCODER_COMPONENTS, TEXT_ENCODER_PREFIX, LoraAdapters, text_encoder_component
    from .wrapper import PipelineWrapper, load_pipeline, wrap_pipeline

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
