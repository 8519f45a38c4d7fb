"""The attack interface: what every attack takes and returns, the registry, the probes and the success rate.

An attack gets an :class:`AttackTarget` (the pipeline, a context manager that puts the erasure in force, the concept
and the probes to attack) plus its config dataclass and a seed, and returns an :class:`AttackResult`: one image per
probe drawn by the *erased* model under attack, and the adversarial prompts or embeddings that drew them. The same
probes drawn by the erased model without the attack give the unattacked rate beside it.

The attacks reach the model only through :class:`pipelines.PipelineWrapper` and the erasure only through
``target.erased(wrapper)``, so they run against every artifact kind the toolkit makes (weight edits, LoRA, runtime
interventions). The original model is the same pipeline outside that context: one model in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines import ARCHITECTURE_NAMES, ARCHITECTURES, DEFAULT_GUIDANCE, DEFAULT_STEPS, PipelineWrapper
from pipelines.checks import check_config_fields, check_text_fields

from .. import metrics as M
from ..microworld import world
from ..probes import (
    PROMPT_FORMS,
    Probe,
    check_forms,
    check_split,
    form_prompt,
    judge_correct,
    probe_seed,
    probe_verdicts,
    split_accuracies,
    world_concept,
    world_labels,
)

__all__ = [
    "KINDS",
    "THREAT_MODELS",
    "Attack",
    "AttackProbe",
    "AttackResult",
    "AttackTarget",
    "attack_configs",
    "attack_labels",
    "attack_probes",
    "attack_success",
    "available_attacks",
    "budget_config",
    "budget_fields",
    "check_attack",
    "check_attack_architecture",
    "check_budget",
    "get_attack",
    "others_kept",
    "parse_budget",
    "register_attack",
    "resolve_attacks",
    "run_attack",
    "word_vocabulary",
]

logger = logging.getLogger(__name__)

#: word_vocabulary's ids per wrapper (they depend on its tokenizer alone), dropped with the wrapper
_WORDS: weakref.WeakKeyDictionary[PipelineWrapper, torch.Tensor] = weakref.WeakKeyDictionary()

#: One line per attack module; importing it registers the attack.
_ATTACK_MODULES: tuple[str, ...] = (
    "evals.attacks.rece_embedding",
    "evals.attacks.ring_a_bell",
    "evals.attacks.noise_probe",
    "evals.attacks.unlearn_diff_atk",
    "evals.attacks.concept_inversion",
)

#: Labels a concept outside the micro world is told apart from when nothing else is given (zero-shot needs rivals).
GENERIC_ALTERNATIVES: tuple[str, ...] = ("a photo", "a painting", "a drawing", "an abstract pattern")

#: The prompt without the concept of a probe that names the concept alone.
NEUTRAL_ALONE = "a picture"

#: Prompts for concepts outside the micro world: (with the concept, the same without it).
GENERIC_PAIRS: tuple[tuple[str, str], ...] = (
    ("a painting in the style of {}", "a painting"),
    ("a picture of {}", "a picture"),
    ("{}", "a picture"),
)


@dataclass(frozen=True)
class AttackProbe:
    """A prompt naming the attacked concept, the same prompt without it, and the seed of its image."""

    prompt: str
    neutral: str
    seed: int
    concept: str  # the label a verdict must equal for the attack to succeed on this probe
    category: str  # the zero-shot label set the verdict is taken among
    form: str = ""  # the prompt's form (evals.probes.PROMPT_FORMS); "" for concepts outside the micro world
    #: the other attributes the prompt names, (category, canonical name) pairs: "a blue heart in the style of van
    #: gogh" names (colour, blue) and (object, heart)
    others: tuple[tuple[str, str], ...] = ()

    def as_probe(self) -> Probe:
        return Probe(self.prompt, self.seed, self.concept, self.category, self.form)


@dataclass
class AttackTarget:
    """What an attack attacks.

    Attributes:
        wrapper: the pipeline; outside ``erased`` it is the original model.
        erased: ``erased(wrapper)`` is a context manager that puts the erasure in force for its block.
        concept: the erased concept under attack, as the user named it.
        probes: the prompts whose images the attack must bring the concept back into (one image each).
        labels: category -> the zero-shot labels a verdict is taken among (default: :func:`attack_labels`).
        scorer: a :class:`evals.scorer.ClipScorer`, for attacks that pick images by score (``noise_probe``).
        steps, guidance: the sampler settings every image of the attack is drawn with.
        batch_size: images per generation batch.
        progress: show progress bars.
    """

    wrapper: PipelineWrapper
    erased: Callable[[PipelineWrapper], AbstractContextManager]
    concept: str
    probes: list[AttackProbe]
    labels: Mapping[str, Sequence[str]] | None = None
    scorer: Any = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = attack_labels(self.concept)

    @contextlib.contextmanager
    def erased_model(self) -> Iterator[PipelineWrapper]:
        with self.erased(self.wrapper):
            yield self.wrapper

    def generate(self, prompts: Sequence[str] | Any, seeds: Sequence[int], **kwargs: Any) -> list[Image.Image]:
        """Images of the pipeline as it is now (call inside :meth:`erased_model` for the erased model's)."""
        kwargs.setdefault("progress", self.progress)
        return self.wrapper.generate(prompts, seeds, steps=self.steps, guidance=self.guidance,
                                     batch_size=self.batch_size, **kwargs)  # fmt: skip


@dataclass
class AttackResult:
    """An attack's outcome: ``images[i]`` is the erased model's image for ``probes[i]`` under attack."""

    attack: str
    config: dict[str, Any]
    images: list[Image.Image]
    seconds: float
    prompts: list[str] | None = None  # adversarial prompts (attacks that write text)
    embeddings: torch.Tensor | None = None  # adversarial prompt embeddings (attacks that write embeddings)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    name: str
    config_class: type
    run: Callable[[AttackTarget, Any, int], AttackResult]
    summary: str
    #: the threat model: what the attacker controls. "embedding": feeds prompt embeddings to the UNet (white-box,
    #: diffusers' ``prompt_embeds``: needs the weights); "prompt": writes text any deployment accepts; "sampling":
    #: changes only how images are sampled
    kind: str
    #: ``check(target, config)`` raises for a target the attack cannot run on (known once the model is loaded, before
    #: any image is drawn: a suite checks every attack before its baselines)
    check: Callable[[AttackTarget, Any], None] | None = None
    #: the pipelines it runs on (``pipelines.ARCHITECTURES``); the others are refused before any work, with
    #: ``unported``, one line saying why
    architectures: tuple[str, ...] = ARCHITECTURES
    unported: str = ""

    def runs_on(self, architecture: str) -> bool:
        return architecture in self.architectures


_REGISTRY: dict[str, Attack] = {}
_loaded = False
KINDS = ("embedding", "prompt", "sampling")
#: Each threat model and the attack kinds it admits. An attacker who feeds embeddings holds the weights and can
#: also write any prompt; one who controls sampling sends the plain probe prompts. Every threat model also admits
#: the unattacked prompts: no attack is needed to send them.
THREAT_MODELS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "embedding": ("embedding", "prompt"),
    "sampling": ("sampling",),
}


