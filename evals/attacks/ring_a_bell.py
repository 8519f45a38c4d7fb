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
hand-written CSV.

``ring_a_bell_prompt`` is the paper's own attack, which writes text: a genetic search over token sequences for the
prompt whose original-model embedding is nearest the target ``E(prompt) + eta * d`` (squared error over the whole
padded sequence), so the attack needs nothing but a text box on the deployed model and meets every part of the
erasure that reads the prompt (a text-encoder SAE, a per-prompt adapter strength). The reference
(chiayi-hsu/Ring-A-Bell, ``InversePrompt.ipynb``): 16 free tokens after BOS, padded with EOS; a population of 200,
of which the better half survives each generation; each survivor crosses over with a random other one at a random
point with probability 0.5 (both children join); each member then has one random token replaced with probability
0.25; 3000 generations, one search per target prompt. Where we differ (a CPU budget): ``population`` 64 and
``generations`` 150 by default; ``searches`` searches (the first probes' targets), whose prompts the other probes
take in turn; tokens drawn from whole words that tokenise back to themselves (``base.word_vocabulary``),
so the written text encodes as the searched ids (the reference draws any id and decodes); and the best member is
never mutated (elitism: the best loss only falls).

On SD3 and Flux the search draws tokens that every text encoder (CLIP's and T5's) reads as one whole word, and the
loss is over the whole joint token sequence the transformer reads (SD3's CLIP rows then T5's; Flux's T5 rows).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from pipelines import PipelineWrapper
from pipelines.checks import check_number_fields

from .adversaries import AdversaryProblem, register_adversary
from .base import (
    AttackResult,
    AttackTarget,
    attack_probes,
    register_attack,
    word_vocabulary,
)

__all__ = [
    "RingABellConfig",
    "RingABellPromptConfig",
    "TokenSearch",
    "concept_direction",
    "ring_a_bell",
    "ring_a_bell_adversary",
    "ring_a_bell_prompt",
    "search_tokens",
]

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

    NUMBER_RANGES: ClassVar[dict[str, str]] = {"eta": "> 0", "pairs": ">= 1"}
    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("pairs",)

    eta: float = 0.9
    pairs: int = 64
    base: str = "prompt"

    def __post_init__(self) -> None:
        check_number_fields(self)
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")


def concept_direction(wrapper: PipelineWrapper, concept: str, pairs: int, seed: int) -> torch.Tensor:
    """``mean_i [E(with_i) - E(without_i)]`` over ``pairs`` generated prompt pairs, ``(tokens, width)`` float32."""
    probes = attack_probes(concept, pairs, seed, forms=("one_other", "both_others"))  # both prompts name something
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


@dataclass
class RingABellPromptConfig(RingABellConfig):
    """Settings (the budget) of Ring-A-Bell's discrete search: :class:`RingABellConfig`'s (the target is
    ``E(base prompt) + eta * d``) and the search's.

    Attributes:
        length: free tokens of the written prompt (reference: 16).
        population: members of each generation (reference: 200).
        generations: generations of the search (reference: 3000).
        crossover_rate: chance that a survivor crosses over with another (reference: 0.5).
        mutation_rate: chance that a member has one token replaced (reference: 0.25).
        searches: targets searched (the first probes'); the other probes take their prompts in turn (reference: one
            search per prompt).
    """

    NUMBER_RANGES: ClassVar[dict[str, str]] = {
        **RingABellConfig.NUMBER_RANGES, "length": ">= 1", "population": ">= 2", "generations": ">= 1",
        "crossover_rate": "[0, 1]", "mutation_rate": "[0, 1]", "searches": ">= 1",
    }  # fmt: skip
    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("pairs", "generations")

    length: int = 16
    population: int = 64
    generations: int = 150
    crossover_rate: float = 0.5
    mutation_rate: float = 0.25
    searches: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()  # RingABellConfig's checks every number of this class against NUMBER_RANGES


@dataclass
class TokenSearch:
    """One search's outcome: the best token ids, their loss, and the best loss after each generation."""

    ids: torch.Tensor  # (length,)
    loss: float
    curve: list[float]


def _sequence_loss(wrapper: PipelineWrapper, members: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|| E(BOS members EOS pad) - target ||^2`` per member, over the whole padded sequence, ``(n,)``."""
    rows = wrapper.token_rows(members.reshape(-1)).reshape(*members.shape, -1)
    encoding = wrapper.encode_with_vectors(["{}"] * len(members), rows)
    return (encoding.embeddings.float() - target.to(encoding.embeddings.device)).pow(2).sum(dim=(1, 2)).cpu()


@torch.no_grad()
def search_tokens(
    wrapper: PipelineWrapper,
    target: torch.Tensor,
    vocabulary: torch.Tensor,
    config: RingABellPromptConfig,
    generator: torch.Generator,
) -> TokenSearch:
    """Ring-A-Bell's genetic search for the ``config.length`` tokens whose embedding is nearest ``target``
    ``(tokens, width)``: keep the better half, cross over, mutate, ``config.generations`` times."""
    n, length = config.population, config.length

    def draw(*shape: int) -> torch.Tensor:
        return vocabulary[torch.randint(len(vocabulary), shape, generator=generator)]

    members = draw(n, length)
    losses = _sequence_loss(wrapper, members, target)
    curve = []
    for _ in range(config.generations):
        order = losses.argsort()[: max(1, n // 2)]
        members, losses = members[order], losses[order]
        curve.append(float(losses[0]))
        children = []
        for i in range(len(members)):
            if float(torch.rand((), generator=generator)) < config.crossover_rate:
                j = int(torch.randint(len(members), (), generator=generator))
                point = int(torch.randint(1, length, (), generator=generator)) if length > 1 else 0
                children.append(torch.cat([members[i, :point], members[j, point:]]))
                children.append(torch.cat([members[j, :point], members[i, point:]]))
        pool = torch.cat([members, *[c.unsqueeze(0) for c in children]])
        scored = torch.cat([losses, torch.full((len(children),), float("nan"))])
        mutate = torch.rand(len(pool), generator=generator) < config.mutation_rate
        mutate[0] = False  # the best survivor is kept as it is
        for i in mutate.nonzero().flatten().tolist():
            pool[i, int(torch.randint(length, (), generator=generator))] = draw(1)[0]
            scored[i] = float("nan")
        fresh = scored.isnan()
        if fresh.any():
            scored[fresh] = _sequence_loss(wrapper, pool[fresh], target)
        members, losses = pool, scored
    best = int(losses.argmin())
    curve.append(float(losses[best]))
    return TokenSearch(members[best].clone(), float(losses[best]), curve)


def _check_prompt_search(target: AttackTarget, config: RingABellPromptConfig) -> None:
    if config.length > target.wrapper.max_prompt_tokens:
        raise ValueError(f"length {config.length} is more tokens than the text encoder reads "
                         f"({target.wrapper.max_prompt_tokens})")  # fmt: skip


@register_attack("ring_a_bell_prompt", RingABellPromptConfig,
                 "a written prompt whose embedding is the concept direction's (Ring-A-Bell's genetic search)",
                 "prompt", check=_check_prompt_search)  # fmt: skip
def ring_a_bell_prompt(target: AttackTarget, config: RingABellPromptConfig, seed: int) -> AttackResult:
    """Search the first ``config.searches`` probes' targets on the original model (white box), then draw every probe
    from a found prompt, as text, with the erased model."""
    wrapper = target.wrapper
    clock = time.perf_counter()
    direction = concept_direction(wrapper, target.concept, config.pairs, seed + 7919)
    searched = target.probes[: config.searches]
    bases = [p.prompt if config.base == "prompt" else p.neutral for p in searched]
    shift = config.eta * direction.to(wrapper.device)
    targets = wrapper.encode_prompts(bases).embeddings.float() + shift
    vocabulary = word_vocabulary(wrapper)
    generator = torch.Generator().manual_seed(seed)
    found = []
    for row in tqdm(targets, desc="ring_a_bell_prompt", unit="search", disable=not target.progress):
        found.append(search_tokens(wrapper, row, vocabulary, config, generator))
    written = [wrapper.decode_tokens(f.ids) for f in found]
    seconds = {"search": time.perf_counter() - clock}
    attacked = [written[i % len(written)] for i in range(len(target.probes))]
    with target.erased_model():
        images = target.generate(attacked, [p.seed for p in target.probes])
    seconds["generation"] = time.perf_counter() - clock - seconds["search"]
    for text, search in zip(written, found, strict=True):
        logger.info("ring_a_bell_prompt: %r, loss %.4g -> %.4g", text, search.curve[0], search.loss)
    info = {
        "seconds": seconds,
        "prompts_found": written,
        "searched_prompts": bases,
        "loss_initial": [f.curve[0] for f in found],
        "loss_final": [f.loss for f in found],
        "loss_of_the_base_prompt": float(shift.pow(2).sum()),  # the prompt itself misses its target by eta d
        "loss_curves": [f.curve for f in found],
        "vocabulary_size": int(len(vocabulary)),
        "direction_norm": float(direction.norm()),
    }
    return AttackResult("ring_a_bell_prompt", {}, images, 0.0, prompts=attacked, info=info)


@register_adversary("ring_a_bell", "Ring-A-Bell's concept direction, eta times, added to the attacked embedding")
def ring_a_bell_adversary(problem: AdversaryProblem) -> torch.Tensor:
    """The training-time form: ``eta * d`` for each attacked prompt, ``d`` its concept direction from the ORIGINAL
    model (adapters off; the attack's default eta and pairs, pairs seeded as the attack seeds them for seed 0),
    computed at the first renewal and kept in ``problem.state`` (the trainer checkpoints it). No budget."""
    config = RingABellConfig()
    if "direction" not in problem.state:
        with problem.original():
            directions = [concept_direction(problem.wrapper, p, config.pairs, 7919) for p in problem.prompts]
        problem.state["direction"] = torch.stack(directions).float().cpu()
    direction = problem.state["direction"].to(problem.embeddings.device, problem.embeddings.dtype)
    return config.eta * direction
