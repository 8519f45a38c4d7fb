"""Atomic file writes, shared by training checkpoints, artifacts' extras and audits."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from PIL import Image

__all__ = ["atomic_write_bytes", "png_bytes", "temporary_sibling"]


def temporary_sibling(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process and call, so concurrent writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that a reader (or a rerun after a kill) sees the old file or the whole new one, never a
    truncated one. The file gets the usual umask permissions ("xb", not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