def register_attack(
    name: str,
    config_class: type,
    summary: str,
    kind: str,
    check: Callable[[AttackTarget, Any], None] | None = None,
    *,
    architectures: tuple[str, ...] = ARCHITECTURES,
    unported: str = "",
) -> Callable:
    """Decorator registering ``fn(target, config, seed) -> AttackResult`` under ``name`` (``check``,
    ``architectures``, ``unported``: see :class:`Attack`; an attack that does not run everywhere says why)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; expected one of {KINDS}")
    unknown = sorted(set(architectures) - set(ARCHITECTURES))
    if unknown or not architectures:
        raise ValueError(f"attack {name!r}: architectures must be some of {ARCHITECTURES}, got {architectures}")
    if set(architectures) != set(ARCHITECTURES) and (not unported.strip() or "\n" in unported):
        raise ValueError(f"attack {name!r} does not run on every architecture: say why in one line (unported)")
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config class of attack {name!r} must be a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    scaled = getattr(config_class, "BUDGET_FIELDS", None)
    if scaled is None or any(f not in fields or fields[f].type not in ("int", "float", int, float) for f in scaled):
        raise TypeError(f"config class of attack {name!r} must name its int or float BUDGET_FIELDS")

    def decorator(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"an attack named {name!r} is already registered")
        _REGISTRY[name] = Attack(name, config_class, fn, summary, kind, check, tuple(architectures), unported)
        return fn

    return decorator


def _load_attacks() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in _ATTACK_MODULES:
            importlib.import_module(module)


def available_attacks() -> list[str]:
    """Attack names in the order the suite runs them (cheapest first)."""
    _load_attacks()
    return list(_REGISTRY)


def resolve_attacks(names: Sequence[str], architecture: str | None = None) -> list[str]:
    """Attack names as a user gives them (``"all"`` for every attack), checked: ``ValueError`` names the first
    unknown one. With ``architecture`` (the model's, ``pipelines.ARCHITECTURES``), ``"all"`` means every attack that
    runs on it, and a named attack that does not is refused (:func:`check_attack_architecture`)."""
    known = available_attacks()
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; available: all, {', '.join(known)}")
    named = list(dict.fromkeys(n for n in names if n != "all"))
    if architecture is not None:
        for name in named:
            check_attack_architecture(name, architecture)
    if "all" not in names:
        return named
    return [n for n in known if architecture is None or n in named or get_attack(n).runs_on(architecture)]


def check_attack_architecture(name: str, architecture: str) -> None:
    """``ValueError`` in one line when attack ``name`` does not run on ``architecture`` (what it declares where it
    registers)."""
    attack = get_attack(name)
    if not attack.runs_on(architecture):
        runs_on = ", ".join(ARCHITECTURE_NAMES[a] for a in attack.architectures)
        raise ValueError(
            f"attack {name!r} does not run on {ARCHITECTURE_NAMES.get(architecture, architecture)} pipelines: "
            f"{attack.unported} (it runs on {runs_on})"
        )


def attack_configs(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Configs of the named attacks with some fields changed (``{"noise_probe": {"candidates": 4}}``); ``ValueError``
    in one line for an unknown attack or field, or a bad value (every number, switch and text checked:
    ``pipelines.checks.check_config_fields``, whatever the attack's own checks)."""
    configs = {}
    for name, fields in overrides.items():
        attack = get_attack(name)
        known = {f.name for f in dataclasses.fields(attack.config_class)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"attack {name!r} has no setting {unknown[0]!r}; it has {', '.join(sorted(known))}")
        try:
            check_text_fields(attack.config_class, fields)
            configs[name] = attack.config_class(**fields)
            check_config_fields(configs[name])
        except TypeError as err:
            raise ValueError(f"attack {name!r}: {err}") from None
    return configs


def check_budget(budget: float) -> float:
    """``budget`` as a float when it is a finite number > 0; ``ValueError`` in one line otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    return float(budget)


def parse_budget(text: str) -> float:
    """A budget as a user writes it (``"4"``, ``"0.5"``), checked by :func:`check_budget`."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a finite number > 0, got {text!r}") from None
    return check_budget(value)


