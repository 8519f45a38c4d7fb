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

__all__ = ["SPEEDConfig", "erase_speed", "kmeans_centres", "refined_retain", "speed_update"]

logger = logging.getLogger(__name__)

KMEANS_TOLERANCE = 1e-4  # kmeans_pytorch's default: stop when the centres move less (sum of squared shifts)
KMEANS_MAX_ROUNDS = 300


@dataclass
class SPEEDConfig:
    """Settings of a SPEED edit (the reference's command-line defaults).

    Attributes:
        layers: fnmatch patterns of the UNet Linear modules to edit (``--params V``: the cross-attention values).
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

    layers: tuple[str, ...] = ("*attn2.to_v",)
    retain_scale: float = 1.0
    threshold: float = 0.1
    lamb: float = 0.0
    augment: int = 10
    influence_filter: bool = True
    null_clusters: int = 3
    seed: int = 0
    chunk_size: int = 128

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        check_number_fields(self)
        if not self.layers:
            raise ValueError("layers is empty: give at least one module-name pattern")


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


def refined_retain(
    retain: torch.Tensor,
    erase_map: torch.Tensor,
    weight: torch.Tensor,
    config: SPEEDConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The retain set of one layer after IPF and DPA (see the module docstring); rows are embeddings.

    ``erase_map`` is E = W (A - T) (I + T)^-1 of this layer, ``weight`` its W; ``retain`` in the (shuffled) order
    its chunks are taken in.
    """
    if config.augment == 0:
        return retain
    if config.influence_filter:
        influence = (retain @ erase_map.T).norm(dim=1)
        kept = retain[influence > influence.mean()]
        retain = kept if len(kept) else retain
    direction = torch.linalg.svd(weight, full_matrices=False).Vh[-1]  # smallest singular value's right vector
    rows = []
    for start in range(0, len(retain), config.chunk_size):
        chunk = retain[start : start + config.chunk_size]
        drawn = []
        for mini in range(0, len(chunk), 8):
            batch = chunk[mini : mini + 8]
            for _ in range(config.augment):
                noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype)
                drawn.append(batch + (noise @ direction)[:, None] * direction)
        drawn = torch.cat(drawn)
        influence = (drawn @ erase_map.T).norm(dim=1)
        rows += [chunk, drawn[influence > influence.mean()]]
    return torch.cat(rows)


def speed_update(
    weight: torch.Tensor,
    c_target: torch.Tensor,
    c_anchor: torch.Tensor,
    retain: torch.Tensor,
    invariant: torch.Tensor,
    config: SPEEDConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEED's change of one projection as exact factors (B, A): dW = B @ A (module docstring's formula), float64.

    ``c_target``/``c_anchor``: (N, d) aligned rows; ``retain``: (R, d); ``invariant``: K's columns as rows (k, d).
    A - T = (1/N) D C^T with D the anchor-minus-target and C the target columns, so dW = (W D / N) (C^T P X M):
    rank at most N.
    """
    n, d = c_target.shape
    eye = torch.eye(d, dtype=torch.float64)
    gram = c_target.T @ c_target / n  # T
    difference = (c_anchor - c_target).T / n  # D / N: A - T = difference @ c_target
    erase_map = weight @ difference @ c_target @ torch.linalg.inv(eye + gram)
    rows = refined_retain(retain, erase_map, weight, config, generator)
    covariance = rows.T @ rows / len(rows)
    values, vectors = torch.linalg.eigh(covariance)  # R is symmetric PSD: its SVD's U and S
    null = vectors[:, values < config.threshold]
    projection = null @ null.T
    m = torch.linalg.inv(gram @ projection + config.retain_scale * eye)
    k = invariant.T
    inner = k.T @ projection @ m @ k + config.lamb * torch.eye(k.shape[1], dtype=torch.float64)
    constrained = eye - m @ k @ torch.linalg.solve(inner, k.T @ projection)
    return weight @ difference, c_target @ projection @ constrained @ m


def _last_token_rows(wrapper: PipelineWrapper, prompts: Sequence[str]) -> torch.Tensor:
    """Each prompt's embedding at its last token (BOS for the empty prompt), float64 ``(len(prompts), d)``."""
    positions = [wrapper.token_count(p) for p in prompts]
    encoding = wrapper.encode_prompt_prefixes(list(prompts), 1 + max(positions)).embeddings.double().cpu()
    return encoding[torch.arange(len(prompts)), torch.tensor(positions)]


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
    capabilities=Capabilities(preserve=True),
)
def erase_speed(wrapper: PipelineWrapper, concepts: ConceptSpec, config: SPEEDConfig) -> WeightEdit:
    """Erase ``concepts.targets`` into their guides (anchors) within the null space of ``concepts.preserve``."""
    generator = torch.Generator().manual_seed(config.seed)
    targets = list(concepts.targets)
    anchors = [concepts.guide_for(i) for i in range(len(targets))]
    kept, dropped = _retain_texts(targets, concepts.preserve)
    rows = _last_token_rows(wrapper, targets + anchors + kept)
    c_target, c_anchor, retain = rows[: len(targets)], rows[len(targets) : 2 * len(targets)], rows[2 * len(targets) :]
    empty = wrapper.encode_prompts([""]).embeddings[0].double().cpu()
    if not kept:
        retain = empty[1:]  # the reference's retain text "": its EOS and padding positions
    retain = retain[torch.randperm(len(retain), generator=generator)]  # once, as the reference shuffles
    if config.null_clusters > len(empty) - 1:
        raise ValueError(f"null_clusters is {config.null_clusters}; the empty prompt has {len(empty) - 1} positions")
    invariant = torch.cat([empty[:1], kmeans_centres(empty[1:], config.null_clusters, generator)])
    layers = wrapper.cross_attention_layers(config.layers)
    deltas, factors = {}, {}
    for layer in layers:
        if layer.in_features != c_target.shape[1]:
            raise ValueError(
                f"{layer.name} reads {layer.in_features}-d inputs, text embeddings are {c_target.shape[1]}-d"
            )
        weight = layer.module.weight.detach().double().cpu()
        lora_b, lora_a = speed_update(weight, c_target, c_anchor, retain, invariant, config, generator)
        name = f"unet.{layer.name}"
        factors[name] = (lora_a.float(), lora_b.float())
        deltas[name] = (lora_b @ lora_a).float()
    info = {"layers_matched": len(layers), "retain_embeddings": int(len(retain)), "retain_dropped": dropped}
    return WeightEdit(deltas, info, factors=factors if len(targets) < c_target.shape[1] else None)
