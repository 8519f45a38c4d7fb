"""Real write faults for tests, without patching any library: a process file size limit (EFBIG), a tiny tmpfs that
fills up (ENOSPC) and a read-only tmpfs (EROFS), both in a private mount namespace, so no root is needed."""

import contextlib
import resource
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes past ``nbytes`` in any file fail with EFBIG in this process (SIGXFSZ ignored), until the block ends.
    Holds for root too, unlike permissions."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _namespace_command(mountpoint: Path, options: str, argv: Sequence[str]) -> list[str]:
    script = f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mountpoint), *argv]


def private_tmpfs_available(tmp_path: Path) -> bool:
    """Whether this system lets a process mount a tmpfs in its own user and mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / ".tmpfs-probe"
    probe.mkdir(exist_ok=True)
    found = subprocess.run(_namespace_command(probe, "size=16k", ["true"]), capture_output=True, timeout=60)
    probe.rmdir()
    return found.returncode == 0


def run_on_tmpfs(mountpoint: Path, options: str, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
    """Run ``argv`` with a fresh tmpfs (``options``, e.g. ``size=150k`` or ``ro,size=16k``) mounted on
    ``mountpoint``, visible to it alone; what it wrote there is listed by the command itself (the tmpfs goes with
    it)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_namespace_command(mountpoint, options, argv), capture_output=True, text=True, **kwargs)
