"""The one writer of every long job's files (training checkpoints, activation caches, SAEs, artifacts' extras,
attack rows, audits, the scripts' JSON reports), the claim a run takes on its output folder, and the checked reads of
the small JSON and safetensors files artifacts and checkpoints hold.

Every write goes to a temporary sibling that is flushed to disk and renamed into place: a reader, or a rerun after a
kill, sees the old file or the whole new one. A write that fails (disk full, read-only file system, a name too long,
a file where a folder should be) raises :class:`WriteError`, one line naming the destination and the cause, after
its temporary is removed; what was at the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "DIGEST_KEY",
    "DamagedCheckpointError",
    "FolderInUseError",
    "WriteError",
    "atomic_output",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_name_lengths",
    "claim_folder",
    "damaged_checkpoint",
    "file_sha256",
    "folder_name",
    "foreign_entries",
    "move_into_place",
    "png_bytes",
    "process_alive",
    "read_json_object",
    "read_safetensors_metadata",
    "read_tensors",
    "remove_stale_temporaries",
    "safetensors_digest",
    "slug",
    "sync_to_disk",
    "temporary_sibling",
    "write_failure_reason",
    "write_error",
    "write_synced_sibling",
]

#: Width of the process id in temporary names: Linux's largest pid (2**22) has 7 digits, so every temporary name of
#: a destination has the same, longest, length, and an up-front probe with one of them proves the real one fits.
PID_WIDTH = 7


class WriteError(OSError):
    """A file or folder could not be written (disk full, read-only file system, a name too long, ...).

    ``str()`` is one line naming the destination and the cause; the writer removed its temporary, and whatever was at
    the destination before is intact. ``errno`` is the system's code when one is known.
    """

    def __init__(self, path: str | Path, code: int | None, reason: str) -> None:
        super().__init__(code, reason)
        self.path = Path(path)
        self.message = f"cannot write {path}: {reason}"

    def __str__(self) -> str:
        return self.message


class FolderInUseError(OSError):
    """Another live run holds the claim on an output folder (:func:`claim_folder`); ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, not JSON, fields missing); the message names it."""


_HINTS = {
    errno.ENOSPC: "free some space and rerun the same command to resume",
    errno.EDQUOT: "free some space and rerun the same command to resume",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EFBIG: "the file system's or the process's file size limit",
}


def write_failure_reason(code: int | None, text: str = "") -> str:
    """Why a write failed: the system's words, with what to do where there is something to do (a full disk: the job
    resumes)."""
    text = text or (os.strerror(code) if code else "unknown error")
    return f"{text}; {_HINTS[code]}" if code in _HINTS else text


def write_error(path: str | Path, err: BaseException) -> WriteError:
    """``err`` (an ``OSError``, or the ``SafetensorError`` safetensors raises for a failed write) as a
    :class:`WriteError` about ``path``."""
    if isinstance(err, WriteError):
        return err
    if isinstance(err, FileExistsError | NotADirectoryError) and err.filename and Path(err.filename) != Path(path):
        blocking = next((p for p in [Path(err.filename), *Path(err.filename).parents] if p.is_file()), None)
        if blocking is not None:  # mkdir on the way met a file
            return WriteError(path, errno.ENOTDIR, f"{blocking} is a file, not a folder")
    if isinstance(err, OSError):
        return WriteError(path, err.errno, write_failure_reason(err.errno, err.strerror or str(err)))
    found = re.search(r"os error (\d+)", str(err))  # safetensors: "I/O error: No space left on device (os error 28)"
    code = int(found.group(1)) if found else None
    text = "" if code else (str(err).splitlines() or [""])[0]
    return WriteError(path, code, write_failure_reason(code, text))


def _is_write_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError"


def temporary_sibling(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process and call (so concurrent writers never share one), and
    always of the same length (``PID_WIDTH``)."""
    return path.with_name(f".{path.name}.{os.getpid():0{PID_WIDTH}d}.{uuid.uuid4().hex[:12]}.tmp")


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")
_STALE_SECONDS = 10.0  # a dead writer's temporary is removed once this old (another machine may share the folder)
_ABANDONED_SECONDS = 86400.0  # ... and anyone's once this old (its pid may have been reused)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (this one, someone else's, or one this system cannot tell about
    count as alive), so its temporaries are left alone."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not a pid this system can tell about: leave its file alone
    return True


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove the temporaries (:func:`temporary_sibling`) a killed writer left in ``folder``, never a live one's."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    now = time.time()
    for path in folder.iterdir():
        found = _TEMPORARY.match(path.name)
        if not found:
            continue
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue  # its writer just moved it into place
        if age > _ABANDONED_SECONDS or (age > _STALE_SECONDS and not process_alive(int(found.group(1)))):
            _remove(path)


def _exists(path: Path) -> bool:
    """``Path.exists`` that is False, not an error, for a name too long to exist."""
    try:
        os.stat(path)
    except OSError:
        return False
    return True


#: Room left under the system's path limit for what a written folder holds (an artifact's ``pipeline/`` export).
_CONTENT_ROOM = 128