def budget_fields(name: str) -> tuple[str, ...]:
    """The fields of attack ``name``'s config that scale with the budget (its ``BUDGET_FIELDS``): steps, candidates,
    generations... What it costs grows about in proportion; an attack with none (a closed form) costs the same at
    every budget."""
    return tuple(get_attack(name).config_class.BUDGET_FIELDS)


def budget_config(name: str, config: Any = None, budget: float = 1.0) -> Any:
    """``config`` (the attack's default when ``None``) with its budget fields multiplied by ``budget``: an int
    field rounded, at least 1; a float field as it comes. ``budget`` 1 returns the config unchanged."""
    attack = get_attack(name)
    config = attack.config_class() if config is None else config
    budget = check_budget(budget)
    if budget == 1.0:
        return config
    changes = {}
    for field_name in budget_fields(name):
        value = getattr(config, field_name)
        changes[field_name] = max(1, round(value * budget)) if isinstance(value, int) else value * budget
    return dataclasses.replace(config, **changes)


def get_attack(name: str) -> Attack:
    _load_attacks()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_attack(name: str, target: AttackTarget, config: Any = None) -> Any:
    """The config ``name`` runs ``target`` with (its default when ``None``); raises when the attack does not run on
    the target's architecture, the config is of the wrong class, there are no probes, or the attack's own check
    refuses the target."""
    attack = get_attack(name)
    check_attack_architecture(name, target.wrapper.architecture)
    config = attack.config_class() if config is None else config
    if not isinstance(config, attack.config_class):
        raise TypeError(f"attack {name!r} takes a {attack.config_class.__name__}, got {type(config).__name__}")
    if not target.probes:
        raise ValueError("no probes to attack")
    if attack.check is not None:
        attack.check(target, config)
    return config


