"""A pipeline's modules by qualified name, and the layers erasure methods select by explicit name patterns.

A qualified name is ``"<component>.<path>"``, e.g. ``"unet.mid_block.attentions.0"``. Layers are picked by fnmatch
patterns over module names, never by shape tests, so the same patterns pick the same roles in SD 1.x, 2.x and SDXL;
how many matched is logged and a pattern set that matches nothing is an error.

The denoiser is the UNet of SD 1.x/2.x and SDXL and the transformer (MMDiT) of SD3 and Flux: component ``"unet"`` or
``"transformer"``. In a transformer the text enters through two projections that read nothing else: the token stream
(``context_embedder``: T5 for Flux, CLIP and T5 joined for SD3) and the pooled vector
(``time_text_embed.text_embedder.linear_1``: CLIP pooled). They are what a closed-form edit changes there, as the
reference ``uce_flux_edit.py`` chooses (every joint-attention block reads the text only through them).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .architectures import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "CROSS_ATTENTION_PATTERNS",
    "LORA_TARGETS",
    "TEXT_PROJECTION_PATTERNS",
    "CrossAttentionLayer",
    "Pipeline",
    "architecture",
    "closed_form_patterns",
    "components",
    "cross_attention_layers",
    "denoiser",
    "denoiser_name",
    "is_sdxl",
    "is_transformer",
    "linear_module_names",
    "module",
]

logger = logging.getLogger(__name__)

#: The pipelines the wrapper serves: SD 1.x/2.x (the micro model is one), SDXL, SD3 and Flux.
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | FluxPipeline


#: Cross-attention in diffusers' transformer blocks is always ``attn2``; its key/value projections read the text.
CROSS_ATTENTION_PATTERNS: tuple[str, ...] = ("*attn2.to_k", "*attn2.to_v")

#: SD3/Flux: the transformer's text-side input projections (token stream, pooled vector), ``uce_flux_edit.py``'s.
TEXT_PROJECTION_PATTERNS: tuple[str, ...] = ("context_embedder", "time_text_embed.text_embedder.linear_1")
#: the module among them that reads the pooled text vector rather than the token embeddings
_POOLED_PROJECTION = "time_text_embed.text_embedder.linear_1"

#: LoRA target sets by name: fnmatch patterns over the denoiser's Linear module names. In a UNet (diffusers'
#: transformer blocks): ``attn1`` self-attention, ``attn2`` cross-attention, ``ff`` the GEGLU feed-forward,
#: ``proj_in``/``proj_out`` the block's input and output projections, which are Linear only where
#: ``use_linear_projection`` is set (SD 2.x, SDXL). ``noxattn`` is every transformer-block Linear but cross-attention:
#: ESD-u's "everything but cross-attention" as far as a LoRA on Linear layers reaches (the official ESD-u also
#: fine-tunes convolutions, resnets and time embeddings). In an SD3/Flux transformer the joint attention ``attn`` has
#: image-side (``to_q``/``to_k``/``to_v``/``to_out.0``) and text-side (``add_q_proj``/``add_k_proj``/``add_v_proj``/
#: ``to_add_out``) projections: the text side plays cross-attention's part (EraseAnything trains ``add_q_proj`` and
#: ``add_k_proj``), the image side and feed-forwards ``noxattn``'s. Each set lists both kinds of names; a UNet has no
#: ``attn.add_k_proj`` and a transformer no ``attn2`` (SD3.5's dual-attention ``attn2`` excepted, a self-attention).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "xattn": (
        "*attn2.to_q", "*attn2.to_k", "*attn2.to_v", "*attn2.to_out.0",
        "*attn.add_q_proj", "*attn.add_k_proj", "*attn.add_v_proj", "*attn.to_add_out",
    ),
    "kv": (*CROSS_ATTENTION_PATTERNS, "*attn.add_k_proj", "*attn.add_v_proj"),
    "noxattn": (
        "*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0", "*ff.net.0.proj", "*ff.net.2",
        "*proj_in", "*proj_out", "*attn.to_q", "*attn.to_k", "*attn.to_v", "*attn.to_out.0",
    ),
}  # fmt: skip
#: every Linear of the transformer blocks (SPM's "Transformer2DModel" modules); Conv2d projections are not reached
LORA_TARGETS["transformer"] = LORA_TARGETS["xattn"] + LORA_TARGETS["noxattn"]


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One Linear that reads text embeddings: a cross-attention key or value projection ``y = W c`` (UNet), or a
    transformer's text-side input projection ``y = W c + b`` (SD3/Flux)."""

    name: str  # module name inside the denoiser, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    module: torch.nn.Linear
    #: what it reads: ``"tokens"`` (per-token text embeddings) or ``"pooled"`` (the pooled text vector)
    reads: str = "tokens"

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features


