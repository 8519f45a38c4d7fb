"""A pipeline's modules by qualified name, and the layers erasure methods select by explicit name patterns.

A qualified name is ``"<component>.<path>"``, e.g. ``"unet.mid_block.attentions.0"``. Layers are picked by fnmatch
patterns over module names, never by shape tests, so the same patterns pick the same roles in SD 1.x, 2.x and SDXL;
how many matched is logged and a pattern set that matches nothing is an error.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

__all__ = [
    "CROSS_ATTENTION_PATTERNS",
    "LORA_TARGETS",
    "CrossAttentionLayer",
    "Pipeline",
    "components",
    "cross_attention_layers",
    "is_sdxl",
    "linear_module_names",
    "module",
]

logger = logging.getLogger(__name__)

#: The pipelines the wrapper serves: SD 1.x/2.x (the micro model is one) and SDXL.
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline

#: Cross-attention in diffusers' transformer blocks is always ``attn2``; its key/value projections read the text.
CROSS_ATTENTION_PATTERNS: tuple[str, ...] = ("*attn2.to_k", "*attn2.to_v")

#: LoRA target sets by name: fnmatch patterns over the UNet's Linear module names (diffusers' transformer blocks:
#: ``attn1`` self-attention, ``attn2`` cross-attention, ``ff`` the GEGLU feed-forward, ``proj_in``/``proj_out`` the
#: block's input and output projections, which are Linear only where ``use_linear_projection`` is set: SD 2.x, SDXL).
#: ``noxattn`` is every transformer-block Linear but cross-attention: ESD-u's "everything but cross-attention" as far
#: as a LoRA on Linear layers reaches (the official ESD-u also fine-tunes convolutions, resnets and time embeddings).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "xattn": ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v", "*attn2.to_out.0"),
    "kv": CROSS_ATTENTION_PATTERNS,
    "noxattn": (
        "*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0", "*ff.net.0.proj", "*ff.net.2",
        "*proj_in", "*proj_out",
    ),
}  # fmt: skip
#: every Linear of the transformer blocks (SPM's "Transformer2DModel" modules); Conv2d projections are not reached
LORA_TARGETS["transformer"] = LORA_TARGETS["xattn"] + LORA_TARGETS["noxattn"]


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One key or value projection of a cross-attention block: ``y = W c`` for a text embedding ``c``."""

    name: str  # module name inside the UNet, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    module: torch.nn.Linear

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features


def is_sdxl(pipe: Pipeline) -> bool:
    """Whether the pipeline is SDXL (two text encoders, pooled embeddings and size conditions)."""
    return isinstance(pipe, StableDiffusionXLPipeline)


def components(pipe: Pipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's trainable modules by component name ("unet", "text_encoder", ...)."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def module(pipe: Pipeline, name: str) -> torch.nn.Module:
    """A module by qualified name, ``"<component>.<path>"``; ``KeyError`` in one line when there is none."""
    component, _, path = name.partition(".")
    # the pipeline's config names its components; ``pipe.components`` would inspect signatures at every lookup
    root = getattr(pipe, component, None) if component in pipe.config and not component.startswith("_") else None
    if not isinstance(root, torch.nn.Module):
        raise KeyError(f"no pipeline component {component!r} (have {sorted(components(pipe))})")
    try:
        return root.get_submodule(path) if path else root
    except AttributeError as err:
        raise KeyError(f"no module {name!r} in the pipeline") from err


def _matching_linears(unet: torch.nn.Module, patterns: Sequence[str]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, layer)
        for name, layer in unet.named_modules()
        if isinstance(layer, torch.nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def cross_attention_layers(
    unet: torch.nn.Module, patterns: Sequence[str] = CROSS_ATTENTION_PATTERNS
) -> list[CrossAttentionLayer]:
    """UNet cross-attention projections whose module names match any of ``patterns`` (fnmatch syntax).

    Raises ``ValueError`` when nothing matches, since an edit that touches no layer would silently do nothing.
    """
    layers = [CrossAttentionLayer(name, layer) for name, layer in _matching_linears(unet, patterns)]
    if not layers:
        raise ValueError(f"no UNet module matches the cross-attention patterns {list(patterns)}")
    logger.info("%d cross-attention projections match %s", len(layers), list(patterns))
    return layers


def linear_module_names(unet: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """UNet Linear module names (unqualified) matching any fnmatch pattern, sorted; ``ValueError`` for none (the
    modules a LoRA adapts)."""
    patterns = list(patterns)
    names = sorted(name for name, _ in _matching_linears(unet, patterns))
    if not names:
        raise ValueError(f"no UNet Linear module matches the LoRA target patterns {patterns}")
    logger.info("%d UNet Linear modules match the LoRA targets %s", len(names), patterns)
    return names
