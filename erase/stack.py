"""Stacked erasures (defence in depth): several methods applied in order, each made on the model with the earlier
ones in force, e.g. ``uce`` against the prompt threat, then ``saeuron`` against the embedding threat.

A stack is named by its members joined with ``+`` (``"uce+saeuron"``). Each member is an ordinary
``ErasureArtifact``: the later ones record as their base the pipeline the earlier ones leave (their base fingerprint
is of those weights), so a member is installed only on exactly that state. On disk::

    STACK/
      stack.json       the order, each member's method and folder, the sha256 of each member's erasure.json
      1-uce/           a complete artifact folder (erasure.json, its payload files, ...)
      2-saeuron/       another, made with 1-uce in force

``erase.load(pipe, STACK)`` installs the members in order, each checked against the state its predecessors leave,
and returns one handle whose ``remove()`` takes them off in reverse, bit for bit. The stack names no method: it reads
each member's settings from the registry.

Order matters where a member learns from the model's images. ``uce+saeuron`` scores saeuron's features on images of
the concept's prompts drawn with uce in force, which no longer show the concept; ``saeuron+uce`` scores them on the
base model's, and uce, a closed form over weights and text embeddings, is the same made under saeuron's hooks or
without them. What a member looks up by the model's weights (the SAE trained on them: ``Capabilities.base_lookup``)
is looked up on the base model either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import PipelineWrapper
from pipelines.files import file_sha256

from .core.artifact import (
    ArtifactHandle,
    ErasureArtifact,
    check_artifact_base,
    folder_written_atomically,
    install_artifact,
    load_artifact,
    save_artifact,
)
from .core.layout import (
    METADATA_FILE,
    STACK_EXTRA_ENTRIES,
    STACK_FILE,
    STACK_MEMBER_FOLDER,
    ArtifactError,
    ArtifactMismatchError,
    check_output_folder,
)
from .core.registry import ConceptSpec, erase_concepts, get_method
from .core.version import __version__

__all__ = [
    "STACK_FORMAT",
    "STACK_SEPARATOR",
    "ErasureStack",
    "StackHandle",
    "check_erasure_base",
    "erase_stack",
    "install_stack",
    "is_stack_folder",
    "load_stack",
    "member_overrides",
    "parse_method_stack",
    "read_erasure",
    "refuse_as_member",
    "save_stack",
    "stack_member_hint",
]

logger = logging.getLogger(__name__)

STACK_SEPARATOR = "+"
STACK_VERSION = 1
#: what ``scripts/erase.py``'s summary calls a stack's format (an artifact's is its weight format)
STACK_FORMAT = "stack"


# ---------------------------------------------------------------------------------------------------- names, settings
def parse_method_stack(text: str) -> list[str]:
    """The methods ``text`` names in order (``"uce+saeuron"`` -> ``["uce", "saeuron"]``; one method alone is a
    stack of one); ``ValueError`` in one line for an empty member, an unknown method or a method named twice."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--method is empty: name a method, or several joined by '+' (uce+saeuron)")
    names = [n.strip() for n in text.split(STACK_SEPARATOR)]
    if not all(names):
        raise ValueError(f"--method {text!r} has an empty member: join methods by single '+' (uce+saeuron)")
    methods = [get_method(n).name for n in names]
    twice = next((m for m in methods if methods.count(m) > 1), None)
    if twice is not None:
        raise ValueError(f"--method {text!r} names {twice!r} twice: a stack applies each method once")
    return methods


def _field_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_method(method).config_class)}


