"""Unified Concept Editing (Gandikota et al., 2024): a closed-form edit of cross-attention keys and values.

Every key/value projection W of the UNet's cross-attention reads text embeddings c. UCE rewrites W so that the
embeddings of an erased concept c_i are sent where a guide concept's embeddings go, v*_i = W c_guide_i, while
preserved concepts c_j keep W c_j and a ridge term keeps W close to itself. One linear solve, no training.

Defaults are the reference implementation's (rohitgandikota/unified-concept-editing, ``trainscripts/uce_sd_erase.py``):
one embedding per prompt, the prompt's last token (BOS for the empty prompt; no EOS, no padding), erase and
preserve scales 1, lambda 0.5, the bare concept as the only template. Where we differ: the solve is float64 (the
reference inverts in float32), and other token choices and templates are options.

SD3 and Flux (``trainscripts/uce_flux_edit.py``): the edited layers are the transformer's text-side input projections
(``context_embedder`` reads the token embeddings, ``time_text_embed.text_embedder.linear_1`` the pooled CLIP vector;
the pipeline wrapper's ``closed_form_patterns``), each solved with the embeddings it reads: the token rows as above
(Flux: T5's, whose empty prompt's "last token" is the last padding row, ``attention_mask.sum() - 2 = -1``), the
pooled vector one row per prompt. These layers have biases, and the reference takes the output of the layer as the
target, v* = W c + b, while the edited layer adds b again; the formula keeps that (``target_bias``), so that the edit
equals the reference's: dW = W U V + b (R^-1 m)^T (``uce_update``'s U, V, R; m = s_e sum_i c_i + s_p sum_j c_j).
SD3 has no reference script. Its ``context_embedder`` reads CLIP's 77 rows and T5's rows joined in one sequence
(``PipelineWrapper.token_streams``), so a concept reaches the transformer through both; following the reference's
rule for every text stream a projection reads (``uce_flux_edit.py``: T5's last token into ``context_embedder``;
``uce_hidream_edit.py``: Llama's and T5's last tokens, each into its caption projection), each prompt gives one row
per stream at the chosen positions (CLIP's, and T5's from ``attention_mask.sum() - 2`` of SD3's T5 tokenizer), both
in the one solve of ``context_embedder``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import CrossAttentionLayer, PipelineWrapper, PromptEncoding

from ..core.inputs import check_number_fields
from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method

__all__ = [
    "UCEConfig",
    "bias_direction",
    "concept_embeddings",
    "edit_from_update",
    "erase_uce",
    "layer_edits",
    "uce_update",
]

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
        layers: fnmatch patterns of the denoiser's Linear modules to edit (``None``: the model's text-reading layers,
            all cross-attention keys and values of a UNet, the text-side input projections of SD3/Flux).
        token_positions: which token embeddings of a concept prompt are edited. ``"last_token"`` (the reference's):
            the concept's last token alone, where a causal text encoder has read the whole concept. ``"last"``: that
            token and EOS. ``"from_last"``: the last token, EOS and all the padding after it (the older UCE
            scripts' choice; many rows, so a large edit). ``"from_first"``: from the concept's first token on, so
            that its earlier sub-words ("van" of "van gogh") are edited too.
        templates: prompts the concept is embedded in, ``{}`` standing for it; more contexts generalise further
            (the reference's ``--expand_prompts`` adds five per concept type: ``erase.workflow.CONCEPT_TYPES``).
        target_bias: for layers with a bias (SD3/Flux's projections), the targets are the layer's outputs
            v* = W c + b, as ``uce_flux_edit.py`` computes them (the edited layer then adds b once more); ``False``
            takes v* = W c. Layers without a bias (UNet cross-attention) are the same either way.
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"erase_scale": "> 0", "preserve_scale": ">= 0", "lamb": "> 0"}

    erase_scale: float = 1.0
    preserve_scale: float | None = 1.0
    lamb: float = 0.5
    layers: tuple[str, ...] | None = None
    token_positions: str = "last_token"
    templates: tuple[str, ...] = ("{}",)
    target_bias: bool = True

    def __post_init__(self) -> None:
        self.layers = None if self.layers is None else tuple(self.layers)
        self.templates = tuple(self.templates)
        check_number_fields(self)  # lamb > 0 keeps the system invertible
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty: give at least one module-name pattern, or None for the model's")
        if self.token_positions not in TOKEN_POSITIONS:
            raise ValueError(f"token_positions must be one of {TOKEN_POSITIONS}, got {self.token_positions!r}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"every template must contain '{{}}', got {list(self.templates)}")


def _positions(wrapper: PipelineWrapper, prompt: str, phrase: str, mode: str, stream: int = 0) -> list[int]:
    """Token positions (embedding rows) of ``phrase`` inside ``prompt`` that ``mode`` edits, in one text stream
    (``PipelineWrapper.token_streams``: the only one but on SD3, whose T5 rows follow its CLIP rows).

    An empty phrase (the empty guide) ends where the prompt's own words end, as the reference's
    ``attention_mask.sum() - 2`` gives (``PipelineWrapper.last_token_position``): BOS for a bare CLIP template, the
    last padding row for T5.
    """
    found = wrapper.token_streams()[stream]
    end = found.offset + found.length
    if phrase:
        span = wrapper.phrase_positions(prompt, phrase, stream)
    else:
        span = [wrapper.last_token_position(prompt, stream)]
    if mode == "last_token":
        return [span[-1]]
    if mode == "last":
        return [p for p in (span[-1], span[-1] + 1) if p < end]
    return list(range(span[0] if mode == "from_first" else span[-1], end))


def _prefix_rows(
    wrapper: PipelineWrapper,
    prompts: list[str],
    concepts: Sequence[str],
    guide_prompts: list[str],
    guides: Sequence[str] | None,
    config: UCEConfig,
    rows: list[torch.Tensor],
    guide_rows: list[torch.Tensor],
) -> None:
    """``concept_embeddings``' token rows of one template on causal text encoders: each distinct prompt once (the same
    text, the same rows), in one batch, encoded up to the last position read; appended to ``rows``/``guide_rows``."""
    pos = [_positions(wrapper, p, c, config.token_positions) for p, c in zip(prompts, concepts, strict=True)]
    gpos = []
    if guides is not None:
        gpos = [_positions(wrapper, p, g, config.token_positions) for p, g in zip(guide_prompts, guides, strict=True)]
    distinct = list(dict.fromkeys(prompts + guide_prompts))
    enc = wrapper.encode_prompt_prefixes(distinct, 1 + max(max(p) for p in pos + gpos)).embeddings.double()
    row = {p: i for i, p in enumerate(distinct)}
    for i in range(len(prompts)):
        n = min(len(pos[i]), len(gpos[i])) if gpos else len(pos[i])
        rows.append(enc[row[prompts[i]], pos[i][:n]])
        if gpos:
            guide_rows.append(enc[row[guide_prompts[i]], gpos[i][:n]])


def concept_embeddings(
    wrapper: PipelineWrapper,
    concepts: Sequence[str],
    guides: Sequence[str] | None,
    config: UCEConfig,
    reads: str = "tokens",
    encode: Callable[[Sequence[str]], PromptEncoding] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows c_i (and the guide rows c_guide_i aligned to them) for every concept in every template, float64.

    ``reads="tokens"``: token embeddings at ``config.token_positions``. Target and guide positions are aligned from
    the concept's last token, as in the authors' code: the k-th position after the target's last token is sent where
    the k-th position after the guide's last token goes. ``reads="pooled"``: the pooled text vector, one row per
    prompt (what SD3/Flux's pooled projection reads). ``encode`` encodes prompts (default:
    ``wrapper.encode_prompts``; a memo of it lets both kinds share one encoding). Token rows on causal text encoders
    (SD 1.x/2.x, SDXL) come from prefix encodings instead (``_prefix_rows``): the same rows at less cost.
    """
    encode = encode or wrapper.encode_prompts
    rows, guide_rows = [], []
    for template in config.templates:
        prompts = [template.format(c) for c in concepts]
        guide_prompts = []
        if guides is not None:
            guide_prompts = [template.format(g).strip() if g else template.format("").strip() for g in guides]
        if reads == "tokens" and wrapper.prefix_encodable:
            _prefix_rows(wrapper, prompts, concepts, guide_prompts, guides, config, rows, guide_rows)
            continue
        encoding = encode(prompts)
        guide_encoding = encode(guide_prompts) if guides is not None else None
        if reads == "pooled":
            if encoding.pooled is None:
                raise ValueError("this model has no pooled text vector for a layer to read")
            rows.append(encoding.pooled.double())
            if guide_encoding is not None:
                guide_rows.append(guide_encoding.pooled.double())
            continue
        enc = encoding.embeddings.double()
        genc = None if guide_encoding is None else guide_encoding.embeddings.double()
        for i, concept in enumerate(concepts):
            for stream in range(len(wrapper.token_streams())):
                pos = _positions(wrapper, prompts[i], concept, config.token_positions, stream)
                if genc is None:
                    rows.append(enc[i, pos])
                    continue
                gpos = _positions(wrapper, guide_prompts[i], guides[i], config.token_positions, stream)
                n = min(len(pos), len(gpos))
                rows.append(enc[i, pos[:n]])
                guide_rows.append(genc[i, gpos[:n]])
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
    gram = _gram(c_erase, c_preserve, erase_scale, preserve_scale, lamb)
    v = erase_scale * torch.linalg.solve(gram, c_erase.T).T  # R is symmetric: C_e R^-1 = (R^-1 C_e^T)^T
    return (c_guide - c_erase).T, v


