"""What an artifact folder holds and where one may be written: checked before torch is imported or a model loads,
so a bad ``--out`` costs nothing. No torch here.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from pipelines.tokenizer import concept_folder, concept_text

__all__ = [
    "ARTIFACT_ENTRIES",
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactMismatchError",
    "check_checkpoint_folder",
    "check_erasure_folder",
    "check_output_folder",
    "check_replaceable_file",
    "check_result_file",
    "check_writable_folder",
    "default_output_folder",
    "temporary_folder",
]

SCHEMA_VERSION = 2  # 2: payloads by kind, and the sha256 of every payload file
METADATA_FILE = "erasure.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_FILE = "edited_weights.safetensors"
PIPELINE_FOLDER = "pipeline"
CHECK_PICTURE = "before_after.png"
#: a stack of erasures (``erase.stack``): this file, and one artifact folder per member named ``<position>-<method>``
STACK_FILE = "stack.json"
STACK_MEMBER_FOLDER = re.compile(r"[1-9][0-9]*-[A-Za-z0-9_]+")
#: what a stack folder may hold beside stack.json and its members
STACK_EXTRA_ENTRIES = frozenset({CHECK_PICTURE})
#: the weight change in kohya-ss's LoRA layout, for Automatic1111 and ComfyUI (``erase.core.kohya``; not checksummed:
#: erase itself never reads it)
KOHYA_FILE = "lora_kohya.safetensors"
INTERVENTION_ENTRIES = ("intervention.json", "intervention.safetensors", "sae.safetensors", "sae.json")
#: facilitated transport beside a LoRA (``erase.lora.transport``)
TRANSPORT_ENTRIES = ("transport.json", "transport.safetensors")
#: the file whose sha256 ``erasure.json`` records, by weight format
WEIGHTS_FILES = {"lora": LORA_FILE, "full": FULL_FILE, "intervention": "intervention.safetensors"}
#: Everything an artifact folder may hold; ``overwrite`` replaces a folder only if it holds nothing else.
ARTIFACT_ENTRIES = frozenset({METADATA_FILE, LORA_FILE, FULL_FILE, PIPELINE_FOLDER, CHECK_PICTURE, KOHYA_FILE,
                              *INTERVENTION_ENTRIES, *TRANSPORT_ENTRIES})  # fmt: skip
#: Relative tolerance on per-module weight norms when the pipeline runs in float16/bfloat16: its weights are the
#: base's rounded, so the float32 fingerprint cannot match, while rounding moves a norm by far less than this.
LOW_PRECISION_NORM_RTOL = 1e-3


class ArtifactError(ValueError):
    """An artifact folder is missing, corrupt, or not an erasure artifact."""


class ArtifactExistsError(ArtifactError):
    """The output folder already holds something that saving would destroy."""


class ArtifactMismatchError(ArtifactError):
    """The artifact was made for other base weights than the pipeline's."""


TEMPORARY_MARK = ".erase-tmp-"


