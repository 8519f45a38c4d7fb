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

from .metrics import accuracy
from .microworld import world
from .scorer import TEMPLATES, ClipScorer

__all__ = [
    "FORM_GAP",
    "FORM_TITLES",
    "GENERIC_TEMPLATES",
    "PROMPT_FORMS",
    "SEED_SPLITS",
    "Probe",
    "check_forms",
    "check_split",
    "form_attributes",
    "form_gap",
    "form_prompt",
    "generic_probes",
    "judge_correct",
    "probe_accuracy",
    "probe_correct",
    "probe_verdicts",
    "probe_seed",
    "prompt_form",
    "split_accuracies",
    "world_concept",
    "world_labels",
    "world_probes",
]

logger = logging.getLogger(__name__)

#: Zero-shot templates for concepts of unknown category (hub models, user-given concepts).
GENERIC_TEMPLATES: tuple[str, ...] = ("{}", "a picture of {}", "in the style of {}", "an image of {}")

#: The three forms a probe's prompt takes: the concept alone in the world's templates ("a van gogh painting"); with
#: one other attribute named ("a heart in the style of van gogh"); with both other attributes named ("a blue heart in
#: the style of van gogh": for a style, its object and its colour). A user writes all three; an erasure measured on
#: one form alone can look better than it is on another.
PROMPT_FORMS: tuple[str, ...] = ("alone", "one_other", "both_others")
FORM_TITLES: dict[str, str] = {
    "alone": "alone",
    "one_other": "+1 attribute",
    "both_others": "+2 attributes",
}
#: Figures of one setting that differ between prompt forms by more than this (absolute) are flagged.
FORM_GAP = 0.05
#: Seed sets: settings are chosen on ``tune`` seeds and reported on ``report`` seeds, which never coincide.
SEED_SPLITS: tuple[str, ...] = ("tune", "report")
#: Where each split's seeds start inside a base seed's block of ``_SEED_BLOCK`` seeds.
_SPLIT_OFFSETS = {"tune": 0, "report": 500_000}
_SEED_BLOCK = 1_000_003


@dataclass(frozen=True)
class Probe:
    prompt: str
    seed: int
    concept: str  # the canonical concept the prompt names
    category: str  # the zero-shot label set it is judged among
    form: str = ""  # one of PROMPT_FORMS; "" for probes built otherwise (generic, or other attributes at random)


def check_forms(forms: Sequence[str]) -> tuple[str, ...]:
    """``forms`` as a tuple, each one of :data:`PROMPT_FORMS`, none twice; ``ValueError`` in one line otherwise."""
    forms = tuple(forms)
    unknown = [f for f in forms if f not in PROMPT_FORMS]
    if unknown or not forms or len(set(forms)) != len(forms):
        raise ValueError(f"prompt forms must be distinct ones of {', '.join(PROMPT_FORMS)}; got {', '.join(forms)}")
    return forms


def check_split(split: str) -> str:
    if split not in SEED_SPLITS:
        raise ValueError(f"seed split must be one of {', '.join(SEED_SPLITS)}, got {split!r}")
    return split


def probe_seed(seed: int, index: int, split: str) -> int:
    """The image seed of probe ``index`` of a probe set drawn with ``seed``: ``seed * 1_000_003 + offset + index``,
    the offset 0 for ``tune`` and 500,000 for ``report``, so the two splits share no seed for up to 500,000 probes
    per set (more are refused)."""
    if not 0 <= index < _SPLIT_OFFSETS["report"]:
        raise ValueError(f"a probe set holds at most {_SPLIT_OFFSETS['report']} probes per seed")
    return seed * _SEED_BLOCK + _SPLIT_OFFSETS[check_split(split)] + index


def form_attributes(category: str, form: str, rng: np.random.Generator) -> dict[str, str]:
    """The other attributes a prompt of ``form`` names besides its ``category`` concept (random world names)."""
    others = [c for c in world.CATEGORIES if c != category]
    if form == "alone":
        picked = []
    elif form == "one_other":
        picked = [others[int(rng.integers(len(others)))]]
    elif form == "both_others":
        picked = others
    else:
        raise ValueError(f"unknown prompt form {form!r}; expected one of {', '.join(PROMPT_FORMS)}")
    named = {}
    for other in picked:
        choices = [c for c in world.concepts(other) if c != "plain"]
        named[other] = choices[int(rng.integers(len(choices)))]
    return named