def member_overrides(
    methods: Sequence[str], overrides: dict[str, Any], *, known_members: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``KEY=VALUE`` settings split among a stack's members: ``saeuron.steps`` goes to ``saeuron`` alone, an
    unqualified key to every member whose config has that field.

    ``ValueError`` in one line for a qualified key naming no member, or an unqualified one that no member has (for a
    stack of one, that member's own refusal, which lists its settings). ``known_members``: further methods a
    qualified key may name without error (the other rows of a table); its settings are left out here.
    """
    split: dict[str, dict[str, Any]] = {m: {} for m in methods}
    allowed = set(methods) | set(known_members or ())
    for key, value in overrides.items():
        member, dot, field_name = key.rpartition(".")
        if dot:
            if member not in allowed:
                named = STACK_SEPARATOR.join(methods) if known_members is None else ", ".join(sorted(allowed))
                raise ValueError(f"--set {key}: {member!r} is no member of {named}")
            if member in split:
                split[member][field_name] = value
            continue
        takers = [m for m in methods if key in _field_names(m)] if len(methods) > 1 else list(methods)
        if not takers:
            raise ValueError(f"--set {key}: no member of {STACK_SEPARATOR.join(methods)} has a setting {key!r}")
        for m in takers:
            split[m][key] = value
    return split


# ---------------------------------------------------------------------------------------------------- the stack
@dataclass
class ErasureStack:
    """Member artifacts in the order they apply; each was made (and is installed) with the ones before in force."""

    members: list[ErasureArtifact]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an erasure stack needs at least one member")

    @property
    def method(self) -> str:
        return STACK_SEPARATOR.join(m.method for m in self.members)

    @property
    def config(self) -> dict[str, dict[str, Any]]:
        """Each member's config, by method."""
        return {m.method: m.config for m in self.members}

    @property
    def concepts(self) -> list[str]:
        return list(dict.fromkeys(c for m in self.members for c in m.concepts))

    @property
    def preserve(self) -> list[str]:
        return list(dict.fromkeys(c for m in self.members for c in m.preserve))

    @property
    def guides(self) -> list[str]:
        """The guides of the members that read guides."""
        readers = [m for m in self.members if get_method(m.method).capabilities.guides]
        return list(dict.fromkeys(g for m in readers for g in m.guides))

    @property
    def base_model(self) -> str:
        return self.members[0].base_model

    @property
    def base_fingerprint(self) -> str:
        """The first member's: the base model's weights the whole stack goes on."""
        return self.members[0].base_fingerprint

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.members)

    @property
    def info(self) -> dict[str, Any]:
        """Each member's info, by method."""
        return {m.method: m.info for m in self.members}

    @property
    def layers(self) -> list[str]:
        return sorted({layer for m in self.members for layer in m.layers})

    @property
    def payloads(self) -> dict[str, Any]:
        """Each member's payloads, keyed ``method.kind``."""
        return {f"{m.method}.{kind}": p for m in self.members for kind, p in m.payloads.items()}

    @contextlib.contextmanager
    def applied(self, wrapper: PipelineWrapper) -> Iterator[None]:
        """Every member in force for the ``with`` block, in order; taken off in reverse afterwards, the pipeline
        restored exactly. The bases are not checked (``install_stack`` checks them)."""
        with contextlib.ExitStack() as members:
            for member in self.members:
                members.enter_context(member.applied(wrapper))
            yield


def erase_stack(wrapper: PipelineWrapper, members: Sequence[tuple[str, ConceptSpec, Any]]) -> ErasureStack:
    """Run each ``(method, concepts, config)`` in order, each on the pipeline with the earlier members' results in
    force (so its base fingerprint is of the state they leave); the pipeline is left unchanged. What a member looks
    up by the model's weights (``Capabilities.base_lookup``: the SAE trained on them) is looked up on the unedited
    model first."""
    if not members:
        raise ValueError("an erasure stack needs at least one member")
    lookups = [get_method(m).capabilities.base_lookup for m, _, _ in members]
    members = [(m, concepts, config if lookup is None or i == 0 else lookup(wrapper, config))
               for i, ((m, concepts, config), lookup) in enumerate(zip(members, lookups, strict=True))]  # fmt: skip
    made: list[ErasureArtifact] = []
    with contextlib.ExitStack() as in_force:
        for i, (method, concepts, config) in enumerate(members):
            artifact = erase_concepts(wrapper, concepts, method, config)
            if len(members) > 1:
                artifact.info["stack"] = {"position": i + 1, "of": STACK_SEPARATOR.join(m[0] for m in members)}
            made.append(artifact)
            if i + 1 < len(members):
                in_force.enter_context(artifact.applied(wrapper))
    return ErasureStack(made)


class StackHandle(ArtifactHandle):
    """A stack installed on a pipeline: ``remove()`` takes the members off in reverse order, bit for bit."""

    def __init__(self, stack: ErasureStack, installed: list[ArtifactHandle]) -> None:
        super().__init__(stack, list(installed))  # type: ignore[arg-type]  # the stack stands for its artifact
        self.stack = stack


def install_stack(wrapper: PipelineWrapper, stack: ErasureStack, where: str = "stack") -> StackHandle:
    """Install the members in order, each checked against the pipeline as its predecessors leave it
    (``ArtifactMismatchError`` naming the member); on any refusal the members already in are taken off again."""
    handles: list[ArtifactHandle] = []
    try:
        for i, member in enumerate(stack.members):
            handles.append(install_artifact(wrapper, member, f"{where} member {i + 1} ({member.method})"))
    except BaseException:
        while handles:
            handles.pop().remove()
        raise
    return StackHandle(stack, handles)


# ---------------------------------------------------------------------------------------------------- on disk
def _member_folder(position: int, method: str) -> str:
    return f"{position}-{method}"


def save_stack(
    stack: ErasureStack,
    folder: str | Path,
    wrapper: PipelineWrapper,
    *,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the stack folder atomically: each member as an ordinary artifact folder (saved with its predecessors
    in force, so a member's exported pipeline is the state it leaves), then ``stack.json``; all swapped in at once.
    ``wrapper`` holds the base model, unedited; ``extra_files`` (``STACK_EXTRA_ENTRIES``: the check's picture) go
    beside ``stack.json``. Returns the folder written."""
    folder = check_output_folder(folder, overwrite)
    for name in extra_files or {}:
        if name not in STACK_EXTRA_ENTRIES:
            raise ValueError(f"{name!r} is not a file a stack folder holds")
    with folder_written_atomically(folder, overwrite) as tmp:
        records = []
        with contextlib.ExitStack() as in_force:
            for i, member in enumerate(stack.members):
                name = _member_folder(i + 1, member.method)
                save_artifact(member, tmp / name, wrapper)
                records.append({"folder": name, "method": member.method,
                                "erasure_sha256": file_sha256(tmp / name / METADATA_FILE)})  # fmt: skip
                if i + 1 < len(stack.members):
                    in_force.enter_context(member.applied(wrapper))
        meta = {"stack_version": STACK_VERSION, "method": stack.method, "weight_format": STACK_FORMAT,
                "concepts": stack.concepts, "guides": stack.guides, "preserve": stack.preserve,
                "base_model": stack.base_model, "base_fingerprint": stack.base_fingerprint, "config": stack.config,
                "members": records, "created": stack.members[-1].created, "erase_version": __version__}  # fmt: skip
        (tmp / STACK_FILE).write_text(json.dumps(meta, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    logger.info("saved the %s stack (%d members) to %s", stack.method, len(stack.members), folder)
    return folder


def is_stack_folder(folder: str | Path) -> bool:
    """The folder holds a stack (``stack.json``) rather than one artifact."""
    return (Path(folder) / STACK_FILE).is_file()


def _stack_records(folder: Path) -> list[dict[str, str]]:
    """The member records of ``stack.json``, each checked; ``ArtifactError`` in one line naming what is wrong."""
    path = folder / STACK_FILE
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ArtifactError(f"{path} is corrupt: {err}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    if meta.get("stack_version") != STACK_VERSION:
        raise ArtifactError(f"{path}: stack_version must be {STACK_VERSION}, got {meta.get('stack_version')!r}")
    records = meta.get("members")
    if not isinstance(records, list) or not records:
        raise ArtifactError(f"{path}: members must be a non-empty list")
    for i, record in enumerate(records):
        keys = ("folder", "method", "erasure_sha256")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in keys):
            raise ArtifactError(f"{path}: member {i + 1} must give folder, method and erasure_sha256 as strings")
        if record["folder"] != _member_folder(i + 1, record["method"]) or not STACK_MEMBER_FOLDER.fullmatch(
            record["folder"]
        ):
            raise ArtifactError(f"{path}: member {i + 1} must be the folder {_member_folder(i + 1, record['method'])}")
    return records


def load_stack(folder: str | Path) -> ErasureStack:
    """Read a stack folder: ``stack.json``, then each member as ``load_artifact`` reads it, its ``erasure.json``
    matching the recorded sha256; ``ArtifactError`` in one line naming the damaged part."""
    folder = Path(folder)
    members = []
    for i, record in enumerate(_stack_records(folder)):
        member_folder = folder / record["folder"]
        meta_path = member_folder / METADATA_FILE
        if not meta_path.is_file():
            raise ArtifactError(f"{member_folder}, member {i + 1} of the stack {folder}, is missing or no artifact")
        if file_sha256(meta_path) != record["erasure_sha256"]:
            raise ArtifactError(f"{meta_path} does not match the sha256 in {folder / STACK_FILE}: it was changed")
        member = load_artifact(member_folder)
        if member.method != record["method"]:
            raise ArtifactError(f"{meta_path} holds a {member.method} erasure; {STACK_FILE} lists {record['method']}")
        members.append(member)
    return ErasureStack(members)


def read_erasure(folder: str | Path) -> ErasureArtifact | ErasureStack:
    """What an erasure folder holds: a stack (``stack.json``) or one artifact; ``ArtifactError`` in one line."""
    return load_stack(folder) if is_stack_folder(folder) else load_artifact(folder)


def check_erasure_base(wrapper: PipelineWrapper, erasure: ErasureArtifact | ErasureStack, where: str) -> None:
    """``ArtifactMismatchError`` unless ``erasure`` fits the pipeline's current weights; a stack's members are
    installed in turn to check each against the state before it, and taken off again (the pipeline as it was)."""
    if isinstance(erasure, ErasureStack):
        install_stack(wrapper, erasure, where).remove()
        return
    try:
        check_artifact_base(wrapper, erasure, where)
    except ArtifactMismatchError as err:
        raise refuse_as_member(err, erasure) from None


def stack_member_hint(artifact: ErasureArtifact) -> str:
    """For an artifact that is a later member of a stack, what to load instead (empty otherwise)."""
    stack = artifact.info.get("stack") if isinstance(artifact.info, dict) else None
    if not isinstance(stack, dict) or not isinstance(stack.get("position"), int) or stack["position"] < 2:
        return ""
    return (f"; it is member {stack['position']} of the stack {stack.get('of')!r}, made on the model with the "
            "members before it in force: load the stack's folder")  # fmt: skip


def refuse_as_member(err: ArtifactMismatchError, artifact: ErasureArtifact) -> ArtifactMismatchError:
    """``err`` with the stack hint added where ``artifact`` is a later stack member."""
    hint = stack_member_hint(artifact)
    return ArtifactMismatchError(f"{err}{hint}") if hint else err
