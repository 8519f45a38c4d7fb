"""The RECE embedding attack (Gong et al., 2024, "Reliable and Efficient Concept Erasure"): white-box, closed form.

An edit of the cross-attention key/value projections W_l -> W'_l removes a concept by changing what its text
embedding c is projected to. The attack looks for the embedding c* that the *edited* projections send where the
original ones sent c:

    c* = argmin_x  sum_l ||W'_l x - W_l c||^2 + lambda ||x||^2  =  (sum_l W'_l^T W'_l + lambda I)^-1 sum_l W'_l^T W_l c

one d x d solve shared by every token of every prompt (``M`` below, c* = M c), regularised towards the zero vector
(the reference's ``close_form_emb_regzero``). Every token of the prompt's embedding is mapped, BOS and padding
included, as in the reference, and the images are drawn from c* with the prompt's own classifier-free guidance.

Defaults are the reference's for artistic styles and objects (CharlesGong12/RECE, ``close_form_emb.py`` and its
README): lambda = 1e-3 (1e-1 for nudity), all keys and values. Where we differ: the solve is float64 (the reference
inverts in float32), and the attack maps each probe prompt's embedding instead of the bare concept's alone.

On SD3 and Flux (the reference is SD 1.x only) the edited projections are the transformer's text inputs that uce
changes there: ``context_embedder`` reads every token row and ``time_text_embed.text_embedder.linear_1`` the pooled
vector, so the token rows and the pooled vector each get their own map, solved the same way. The biases of those
projections are unchanged by the edit and cancel from ``W' x + b = W c + b``.

Against an erasure that leaves the keys and values as they are (LoRA on other layers, SAE interventions) the map is
the identity up to lambda and the attack is the unattacked prompt: it is the natural attack on UCE/TIME-style edits,
not a general one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines import CROSS_ATTENTION_PATTERNS, PipelineWrapper
from pipelines.checks import check_number_fields

from .adversaries import AdversaryProblem, register_adversary
from .base import AttackResult, AttackTarget, register_attack

__all__ = [
    "ReceEmbeddingConfig",
    "adversarial_map",
    "layer_patterns",
    "projection_weights",
    "rece_adversary",
    "rece_embedding",
    "restored_share",
]

logger = logging.getLogger(__name__)


@dataclass
class ReceEmbeddingConfig:
    """Settings of the RECE embedding attack.

    Attributes:
        regularization: lambda, the ridge towards the zero embedding (the reference's ``regular_scale``).
        layers: fnmatch patterns of the projections whose outputs the embedding restores (all cross-attention keys
            and values; on SD3/Flux, which have none, the default means the transformer's text projections: see
            :func:`layer_patterns`).
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"regularization": "> 0"}  # it keeps the solve invertible
    #: a closed form: nothing to spend a larger budget on
    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ()

    regularization: float = 1e-3
    layers: tuple[str, ...] = CROSS_ATTENTION_PATTERNS

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        check_number_fields(self)
        if not self.layers:
            raise ValueError("layers is empty: give at least one module-name pattern")


def layer_patterns(wrapper: PipelineWrapper, config: ReceEmbeddingConfig) -> tuple[str, ...]:
    """The projections the attack restores on ``wrapper``: ``config.layers``, where the default (UNet cross-attention
    keys and values) stands for the pipeline's closed-form layers, which on SD3/Flux are the transformer's text
    projections (``PipelineWrapper.closed_form_patterns``: what uce edits there)."""
    return wrapper.closed_form_patterns() if tuple(config.layers) == CROSS_ATTENTION_PATTERNS else config.layers