def run_attack(name: str, target: AttackTarget, config: Any = None, seed: int = 0) -> AttackResult:
    """Run one attack; the pipeline is left as it was (the erasure is in force only inside the attack)."""
    attack, config = get_attack(name), check_attack(name, target, config)
    start = time.perf_counter()
    result = attack.run(target, config, seed)
    result.seconds = time.perf_counter() - start
    result.config = dataclasses.asdict(config)
    if len(result.images) != len(target.probes):
        raise RuntimeError(f"attack {name!r} returned {len(result.images)} images for {len(target.probes)} probes")
    logger.info("%s: %d images in %.1f s", name, len(result.images), result.seconds)
    return result


def attack_probes(
    concept: str, n: int, seed: int = 0, *, forms: Sequence[str] = PROMPT_FORMS, split: str = "report"
) -> list[AttackProbe]:
    """``n`` probes of ``concept``: prompts naming it, each with the same prompt without it, and a seed.

    A micro-world concept gets world prompts, probe ``i`` of the prompt form ``forms[i % len(forms)]``
    (:data:`evals.probes.PROMPT_FORMS`: the concept alone, with one other attribute, with both; random templates
    and other attributes) and is judged among its category; the prompt without the concept names the same other
    attributes, or is :data:`NEUTRAL_ALONE` when there are none. Any other concept gets generic prompts judged among
    the label set ``"concept"``. A name is a world concept in any spelling :func:`evals.probes.world_concept` reads
    ("a circle", "Van-Gogh"), as erase.py's check takes it. ``split`` picks the seeds
    (:func:`evals.probes.probe_seed`): settings are tuned on ``tune`` and reported on ``report``.
    """
    if n < 1:
        raise ValueError(f"need at least one probe, got {n}")
    forms, split = check_forms(forms), check_split(split)
    rng = np.random.default_rng(seed)
    name = world_concept(concept)  # read as the check of scripts/erase.py reads it: "a circle", "Van-Gogh"
    if name is None:
        pairs = [GENERIC_PAIRS[i % len(GENERIC_PAIRS)] for i in range(n)]
        return [AttackProbe(with_.format(concept), without, probe_seed(seed, i, split), concept, "concept")
                for i, (with_, without) in enumerate(pairs)]  # fmt: skip
    category, canonical = world.category_of(name), world.canonical(name)
    probes = []
    for i in range(n):
        form = forms[i % len(forms)]
        text, named = form_prompt(category, name, form, rng)
        neutral = world.prompt(**named) if named else NEUTRAL_ALONE
        others = tuple((c, world.canonical(n)) for c, n in named.items())
        probes.append(AttackProbe(text, neutral, probe_seed(seed, i, split), canonical, category, form, others))
    return probes


def attack_labels(concept: str, others: Sequence[str] = ()) -> dict[str, list[str]]:
    """The zero-shot label sets an attacked concept's images are judged among: the micro world's categories for a
    world concept; otherwise one set ``"concept"``: the concept, ``others`` (say the erasure's preserved concepts)
    and :data:`GENERIC_ALTERNATIVES`."""
    if world_concept(concept) is not None:
        return world_labels()
    return {"concept": list(dict.fromkeys([concept, *others, *GENERIC_ALTERNATIVES]))}


