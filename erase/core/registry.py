"""The method interface every erasure method shares, and the registry that lists them.

A method is one file in its family's package (``erase/closed_form``, ``erase/lora``, ``erase/sae``, found there by
``erase.core.discovery``): a config dataclass validated in ``__post_init__`` and one function ``(pipeline wrapper,
concepts, config) -> WeightEdit`` registered under a name with what it can do (``Capabilities``). Methods do not
mutate the pipeline: they return the change (weight changes, and payloads such as an ``SAEIntervention``), and
``erase_concepts`` packages it as an artifact with the provenance a user needs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines import PipelineWrapper

from .artifact import ErasureArtifact
from .discovery import discover_families, record_method_name
from .inputs import check_concept_text, concept_key
from .payloads import kind_of
from .weights import WEIGHTS_KIND, WeightChange

__all__ = [
    "Capabilities",
    "ConceptSpec",
    "Method",
    "WeightEdit",
    "available_methods",
    "erase_concepts",
    "get_method",
    "register_method",
]

logger = logging.getLogger(__name__)

FAMILIES = ("closed_form", "lora", "runtime")


@dataclass(frozen=True)
class ConceptSpec:
    """What to erase and what to keep.

    Every text is kept as its one reading (``concept_key``: CLIP's clean-up plus NFKC), the form the text encoder is
    fed and concepts are compared in: a concept cannot be both erased and preserved, nor be its own guide, under
    another capitalisation, spacing or width.

    Attributes:
        targets: concepts to erase, e.g. ``("van gogh",)``.
        guides: what each target should become; one per target, or one for all. ``""`` (the empty prompt) maps a
            target to "nothing in particular".
        preserve: concepts whose behaviour must not change (other styles, objects, ...); duplicates are dropped.
    """

    targets: tuple[str, ...]
    guides: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("targets", "guides", "preserve"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a sequence of strings, not the string {value!r}")
        if not self.targets:
            raise ValueError("no concept to erase: targets is empty")
        given = tuple(self.targets)
        targets = tuple(check_concept_text(t, "concept to erase") for t in given)
        guides = tuple(g.strip() if isinstance(g, str) and not g.strip() else check_concept_text(g, "guide")
                       for g in self.guides)  # fmt: skip
        preserve = tuple(dict.fromkeys(check_concept_text(p, "preserved concept") for p in self.preserve))
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "guides", guides)
        object.__setattr__(self, "preserve", preserve)
        keys = list(targets)  # readings already
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            alike = [t.strip() for t, k in zip(given, keys, strict=True) if k == twice]
            raise ValueError(f"duplicate concepts to erase: {', '.join(map(repr, alike))} all read as {twice!r}")
        if len(guides) not in (1, len(targets)):
            raise ValueError(f"{len(guides)} guides for {len(targets)} targets: give one, or one per target")
        overlap = [p for p in preserve if concept_key(p) in keys]
        if overlap:
            raise ValueError(f"concepts both erased and preserved: {overlap}")
        for i, target in enumerate(targets):
            if concept_key(self.guide_for(i)) == keys[i]:
                raise ValueError(f"the guide of {target!r} is the concept itself: the edit would change nothing")

    def guide_for(self, index: int) -> str:
        return self.guides[0] if len(self.guides) == 1 else self.guides[index]

    def check_against(self, wrapper: PipelineWrapper) -> None:
        """Raise ``ValueError`` naming the first concept the pipeline's text encoder cannot read whole."""
        for t in self.targets:
            wrapper.check_prompt(t, "concept")
        for g in self.guides:
            if g:
                wrapper.check_prompt(g, "guide")
        for p in self.preserve:
            wrapper.check_prompt(p, "preserved concept")


@dataclass
class WeightEdit:
    """A method's result: additive changes ``dW`` to Linear weights (qualified names), any further payloads (a
    runtime intervention, a facilitated transport; ``erase.core.payloads``), and anything worth recording."""

    deltas: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    #: exact low-rank factors (A, B) with dW = B @ A, when the method knows them (saves an SVD per layer)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: payloads beside the weight change, each of a registered payload kind
    payloads: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared where it registers; the workflow, the scripts and the tests read these instead
    of guessing from config field names.

    Attributes:
        guides: the method reads ``ConceptSpec.guides`` (``False``: ``--guide`` is refused and no guide recorded).
        preserve: the method has a preserve term that reads ``ConceptSpec.preserve`` (``False``: ``--preserve`` is
            refused rather than ignored).
        preserve_setting: a config field the workflow fills with the preserve set unless the user set it, so the
            artifact's config records it (the LoRA family's ``anchor_prompts``).
        templates: a config field of prompt templates (``{}`` the concept) that ``--expand-prompts`` fills.
        training: the method trains by gradient steps (the LoRA trainer).
        sampler_steps: config fields that are sampler step counts, checked against the model's sampler before work.
        quick: config settings for a run of seconds on the tiny model (tests and smoke benchmarks); ``None`` where
            the method needs more than a config (e.g. a trained SAE).
        architectures: the pipelines the method runs on (``pipelines.modules.ARCHITECTURES``: ``sd`` for SD 1.x/2.x
            with any prediction type, ``sdxl``, ``sd3``, ``flux``); others are refused before any work, with
            ``unported``, one line saying why.
        base_lookup: ``(wrapper, config) -> config`` fixing in the config what the method looks up by the model's
            weights (the SAE trained on them), called on the unedited pipeline before a stack's earlier members are
            put in force (``erase.stack``), which change those weights.
    """

    guides: bool = True
    preserve: bool = False
    preserve_setting: str | None = None
    templates: str | None = None
    training: bool = False
    sampler_steps: tuple[str, ...] = ()
    quick: dict[str, Any] | None = field(default_factory=dict)
    architectures: tuple[str, ...] = ("sd", "sdxl")
    unported: str = "it edits UNet cross-attention, which SD3/Flux lack"
    base_lookup: Callable[[PipelineWrapper, Any], Any] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    run: Callable[[PipelineWrapper, ConceptSpec, Any], WeightEdit]
    family: str
    summary: str
    capabilities: Capabilities = Capabilities()
    #: runtime family: ``(intervention, tokens, timestep) -> tokens`` (``None``: leave them as they are)
    runtime_edit: Callable | None = None
    #: runtime family: raises ``ValueError`` when a loaded intervention's tables or settings do not fit its SAE
    check_intervention: Callable | None = None

    @property
    def runtime(self) -> bool:
        """The method edits nothing but installs a runtime intervention."""
        return self.runtime_edit is not None

    def check_architecture(self, wrapper: PipelineWrapper) -> None:
        """``ValueError`` in one line when the method does not run on ``wrapper``'s architecture."""
        if wrapper.architecture not in self.capabilities.architectures:
            raise ValueError(
                f"method {self.name!r} does not run on {wrapper.architecture} pipelines: {self.capabilities.unported} "
                f"(it runs on {', '.join(self.capabilities.architectures)})"
            )

    def quick_config(self) -> Any:
        """The config of a run of seconds on the tiny model (``capabilities.quick``); ``None`` where there is none."""
        quick = self.capabilities.quick
        return None if quick is None else self.config_class(**quick)


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str,
    config_class: type,
    family: str,
    summary: str = "",
    *,
    capabilities: Capabilities = Capabilities(),
    runtime_edit: Callable | None = None,
    check_intervention: Callable | None = None,
) -> Callable:
    """Decorator registering ``fn(wrapper, concepts, config) -> WeightEdit`` under ``name``, with what the method
    can do (``Capabilities``). A "runtime" method gives ``runtime_edit``, which applies its intervention to a hook
    point's tokens while the pipeline runs.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; expected one of {FAMILIES}")
    if (family == "runtime") != (runtime_edit is not None):
        raise ValueError("a runtime method, and only a runtime method, gives a runtime_edit")
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config class of method {name!r} must be a dataclass")
    fields = {f.name for f in dataclasses.fields(config_class)}
    named = [capabilities.preserve_setting, capabilities.templates, *capabilities.sampler_steps]
    unknown = [n for n in named if n is not None and n not in fields]
    if unknown or (capabilities.quick and set(capabilities.quick) - fields):
        missing = unknown or sorted(set(capabilities.quick) - fields)
        raise ValueError(f"method {name!r} declares capabilities on {missing}, which its config does not have")

    def decorator(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"an erasure method named {name!r} is already registered")
        summary_line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Method(name, config_class, fn, family, summary_line, capabilities, runtime_edit,
                                 check_intervention)  # fmt: skip
        record_method_name(name)
        return fn

    return decorator


def available_methods() -> list[str]:
    discover_families()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    discover_families()
    if name not in _REGISTRY:
        raise ValueError(f"unknown erasure method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def erase_concepts(
    wrapper: PipelineWrapper,
    concepts: ConceptSpec | Sequence[str],
    method: str = "uce",
    config: Any = None,
) -> ErasureArtifact:
    """Run an erasure method and return its artifact; the pipeline itself is left unchanged.

    Install the result with ``erase.load(wrapper, artifact)`` or save it with ``erase.save_artifact``.
    """
    spec = get_method(method)
    if not isinstance(concepts, ConceptSpec):
        concepts = ConceptSpec(tuple(concepts))
    config = spec.config_class() if config is None else config
    if not isinstance(config, spec.config_class):
        raise TypeError(f"method {method!r} takes a {spec.config_class.__name__}, got {type(config).__name__}")
    spec.check_architecture(wrapper)
    concepts.check_against(wrapper)
    start = time.perf_counter()
    edit = spec.run(wrapper, concepts, config)
    seconds = time.perf_counter() - start
    payloads: dict[str, Any] = {}
    deltas: dict[str, torch.Tensor] = {}
    if edit.deltas:
        deltas = {k: v.detach().float().cpu() for k, v in edit.deltas.items()}
        delta_norms = _finite_norms(deltas)
        factors = None
        if edit.factors is not None:
            factors = {k: (a.detach().float().cpu(), b.detach().float().cpu()) for k, (a, b) in edit.factors.items()}
        payloads[WEIGHTS_KIND.name] = WeightChange(deltas, factors)
    for payload in edit.payloads:
        payloads[kind_of(payload).name] = payload
    if not payloads:
        raise RuntimeError(f"method {method!r} returned no weight change and no payload")
    artifact = ErasureArtifact(
        method=method,
        config=dataclasses.asdict(config),
        concepts=list(concepts.targets),
        guides=list(concepts.guides),
        preserve=list(concepts.preserve),
        base_model=wrapper.model_id,
        base_fingerprint="",
        payloads=payloads,
        seconds=seconds,
        info=dict(edit.info),
    )
    start = time.perf_counter()
    artifact.base_fingerprint = wrapper.fingerprint(artifact.fingerprint_modules)
    artifact.low_precision_fingerprints, base_norms = _base_record(wrapper, artifact)
    fingerprint_seconds = time.perf_counter() - start
    start = time.perf_counter()
    artifact.weight_norms = {"base": base_norms}
    if deltas:
        relative = {n: delta_norms[n] / max(base_norms[n], 1e-30) for n in sorted(deltas)}
        if max(relative.values()) == 0.0:
            raise ValueError(
                f"the {method} edit changes nothing: the guide reads like the concept to this text encoder"
            )
        artifact.info["relative_change"] = relative
        artifact.weight_norms["edited"] = _edited_norms(wrapper, artifact, base_norms, deltas)
    artifact.info["seconds_by_step"] = {
        "method": seconds,
        "fingerprints": fingerprint_seconds,
        "norms": time.perf_counter() - start,
    }
    logger.info("%s: %s on %d modules in %.3f s", method, ", ".join(payloads), len(artifact.layers), seconds)
    return artifact


#: (base fingerprint, modules, payload kinds, dtype, device) -> (low-precision fingerprints, base norms); see
#: ``_base_record``. A few entries: erasing several times from one base (benchmarks, sweeps) hashes it once more
#: each time, not three times, and measures its norms once.
_BASE_RECORDS: OrderedDict[tuple, tuple[dict[str, str] | None, dict[str, float]]] = OrderedDict()
_BASE_RECORDS_KEPT = 8


def forget_base_records() -> None:
    """Drop the remembered base records, so that the next erase measures its base in full (benchmarks of a first
    call, tests)."""
    _BASE_RECORDS.clear()


def _base_record(
    wrapper: PipelineWrapper, artifact: ErasureArtifact
) -> tuple[dict[str, str] | None, dict[str, float]]:
    """The base's fingerprints rounded to float16 and bfloat16 (exact recognition of a half-precision copy; only a
    float32 pipeline can compute them) and its norms as the payload kinds measure them.

    Both are functions of the fingerprinted modules' weights alone, which ``artifact.base_fingerprint`` (sha256 over
    exactly those weights, just computed) identifies: they are computed once per base and reused while its
    fingerprint is the same.
    """
    modules = artifact.fingerprint_modules
    weight = next(wrapper.module(modules[0]).parameters())  # their dtype and device (cheaper than the UNet's)
    key = (artifact.base_fingerprint, tuple(modules), tuple(sorted(artifact.payloads)), weight.dtype, weight.device)
    if key in _BASE_RECORDS:
        _BASE_RECORDS.move_to_end(key)
        low_precision, norms = _BASE_RECORDS[key]
        return (None if low_precision is None else dict(low_precision)), dict(norms)  # the artifact's own copies
    low_precision = None
    if wrapper.dtype == torch.float32:
        found = wrapper.fingerprints(modules, (torch.float16, torch.bfloat16))
        low_precision = {str(d).removeprefix("torch."): f for d, f in found.items()}
    norms = artifact.base_norms(wrapper)
    _BASE_RECORDS[key] = (None if low_precision is None else dict(low_precision), dict(norms))
    while len(_BASE_RECORDS) > _BASE_RECORDS_KEPT:
        _BASE_RECORDS.popitem(last=False)
    return low_precision, norms


def _edited_norms(
    wrapper: PipelineWrapper, artifact: ErasureArtifact, base_norms: dict[str, float], deltas: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The norms ``base_norms`` holds, of the pipeline with the artifact installed (what recognises a pipeline that
    already holds the edit). A weight change alone changes the norms of its own modules only: W + dW is measured
    without touching the pipeline. Beside other payloads the edit is applied and every kind measures."""
    if set(artifact.payloads) == {WEIGHTS_KIND.name} and set(base_norms) == set(deltas):
        return wrapper.weight_norms(list(deltas), deltas)
    with wrapper.weight_deltas(deltas):
        return artifact.base_norms(wrapper)


def _finite_norms(deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    """||dW||_F of each weight change, in float64; ``ValueError`` naming the first that is not finite (a float64 norm
    of float32 values is finite exactly when every value is)."""
    norms = {}
    for name, delta in sorted(deltas.items()):
        norms[name] = float(delta.double().norm())
        if not math.isfinite(norms[name]):
            raise ValueError(f"the edit of {name} is not finite (NaN or inf): the solve failed")
    return norms