def check_name_lengths(path: str | Path, entries: tuple[str, ...] = (), *, temporary: bool = True) -> None:
    """``WriteError`` (ENAMETOOLONG) when a name a write to ``path`` will create is longer than its file system
    allows: each component of ``path`` that does not exist yet, the temporary sibling of its last (``temporary``:
    ``path`` itself is written atomically), and the temporary sibling of each of ``entries`` (names that will be
    written inside ``path``); or when the whole path of one of those, with ``_CONTENT_ROOM`` to spare, is longer than
    the system's path limit. Checked before any work."""
    path = Path(os.path.abspath(path))
    existing = path
    while not _exists(existing) and existing.parent != existing:
        existing = existing.parent
    where = existing if existing.is_dir() else existing.parent
    names = [p.name for p in [path, *path.parents] if p != existing and existing in p.parents]
    names += [temporary_sibling(path).name] if temporary else []
    names += [temporary_sibling(path / e).name for e in entries]
    limit = _path_setting(where, "PC_NAME_MAX", 255)
    for name in names:
        if len(os.fsencode(name)) > limit:
            shown = name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}"
            raise WriteError(
                path, errno.ENAMETOOLONG,
                f"the name {shown!r} ({len(os.fsencode(name))} bytes) is longer than this file system allows "
                f"({limit}): {write_failure_reason(errno.ENAMETOOLONG)}",
            )  # fmt: skip
    written = [path.parent / temporary_sibling(path).name if temporary else path]
    written += [path / temporary_sibling(path / e).name for e in entries]
    longest = max(len(os.fsencode(p)) for p in written) + _CONTENT_ROOM
    path_limit = _path_setting(where, "PC_PATH_MAX", 4096) - 1  # the limit counts the terminating NUL
    if longest > path_limit:
        raise WriteError(
            path, errno.ENAMETOOLONG,
            f"its path ({len(os.fsencode(path))} bytes, {longest} with what is written in it) is longer than this "
            f"system allows ({path_limit}): {write_failure_reason(errno.ENAMETOOLONG)}",
        )  # fmt: skip


