"""The payload kinds an artifact holds, behind one protocol.

An artifact is provenance (``erasure.json``) plus one or more payloads: a weight change, an SAE intervention, a
facilitated transport, ... Each kind is a ``PayloadKind`` registered by the module that defines it, and says how its
payload is saved, loaded (validated), checked against a live pipeline, installed (returning a handle whose
``remove()`` restores the pipeline exactly) and which modules' base weights it depends on. The artifact format
(``erase.core.artifact``) only loops over the kinds; it names none.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from pipelines import PipelineWrapper

__all__ = [
    "Installed",
    "PayloadKind",
    "install_once",
    "kind_of",
    "payload_kind",
    "payload_kinds",
    "register_payload_kind",
]


class Installed(Protocol):
    """What installing a payload returns: ``remove()`` restores the pipeline as it was before."""

    def remove(self) -> None: ...


class PayloadKind:
    """One kind of payload. A subclass sets the class attributes and overrides the methods, and its module registers
    one instance with ``register_payload_kind``.

    Attributes:
        name: the kind's name in ``erasure.json`` (``payloads``).
        payload_type: the class of its payloads (``kind_of`` looks kinds up by it).
        files: the files it writes into an artifact folder (every one is covered by the artifact's checksums).
        replaces: kinds it installs in place of (facilitated transport installs the artifact's LoRA itself, at each
            prompt's strength).
    """

    name: str = ""
    payload_type: type = object
    files: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()

    def save(self, payload: Any, folder: Path, wrapper: PipelineWrapper) -> dict[str, Any]:
        """Write the payload's files into ``folder``; returns what ``erasure.json`` records about it."""
        raise NotImplementedError

    def load(self, folder: Path, record: dict[str, Any]) -> Any:
        """The payload read back from ``folder`` (``record``: what ``save`` returned); ``ValueError`` in one line
        when a file is bad."""
        raise NotImplementedError

    def modules(self, payload: Any) -> list[str]:
        """The qualified modules the payload changes or hooks (``erasure.json``'s ``layers``)."""
        return []

    def fingerprinted(self, payload: Any) -> list[str]:
        """The modules whose base weights the payload was made for (covered by the base fingerprint)."""
        return self.modules(payload)

    def norms(self, payload: Any, wrapper: PipelineWrapper) -> dict[str, float]:
        """The norms of the fingerprinted modules' weights in ``wrapper`` (recognise a half-precision base copy)."""
        return wrapper.weight_norms(self.fingerprinted(payload))

    def weight_changes(self, payload: Any) -> dict[str, torch.Tensor]:
        """Additive weight changes, qualified Linear name -> dW (float32); none for a runtime payload."""
        return {}

    def check(self, payload: Any, wrapper: PipelineWrapper) -> None:
        """``ValueError`` in one line when the payload does not fit the live pipeline; runs before anything of the
        artifact is installed."""

    def install(self, payload: Any, wrapper: PipelineWrapper, payloads: dict[str, Any]) -> Installed:
        """Put the payload in force on ``wrapper``'s pipeline (``payloads``: the artifact's, by kind)."""
        raise NotImplementedError


_KINDS: dict[str, PayloadKind] = {}


def register_payload_kind(kind: PayloadKind) -> PayloadKind:
    """Register a payload kind under ``kind.name``; a name or payload class registered twice is an error."""
    if not kind.name or kind.name in _KINDS:
        raise ValueError(f"payload kind {kind.name!r} is unnamed or already registered")
    if any(k.payload_type is kind.payload_type for k in _KINDS.values()):
        raise ValueError(f"payloads of type {kind.payload_type.__name__} already have a kind")
    _KINDS[kind.name] = kind
    return kind


def payload_kinds() -> dict[str, PayloadKind]:
    return dict(_KINDS)


def payload_kind(name: str) -> PayloadKind:
    if name not in _KINDS:
        raise ValueError(f"unknown payload kind {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def kind_of(payload: object) -> PayloadKind:
    for kind in _KINDS.values():
        if isinstance(payload, kind.payload_type):
            return kind
    raise TypeError(f"{type(payload).__name__} is no registered payload kind")


# module -> the payloads installed on it now (token -> identity), so a second installation of one is refused
_INSTALLED: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


def install_once(module: torch.nn.Module, key: str, install: Callable[[], Any], refusal: str) -> Any:
    """``install()`` a payload identified by ``key`` on ``module``, unless the same payload is installed there now
    (``ValueError(refusal)``: it would apply twice). The handle (which has ``on_remove``, a list of callbacks run
    after removal) forgets the installation when removed."""
    installed = _INSTALLED.setdefault(module, {})
    if key in installed.values():
        raise ValueError(refusal)
    handles = install()
    token = id(handles)
    installed[token] = key
    handles.on_remove.append(lambda: _INSTALLED.get(module, {}).pop(token, None))
    return handles