def form_prompt(category: str, name: str, form: str, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A prompt of ``form`` naming ``name`` (a ``category`` concept) with a random template of its attribute set,
    and the other attributes it names."""
    named = form_attributes(category, form, rng)
    attributes = {**named, category: name}
    plain = category == "style" and world.canonical(name) == "plain"
    templates = world.templates_for(**{c: c in attributes for c in world.CATEGORIES}, plain=plain)
    return world.prompt(**attributes, template=int(rng.integers(len(templates)))), named


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


def prompt_form(prompt: str, category: str) -> str:
    """The form (:data:`PROMPT_FORMS`) of a prompt that names a concept of the micro world's ``category``: how many
    of the other categories it names besides (any world name of theirs, as a whole word); "" for a category outside
    the world. Read from the text, so a suite file's rows have forms too."""
    if category not in world.CATEGORIES:
        return ""
    words = f" {' '.join(re.sub(r'[^a-z0-9-]+', ' ', prompt.lower()).split())} "
    named = sum(
        any(f" {name} " in words for concept in world.concepts(other) for name in world.all_names(concept))
        for other in world.CATEGORIES
        if other != category
    )
    return PROMPT_FORMS[named]


def world_probes(
    concepts: Sequence[str],
    per_concept: int,
    seed: int = 0,
    name_as: str | None = None,
    *,
    forms: Sequence[str] | None = None,
    split: str = "tune",
) -> list[Probe]:
    """``per_concept`` probes per micro-world concept; the other attributes are random (fixed by ``seed``).

    ``forms`` (some of :data:`PROMPT_FORMS`): the ``i``-th probe of the list takes form ``forms[i % len(forms)]``
    (so a pooled group of many concepts, one probe each, still holds every form) with a random template of its
    attribute set; ``None`` names each other attribute half the time in the canonical template
    (the quick self-check's probes). ``split`` picks the seed set (:func:`probe_seed`; ``tune`` by default: the
    seeds settings are chosen on). ``name_as`` writes the
    concept under another name (a synonym) while it is still judged as the canonical one.
    """
    forms = None if forms is None else check_forms(forms)
    rng = np.random.default_rng(seed)
    probes = []
    for concept in concepts:
        category = world.category_of(concept)
        canonical = world.canonical(concept)
        for _ in range(per_concept):
            if forms is not None:
                form = forms[len(probes) % len(forms)]
                text, _ = form_prompt(category, name_as or concept, form, rng)
                probes.append(Probe(text, probe_seed(seed, len(probes), split), canonical, category, form))
                continue
            named = {category: name_as or concept}
            for other in world.CATEGORIES:
                # Name each other attribute half the time, as real prompts do.
                if other != category and rng.random() < 0.5:
                    choices = [c for c in world.concepts(other) if c != "plain"]
                    named[other] = choices[int(rng.integers(len(choices)))]
            probes.append(Probe(world.prompt(**named), probe_seed(seed, len(probes), split), canonical, category))
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


def split_accuracies(correct: Sequence[bool], forms: Sequence[str]) -> dict[str, dict]:
    """The accuracy of each prompt form's probes (:func:`evals.metrics.accuracy`), in :data:`PROMPT_FORMS` order;
    empty when the probes carry no form."""
    if len(correct) != len(forms):
        raise ValueError(f"{len(correct)} flags for {len(forms)} forms")
    return {f: accuracy([c for c, g in zip(correct, forms, strict=True) if g == f])
            for f in PROMPT_FORMS if f in forms}  # fmt: skip


def form_gap(by_form: Mapping[str, Mapping[str, Any] | None]) -> float | None:
    """The largest difference between two forms' figures (``{form: ACC}``), None with fewer than two figures."""
    values = [a["value"] for a in by_form.values() if a and a.get("value") is not None]
    return max(values) - min(values) if len(values) > 1 else None
