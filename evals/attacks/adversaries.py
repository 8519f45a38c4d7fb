"""Training-time adversaries: the form of an embedding attack a trainer runs against the model it is training.

Adversarial training (RACE, Kim et al. 2024; AdvUnlearn, Zhang et al. 2024) erases the concept also from the
embeddings an attacker would feed: every few steps an adversary is run against the model *being trained* and the
erasure loss is taken on the adversarial embedding instead of the clean one. An embedding attack (``kind ==
"embedding"`` in :mod:`.base`) opts in by registering an adversary under its own name with
:func:`register_adversary`; an adversary may also be registered under a name of its own when it is no evaluation
attack (``race_pgd`` below). A trainer asks :func:`get_adversary` by name and never knows the names.

An adversary is a function ``(problem) -> perturbation``: it gets an :class:`AdversaryProblem` (the attacked prompts,
their embeddings under the model being trained, the attacker's objective on embeddings, the adapted weights, a
budget and a generator) and returns a ``(prompts, tokens, width)`` perturbation that the trainer adds to those
prompts' embeddings on the trained model's side until the next renewal.

=================  =================================================================================================
adversary          what it perturbs
=================  =================================================================================================
``race_pgd``       RACE's attack: PGD with sign steps in an L-inf ball of radius ``epsilon`` around the text encoder's
                   output embedding, random start, clamped to the embedding's own value range (``steps`` steps of
                   ``step_size``); the objective is the trainer's
``rece_embedding`` RECE's closed form c* = M c against the CURRENT adapted key/value weights (no budget: one solve)
``ring_a_bell``    Ring-A-Bell's concept direction (original model, fixed over the run), ``eta`` times
=================  =================================================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipelines import PipelineWrapper

from .base import available_attacks, get_attack

__all__ = [
    "Adversary",
    "AdversaryBudget",
    "AdversaryProblem",
    "available_adversaries",
    "get_adversary",
    "pgd_perturbation",
    "register_adversary",
]


@dataclass(frozen=True)
class AdversaryBudget:
    """What an adversary may spend per renewal: optimisation ``steps`` of ``step_size``, within ``epsilon`` (an
    L-inf radius on the embedding). A closed-form adversary spends none of it."""

    steps: int
    step_size: float
    epsilon: float


@dataclass
class AdversaryProblem:
    """What a training-time adversary attacks when the trainer renews it.

    Attributes:
        wrapper: the pipeline, adapters in force (the model being trained).
        prompts: the attacked prompts, one row each.
        embeddings: ``(len(prompts), tokens, width)``: their encoding by the model being trained, detached.
        loss: the attacker's objective on embeddings shaped like ``embeddings`` (lower: more of the concept back),
            differentiable in its argument; it runs the model being trained on the step's examples.
        weights: ``weights(patterns)`` -> ``{module: (W, W + dW)}`` float64, the adapted UNet modules matching
            ``patterns`` without and with the adapters as they are now (modules not adapted are left out: unchanged).
        original: a context manager in which the pipeline is the original model (adapters off).
        budget: the adversary's budget per renewal.
        generator: the trainer's generator (draws keep the run deterministic and resumable).
        state: the adversary's own tensors kept between renewals; the trainer checkpoints them.
    """

    wrapper: PipelineWrapper
    prompts: list[str]
    embeddings: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    weights: Callable[[Sequence[str]], dict[str, tuple[torch.Tensor, torch.Tensor]]]
    original: Callable[[], contextlib.AbstractContextManager]
    budget: AdversaryBudget
    generator: torch.Generator
    state: dict[str, torch.Tensor] = field(default_factory=dict)


Adversary = Callable[[AdversaryProblem], torch.Tensor]

_ADVERSARIES: dict[str, tuple[Adversary, str]] = {}


def register_adversary(name: str, summary: str) -> Callable[[Adversary], Adversary]:
    """Decorator registering ``fn(problem) -> perturbation`` as the training-time adversary ``name``: an embedding
    attack's own name (its training-time form) or a name no attack has."""

    def decorator(fn: Adversary) -> Adversary:
        if name in _ADVERSARIES:
            raise ValueError(f"an adversary named {name!r} is already registered")
        _ADVERSARIES[name] = (fn, summary)
        return fn

    return decorator


def available_adversaries() -> list[str]:
    """Names a trainer's ``adversarial`` setting accepts."""
    available_attacks()  # imports every attack module, which registers its adversary
    return list(_ADVERSARIES)


def get_adversary(name: str) -> Adversary:
    """The adversary ``name``; ``ValueError`` in one line for an unknown name, an attack that writes text or changes
    sampling (not an embedding attack), or an embedding attack that has no training-time form."""
    names = available_adversaries()
    if name in _ADVERSARIES:
        return _ADVERSARIES[name][0]
    choices = ", ".join(names)
    if name in available_attacks():
        kind = get_attack(name).kind
        if kind != "embedding":
            raise ValueError(f"attack {name!r} is a {kind} attack; adversarial training takes an embedding attack "
                             f"with a training-time adversary: {choices}")  # fmt: skip
        raise ValueError(f"embedding attack {name!r} has no training-time adversary; available: {choices}")
    raise ValueError(f"unknown adversary {name!r}; available: {choices}")


def pgd_perturbation(problem: AdversaryProblem) -> torch.Tensor:
    """RACE's PGD (``train-esd.py`` ``pgd_attack``) on the embeddings: a random start uniform in the L-inf ball,
    then ``steps`` sign-gradient steps of ``step_size`` down the objective, each projected back into the ball and
    clamped to each prompt's own embedding range [min(c), max(c)]; returns the final perturbation.

    RACE maximises minus its loss; descending the objective is the same step."""
    budget = problem.budget
    clean = problem.embeddings.detach().float()
    low = clean.amin(dim=(1, 2), keepdim=True)
    high = clean.amax(dim=(1, 2), keepdim=True)
    start = torch.rand(clean.shape, generator=problem.generator, dtype=torch.float32) * 2 - 1
    adv = torch.minimum(torch.maximum(clean + budget.epsilon * start.to(clean.device), low), high)
    for _ in range(budget.steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(problem.loss(adv), [adv])
        with torch.no_grad():
            moved = adv - budget.step_size * grad.sign()
            delta = (moved - clean).clamp(-budget.epsilon, budget.epsilon)
            adv = torch.minimum(torch.maximum(clean + delta, low), high)
    return (adv - clean).detach()


@register_adversary("race_pgd", "RACE: PGD in an L-inf ball on the text encoder's output embedding")
def race_pgd(problem: AdversaryProblem) -> torch.Tensor:
    return pgd_perturbation(problem)
