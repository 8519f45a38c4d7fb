"""The method interface every erasure method shares, and the registry that lists them.

A method is one file in ``erase/``: a config dataclass validated in ``__post_init__`` and one function
``(pipeline wrapper, concepts, config) -> WeightEdit`` registered under a name. Methods do not mutate the pipeline:
they return the change (weight changes, or for the runtime family an ``SAEIntervention``), and ``erase_concepts``
packages it as an artifact with the provenance a user needs.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines import PipelineWrapper

from .inputs import check_concept_text, concept_key

__all__ = [
    "ConceptSpec",
    "Method",
    "WeightEdit",
    "available_methods",
    "erase_concepts",
    "get_method",
    "register_method",
]

logger = logging.getLogger(__name__)

# One line per method module; importing it registers the method.
_METHOD_MODULES: tuple[str, ...] = (
    "erase.closed_form.uce", "erase.closed_form.time", "erase.closed_form.rece",
    "erase.lora.esd", "erase.lora.ca", "erase.lora.spm", "erase.sae.itd", "erase.sae.saeuron",
)  # fmt: skip

FAMILIES = ("closed_form", "lora", "runtime")


@dataclass(frozen=True)
class ConceptSpec:
    """What to erase and what to keep.

    Concepts are compared as CLIP reads them, up to case and spacing (``concept_key``): a concept cannot be both
    erased and preserved, nor be its own guide, under another capitalisation.

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
        targets = tuple(check_concept_text(t, "concept to erase") for t in self.targets)
        guides = tuple(g.strip() if isinstance(g, str) and not g.strip() else check_concept_text(g, "guide")
                       for g in self.guides)  # fmt: skip
        preserve = tuple(dict.fromkeys(check_concept_text(p, "preserved concept") for p in self.preserve))
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "guides", guides)
        object.__setattr__(self, "preserve", preserve)
        keys = [concept_key(t) for t in targets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate concepts to erase: {list(targets)}")
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
    """A method's result: additive changes ``dW`` to Linear weights (qualified names), and anything worth recording."""

    deltas: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    #: exact low-rank factors (A, B) with dW = B @ A, when the method knows them (saves an SVD per layer)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the runtime family's result (``erase.sae.intervention.SAEIntervention``) instead of weight changes
    intervention: Any = None
    #: a LoRA whose strength follows each prompt (``erase.lora.transport.FacilitatedTransport``), if the method has one
    transport: Any = None


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    run: Callable[[PipelineWrapper, ConceptSpec, Any], WeightEdit]
    family: str
    summary: str
    uses_guides: bool = True  # False: the method ignores guides (ESD erases towards nothing in particular)
    #: runtime family: ``(intervention, tokens, timestep) -> tokens`` (``None``: leave them as they are)
    runtime_edit: Callable | None = None
    #: runtime family: raises ``ValueError`` when a loaded intervention's tables do not fit its SAE
    check_intervention: Callable | None = None


_REGISTRY: dict[str, Method] = {}
_loaded = False


def register_method(
    name: str,
    config_class: type,
    family: str,
    summary: str = "",
    *,
    uses_guides: bool = True,
    runtime_edit: Callable | None = None,
    check_intervention: Callable | None = None,
) -> Callable:
    """Decorator registering ``fn(wrapper, concepts, config) -> WeightEdit`` under ``name``.

    ``uses_guides=False`` marks a method that ignores ``ConceptSpec.guides``: the workflow then refuses ``--guide``
    and records no guide, instead of a default the method never read. A "runtime" method gives ``runtime_edit``,
    which applies its intervention to a hook point's tokens while the pipeline runs.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; expected one of {FAMILIES}")
    if (family == "runtime") != (runtime_edit is not None):
        raise ValueError("a runtime method, and only a runtime method, gives a runtime_edit")
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config class of method {name!r} must be a dataclass")

    def decorator(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"an erasure method named {name!r} is already registered")
        summary_line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Method(name, config_class, fn, family, summary_line, uses_guides, runtime_edit,
                                 check_intervention)  # fmt: skip
        return fn

    return decorator


def _load_methods() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _METHOD_MODULES:
            importlib.import_module(module)


def available_methods() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    _load_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown erasure method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def erase_concepts(
    wrapper: PipelineWrapper,
    concepts: ConceptSpec | Sequence[str],
    method: str = "uce",
    config: Any = None,
):  # -> ErasureArtifact (imported lazily to keep the modules acyclic)
    """Run an erasure method and return its artifact; the pipeline itself is left unchanged.

    Apply the result with ``erase.apply_artifact(wrapper, artifact)`` or save it with ``erase.save_artifact``.
    """
    spec = get_method(method)
    if not isinstance(concepts, ConceptSpec):
        concepts = ConceptSpec(tuple(concepts))
    config = spec.config_class() if config is None else config
    if not isinstance(config, spec.config_class):
        raise TypeError(f"method {method!r} takes a {spec.config_class.__name__}, got {type(config).__name__}")
    concepts.check_against(wrapper)
    start = time.perf_counter()
    edit = spec.run(wrapper, concepts, config)
    seconds = time.perf_counter() - start
    if edit.intervention is not None:
        component = edit.intervention.component  # a runtime edit reads its whole component
        logger.info("%s: intervention at %s in %.3f s", method, edit.intervention.hook_point, seconds)
        return _artifact(wrapper, concepts, method, config, seconds, [component], deltas={}, info=dict(edit.info),
                         weight_norms={"base": {component: wrapper.parameter_norm(component)}},
                         intervention=edit.intervention)  # fmt: skip
    if not edit.deltas:
        raise RuntimeError(f"method {method!r} returned no weight change")
    norms = _weight_norms(wrapper, edit.deltas)
    relative = _relative_change(norms["base"], edit.deltas)
    if max(relative.values()) == 0.0:
        raise ValueError(f"the {method} edit changes nothing: the guide reads like the concept to this text encoder")
    logger.info("%s edited %d modules in %.3f s", method, len(edit.deltas), seconds)
    factors = None
    if edit.factors is not None:
        factors = {k: (a.detach().float().cpu(), b.detach().float().cpu()) for k, (a, b) in edit.factors.items()}
    return _artifact(wrapper, concepts, method, config, seconds, list(edit.deltas),
                     deltas={k: v.detach().float().cpu() for k, v in edit.deltas.items()},
                     info={**edit.info, "relative_change": relative}, factors=factors, weight_norms=norms,
                     transport=edit.transport)  # fmt: skip


def _artifact(wrapper: PipelineWrapper, concepts: ConceptSpec, method: str, config: Any, seconds: float,
              fingerprinted: list[str], **fields: Any):  # fmt: skip  # -> ErasureArtifact
    """The artifact of an edit: its provenance, and the base fingerprint of the ``fingerprinted`` modules (in float32
    and rounded to float16 and bfloat16, which recognise a half-precision copy of the same weights exactly)."""
    from .artifact import ErasureArtifact

    return ErasureArtifact(
        method=method,
        config=dataclasses.asdict(config),
        concepts=list(concepts.targets),
        guides=list(concepts.guides),
        preserve=list(concepts.preserve),
        base_model=wrapper.model_id,
        base_fingerprint=wrapper.fingerprint(fingerprinted),
        seconds=seconds,
        low_precision_fingerprints=_low_precision_fingerprints(wrapper, fingerprinted),
        **fields,
    )


def _low_precision_fingerprints(wrapper: PipelineWrapper, modules: list[str]) -> dict[str, str] | None:
    """The base fingerprint rounded to float16 and bfloat16 (exact recognition of a half-precision copy of the base);
    only a float32 pipeline can compute them."""
    if wrapper.dtype != torch.float32:
        return None
    return {str(d).removeprefix("torch."): wrapper.fingerprint(modules, d) for d in (torch.float16, torch.bfloat16)}


def _weight_norms(wrapper: PipelineWrapper, deltas: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Norms of the base and the edited weights, by which ``check_artifact_base`` recognises an edited pipeline."""
    with wrapper.weight_deltas(deltas):
        edited = wrapper.weight_norms(list(deltas))
    return {"base": wrapper.weight_norms(list(deltas)), "edited": edited}


def _relative_change(base_norms: dict[str, float], deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    """||dW||_F / ||W||_F per module: how far the edit moves each weight. ``ValueError`` for a non-finite change."""
    relative = {}
    for name, delta in sorted(deltas.items()):
        if not torch.isfinite(delta).all():
            raise ValueError(f"the edit of {name} is not finite (NaN or inf): the solve failed")
        relative[name] = float(delta.double().norm()) / max(base_norms[name], 1e-30)
    return relative
