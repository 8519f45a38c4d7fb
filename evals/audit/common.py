"""What every part of an audit names: its error, its columns (models), its image file names and its file writes.

Running (:mod:`.run`), scoring (:mod:`.scoring`) and the report (:mod:`.report`) all import these and nothing of each
other's internals, so each can change without the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import PipelineWrapper
from pipelines.files import WriteError, atomic_write_bytes, slug, write_failure_reason

__all__ = [
    "ORIGINAL",
    "SCHEMA_VERSION",
    "AuditError",
    "AuditModel",
    "image_name",
    "json_text",
    "make_folder",
    "slug",
    "write_file",
]

#: ``schema_version`` of ``metrics.json`` and ``audit.json``.
SCHEMA_VERSION = 1
#: The key (and label) of the original model's column.
ORIGINAL = "original"


class AuditError(ValueError):
    """The audit cannot run as asked (an output folder made with other settings, images missing, bad arguments)."""


@dataclass(frozen=True)
class AuditModel:
    """One column of the audit: the original model (``edit is None``) or the base with one erasure applied.

    Erased models are built by the caller, which reads and checks the artifact (``erase.workflow.audit_models``):
    evals sits below erase and never imports it.
    """

    key: str
    label: str
    folder: str | None = None
    #: ``edit(wrapper)`` is a context manager that puts the erasure in force for its block (weight changes applied
    #: and restored, or an intervention attached and removed)
    edit: Callable[[PipelineWrapper], AbstractContextManager] | None = None
    metadata: dict[str, Any] | None = None  # erasure.json as saved

    @classmethod
    def erased(
        cls, folder: str | Path, metadata_json: bytes, edit: Callable[[PipelineWrapper], AbstractContextManager]
    ) -> AuditModel:
        """The column of one artifact folder; its key is fixed by the folder's name and its erasure.json bytes."""
        folder = Path(folder)
        key = f"{slug(folder.resolve().name)}-{hashlib.sha1(metadata_json).hexdigest()[:8]}"
        return cls(key, folder.resolve().name, str(folder), edit, json.loads(metadata_json))


def image_name(prompt: str, seed: int) -> str:
    """``<sha1(prompt)[:10]>-<seed>.png``: a file name fixed by the image's prompt and seed alone."""
    return f"{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}-{int(seed)}.png"


def json_text(obj: Any) -> str:
    """The JSON files' one format (indented, keys in insertion order, no NaN): reruns write identical bytes."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def reason(err: OSError) -> str:
    """Why a file operation failed, with what to do when the disk is full (the audit resumes)."""
    return write_failure_reason(err.errno, err.strerror or str(err) or type(err).__name__)


def write_file(path: Path, data: bytes) -> None:
    """Atomic write; a failure (disk full, read-only folder) is an :class:`AuditError` naming the file."""
    try:
        atomic_write_bytes(path, data)
    except WriteError as err:
        raise AuditError(str(err)) from err


def make_folder(path: Path) -> None:
    """Create ``path`` (and its parents); a file in the way or a failure is an :class:`AuditError`."""
    if path.exists() and not path.is_dir():
        raise AuditError(f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AuditError(f"cannot create the folder {path}: {reason(err)}") from err
