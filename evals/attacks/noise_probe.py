"""Noise probe: inference-only re-sampling at full sampler noise, keeping the image most like the erased concept.

No weights, no gradients, no adversarial text: for every probe the erased model draws ``candidates`` images from the
probe's own prompt with DDIM at noise level ``eta`` (1: as much fresh noise per step as DDPM's ancestral sampler)
and different seeds, and the attacker keeps the one the CLIP scorer rates most likely to show the concept (its
zero-shot probability among the probe's labels). An erasure that only lowers the concept's odds, rather than
removing it, leaks under this best-of-N search.

On SD3 and Flux, which sample by flow matching, the re-sampling is the flow path's DDIM at the same ``eta``
(``pipelines.sampling.FlowDDIMScheduler``: DDIM in the variance-preserving form of the flow path; eta 0 is the
pipelines' own Euler sampler, eta 1 renews as much noise per step as DDPM does).

The scorer that picks the image is the scorer that counts successes, so the CLIP rate of this attack is optimistic
by construction; on the micro world the judge, which the attack never sees, is the honest column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipelines.checks import check_number_fields

from ..probes import GENERIC_TEMPLATES
from ..scorer import TEMPLATES
from .base import AttackResult, AttackTarget, register_attack

__all__ = ["NoiseProbeConfig", "noise_probe"]

logger = logging.getLogger(__name__)


@dataclass
class NoiseProbeConfig:
    """Settings of the noise probe.

    Attributes:
        candidates: images drawn per probe; the attack keeps one.
        eta: DDIM's noise level while re-sampling, in (0, 1].
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"candidates": ">= 1", "eta": "(0, 1]"}
    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("candidates",)

    candidates: int = 8
    eta: float = 1.0

    def __post_init__(self) -> None:
        check_number_fields(self)


@register_attack("noise_probe", NoiseProbeConfig, "best of N noisy re-samplings, picked by the scorer", "sampling")
def noise_probe(target: AttackTarget, config: NoiseProbeConfig, seed: int) -> AttackResult:
    """``candidates`` DDIM samples per probe (seeds from ``seed`` and the probe's), the scorer's favourite kept."""
    if target.scorer is None:
        raise ValueError("noise_probe picks images with a CLIP scorer: give the target a scorer")
    k = config.candidates
    prompts = [p.prompt for p in target.probes for _ in range(k)]
    seeds = [(p.seed * 7 + seed * 1_000_003 + j) % 2**63 for p in target.probes for j in range(k)]
    with target.erased_model():
        candidates = target.generate(prompts, seeds, eta=config.eta)
    chosen = []
    for category in sorted({p.category for p in target.probes}):
        rows = [i for i, p in enumerate(target.probes) if p.category == category]
        labels = list(target.labels[category])
        result = target.scorer.zero_shot([candidates[i * k + j] for i in rows for j in range(k)], labels,
                                         TEMPLATES.get(category, GENERIC_TEMPLATES))  # fmt: skip
        probs = result.probs.reshape(len(rows), k, len(labels))
        for r, i in enumerate(rows):
            concept_probs = probs[r, :, labels.index(target.probes[i].concept)]
            chosen.append((i, int(torch.argmax(concept_probs))))
    keep = [candidates[i * k + j] for i, j in sorted(chosen)]
    logger.info("noise_probe: %d candidates per probe", k)
    info = {"candidates_drawn": len(candidates), "picked": [j for _, j in sorted(chosen)]}
    return AttackResult("noise_probe", {}, keep, 0.0, prompts=[p.prompt for p in target.probes], info=info)
