"""SPEED (Li et al., ICLR 2026): a closed-form edit of cross-attention values in the null space of what is kept.

Reference: Ouxiang-Li/SPEED, ``train_erase_null.py`` (``edit_model``). With embeddings as columns, T = mean_i
c_i c_i^T over the erased concepts' embeddings, A = mean_i a_i c_i^T with their anchors (guides) a_i, and for each
edited projection W:

    E     = W (A - T) (I + T)^-1                       the unconstrained erase ("erase_weight"), used to rank
    R     = mean over the refined retain set of r r^T  retain embeddings by the influence ||E r||
    P     = U_0 U_0^T, U_0 the eigenvectors of R with eigenvalue < threshold (R's null space)
    M     = (T P + retain_scale I)^-1
    dW    = W (A - T) P (I - M K (K^T P M K + lamb I)^-1 K^T P) M

K holds the empty prompt's BOS embedding and ``null_clusters`` k-means centres of its other 76 positions: with
``lamb`` 0 the edit leaves W K exactly as it was (the paper's invariant equality constraints, IEC).

The prior-knowledge refinement of the retain set, per layer, as the reference does it: influence-based prior filtering
(IPF: keep the retain embeddings with ||E r|| above the mean) and directed prior augmentation (DPA: each of those, in
chunks of 128 and mini-batches of 8, drawn ``augment`` times as r + (n . v) v with n ~ N(0, I) and v the right
singular vector of W with the smallest singular value, the draws with ||E r'|| above the chunk's mean kept). Retain
embeddings are the preserved concepts' last tokens; with nothing preserved, the empty prompt's 76 EOS/padding
positions, as the reference's default retain text ``""``. Preserved texts that name a target as a whole word are
dropped, as the reference drops them.

Defaults are the reference script's: values only (``--params V``), 10 augmentations, threshold 0.1, retain scale 1,
lambda 0, the filter on, 3 null clusters; its 10/50/100-celebrity setting is ``retain_scale=0.05,
influence_filter=False``. Every concept and anchor is embedded at its last token (``attention_mask.sum() - 2``: BOS
for the empty anchor). Where we differ: float64 throughout (the reference runs float32 on the GPU); the random draws
(k-means initialisation, shuffle, noise) come from a generator seeded by ``seed``, so no figure depends on the
reference's global RNG; k-means is a plain Lloyd iteration from distinct random points (``kmeans_pytorch``'s, to
its tolerance); a filter that would keep nothing (every influence equal) keeps every embedding.

SD3 and Flux (the reference is SD 1.x only): a transformer projects the text once, for keys and values alike, so the
edited layers are uce's there, the text-side input projections (``context_embedder`` for the token rows,
``time_text_embed.text_embedder.linear_1`` for the pooled vector), each with the embeddings it reads. Token rows: a
prompt's last-token row in every text stream (SD3: CLIP's and T5's, as uce takes them); K per stream: the row where
the empty anchor is read (CLIP's BOS; T5, which has none, its last padding row, ``attention_mask.sum() - 2 = -1``)
and ``null_clusters`` centres of the stream's other rows, which are also the default retain set. Pooled vector: one
row per prompt, K the empty prompt's. The targets are W a, not W a + b: the biased layer then gives the anchor's
output (where uce keeps ``uce_flux_edit.py``'s v* = W a + b for the equality with that script).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import PipelineWrapper

from ..core.inputs import check_number_fields
from ..core.registry import Capabilities, ConceptSpec, WeightEdit, register_method

__all__ = [
    "SPEEDConfig",
    "SPEEDTerms",
    "erase_speed",
    "VALUE_PATTERNS",
    "kmeans_centres",
    "layer_patterns",
    "null_space_projection",
    "refined_retain",
    "retained_basis",
    "speed_terms",
    "speed_update",
    "weakest_direction",
]

logger = logging.getLogger(__name__)

#: the reference's default layers (``--params V``): every UNet cross-attention value projection
VALUE_PATTERNS: tuple[str, ...] = ("*attn2.to_v",)
KMEANS_TOLERANCE = 1e-4  # kmeans_pytorch's default: stop when the centres move less (sum of squared shifts)
KMEANS_MAX_ROUNDS = 300


@dataclass
class SPEEDConfig:
    """Settings of a SPEED edit (the reference's command-line defaults).

    Attributes:
        layers: fnmatch patterns of the denoiser's Linear modules to edit (``None``: the model's value-side layers,
            :func:`layer_patterns`).
        retain_scale: weight of the identity in M = (T P + retain_scale I)^-1 (0.05 in the celebrity settings).
        threshold: eigenvalues of the retain covariance below it span the null space the edit is confined to.
        lamb: ridge on the invariance of the empty prompt's embeddings (0: exact invariance).
        augment: perturbed copies drawn per retain embedding (``--aug_num``); 0 turns the refinement off (no filter
            and no augmentation, as in the reference).
        influence_filter: keep only the retain embeddings the erase moves more than average before augmenting
            (``--disable_filter`` turns it off; the celebrity settings do).
        null_clusters: k-means centres of the empty prompt's EOS/padding embeddings kept invariant.
        seed: seeds the k-means initialisation, the shuffle and the augmentation noise.
        chunk_size: retain embeddings per augmentation chunk (the filter's mean is taken per chunk).
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        "retain_scale": "> 0", "threshold": "> 0", "lamb": ">= 0", "augment": ">= 0", "null_clusters": ">= 1",
        "seed": ">= 0", "chunk_size": ">= 1",
    }  # fmt: skip

    layers: tuple[str, ...] | None = None
    retain_scale: float = 1.0
    threshold: float = 0.1
    lamb: float = 0.0
    augment: int = 10
    influence_filter: bool = True
    null_clusters: int = 3
    seed: int = 0
    chunk_size: int = 128

    def __post_init__(self) -> None:
        self.layers = None if self.layers is None else tuple(self.layers)
        check_number_fields(self)
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty: give at least one module-name pattern, or None for the model's")