def is_sdxl(pipe: Pipeline) -> bool:
    """Whether the pipeline is SDXL (two text encoders, pooled embeddings and size conditions)."""
    return isinstance(pipe, StableDiffusionXLPipeline)


def architecture(pipe: Pipeline) -> str:
    """The pipeline's architecture, one of :data:`ARCHITECTURES`."""
    if isinstance(pipe, FluxPipeline):
        return "flux"
    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    return "sdxl" if is_sdxl(pipe) else "sd"


def is_transformer(pipe: Pipeline) -> bool:
    """Whether the denoiser is an MMDiT transformer (SD3, Flux) rather than a UNet."""
    return architecture(pipe) in ("sd3", "flux")


def denoiser_name(pipe: Pipeline) -> str:
    """The denoiser's component name: ``"unet"`` or ``"transformer"``."""
    return "transformer" if is_transformer(pipe) else "unet"


def denoiser(pipe: Pipeline) -> torch.nn.Module:
    """The model that predicts noise (UNet) or velocity (SD3/Flux transformer)."""
    return getattr(pipe, denoiser_name(pipe))


def closed_form_patterns(pipe: Pipeline) -> tuple[str, ...]:
    """The layers a closed-form edit changes by default: cross-attention keys and values in a UNet, the text-side
    input projections in a transformer."""
    return TEXT_PROJECTION_PATTERNS if is_transformer(pipe) else CROSS_ATTENTION_PATTERNS


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


def _label(model: torch.nn.Module) -> str:
    return "transformer" if "Transformer" in type(model).__name__ else "UNet"


def _matching_linears(model: torch.nn.Module, patterns: Sequence[str]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, torch.nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def cross_attention_layers(
    model: torch.nn.Module, patterns: Sequence[str] = CROSS_ATTENTION_PATTERNS
) -> list[CrossAttentionLayer]:
    """The denoiser's text-reading Linears whose module names match any of ``patterns`` (fnmatch syntax), each with
    what it reads (the pooled projection of SD3/Flux reads the pooled vector, every other the token embeddings).

    Raises ``ValueError`` when nothing matches, since an edit that touches no layer would silently do nothing.
    """
    layers = [
        CrossAttentionLayer(name, layer, "pooled" if name == _POOLED_PROJECTION else "tokens")
        for name, layer in _matching_linears(model, patterns)
    ]
    if not layers:
        raise ValueError(f"no {_label(model)} module matches the cross-attention patterns {list(patterns)}")
    logger.info("%d text-reading projections match %s", len(layers), list(patterns))
    return layers


def linear_module_names(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """The denoiser's Linear module names (unqualified) matching any fnmatch pattern, sorted; ``ValueError`` for none
    (the modules a LoRA adapts)."""
    patterns = list(patterns)
    names = sorted(name for name, _ in _matching_linears(model, patterns))
    if not names:
        raise ValueError(f"no {_label(model)} Linear module matches the LoRA target patterns {patterns}")
    logger.info("%d %s Linear modules match the LoRA targets %s", len(names), _label(model), patterns)
    return names