def _path_setting(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def sync_to_disk(path: Path) -> None:
    """Flush a file, or a folder with everything in it, to disk."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    """Remove a temporary file or folder; one that was never made (its name too long, say) is no error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic_output(path: str | Path, *, folder: bool = False, replace: bool = True) -> Iterator[Path]:
    """The one writer: yields a fresh temporary path beside ``path`` (with ``folder``, an empty folder there) for the
    body to write; then flushes it to disk and moves it onto ``path`` in one step (:func:`move_into_place`).

    Any failure, in the body or the move, removes the temporary; a failed write (``OSError``, ``SafetensorError``)
    is raised as :class:`WriteError` naming ``path``, anything else (an interrupt) as it is. ``replace=False``
    refuses (``FileExistsError``) a destination that appeared meanwhile.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    moving = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp.mkdir()
        yield tmp
        sync_to_disk(tmp)
        moving = True
        move_into_place(tmp, path, replace=replace)
    except BaseException as err:
        _remove(tmp)
        if _is_write_failure(err) and not (moving and isinstance(err, FileExistsError)):
            raise write_error(path, err) from err
        raise


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the system has no such call or flag (the caller falls back)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if call(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(tmp: Path, path: Path, *, replace: bool) -> None:
    """Rename ``tmp`` (a file or a folder) onto ``path`` in one step, and flush the parent folder.

    ``replace``: what is at ``path`` is swapped out whole (a folder by an atomic exchange where the system has one)
    and removed. Without it the move re-checks the destination at the last moment: an empty folder there is taken
    over; anything else, even one that appeared an instant ago, is ``FileExistsError`` and ``tmp`` is left in place
    for the caller to remove.
    """
    if replace and path.is_dir() and not path.is_symlink():
        if not _renameat2(tmp, path, _RENAME_EXCHANGE):  # no atomic exchange here: two renames, a microsecond apart
            backup = tmp.with_name(f"{tmp.name}.old")
            os.replace(path, backup)
            os.replace(tmp, path)
            os.replace(backup, tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # what was at the destination, swapped out
    elif replace:
        os.replace(tmp, path)
    else:
        with contextlib.suppress(FileNotFoundError):
            try:
                path.rmdir()  # an empty folder is taken over; a non-empty one or a file stays and is refused below
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
        if not _renameat2(tmp, path, _RENAME_NOREPLACE):
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(path))
            os.rename(tmp, path)
    _fsync_dir(path.parent)


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
    truncated one; :class:`WriteError` when it cannot."""
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """``image`` as PNG, with ``text`` as its tEXt chunks (a mark a later run reads to know the file is its own)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


#: The safetensors header entry holding :func:`safetensors_digest` of a file's tensors and other header entries:
#: files erase writes and reads back itself (training checkpoints, caches), so that a changed number is found when
#: the file is read, not only a truncated file.
DIGEST_KEY = "erase_digest"


def safetensors_digest(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and every header entry but :data:`DIGEST_KEY`, in name
    order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"tensor\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    for key in sorted(set(metadata or {}) - {DIGEST_KEY}):
        digest.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    return digest.hexdigest()


def atomic_save_safetensors(
    tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None, *, digest: bool = False
) -> None:
    """Atomically save a flat tensor dict as safetensors (contiguous CPU copies, so views and GPU tensors work);
    ``digest`` adds :func:`safetensors_digest` to the header, which ``read_tensors(..., digest=True)`` checks."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if digest:
        metadata = {**(metadata or {}), DIGEST_KEY: safetensors_digest(tensors, metadata)}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Folder names stay well under file systems' 255-byte limit, leaving room for suffixes and temporaries.
FOLDER_NAME_LENGTH = 60


def folder_name(text: str) -> str:
    """A file-name-safe folder name, distinct for distinct ``text`` (concepts, table rows).

    The plain slug (``a-z``, ``0-9``, single hyphens) when it spells ``text`` with spaces as hyphens and is short
    enough (``van gogh`` -> ``van-gogh``); otherwise the slug cut short, ``_`` and 16 hex digits of the sha256 of
    ``text`` (``van-gogh`` -> ``van-gogh_b0bf...``). A slug holds no ``_``, so no text's plain name is another's
    hashed one.
    """
    plain = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if plain and plain.replace("-", " ") == text and len(plain) <= FOLDER_NAME_LENGTH:
        return plain
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{plain[: FOLDER_NAME_LENGTH - 17].rstrip('-') or 'x'}_{digest}"


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


def read_tensors(path: str | Path, *, digest: bool = False) -> dict[str, Any]:
    """The tensors of a safetensors file, every floating-point one finite; ``ValueError`` in one line naming the file
    when it is not a regular file (a FIFO would block), unreadable, or holds NaN or infinite values. ``digest``: the
    file must also hold the :func:`safetensors_digest` of what it holds (written by ``atomic_save_safetensors(...,
    digest=True)``), and match it."""
    import torch
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise ValueError(f"cannot read {path}: not a regular file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if digest and DIGEST_KEY not in metadata:
        raise ValueError(f"{path} records no digest of its contents (written by another version, or changed)")
    if digest and metadata[DIGEST_KEY] != safetensors_digest(tensors, metadata):
        raise ValueError(f"{path} does not match the digest in its header: the file was changed")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
    return tensors


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header; ``ValueError`` in one line naming the file when it cannot
    be read."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise ValueError(f"cannot read {path}: not a regular file")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def damaged_checkpoint(path: str | Path, why: BaseException | str) -> DamagedCheckpointError:
    """The error for a checkpoint file that cannot be read back (``why``: the reading's error, or words): it names
    the file and how to start afresh."""
    if isinstance(why, KeyError):
        why = f"{why.args[0] if why.args else 'an entry'} is missing"
    why = (str(why).strip().splitlines() or [type(why).__name__])[0]
    why = why.removeprefix(f"cannot read {path}: ").removeprefix(f"{path}: ").removeprefix(f"{path} ")
    return DamagedCheckpointError(
        f"the checkpoint file {path} is damaged ({why}); rerun with --restart (restart=True) to start afresh, "
        "which deletes this run's checkpoints and nothing else"
    )


# ---------------------------------------------------------------------------------------------------- claims
def claim_path(folder: Path) -> Path:
    """The lock file of an output folder's claim: ``.<name>.claim`` beside it (the folder itself may not exist yet,
    or may be swapped whole)."""
    return folder.with_name(f".{folder.name}.claim")


@contextlib.contextmanager
def claim_folder(folder: str | Path, option: str = "--out") -> Iterator[Path]:
    """Hold ``folder`` for this run: an exclusive ``flock`` on its sibling lock file (:func:`claim_path`), taken
    without waiting, so a second run to the same folder fails at once (:class:`FolderInUseError`, one line naming the
    holder's process, and ``option``, the setting that names the folder). Released, and the lock file removed, on
    exit.

    The kernel drops the lock of a process that dies, so a claim left by a killed run is taken over, never stale.
    Locks are per open file: two claims on one folder conflict in one process too. The lock file is checked to still
    be the one at the path after locking (its previous holder may have removed it in between), else taken again.
    """
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    try:
        if folder.is_symlink():  # a name too long to exist raises here
            folder = folder.resolve()
        lock = claim_path(folder)
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(folder, err) from err
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise write_error(lock, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise FolderInUseError(
                f"{folder} is being written by another run ({who}); wait for it to end or choose another {option}"
            ) from None
        except OSError as err:
            os.close(fd)
            raise write_error(lock, err) from err
        try:
            found, held = os.stat(lock), os.fstat(fd)
            if (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the holder's pid is for the message only (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def foreign_entries(folder: str | Path, ours: Callable[[Path], bool] = lambda entry: False) -> str:
    """The visible entries of ``folder`` that ``ours`` does not claim, named for a one-line refusal (the first three,
    then "..."); empty when there are none or no folder. Hidden entries (our temporaries, locks) are left aside."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    foreign = sorted(e.name for e in folder.iterdir() if not e.name.startswith(".") and not ours(e))
    return ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