def layer_patterns(wrapper: PipelineWrapper, config: SPEEDConfig) -> tuple[str, ...]:
    """The layers SPEED edits: ``config.layers``, or by default the UNet's cross-attention values
    (:data:`VALUE_PATTERNS`, the reference's ``--params V``) and, on SD3/Flux, which project the text once for keys
    and values alike, the transformer's text-side input projections (``PipelineWrapper.closed_form_patterns``)."""
    if config.layers is not None:
        return config.layers
    return VALUE_PATTERNS if wrapper.denoiser_name == "unet" else wrapper.closed_form_patterns()


def kmeans_centres(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``points`` from ``clusters`` distinct rows drawn at random; ``(clusters, d)``.

    Stops when the centres move less than ``KMEANS_TOLERANCE`` (sum of squared shifts); an emptied cluster keeps its
    centre.
    """
    if not 1 <= clusters <= len(points):
        raise ValueError(f"{clusters} clusters for {len(points)} points")
    centres = points[torch.randperm(len(points), generator=generator)[:clusters]].clone()
    for _ in range(KMEANS_MAX_ROUNDS):
        nearest = torch.cdist(points, centres).argmin(dim=1)
        moved = centres.clone()
        for k in range(clusters):
            members = points[nearest == k]
            if len(members):
                moved[k] = members.mean(dim=0)
        shift = float((moved - centres).pow(2).sum())
        centres = moved
        if shift < KMEANS_TOLERANCE:
            break
    return centres


def weakest_direction(weight: torch.Tensor) -> torch.Tensor:
    """The right singular vector of ``weight`` with the smallest singular value of its reduced SVD (the reference's
    ``torch.svd(W)[2][:, -1]``), from the eigenvectors of the smaller of W W^T and W^T W; its sign is arbitrary."""
    out, d = weight.shape
    if out >= d:
        return torch.linalg.eigh(weight.T @ weight).eigenvectors[:, 0]
    values, vectors = torch.linalg.eigh(weight @ weight.T)  # W^T u / sigma for the smallest sigma
    direction = weight.T @ vectors[:, 0]
    return direction / direction.norm()


def refined_retain(
    retain: torch.Tensor,
    weight: torch.Tensor,
    erase_input: torch.Tensor,
    direction: torch.Tensor,
    config: SPEEDConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The retain set of one layer after IPF and DPA (see the module docstring); rows are embeddings.

    The layer's erase map is E = ``weight`` @ ``erase_input`` (W (A - T) (I + T)^-1, applied in factors) and
    ``direction`` W's weakest right singular vector (:func:`weakest_direction`); ``retain`` in the (shuffled) order
    its chunks are taken in. A draw r + s v has E r + s E v: the draws' influences come from the originals'.
    """
    if config.augment == 0:
        return retain
    influence = (retain @ erase_input.T) @ weight.T
    if config.influence_filter:
        norms = influence.norm(dim=1)
        kept = norms > norms.mean()
        if kept.any():
            retain, influence = retain[kept], influence[kept]
    moved = weight @ (erase_input @ direction)
    rows = []
    for start in range(0, len(retain), config.chunk_size):
        chunk, chunk_influence = (
            retain[start : start + config.chunk_size],
            influence[start : start + config.chunk_size],
        )
        drawn, drawn_influence = [], []
        for mini in range(0, len(chunk), 8):
            batch, batch_influence = chunk[mini : mini + 8], chunk_influence[mini : mini + 8]
            for _ in range(config.augment):
                noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype)
                steps = (noise @ direction)[:, None]
                drawn.append(batch + steps * direction)
                drawn_influence.append(batch_influence + steps * moved)
        drawn, norms = torch.cat(drawn), torch.cat(drawn_influence).norm(dim=1)
        rows += [chunk, drawn[norms > norms.mean()]]
    return torch.cat(rows)


