"""Probes: prompts that name one concept, with a seed, and the check that the image shows that concept.

A probe's image is *correct* when zero-shot classification among its category's concept names returns the named
concept. "Accuracy" everywhere in erase means the fraction of correct probes, so after an erasure a low accuracy on
target probes is the goal and a high one on preserved probes is the constraint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.tokenizer import concept_text

from .microworld import world
from .scorer import TEMPLATES, ClipScorer

__all__ = [
    "GENERIC_TEMPLATES",
    "Probe",
    "generic_probes",
    "judge_correct",
    "probe_accuracy",
    "probe_correct",
    "probe_verdicts",
    "world_concept",
    "world_labels",
    "world_probes",
]

logger = logging.getLogger(__name__)

#: Zero-shot templates for concepts of unknown category (hub models, user-given concepts).
GENERIC_TEMPLATES: tuple[str, ...] = ("{}", "a picture of {}", "in the style of {}", "an image of {}")


@dataclass(frozen=True)
class Probe:
    prompt: str
    seed: int
    concept: str  # the canonical concept the prompt names
    category: str  # the zero-shot label set it is judged among


def world_concept(name: str) -> str | None:
    """The micro-world name (canonical or synonym) that a concept as a user writes it stands for, or ``None``.

    The name is read as the text encoder reads it (``concept_text``: case, spacing, width), then tried as it is,
    with hyphens and underscores as spaces, without a leading article ("a circle") and without a trailing "style"
    ("van gogh style"). Anything else is not a world concept: the check probes it generically.
    """
    reading = concept_text(name)
    spaced = " ".join(re.sub(r"[-_]+", " ", reading).split())
    bare = re.sub(r"^(a|an|the) ", "", spaced)
    for candidate in (reading, spaced, bare, re.sub(r" (style|art)$", "", bare)):
        try:
            world.canonical(candidate)
        except ValueError:
            continue
        return candidate
    return None


def world_probes(concepts: Sequence[str], per_concept: int, seed: int = 0, name_as: str | None = None) -> list[Probe]:
    """``per_concept`` probes per micro-world concept; the other attributes are random (fixed by ``seed``).

    ``name_as`` writes the concept under another name (a synonym) while it is still judged as the canonical one.
    """
    rng = np.random.default_rng(seed)
    probes = []
    for concept in concepts:
        category = world.category_of(concept)
        canonical = world.canonical(concept)
        for _ in range(per_concept):
            named = {category: name_as or concept}
            for other in world.CATEGORIES:
                # Name each other attribute half the time, as real prompts do.
                if other != category and rng.random() < 0.5:
                    choices = [c for c in world.concepts(other) if c != "plain"]
                    named[other] = choices[int(rng.integers(len(choices)))]
            probes.append(Probe(world.prompt(**named), seed * 1_000_003 + len(probes), canonical, category))
    return probes


def generic_probes(concepts: Sequence[str], per_concept: int, seed: int = 0) -> list[Probe]:
    """Probes for concepts outside the micro world, all judged among the same label set ``"concept"``."""
    templates = ("a painting in the style of {}", "a picture of {}", "{}")
    return [
        Probe(templates[k % len(templates)].format(c), seed * 1_000_003 + i * per_concept + k, c, "concept")
        for i, c in enumerate(concepts)
        for k in range(per_concept)
    ]


def probe_verdicts(
    scorer: ClipScorer,
    images: Sequence[Image.Image],
    probes: Sequence[Probe],
    labels: Mapping[str, Sequence[str]],
) -> list[str]:
    """Each image's zero-shot verdict among ``labels[probe.category]``: what the image reads as."""
    if len(images) != len(probes):
        raise ValueError(f"{len(images)} images for {len(probes)} probes")
    verdicts = [""] * len(probes)
    for category in sorted({p.category for p in probes}):
        idx = [i for i, p in enumerate(probes) if p.category == category]
        templates = TEMPLATES.get(category, GENERIC_TEMPLATES)
        result = scorer.zero_shot([images[i] for i in idx], labels[category], templates)
        for i, predicted in zip(idx, result.predictions, strict=True):
            verdicts[i] = predicted
    return verdicts


def probe_correct(
    scorer: ClipScorer,
    images: Sequence[Image.Image],
    probes: Sequence[Probe],
    labels: Mapping[str, Sequence[str]],
) -> list[bool]:
    """Whether each image is zero-shot classified as its probe's concept, among ``labels[probe.category]``."""
    verdicts = probe_verdicts(scorer, images, probes, labels)
    return [v == p.concept for v, p in zip(verdicts, probes, strict=True)]


def judge_correct(judge: Any, images: Sequence[Image.Image], probes: Sequence[Any]) -> list[bool]:
    """Whether the micro world's judge reads each image as its probe's concept (in the probe's category)."""
    predicted = judge.predict(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    return [predicted[p.category][i] == p.concept for i, p in enumerate(probes)]


def probe_accuracy(correct: Sequence[bool]) -> float:
    return float(np.mean(correct)) if len(correct) else float("nan")


def world_labels() -> dict[str, list[str]]:
    return {c: world.concepts(c) for c in world.CATEGORIES}