def attack_success(
    images: Sequence[Image.Image],
    probes: Sequence[AttackProbe],
    scorer: Any,
    labels: Mapping[str, Sequence[str]],
    judge: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The share of images read as their probe's concept: ``{"clip": accuracy, "judge": accuracy or None,
    "forms": {form: {"clip": accuracy, "judge": accuracy or None}}, "clip_verdicts": [...]}``, each accuracy with
    its count and Wilson 95% interval (:func:`evals.metrics.accuracy`); ``forms`` splits them by the probes' prompt
    forms (empty for probes without one).

    After an erasure this is the attack success rate (ASR) of attacked images and the unattacked rate of plain ones.
    The judge reads only micro-world categories it was trained on; otherwise its entry is None.
    """
    verdicts = probe_verdicts(scorer, images, [p.as_probe() for p in probes], labels)
    clip = [v == p.concept for v, p in zip(verdicts, probes, strict=True)]
    forms = [p.form for p in probes]
    out = {"clip": M.accuracy(clip), "judge": None, "clip_verdicts": verdicts}
    by_form = {f: {"clip": a, "judge": None} for f, a in split_accuracies(clip, forms).items()}
    if _judge_reads(judge, {p.category for p in probes}):
        judged = judge_correct(judge, images, probes)
        out["judge"] = M.accuracy(judged)
        for f, a in split_accuracies(judged, forms).items():
            by_form[f]["judge"] = a
    out["forms"] = by_form
    out["kept"] = others_kept(images, probes, scorer, labels, judge)
    return out


def others_kept(
    images: Sequence[Image.Image],
    probes: Sequence[AttackProbe],
    scorer: Any,
    labels: Mapping[str, Sequence[str]],
    judge: torch.nn.Module | None = None,
) -> dict[str, Any] | None:
    """Of the probes whose prompt names other attributes, the share whose image shows every one of them (each read
    among its category's labels): ``{"clip": accuracy, "judge": accuracy or None}``, None when no probe names any.

    An erasure is meant to take the concept out and leave the rest of the prompt; an image the erasure (or the
    attack) destroyed also fails the attack, and this is what tells the two apart.
    """
    named = [(i, c, n) for i, p in enumerate(probes) for c, n in p.others if c in labels]
    if not named:
        return None
    # one (image, attribute) pair per named attribute, each read as a probe of that attribute
    pairs = [Probe(probes[i].prompt, probes[i].seed, n, c) for i, c, n in named]
    pictured = [images[i] for i, _, _ in named]

    def share(correct: Sequence[bool]) -> dict[str, Any]:  # a probe counts when every attribute it names is read
        every: dict[int, bool] = {}
        for (i, _, _), ok in zip(named, correct, strict=True):
            every[i] = every.get(i, True) and ok
        return M.accuracy(list(every.values()))

    verdicts = probe_verdicts(scorer, pictured, pairs, labels)
    out = {"clip": share([v == p.concept for v, p in zip(verdicts, pairs, strict=True)]), "judge": None}
    if _judge_reads(judge, {p.category for p in pairs}):
        out["judge"] = share(judge_correct(judge, pictured, pairs))
    return out


def _judge_reads(judge: torch.nn.Module | None, categories: set[str]) -> bool:
    """The micro world's judge is given and was trained on every one of ``categories``."""
    classes = getattr(getattr(judge, "config", None), "classes", None) or {}
    return judge is not None and categories <= set(classes)


def word_vocabulary(wrapper: PipelineWrapper) -> torch.Tensor:
    """Ids of the whole-word lower-case alphabetic tokens that tokenise back to one token: a prefix of them, decoded
    and joined by spaces, re-tokenises to the same ids. On SD3/Flux only tokens that every text encoder reads as one
    word (``PipelineWrapper.slot_token_ids``: CLIP's and T5's), so the written text is the searched tokens in each.
    Computed once per wrapper (seconds on CPU)."""
    if wrapper in _WORDS:
        return _WORDS[wrapper]
    ids = []
    for i in wrapper.slot_token_ids().tolist():
        text = wrapper.decode_tokens([i])
        word = text.isascii() and text.isalpha() and text.islower()  # the tokenizer lower-cases every prompt
        whole_word = word and wrapper.decode_tokens([i, i]) == f"{text} {text}"
        if whole_word and wrapper.token_count(text) == 1:
            ids.append(i)
    _WORDS[wrapper] = torch.tensor(ids)
    return _WORDS[wrapper]
