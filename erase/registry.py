"""The method interface every erasure method shares, and the registry that lists them.

A method is one file in ``erase/``: a config dataclass validated in ``__post_init__`` and one function
``(pipeline wrapper, concepts, config) -> WeightEdit`` registered under a name. Methods do not mutate the pipeline:
they return the change, and ``erase_concepts`` packages it as an artifact with the provenance a user needs.
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
_METHOD_MODULES: tuple[str, ...] = ("erase.uce", "erase.time")

FAMILIES = ("closed_form", "lora", "runtime")


@dataclass(frozen=True)
class ConceptSpec:
    """What to erase and what to keep.

    Attributes:
        targets: concepts to erase, e.g. ``("van gogh",)``.
        guides: what each target should become; one per target, or one for all. ``""`` (the empty prompt) maps a
            target to "nothing in particular", the usual choice for styles.
        preserve: concepts whose behaviour must not change (other styles, objects, ...).
    """

    targets: tuple[str, ...]
    guides: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("targets", "guides", "preserve"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a sequence of strings, not the string {value!r}")
            object.__setattr__(self, name, tuple(s.strip() if isinstance(s, str) else s for s in value))
        if not self.targets:
            raise ValueError("no concept to erase: targets is empty")
        for t in self.targets:
            if not isinstance(t, str) or not t:
                raise ValueError(f"concept to erase is empty: {t!r}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"duplicate concepts to erase: {list(self.targets)}")
        if len(self.guides) not in (1, len(self.targets)):
            raise ValueError(f"{len(self.guides)} guides for {len(self.targets)} targets: give one, or one per target")
        overlap = set(self.targets) & set(self.preserve)
        if overlap:
            raise ValueError(f"concepts both erased and preserved: {sorted(overlap)}")

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


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    run: Callable[[PipelineWrapper, ConceptSpec, Any], WeightEdit]
    family: str
    summary: str


_REGISTRY: dict[str, Method] = {}
_loaded = False


def register_method(name: str, config_class: type, family: str, summary: str = "") -> Callable:
    """Decorator registering ``fn(wrapper, concepts, config) -> WeightEdit`` under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; expected one of {FAMILIES}")
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config class of method {name!r} must be a dataclass")

    def decorator(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"an erasure method named {name!r} is already registered")
        _REGISTRY[name] = Method(name, config_class, fn, family, summary or (fn.__doc__ or "").strip().split("\n")[0])
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
    from .artifact import ErasureArtifact

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
    if not edit.deltas:
        raise RuntimeError(f"method {method!r} returned no weight change")
    logger.info("%s edited %d modules in %.3f s", method, len(edit.deltas), seconds)
    return ErasureArtifact(
        method=method,
        config=dataclasses.asdict(config),
        concepts=list(concepts.targets),
        guides=list(concepts.guides),
        preserve=list(concepts.preserve),
        base_model=wrapper.model_id,
        base_fingerprint=wrapper.fingerprint(list(edit.deltas)),
        deltas={k: v.detach().float().cpu() for k, v in edit.deltas.items()},
        seconds=seconds,
        info=edit.info,
    )
