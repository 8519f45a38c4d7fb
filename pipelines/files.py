"""Atomic file writes, shared by training checkpoints, artifacts' extras, audits and the scripts' JSON reports, and
the checked reads of the small JSON and safetensors files artifacts hold."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "read_json_object",
    "read_tensors",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_sha256",
    "png_bytes",
    "slug",
    "temporary_sibling",
    "write_synced_sibling",
]


def temporary_sibling(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process and call, so concurrent writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def write_synced_sibling(path: Path, data: bytes) -> Path:
    """``data`` written and flushed to disk under a fresh temporary name beside ``path``; the caller moves it into
    place (``os.replace``, ``os.link``) and removes it. Usual umask permissions ("xb", not mkstemp's 0600)."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that a reader (or a rerun after a kill) sees the old file or the whole new one, never a
    truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_synced_sibling(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def atomic_save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat tensor dict as safetensors (contiguous CPU copies, so views and GPU tensors work)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (model keys, grid names, attacked concepts)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "artifact"


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object; ``ValueError`` in one line naming the file when it is unreadable or not one."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path} is not a JSON object")
    return found


def read_tensors(path: str | Path) -> dict[str, Any]:
    """The tensors of a safetensors file, every floating-point one finite; ``ValueError`` in one line naming the file
    when it is not a regular file (a FIFO would block), unreadable, or holds NaN or infinite values."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ValueError(f"cannot read {path}: not a regular file")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
    return tensors
