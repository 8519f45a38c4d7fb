"""Ring-A-Bell (Tsai et al., 2024): the concept's direction in text-embedding space, added to the prompt.

The concept vector is the mean difference of the original model's text embeddings of prompt pairs that differ only
by the concept ("a red star in the style of van gogh" minus "a red star"), token by token over the whole padded
sequence:

    d = mean_i [ E(prompt_i with the concept) - E(prompt_i without it) ]

and each attacked probe is drawn from ``E'(prompt) + eta * d``, ``E'`` the erased model's encoding of the probe
prompt (for an erasure that edits the UNet, the original encoder's). The model-specific attack needs the original
text encoder (white box) and feeds embeddings to the UNet (diffusers' ``prompt_embeds``).

Defaults follow the version in the RECE repository (CharlesGong12/RECE, ``attack_methods/RingABell.py``): the
direction added to the test prompt itself, eta = 0.9 (its value for Van Gogh; 3 for nudity). Where we differ: the
prompt pairs are generated (the micro world's templates, or generic ones for other concepts) instead of read from a
hand-written CSV, and the discrete token search that turns the embedding into text (the paper's genetic algorithm)
is not built: this is the continuous attack only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipelines import PipelineWrapper

from .base import AttackResult, AttackTarget, attack_probes, check_budget, register_attack

__all__ = ["RingABellConfig", "concept_direction", "ring_a_bell"]

logger = logging.getLogger(__name__)

BASES = ("prompt", "neutral")


@dataclass
class RingABellConfig:
    """Settings of Ring-A-Bell.

    Attributes:
        eta: the weight of the concept direction.
        pairs: prompt pairs (with and without the concept) the direction is averaged over.
        base: ``"prompt"`` adds the direction to the probe prompt, which names the concept (the reference's);
            ``"neutral"`` to the same prompt without it.
    """

    eta: float = 0.9
    pairs: int = 64
    base: str = "prompt"

    def __post_init__(self) -> None:
        check_budget(self, ("pairs",), ("eta",))
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")


def concept_direction(wrapper: PipelineWrapper, concept: str, pairs: int, seed: int) -> torch.Tensor:
    """``mean_i [E(with_i) - E(without_i)]`` over ``pairs`` generated prompt pairs, ``(tokens, width)`` float32."""
    probes = attack_probes(concept, pairs, seed)
    with_concept = wrapper.encode_prompts([p.prompt for p in probes]).embeddings.float()
    without = wrapper.encode_prompts([p.neutral for p in probes]).embeddings.float()
    return (with_concept - without).mean(dim=0)


@register_attack("ring_a_bell", RingABellConfig, "the concept's embedding direction added to the prompt", "embedding")
def ring_a_bell(target: AttackTarget, config: RingABellConfig, seed: int) -> AttackResult:
    """The direction from the original model (pairs drawn with ``seed``), added to each probe's erased encoding."""
    direction = concept_direction(target.wrapper, target.concept, config.pairs, seed + 7919)
    with target.erased_model() as wrapper:
        base = [p.prompt if config.base == "prompt" else p.neutral for p in target.probes]
        encoding = wrapper.encode_prompts(base)
        attacked = encoding.embeddings.float() + config.eta * direction.to(encoding.embeddings.device)
        encoding.embeddings = attacked.to(encoding.embeddings.dtype)
        images = target.generate(encoding, [p.seed for p in target.probes])
    norm = float(direction.norm())
    logger.info("ring_a_bell: direction norm %.3f, eta %.2f", norm, config.eta)
    return AttackResult("ring_a_bell", {}, images, 0.0, embeddings=attacked.float().cpu(),
                        info={"direction_norm": norm})  # fmt: skip
