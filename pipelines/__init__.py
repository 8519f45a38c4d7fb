"""The shared Stable Diffusion pipeline wrapper: the only package that knows diffusers' internals."""

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