def temporary_folder(folder: Path) -> Path:
    """The temporary sibling an artifact is written to before it is swapped in. Its name has one length whatever the
    process (a fixed-width pid), the longest name a save makes beside ``folder``, so the up-front probe, which
    creates one, proves the real one fits."""
    return folder.with_name(f".{folder.name}{TEMPORARY_MARK}{os.getpid():07d}-{uuid.uuid4().hex[:8]}")


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: the only way POSIX offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_mount_point(path: Path) -> bool:
    """``os.path.ismount``, plus bind mounts of a folder on the same file system, which only the mount table shows."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo") as f:
            points = {line.split()[4].encode().decode("unicode_escape") for line in f if len(line.split()) > 4}
    except OSError:
        return False
    return str(path.resolve()) in points


def _writable_ancestor(folder: Path) -> Path:
    """The nearest existing ancestor of ``folder``; ``ArtifactError`` when one on the way is a file."""
    parent = folder.parent
    while not parent.exists():
        if parent.is_symlink():
            raise ArtifactError(f"cannot write {folder}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {folder}: {parent} is a file, not a folder")
    return parent


def _refuse_dangling_link(path: Path, option: str = "") -> None:
    """``ArtifactError`` when ``path`` is a symbolic link to nothing: writing through it would create its target,
    wherever that points (another disk, a folder the user never named)."""
    if path.is_symlink() and not path.exists():
        named = f"{option} " if option else ""
        raise ArtifactError(
            f"{named}{path} is a symbolic link to nothing ({os.readlink(path)}); create its target or name "
            "another path"
        )


def check_output_folder(folder: str | Path, overwrite: bool = False) -> Path:
    """The folder an artifact will be written to (symbolic links resolved), or ``ArtifactError`` in one line.

    Checked before any work: the folder must be new, empty, or (with ``overwrite``) hold an erasure artifact and
    nothing else, and its parent must be writable (probed by creating and removing a folder there).
    """
    given = Path(folder).expanduser()
    folder = Path(os.path.abspath(given))
    _check_names(folder)
    _refuse_dangling_link(folder)
    if folder.is_symlink():
        folder = given = folder.resolve()
    if folder == Path.cwd() or folder.parent == folder:
        raise ArtifactError(f"{folder} is the current or root folder; name a new folder for the artifact")
    if folder.exists():
        if not folder.is_dir():
            raise ArtifactExistsError(f"{folder} exists and is not a folder")
        if _is_mount_point(folder):
            raise ArtifactError(f"{folder} is a mount point, which cannot be swapped atomically; name a folder in it")
        entries = sorted(p.name for p in folder.iterdir())
        ours = METADATA_FILE in entries or STACK_FILE in entries
        if entries and not overwrite:
            what = "another erasure artifact" if ours else "files"
            raise ArtifactExistsError(f"{folder} already holds {what}; choose another --out or pass --overwrite")
        if entries and not ours:
            raise ArtifactExistsError(
                f"{folder} holds files that are not an erasure artifact; refusing to replace them"
            )
        if METADATA_FILE in entries:
            foreign = [e for e in entries if e not in ARTIFACT_ENTRIES and not e.startswith(".")]
        else:  # a stack: stack.json and its members' folders
            foreign = [e for e in entries if e != STACK_FILE and e not in STACK_EXTRA_ENTRIES
                       and not STACK_MEMBER_FOLDER.fullmatch(e) and not e.startswith(".")]  # fmt: skip
        if foreign:
            raise ArtifactExistsError(
                f"{folder} holds files beside the artifact ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); --overwrite replaces an artifact folder only: move them"
            )
    ancestor = _writable_ancestor(folder)
    _probe_writable(folder, ancestor, temporary_folder(folder).name)
    return given


def _check_names(folder: Path, entries: tuple[str, ...] = (), temporary: bool = True) -> None:
    from pipelines.files import WriteError, check_name_lengths

    try:
        check_name_lengths(folder, entries, temporary=temporary)
    except WriteError as err:
        raise ArtifactError(str(err)) from None


def _probe_writable(folder: Path, where: Path, name: str) -> None:
    """Create and remove the folder ``where / name`` (the real temporary's name, where there is one)."""
    from pipelines.files import write_failure_reason

    try:
        probe = where / name
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise ArtifactError(
            f"cannot write {folder}: {where} is not writable ({write_failure_reason(err.errno, err.strerror)})"
        ) from None


def check_writable_folder(folder: str | Path, entries: tuple[str, ...] = ()) -> Path:
    """A folder that will be created or added to (an SAE store, a cache): ``ArtifactError`` in one line unless it,
    or the nearest existing folder above it, is a writable folder, and every name to be created fits the file system
    (the folder's missing components, and the temporaries of ``entries``, the names to be written in it)."""
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    _check_names(folder, entries, temporary=False)  # the folder is added to, not swapped in
    _refuse_dangling_link(folder)
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"cannot write {folder}: it is a file, not a folder")
    where = folder if folder.is_dir() else _writable_ancestor(folder)
    _probe_writable(folder, where, f".erase-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    return folder


def check_replaceable_file(
    path: str | Path,
    option: str,
    is_ours: Callable[[Path], bool],
    what: str,
    advice: str = "choose another file or move it",
) -> None:
    """``ArtifactError`` in one line when the output file ``path`` (given as ``option``) exists and ``is_ours`` says
    it is not an earlier ``what``: the run would replace it, and only our own files are ever replaced. A symbolic
    link to nothing is refused too: the write would create its target."""
    path = Path(path).expanduser()
    _refuse_dangling_link(path, option)
    if not path.exists() or path.is_dir():
        return  # a folder is refused by the writability check, which names it
    if not is_ours(path):
        raise ArtifactError(f"{option} {path} exists and is not {what}: it would be replaced; {advice}")


def check_result_file(path: str | Path, option: str, keys: Sequence[str]) -> None:
    """:func:`check_replaceable_file` for a JSON result: an earlier one is a JSON object holding every one of
    ``keys``."""
    import json

    def is_result(found: Path) -> bool:
        try:
            data = json.loads(found.read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and set(keys) <= set(data)

    check_replaceable_file(path, option, is_result, "an earlier result of this command")


def check_checkpoint_folder(checkpoint_dir: str | Path | None, out: str | Path) -> None:
    """``ArtifactError`` when a training's checkpoint folder is the output folder, inside it or holds it (symbolic
    links resolved). The artifact is swapped in whole over ``out``, so checkpoints in it would make the save refuse,
    or be lost with an earlier artifact; and a checkpoint folder holds the run's files and nothing else, so one
    holding ``out`` is refused at the start of training, after the model loaded. Checked before either."""
    if checkpoint_dir is None:
        return
    checkpoints = Path(os.path.realpath(Path(checkpoint_dir).expanduser()))
    folder = Path(os.path.realpath(Path(out).expanduser()))
    where = ("is" if checkpoints == folder else "is inside" if folder in checkpoints.parents
             else "holds" if checkpoints in folder.parents else None)  # fmt: skip
    if where is not None:
        raise ArtifactError(
            f"checkpoint_dir {checkpoint_dir} {where} the output folder {out}: the artifact replaces its folder "
            "whole and a checkpoint folder holds the run's files alone; choose a checkpoint_dir apart from --out"
        )


def check_erasure_folder(folder: str | Path, option: str = "--erasure") -> None:
    """``ArtifactError`` in one line unless ``folder`` holds an erasure artifact (``erasure.json``) or a stack
    (``stack.json``): the scripts' first check of a folder to read, before torch is imported. Whether the files are
    whole and fit the model is for the loader (``erase.stack.read_erasure``)."""
    if not str(folder).strip():
        raise ArtifactError(f"{option} is empty: name an erasure artifact or stack folder")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ArtifactError(f"{option} {folder}: {'no such folder' if not path.exists() else 'not a folder'}")
    if not (path / METADATA_FILE).is_file() and not (path / STACK_FILE).is_file():
        raise ArtifactError(f"{folder} is not an erasure artifact (no {METADATA_FILE}, no {STACK_FILE})")


def default_output_folder(concepts: Sequence[str], method: str) -> Path:
    """``erased/<concept>[+<concept>...]-<method>``, each concept by its folder name
    (``pipelines.tokenizer.concept_folder``: distinct readings, distinct names); a list past 80 characters is cut
    and marked ``__`` and a hash of all the readings, so two long lists still differ, and no list of concepts spells
    a cut name (a concept's folder name holds no ``__``)."""
    name = "+".join(concept_folder(c) for c in concepts)
    if len(name) > 80:
        digest = hashlib.sha256("\n".join(concept_text(c) for c in concepts).encode()).hexdigest()[:16]
        name = f"{name[:62]}__{digest}"
    return Path("erased") / f"{name}-{method}"