def _gram(
    c_erase: torch.Tensor, c_preserve: torch.Tensor | None, erase_scale: float, preserve_scale: float, lamb: float
) -> torch.Tensor:
    """R = s_e C_e^T C_e + s_p C_p^T C_p + lambda I (float64)."""
    d = c_erase.shape[1]
    gram = lamb * torch.eye(d, dtype=torch.float64, device=c_erase.device)
    gram = gram + erase_scale * c_erase.T @ c_erase
    if c_preserve is not None and len(c_preserve):
        gram = gram + preserve_scale * c_preserve.T @ c_preserve
    return gram


def bias_direction(
    c_erase: torch.Tensor,
    c_preserve: torch.Tensor | None,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """w = R^-1 m, m = s_e sum_i c_i + s_p sum_j c_j: with targets v* = W c + b (a layer with bias b), the closed
    form gains b w^T, since sum_x s_x (W c_x + b) c_x^T = W (...) + b m^T. Float64, shape (d,)."""
    m = erase_scale * c_erase.sum(0)
    if c_preserve is not None and len(c_preserve):
        m = m + preserve_scale * c_preserve.sum(0)
    return torch.linalg.solve(_gram(c_erase, c_preserve, erase_scale, preserve_scale, lamb), m)


def layer_edits(
    wrapper: PipelineWrapper,
    layers: Sequence[CrossAttentionLayer],
    u: torch.Tensor,
    v: torch.Tensor,
    bias_row: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """dW = W U V (+ b w^T for layers with a bias, when ``bias_row`` w is given) for each layer, in the weights'
    precision (the solve itself is float64), and the exact LoRA factors where the change is low rank: B = [W U, b],
    A = [V; w^T] (no SVD)."""
    d = v.shape[1]
    deltas, factors = {}, {}
    for layer in layers:
        if layer.in_features != d:
            raise ValueError(f"{layer.name} reads {layer.in_features}-d inputs, text embeddings are {d}-d")
        w = layer.module.weight.detach().float()
        lora_b, lora_a = w @ u.to(w), v.to(w)
        bias = layer.module.bias
        if bias_row is not None and bias is not None:
            lora_b = torch.cat([lora_b, bias.detach().float()[:, None]], dim=1)
            lora_a = torch.cat([lora_a, bias_row.to(w)[None]])
        name = f"{wrapper.denoiser_name}.{layer.name}"
        if lora_a.shape[0] < min(d, w.shape[0]):
            factors[name] = (lora_a, lora_b)
            deltas[name] = lora_b @ lora_a
        else:
            deltas[name] = (lora_b.double() @ lora_a.double()).to(w)
    return deltas, factors


def edit_from_update(
    wrapper: PipelineWrapper, layer_patterns: Sequence[str] | None, u: torch.Tensor, v: torch.Tensor
) -> WeightEdit:
    """dW = W U V for every matched layer (``None``: the model's closed-form layers), in the weights' precision.

    With fewer erased embeddings than text dimensions the change is low rank and its exact LoRA factors come free,
    B = W U and A = V (no SVD); otherwise dW = W (U V).
    """
    layers = wrapper.cross_attention_layers(layer_patterns)
    deltas, factors = layer_edits(wrapper, layers, u, v)
    return WeightEdit(deltas, {"layers_matched": len(layers)}, factors=factors or None)


@register_method(
    "uce",
    UCEConfig,
    family="closed_form",
    summary="Unified Concept Editing (closed-form K/V edit)",
    capabilities=Capabilities(preserve=True, templates="templates", architectures=("sd", "sdxl", "sd3", "flux")),
)
def erase_uce(wrapper: PipelineWrapper, concepts: ConceptSpec, config: UCEConfig) -> WeightEdit:
    """Erase ``concepts.targets`` by sending them to their guides while keeping ``concepts.preserve``.

    One solve per kind of input the edited layers read (token embeddings; SD3/Flux's pooled vector too).
    """
    guides = [concepts.guide_for(i) for i in range(len(concepts.targets))]
    preserve_scale = config.preserve_scale
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / max(1, len(concepts.preserve)))
    layers = wrapper.cross_attention_layers(config.layers)
    deltas, factors, embeddings = {}, {}, {}
    encodings: dict[tuple[str, ...], PromptEncoding] = {}

    def encode(prompts: Sequence[str]) -> PromptEncoding:
        key = tuple(prompts)
        if key not in encodings:
            encodings[key] = wrapper.encode_prompts(prompts)
        return encodings[key]

    for reads in sorted({layer.reads for layer in layers}, reverse=True):  # "tokens" first
        c_erase, c_guide = concept_embeddings(wrapper, concepts.targets, guides, config, reads, encode)
        c_preserve = None
        if concepts.preserve:
            c_preserve, _ = concept_embeddings(wrapper, concepts.preserve, None, config, reads, encode)
        scales = (config.erase_scale, preserve_scale)
        u, v = uce_update(c_erase, c_guide, c_preserve, *scales, config.lamb)
        bias_row = bias_direction(c_erase, c_preserve, *scales, config.lamb) if config.target_bias else None
        stream = [layer for layer in layers if layer.reads == reads]
        stream_deltas, stream_factors = layer_edits(wrapper, stream, u, v, bias_row)
        deltas.update(stream_deltas)
        factors.update(stream_factors)
        embeddings[reads] = int(c_erase.shape[0])
    low_rank = len(factors) == len(deltas)
    edit = WeightEdit(deltas, {"layers_matched": len(layers)}, factors=factors if low_rank else None)
    edit.info.update(erase_embeddings=next(iter(embeddings.values())), preserve_scale=preserve_scale)
    if "pooled" in embeddings:
        edit.info["erase_embeddings_pooled"] = embeddings["pooled"]
    return edit