def retained_basis(rows: torch.Tensor, threshold: float, span: torch.Tensor | None = None) -> torch.Tensor:
    """U_1: orthonormal eigenvectors of R = rows^T rows / len(rows) with eigenvalue >= ``threshold``, (d, q).

    R is zero outside the rows' span, so they are found in an orthonormal basis of ``span`` (rows whose span holds
    every row: the originals and W's weakest direction for a refined set) when that basis is smaller than the width.
    """
    basis = None
    if span is not None and len(span) < rows.shape[1]:
        basis = torch.linalg.qr(span.T).Q  # (d, k)
    coordinates = rows if basis is None else rows @ basis
    values, vectors = torch.linalg.eigh(coordinates.T @ coordinates / len(rows))
    kept = vectors[:, values >= threshold]
    return kept if basis is None else basis @ kept


def null_space_projection(rows: torch.Tensor, threshold: float, span: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's P = U_0 U_0^T, U_0 the eigenvectors of R with eigenvalue < ``threshold``: I - U_1 U_1^T
    (:func:`retained_basis`)."""
    kept = retained_basis(rows, threshold, span)
    return torch.eye(rows.shape[1], dtype=rows.dtype) - kept @ kept.T


@dataclass
class SPEEDTerms:
    """What the edit of every layer shares: the target rows C, D / N (A - T = (D / N) C^T with embeddings as
    columns), T and (A - T) (I + T)^-1."""

    c_target: torch.Tensor
    difference: torch.Tensor
    gram: torch.Tensor
    erase_input: torch.Tensor


def speed_terms(c_target: torch.Tensor, c_anchor: torch.Tensor) -> SPEEDTerms:
    """:class:`SPEEDTerms` of aligned (N, d) target and anchor rows, float64."""
    n, d = c_target.shape
    gram = c_target.T @ c_target / n  # T
    difference = (c_anchor - c_target).T / n
    # (A - T)(I + T)^-1 = difference C (I + T)^-1, and (I + T) is symmetric
    erase_input = difference @ torch.linalg.solve(torch.eye(d, dtype=torch.float64) + gram, c_target.T).T
    return SPEEDTerms(c_target, difference, gram, erase_input)


def speed_update(
    weight: torch.Tensor,
    terms: SPEEDTerms,
    retain: torch.Tensor,
    invariant: torch.Tensor,
    config: SPEEDConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEED's change of one projection as exact factors (B, A): dW = B @ A (module docstring's formula), float64.

    ``retain``: (R, d) rows; ``invariant``: K's columns as rows (k, d). With A - T = (D / N) C^T,
    dW = (W D / N) (C^T P X M): rank at most N. M's inverse is applied by solves (Q = T P + retain_scale I).
    """
    d = weight.shape[1]
    span = retain
    if config.augment:
        direction = weakest_direction(weight)
        rows = refined_retain(retain, weight, terms.erase_input, direction, config, generator)
        span = torch.cat([retain, direction[None]])
    else:
        rows = retain
    kept = retained_basis(rows, config.threshold, span)

    def project(x: torch.Tensor) -> torch.Tensor:  # x P for rows x, P = I - U_1 U_1^T (symmetric)
        return x - (x @ kept) @ kept.T

    q = project(terms.gram) + config.retain_scale * torch.eye(d, dtype=torch.float64)  # T P + r I (T symmetric)
    factors = torch.linalg.lu_factor(q)  # M = Q^-1
    k = invariant.T
    m_k = torch.linalg.lu_solve(*factors, k)
    k_p = project(invariant)  # K^T P
    inner = k_p @ m_k + config.lamb * torch.eye(k.shape[1], dtype=torch.float64)
    left = project(terms.c_target)  # C^T P
    left = left - (left @ m_k) @ torch.linalg.solve(inner, k_p)  # C^T P (I - M K (..)^-1 K^T P)
    right = torch.linalg.lu_solve(*factors, left.T, adjoint=True).T  # left M = (Q^-T left^T)^T
    return weight @ terms.difference, right


def _last_token_rows(wrapper: PipelineWrapper, prompts: Sequence[str]) -> torch.Tensor:
    """Each prompt's embedding at its last token in every text stream (``attention_mask.sum() - 2``: BOS for the
    empty prompt with CLIP, its last padding row with T5), float64 ``(len(prompts) * streams, d)``, prompt-major."""
    streams = range(len(wrapper.token_streams()))
    positions = [[wrapper.last_token_position(p, s) for s in streams] for p in prompts]
    if wrapper.prefix_encodable:  # causal text encoders: the rows up to the last one read, from those tokens alone
        encoding = wrapper.encode_prompt_prefixes(list(prompts), 1 + max(max(p) for p in positions))
    else:
        encoding = wrapper.encode_prompts(list(prompts))
    encoding = encoding.embeddings.double().cpu()
    rows = torch.tensor([i for i, p in enumerate(positions) for _ in p])
    return encoding[rows, torch.tensor([q for p in positions for q in p])]


def _empty_rows(wrapper: PipelineWrapper, config: SPEEDConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The empty prompt's token rows per text stream: the row the empty anchor is read at (kept invariant exactly)
    and the stream's other rows (clustered into the rest of K; the default retain set). On CLIP the anchor row is
    BOS, the reference's; on T5 (no BOS) it is the last padding row, where ``""`` anchors a concept there."""
    empty = wrapper.encode_prompts([""]).embeddings[0].double().cpu()
    invariant, others = [], []
    for s, stream in enumerate(wrapper.token_streams()):
        anchor = wrapper.last_token_position("", s)
        rest = [r for r in range(stream.offset, stream.offset + stream.length) if r != anchor]
        if config.null_clusters > len(rest):
            raise ValueError(f"null_clusters is {config.null_clusters}; the empty prompt has {len(rest)} positions")
        invariant.append(empty[[anchor]])
        others.append(empty[rest])
    return invariant, others


def _retain_texts(targets: Sequence[str], preserve: Sequence[str]) -> tuple[list[str], list[str]]:
    """The preserved texts that name no target as a whole word, and those dropped."""
    kept, dropped = [], []
    for text in preserve:
        names = any(re.search(r"\b" + re.escape(t.lower()) + r"\b", text.lower()) for t in targets)
        (dropped if names else kept).append(text)
    return kept, dropped


@register_method(
    "speed",
    SPEEDConfig,
    family="closed_form",
    summary="SPEED (closed-form value edit in the retained concepts' null space)",
    capabilities=Capabilities(preserve=True, architectures=("sd", "sdxl", "sd3", "flux")),
)
def erase_speed(wrapper: PipelineWrapper, concepts: ConceptSpec, config: SPEEDConfig) -> WeightEdit:
    """Erase ``concepts.targets`` into their guides (anchors) within the null space of ``concepts.preserve``.

    One edit per kind of input the layers read: the token rows (every text stream's last-token row of a prompt),
    and on SD3/Flux the pooled vector (one row per prompt; the empty prompt's is K and, with nothing preserved, the
    retain set).
    """
    generator = torch.Generator().manual_seed(config.seed)
    targets = list(concepts.targets)
    anchors = [concepts.guide_for(i) for i in range(len(targets))]
    kept, dropped = _retain_texts(targets, concepts.preserve)
    layers = wrapper.cross_attention_layers(layer_patterns(wrapper, config))
    groups = {reads: [layer for layer in layers if layer.reads == reads] for reads in ("tokens", "pooled")}
    texts = targets + anchors + kept
    inputs, retained, invariants = {}, {}, {}
    if groups["tokens"]:
        rows = _last_token_rows(wrapper, texts)
        per = len(rows) // len(texts)
        anchor_rows, other_rows = _empty_rows(wrapper, config)
        retain = rows[2 * len(targets) * per :] if kept else torch.cat(other_rows)
        retained["tokens"] = retain[torch.randperm(len(retain), generator=generator)]  # once, as the reference
        centres = [kmeans_centres(other, config.null_clusters, generator) for other in other_rows]
        invariants["tokens"] = torch.cat([*anchor_rows, *centres])
        inputs["tokens"] = rows[: len(targets) * per], rows[len(targets) * per : 2 * len(targets) * per]
    if groups["pooled"]:
        pooled = wrapper.encode_prompts([*texts, ""]).pooled.double().cpu()
        retain = pooled[2 * len(targets) :] if kept else pooled[-1:]
        retained["pooled"] = retain[torch.randperm(len(retain), generator=generator)]
        invariants["pooled"] = pooled[-1:]
        inputs["pooled"] = pooled[: len(targets)], pooled[len(targets) : 2 * len(targets)]
    deltas, factors, low_rank = {}, {}, True
    for reads, stream in groups.items():
        if not stream:
            continue
        c_target, c_anchor = inputs[reads]
        terms = speed_terms(c_target, c_anchor)
        low_rank = low_rank and len(c_target) < c_target.shape[1]
        for layer in stream:
            if layer.in_features != c_target.shape[1]:
                raise ValueError(
                    f"{layer.name} reads {layer.in_features}-d inputs, text embeddings are {c_target.shape[1]}-d"
                )
            weight = layer.module.weight.detach().double().cpu()
            lora_b, lora_a = speed_update(weight, terms, retained[reads], invariants[reads], config, generator)
            name = f"{wrapper.denoiser_name}.{layer.name}"
            factors[name] = (lora_a.float(), lora_b.float())
            deltas[name] = (lora_b @ lora_a).float()
    info = {"layers_matched": len(layers), "retain_embeddings": int(len(retained.get("tokens", ()))),
            "retain_dropped": dropped}  # fmt: skip
    return WeightEdit(deltas, info, factors=factors if low_rank else None)
