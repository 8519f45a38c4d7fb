"""Unified Concept Editing (Gandikota et al., 2024): a closed-form edit of cross-attention keys and values.

Every key/value projection W of the UNet's cross-attention reads text embeddings c. UCE rewrites W so that the
embeddings of an erased concept c_i are sent where a guide concept's embeddings go, v*_i = W c_guide_i, while
preserved concepts c_j keep W c_j and a ridge term keeps W close to itself. One linear solve, no training.

Defaults are the reference implementation's (rohitgandikota/unified-concept-editing, ``trainscripts/uce_sd_erase.py``):
one embedding per prompt, the prompt's last token (BOS for the empty prompt; no EOS, no padding), erase and
preserve scales 1, lambda 0.5, the bare concept as the only template. Where we differ: the solve is float64 (the
reference inverts in float32), and other token choices and templates are options.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import CROSS_ATTENTION_PATTERNS, PipelineWrapper

from ..core.inputs import check_number_fields
from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method

__all__ = ["UCEConfig", "concept_embeddings", "edit_from_update", "erase_uce", "uce_update"]

logger = logging.getLogger(__name__)

TOKEN_POSITIONS = ("last_token", "last", "from_last", "from_first")


@dataclass
class UCEConfig:
    """Settings of a UCE edit.

    Attributes:
        erase_scale: weight of the erase terms (the paper's scale on sum_i v*_i c_i^T and sum_i c_i c_i^T).
        preserve_scale: weight of the preserve terms (the reference's default, 1); ``None`` uses
            max(0.1, 1 / #preserved), the rule of the authors' earlier ``train-scripts/train_erase.py``.
        lamb: ridge weight lambda pulling W_new towards W; larger is gentler.
        layers: fnmatch patterns of the UNet Linear modules to edit (default: all cross-attention keys and values).
        token_positions: which token embeddings of a concept prompt are edited. ``"last_token"`` (the reference's):
            the concept's last token alone, where a causal text encoder has read the whole concept. ``"last"``: that
            token and EOS. ``"from_last"``: the last token, EOS and all the padding after it (the older UCE
            scripts' choice; many rows, so a large edit). ``"from_first"``: from the concept's first token on, so
            that its earlier sub-words ("van" of "van gogh") are edited too.
        templates: prompts the concept is embedded in, ``{}`` standing for it; more contexts generalise further
            (the reference's ``--expand_prompts`` adds five per concept type: ``erase.workflow.CONCEPT_TYPES``).
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"erase_scale": "> 0", "preserve_scale": ">= 0", "lamb": "> 0"}

    erase_scale: float = 1.0
    preserve_scale: float | None = 1.0
    lamb: float = 0.5
    layers: tuple[str, ...] = CROSS_ATTENTION_PATTERNS
    token_positions: str = "last_token"
    templates: tuple[str, ...] = ("{}",)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.templates = tuple(self.templates)
        check_number_fields(self)  # lamb > 0 keeps the system invertible
        if not self.layers:
            raise ValueError("layers is empty: give at least one module-name pattern")
        if self.token_positions not in TOKEN_POSITIONS:
            raise ValueError(f"token_positions must be one of {TOKEN_POSITIONS}, got {self.token_positions!r}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"every template must contain '{{}}', got {list(self.templates)}")


def _positions(wrapper: PipelineWrapper, prompt: str, phrase: str, mode: str) -> list[int]:
    """Token positions (BOS = 0) of ``phrase`` inside ``prompt`` that ``mode`` edits.

    An empty phrase (the empty guide) ends where the prompt's own words end: BOS for a bare template, as the
    reference's ``attention_mask.sum() - 2`` gives for the empty prompt.
    """
    total = wrapper.max_prompt_tokens + 2
    span = wrapper.phrase_positions(prompt, phrase) if phrase else [wrapper.token_count(prompt)]
    if mode == "last_token":
        return [span[-1]]
    if mode == "last":
        return [span[-1], span[-1] + 1]
    return list(range(span[0] if mode == "from_first" else span[-1], total))


def concept_embeddings(
    wrapper: PipelineWrapper,
    concepts: Sequence[str],
    guides: Sequence[str] | None,
    config: UCEConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows c_i (and the guide rows c_guide_i aligned to them) for every concept in every template, float64.

    Target and guide positions are aligned from the concept's last token, as in the authors' code: the k-th
    position after the target's last token is sent where the k-th position after the guide's last token goes.
    """
    rows, guide_rows = [], []
    for template in config.templates:
        prompts = [template.format(c) for c in concepts]
        pos = [_positions(wrapper, p, c, config.token_positions) for p, c in zip(prompts, concepts, strict=True)]
        guide_prompts, gpos = [], []
        if guides is not None:
            guide_prompts = [template.format(g).strip() if g else template.format("").strip() for g in guides]
            pairs = zip(guide_prompts, guides, strict=True)
            gpos = [_positions(wrapper, p, g, config.token_positions) for p, g in pairs]
        # each distinct prompt once (the same text, the same rows), in one batch, encoded up to the last position
        # read: a causal text encoder needs no more
        distinct = list(dict.fromkeys(prompts + guide_prompts))
        length = 1 + max(max(p) for p in pos + gpos)
        enc = wrapper.encode_prompt_prefixes(distinct, length).embeddings.double()
        row = {p: i for i, p in enumerate(distinct)}
        for i in range(len(concepts)):
            n = min(len(pos[i]), len(gpos[i])) if gpos else len(pos[i])
            rows.append(enc[row[prompts[i]], pos[i][:n]])
            if gpos:
                guide_rows.append(enc[row[guide_prompts[i]], gpos[i][:n]])
    return torch.cat(rows), (torch.cat(guide_rows) if guides is not None else None)


def uce_update(
    c_erase: torch.Tensor,
    c_guide: torch.Tensor,
    c_preserve: torch.Tensor | None,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U, V) of UCE's edit: W_new = W (I + U V) for every projection W reading these text embeddings.

    UCE's closed form (rows of ``c_*`` are embeddings c, v*_i = W c_guide_i):

        W_new = (s_e sum_i v*_i c_i^T + s_p sum_j W c_j c_j^T + lambda W)
                (s_e sum_i c_i c_i^T  + s_p sum_j c_j c_j^T   + lambda I)^-1

    Every term on the left is W times something, so with R = s_e C_e^T C_e + s_p C_p^T C_p + lambda I,

        W_new = W + W s_e (C_g - C_e)^T C_e R^-1 = W (I + U V),  U = (C_g - C_e)^T,  V = s_e C_e R^-1,

    one d x d solve shared by all layers, and a change of rank at most the number of erased embeddings.
    Solved in float64.
    """
    d = c_erase.shape[1]
    gram = lamb * torch.eye(d, dtype=torch.float64, device=c_erase.device)
    gram = gram + erase_scale * c_erase.T @ c_erase
    if c_preserve is not None and len(c_preserve):
        gram = gram + preserve_scale * c_preserve.T @ c_preserve
    v = erase_scale * torch.linalg.solve(gram, c_erase.T).T  # R is symmetric: C_e R^-1 = (R^-1 C_e^T)^T
    return (c_guide - c_erase).T, v


def edit_from_update(
    wrapper: PipelineWrapper, layer_patterns: Sequence[str], u: torch.Tensor, v: torch.Tensor
) -> WeightEdit:
    """dW = W U V for every matched layer, in the weights' precision (the solve itself is float64).

    With fewer erased embeddings than text dimensions the change is low rank and its exact LoRA factors come free,
    B = W U and A = V (no SVD); otherwise dW = W (U V).
    """
    layers = wrapper.cross_attention_layers(layer_patterns)
    d = v.shape[1]
    low_rank = v.shape[0] < d
    uv = None if low_rank else (u @ v)
    deltas, factors = {}, {}
    for layer in layers:
        if layer.in_features != d:
            raise ValueError(f"{layer.name} reads {layer.in_features}-d inputs, text embeddings are {d}-d")
        w = layer.module.weight.detach().float()
        name = f"unet.{layer.name}"
        if low_rank:
            lora_b, lora_a = w @ u.to(w), v.to(w)
            factors[name] = (lora_a, lora_b)
            deltas[name] = lora_b @ lora_a
        else:
            deltas[name] = w @ uv.to(w)
    return WeightEdit(deltas, {"layers_matched": len(layers)}, factors=factors or None)


@register_method(
    "uce",
    UCEConfig,
    family="closed_form",
    summary="Unified Concept Editing (closed-form K/V edit)",
    capabilities=Capabilities(preserve=True, templates="templates"),
)
def erase_uce(wrapper: PipelineWrapper, concepts: ConceptSpec, config: UCEConfig) -> WeightEdit:
    """Erase ``concepts.targets`` by sending them to their guides while keeping ``concepts.preserve``."""
    guides = [concepts.guide_for(i) for i in range(len(concepts.targets))]
    c_erase, c_guide = concept_embeddings(wrapper, concepts.targets, guides, config)
    c_preserve = None
    if concepts.preserve:
        c_preserve, _ = concept_embeddings(wrapper, concepts.preserve, None, config)
    preserve_scale = config.preserve_scale
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / max(1, len(concepts.preserve)))
    u, v = uce_update(c_erase, c_guide, c_preserve, config.erase_scale, preserve_scale, config.lamb)
    edit = edit_from_update(wrapper, config.layers, u, v)
    edit.info.update(erase_embeddings=int(c_erase.shape[0]), preserve_scale=preserve_scale)
    return edit