def projection_weights(wrapper: PipelineWrapper, patterns: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weights of the matched cross-attention projections as they are now, float64 on the CPU."""
    return {
        layer.name: layer.module.weight.detach().double().cpu() for layer in wrapper.cross_attention_layers(patterns)
    }


def _paired(
    original: dict[str, torch.Tensor], edited: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W_l, W'_l) by layer name, float64; ``ValueError`` unless both name the same non-empty set of layers."""
    if set(original) != set(edited) or not original:
        raise ValueError(f"need the same non-empty layers, got {len(original)} and {len(edited)}")
    return [(original[n].double().cpu(), edited[n].double().cpu()) for n in sorted(original)]


def adversarial_map(
    original: dict[str, torch.Tensor], edited: dict[str, torch.Tensor], regularization: float
) -> torch.Tensor:
    """``M = (sum_l W'_l^T W'_l + lambda I)^-1 sum_l W'_l^T W_l``, so that ``c* = M c`` (float64, ``d x d``); the
    weights by layer name, before (``original``) and after (``edited``) the erasure."""
    pairs = _paired(original, edited)
    d = pairs[0][0].shape[1]
    gram = regularization * torch.eye(d, dtype=torch.float64)
    cross = torch.zeros(d, d, dtype=torch.float64)
    for w, w_edited in pairs:
        gram += w_edited.T @ w_edited
        cross += w_edited.T @ w
    return torch.linalg.solve(gram, cross)


def restored_share(
    original: dict[str, torch.Tensor], edited: dict[str, torch.Tensor], c: torch.Tensor, c_star: torch.Tensor
) -> float | None:
    """1 - ||W' c* - W c|| / ||W' c - W c|| summed over layers: how much of the edit's effect on the keys and values
    the embedding undoes (1: all of it); None when the edit does not change them."""
    before = after = 0.0
    c, c_star = c.double(), c_star.double()
    for w, w_edited in _paired(original, edited):
        before += float((c @ (w_edited - w).T).norm() ** 2)
        after += float((c_star @ w_edited.T - c @ w.T).norm() ** 2)
    return None if before == 0.0 else 1.0 - (after / before) ** 0.5


@register_attack("rece_embedding", ReceEmbeddingConfig, "closed-form embedding restoring the keys/values", "embedding")
def rece_embedding(target: AttackTarget, config: ReceEmbeddingConfig, seed: int) -> AttackResult:
    """Draw every probe from ``c* = M c``, ``c`` its embedding as the erased model encodes it (deterministic: the
    seed is unused); where some matched projections read the pooled vector (SD3/Flux), that vector is mapped by its
    own ``M`` (one solve per kind of input: the token rows and the pooled vector differ in width and meaning)."""
    del seed
    patterns = layer_patterns(target.wrapper, config)
    reads = {layer.name: layer.reads for layer in target.wrapper.cross_attention_layers(patterns)}
    original = projection_weights(target.wrapper, patterns)
    with target.erased_model() as wrapper:
        edited = projection_weights(wrapper, patterns)
        changed = sum(not torch.equal(original[n], edited[n]) for n in original)
        groups = {kind: sorted(n for n in original if reads[n] == kind) for kind in ("tokens", "pooled")}
        maps = {kind: adversarial_map({n: original[n] for n in names}, {n: edited[n] for n in names},
                                      config.regularization)
                for kind, names in groups.items() if names}  # fmt: skip
        encoding = wrapper.encode_prompts([p.prompt for p in target.probes])
        c = encoding.embeddings.double().cpu()
        c_star = c @ maps["tokens"].T if "tokens" in maps else c
        encoding.embeddings = c_star.to(encoding.embeddings.device, encoding.embeddings.dtype)
        pooled = pooled_star = None
        if "pooled" in maps and encoding.pooled is not None:
            pooled = encoding.pooled.double().cpu()
            pooled_star = pooled @ maps["pooled"].T
            encoding.pooled = pooled_star.to(encoding.pooled.device, encoding.pooled.dtype)
        images = target.generate(encoding, [p.seed for p in target.probes])
    info = {"layers_matched": len(original), "layers_edited": changed}
    for kind, (x, x_star) in {"tokens": (c, c_star), "pooled": (pooled, pooled_star)}.items():
        if kind in maps and x is not None:
            names = groups[kind]
            flat, flat_star = x.reshape(-1, x.shape[-1]), x_star.reshape(-1, x.shape[-1])
            share = restored_share({n: original[n] for n in names}, {n: edited[n] for n in names}, flat, flat_star)
            suffix = "" if kind == "tokens" else "_pooled"
            eye = torch.eye(maps[kind].shape[0], dtype=maps[kind].dtype)
            info.update({f"restored_share{suffix}": share,
                         f"map_distance_from_identity{suffix}": float((maps[kind] - eye).norm())})  # fmt: skip
    restored = info.get("restored_share")
    logger.info("rece_embedding: %d of %d projections edited; restores %s of their change", changed, len(original),
                "n/a" if restored is None else f"{restored:.1%}")  # fmt: skip
    return AttackResult("rece_embedding", {}, images, 0.0, embeddings=c_star.float(), info=info)


@register_adversary("rece_embedding", "RECE's closed-form embedding against the current adapted keys/values")
def rece_adversary(problem: AdversaryProblem) -> torch.Tensor:
    """The training-time form: ``c* = M c`` with M solved from the adapted key/value projections as they are now
    (``W`` the base weights, ``W'`` with the adapters), the attack's default lambda and layers; the perturbation is
    ``c* - c``. No budget: one d x d solve per renewal. Zero when no adapted module is a key or value projection
    (the map is then the identity up to lambda, and the attack the clean prompt)."""
    config = ReceEmbeddingConfig()
    pairs = problem.weights(config.layers)
    if not pairs:
        return torch.zeros_like(problem.embeddings)
    m = adversarial_map({n: w for n, (w, _) in pairs.items()}, {n: w for n, (_, w) in pairs.items()},
                        config.regularization)  # fmt: skip
    c = problem.embeddings.double().cpu()
    return (c @ m.T - c).to(problem.embeddings.device, problem.embeddings.dtype)
