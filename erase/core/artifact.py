"""The erasure artifact: a folder any diffusers app can load, plus the provenance that makes it auditable.

Layout::

    ARTIFACT/
      erasure.json       method, config, concepts, base model + fingerprint, timings, layers, the payloads (kind ->
                         what its files hold), the sha256 of every payload file, the weight norms before and after the
                         edit and the base fingerprint rounded to float16 and bfloat16
      <payload files>    each payload kind's own (``erase.core.payloads``): the weight change as a diffusers LoRA
                         or as full weight changes (``erase.core.weights``), an SAE intervention, a facilitated
                         transport, ...
      pipeline/          optional full ``save_pretrained`` export of the edited pipeline
      before_after.png   optional picture of the check ``scripts/erase.py`` runs

Only safetensors and JSON are ever read back: nothing is unpickled, and every payload file must match its sha256 in
``erasure.json``. Saving is atomic (a temporary sibling folder, swapped in whole), follows the user's umask, and
never deletes anything but an earlier artifact of ours.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from pipelines import PipelineWrapper
from pipelines.files import file_sha256, move_into_place, process_alive, sync_to_disk, write_error

from .discovery import discover_families, method_names
from .layout import (
    ARTIFACT_ENTRIES,
    LOW_PRECISION_NORM_RTOL,
    METADATA_FILE,
    PIPELINE_FOLDER,
    SCHEMA_VERSION,
    TEMPORARY_MARK,
    ArtifactError,
    ArtifactExistsError,
    ArtifactMismatchError,
    check_output_folder,
    current_umask,
    temporary_folder,
)
from .payloads import Installed, payload_kind
from .version import __version__

__all__ = [
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactMismatchError",
    "ArtifactHandle",
    "ErasureArtifact",
    "check_artifact_base",
    "check_output_folder",
    "folder_written_atomically",
    "install_artifact",
    "load_artifact",
    "save_artifact",
]

logger = logging.getLogger(__name__)


@dataclass
class ErasureArtifact:
    """An erasure's provenance and its payloads (kind name -> payload; ``erase.core.payloads``)."""

    method: str
    config: dict[str, Any]
    concepts: list[str]
    guides: list[str]
    preserve: list[str]
    base_model: str
    base_fingerprint: str
    payloads: dict[str, Any]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    #: {"base": {module: norm}, "edited": {module: norm}}: tells an edited pipeline, or a half-precision copy of the
    #: base, from another model ("edited" only where the payloads change weights)
    weight_norms: dict[str, dict[str, float]] | None = None
    #: {"float16" | "bfloat16": the base fingerprint of the same weights rounded to that dtype}: recognises a
    #: half-precision copy of the base exactly (artifacts made in float32)
    low_precision_fingerprints: dict[str, str] | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    version: str = __version__

    def payload(self, kind: str) -> Any:
        """The payload of kind ``kind``, or ``None`` when the artifact holds none."""
        return self.payloads.get(kind)

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        """The additive weight changes of the payloads, qualified Linear name -> dW (empty for a runtime edit)."""
        changes = [payload_kind(name).weight_changes(p) for name, p in self.payloads.items()]
        changes = [c for c in changes if c]
        if len(changes) == 1:
            return changes[0]
        merged: dict[str, torch.Tensor] = {}
        for change in changes:
            for name, delta in change.items():
                merged[name] = merged[name] + delta if name in merged else delta
        return merged

    @property
    def layers(self) -> list[str]:
        """The modules the payloads change or hook."""
        return sorted({m for name, p in self.payloads.items() for m in payload_kind(name).modules(p)})

    @property
    def fingerprint_modules(self) -> list[str]:
        """The modules whose base weights ``base_fingerprint`` covers."""
        return sorted({m for name, p in self.payloads.items() for m in payload_kind(name).fingerprinted(p)})

    def base_norms(self, wrapper: PipelineWrapper) -> dict[str, float]:
        """The norms of the fingerprinted modules in ``wrapper``, as each payload kind measures them."""
        return {k: v for name, p in self.payloads.items() for k, v in payload_kind(name).norms(p, wrapper).items()}

    @contextlib.contextmanager
    def applied(self, wrapper: PipelineWrapper) -> Iterator[None]:
        """The payloads in force for the ``with`` block, the pipeline restored exactly afterwards; the base is not
        checked (``install_artifact`` checks it)."""
        handle = _install(wrapper, self)
        try:
            yield
        finally:
            handle.remove()

    def metadata(self, records: dict[str, dict[str, Any]], checksums: dict[str, str]) -> dict[str, Any]:
        formats = [r["weight_format"] for r in records.values() if "weight_format" in r]
        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "config": self.config,
            "concepts": self.concepts,
            "guides": self.guides,
            "preserve": self.preserve,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "layers": self.layers,
            "weight_format": formats[0] if formats else None,
            "payloads": records,
            "checksums": checksums,
            "weight_norms": self.weight_norms,
            "low_precision_fingerprints": self.low_precision_fingerprints,
            "seconds": self.seconds,
            "created": self.created,
            "erase_version": self.version,
            "info": self.info,
        }


# ---------------------------------------------------------------------------------------------------- writing
def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary folders of earlier saves to ``folder`` whose process is gone (a killed save's litter)."""
    prefix = f".{folder.name}{TEMPORARY_MARK}"
    for path in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        logger.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def _finish_tree(root: Path) -> None:
    """Give every file and folder the user's umask permissions (safetensors writes 0600) and flush them to disk."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    sync_to_disk(root)


@contextlib.contextmanager
def folder_written_atomically(folder: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``folder`` for the ``with`` block to fill; afterwards its files get the user's umask
    permissions (safetensors writes 0600), are flushed to disk and swapped in at once. Without ``overwrite`` a folder
    another run put at ``folder`` meanwhile is refused, never replaced. On any error the temporary is removed; a full
    disk or a read-only folder is one line (``write_error``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(folder)
    try:
        tmp.mkdir()
        yield tmp
        _finish_tree(tmp)
        try:
            move_into_place(tmp, folder, replace=overwrite)
        except FileExistsError:
            raise ArtifactExistsError(
                f"{folder} was filled by another run while this one worked; choose another --out or pass --overwrite"
            ) from None
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(folder, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_artifact(
    artifact: ErasureArtifact,
    folder: str | Path,
    wrapper: PipelineWrapper,
    *,
    overwrite: bool = False,
    export_pipeline: bool | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the artifact atomically: everything goes to a temporary sibling folder that is swapped in at the end.

    Each payload writes its own files (a weight change as an exact LoRA when that is smaller than the changed
    weights, else as full weight changes). ``export_pipeline`` additionally writes a complete diffusers folder of the
    edited pipeline under ``pipeline/`` (``wrapper`` must be the *unedited* base; it is edited for the export and
    restored). ``None`` exports exactly when a weight change is stored as full weights, which ``load_lora_weights``
    cannot read. ``extra_files`` (name -> bytes, names from ``ARTIFACT_ENTRIES``) are written beside it, e.g. the
    check's picture.

    With ``overwrite`` an earlier artifact at ``folder`` is replaced in one atomic exchange; a folder holding anything
    else is refused. Returns the folder written (symbolic links resolved).
    """
    folder = check_output_folder(folder, overwrite)
    for name in extra_files or {}:
        if name not in ARTIFACT_ENTRIES:
            raise ValueError(f"{name!r} is not a file an artifact folder holds")
    if not artifact.payloads:
        raise ValueError("the artifact holds no payload: it changes nothing")
    _check_finite(artifact.deltas, "the weight change")
    deltas = artifact.deltas
    if export_pipeline and not deltas:
        raise ValueError("the artifact changes no weights: there is no edited pipeline to export")
    _remove_stale_temporaries(folder)
    with folder_written_atomically(folder, overwrite) as tmp:
        records, checksums = {}, {}
        for name, payload in artifact.payloads.items():
            kind = payload_kind(name)
            records[name] = kind.save(payload, tmp, wrapper)
            for file in kind.files:
                if (tmp / file).is_file():
                    checksums[file] = file_sha256(tmp / file)
        full = any(r.get("weight_format") == "full" for r in records.values())
        if export_pipeline or (export_pipeline is None and full):
            with wrapper.weight_deltas(deltas):
                wrapper.export_pipeline(tmp / PIPELINE_FOLDER)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / METADATA_FILE).write_text(json.dumps(artifact.metadata(records, checksums), indent=2))
    logger.info("saved %s artifact (%s, %d modules) to %s", artifact.method, ", ".join(records),
                len(artifact.layers), folder)  # fmt: skip
    return folder


# ---------------------------------------------------------------------------------------------------- reading
_REQUIRED = ("schema_version", "method", "config", "concepts", "base_model", "base_fingerprint", "layers",
             "payloads", "checksums")  # fmt: skip


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"{what} of {name} holds NaN or infinite values")


def _check_metadata(meta: Any, meta_path: Path) -> None:
    """One line naming the first field of erasure.json that is missing or of the wrong type."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} is not a JSON object")
    if "schema_version" not in meta:
        raise ArtifactError(f"{meta_path} lacks schema_version")
    version = meta["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{meta_path}: schema_version must be a positive integer, got {version!r}")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{meta_path} uses artifact schema {version}; this erase reads {SCHEMA_VERSION}"
                            + (": erase the concept again" if version < SCHEMA_VERSION else ""))  # fmt: skip
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ArtifactError(f"{meta_path} lacks {', '.join(missing)}")
    expected = {"method": str, "base_model": str, "base_fingerprint": str, "config": dict, "concepts": list,
                "layers": list, "payloads": dict, "checksums": dict}  # fmt: skip
    for key, kind in expected.items():
        if not isinstance(meta[key], kind):
            raise ArtifactError(f"{meta_path}: {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    for key in ("concepts", "layers", "guides", "preserve"):
        if not all(isinstance(v, str) for v in meta.get(key) or []):
            raise ArtifactError(f"{meta_path}: {key} must be a list of strings")
    if not meta["layers"]:
        raise ArtifactError(f"{meta_path} lists no layers: the artifact changes nothing")
    if not meta["concepts"]:
        raise ArtifactError(f"{meta_path} lists no concepts")
    if not meta["payloads"] or not all(isinstance(r, dict) for r in meta["payloads"].values()):
        raise ArtifactError(f"{meta_path}: payloads must map each payload kind to an object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["checksums"].items()):
        raise ArtifactError(f"{meta_path}: checksums must map file names to sha256 strings")
    _check_optional_metadata(meta, meta_path)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_optional_metadata(meta: dict[str, Any], meta_path: Path) -> None:
    """The fields erasure.json may hold are what they say, where present: a field read as another type, or a norm
    that is no number, would be a record of something that did not happen."""
    seconds = meta.get("seconds", 0.0)
    if not _finite_number(seconds) or seconds < 0:
        raise ArtifactError(f"{meta_path}: seconds must be a finite number >= 0, got {seconds!r}")
    for key, kind in (("created", str), ("erase_version", str), ("info", dict), ("weight_norms", dict),
                      ("low_precision_fingerprints", dict)):  # fmt: skip
        if key in meta and not isinstance(meta[key], kind):
            raise ArtifactError(f"{meta_path}: {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    for which, norms in meta.get("weight_norms", {}).items():
        if not isinstance(norms, dict) or not all(isinstance(k, str) and _finite_number(v) for k, v in norms.items()):
            raise ArtifactError(f"{meta_path}: weight_norms[{which!r}] must map module names to finite numbers")
    if _string_map(meta.get("low_precision_fingerprints", {})) is None:
        raise ArtifactError(f"{meta_path}: low_precision_fingerprints must map dtype names to sha256 strings")


def _check_files(folder: Path, meta: dict[str, Any]) -> None:
    """Every file of every payload kind in the folder is listed in ``checksums`` and matches it, and every file
    listed is there."""
    meta_path = folder / METADATA_FILE
    checksums = meta["checksums"]
    kinds = [payload_kind(name) for name in meta["payloads"]]
    known = {file for kind in kinds for file in kind.files}
    stray = sorted(set(checksums) - known)
    if stray:
        raise ArtifactError(f"{meta_path}: checksums lists {stray[0]!r}, which no payload of the artifact writes")
    for file in sorted(known):
        path = folder / file
        if file not in checksums:
            if path.exists():
                raise ArtifactError(f"{path} is not covered by the checksums in {METADATA_FILE}")
            continue
        if not path.is_file():  # also refuses a FIFO or device, which open() would block on
            raise ArtifactError(f"cannot read {path}: not a regular file")
        if file_sha256(path) != checksums[file]:
            raise ArtifactError(f"{path} does not match the sha256 in {METADATA_FILE}: the file was changed")


def load_artifact(folder: str | Path) -> ErasureArtifact:
    """Read an artifact folder; raises ``ArtifactError`` with one line saying what is wrong."""
    discover_families()
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{folder} is not an erasure artifact (no {METADATA_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ArtifactError(f"{meta_path} is corrupt: {err}") from err
    _check_metadata(meta, meta_path)
    if meta["method"] not in method_names():
        known = ", ".join(method_names())
        raise ArtifactError(
            f"{meta_path}: method {meta['method']!r} is no erasure method this erase knows ({known}): the file was "
            "changed, or made by another program"
        )
    try:
        for name in meta["payloads"]:
            payload_kind(name)
    except ValueError as err:
        raise ArtifactError(f"{meta_path}: {err}") from None
    _check_files(folder, meta)
    payloads = {}
    for name, record in meta["payloads"].items():
        try:
            payloads[name] = payload_kind(name).load(folder, record)
        except ValueError as err:
            raise ArtifactError(str(err)) from err
    artifact = ErasureArtifact(
        method=meta["method"],
        config=meta["config"],
        concepts=meta["concepts"],
        guides=meta.get("guides") or [],
        preserve=meta.get("preserve") or [],
        base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"],
        payloads=payloads,
        seconds=float(meta.get("seconds", 0.0)),
        info=meta.get("info", {}),
        weight_norms=meta.get("weight_norms"),
        low_precision_fingerprints=_string_map(meta.get("low_precision_fingerprints")),
        created=str(meta.get("created", "")),
        version=str(meta.get("erase_version", "unknown")),
    )
    if meta["layers"] != artifact.layers:
        raise ArtifactError(f"{meta_path}: layers must list the modules its payloads change")
    return artifact


# ---------------------------------------------------------------------------------------------------- applying
def _string_map(value: Any) -> dict[str, str] | None:
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    return None


def _low_precision_match(wrapper: PipelineWrapper, artifact: ErasureArtifact) -> bool | None:
    """Whether a float16/bfloat16 pipeline holds exactly the artifact's base rounded to its dtype; None when the
    artifact records no fingerprint for that dtype (made in low precision)."""
    stored = (artifact.low_precision_fingerprints or {}).get(str(wrapper.dtype).removeprefix("torch."))
    if wrapper.dtype == torch.float32 or stored is None:
        return None
    return wrapper.fingerprint(artifact.fingerprint_modules) == stored


def _norms_match(found: dict[str, float], expected: dict[str, float] | None, rtol: float) -> bool:
    if not expected or set(expected) != set(found):
        return False
    return all(
        isinstance(expected[k], int | float)
        and math.isclose(found[k], float(expected[k]), rel_tol=rtol, abs_tol=1e-12)
        for k in found
    )


def check_artifact_base(wrapper: PipelineWrapper, artifact: ErasureArtifact, where: str = "artifact") -> None:
    """Raise ``ArtifactMismatchError`` unless the artifact was made for the pipeline's current base weights.

    The float32 fingerprint decides. Where it differs, the norms recorded at save time tell two cases apart: a
    pipeline that already holds this edit (refused: applying twice doubles the edit), and a float16/bfloat16 copy of
    the same base (accepted: its rounded weights cannot match a float32 fingerprint).
    """
    modules = artifact.fingerprint_modules
    try:
        found = wrapper.fingerprint(modules)
    except KeyError as err:
        raise ArtifactMismatchError(
            f"{where} edits modules this pipeline lacks ({err}); it was made for {artifact.base_model!r}"
        ) from err
    if found == artifact.base_fingerprint:
        return
    norms = artifact.weight_norms or {}
    current = artifact.base_norms(wrapper)
    if _norms_match(current, norms.get("edited"), 1e-6) or (
        wrapper.dtype != torch.float32 and _norms_match(current, norms.get("edited"), LOW_PRECISION_NORM_RTOL)
    ):
        raise ArtifactMismatchError(f"{where} is already applied to this pipeline; applying it twice doubles the edit")
    exact = _low_precision_match(wrapper, artifact)
    if exact:
        return
    if (
        exact is None
        and wrapper.dtype != torch.float32
        and _norms_match(current, norms.get("base"), LOW_PRECISION_NORM_RTOL)
    ):
        logger.info("%s: %s weights match the base's norms within %g", where, wrapper.dtype, LOW_PRECISION_NORM_RTOL)
        return
    raise ArtifactMismatchError(
        f"{where} was made for base model {artifact.base_model!r} (weights {artifact.base_fingerprint[:12]} of "
        f"{', '.join(modules[:2])}{', ...' if len(modules) > 2 else ''}), but {wrapper.model_id!r} has different "
        f"weights ({found[:12]})"
    )


class ArtifactHandle:
    """An artifact installed on a pipeline: ``remove()`` (or leaving a ``with`` block) takes every payload off again
    and restores the pipeline bit for bit (weights copied back from their saved originals, hooks removed)."""

    def __init__(self, artifact: ErasureArtifact, installed: list[Installed]) -> None:
        self.artifact = artifact
        self._installed = installed

    @property
    def active(self) -> bool:
        return bool(self._installed)

    def remove(self) -> None:
        while self._installed:
            self._installed.pop().remove()

    def __enter__(self) -> ArtifactHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def _install(wrapper: PipelineWrapper, artifact: ErasureArtifact) -> ArtifactHandle:
    """Check every payload against the live pipeline, then install them all (or, on an error, none)."""
    kinds = {name: payload_kind(name) for name in artifact.payloads}
    for name, payload in artifact.payloads.items():
        kinds[name].check(payload, wrapper)
    replaced = {r for kind in kinds.values() for r in kind.replaces}
    handle = ArtifactHandle(artifact, [])
    try:
        for name, payload in artifact.payloads.items():
            if name not in replaced:
                handle._installed.append(kinds[name].install(payload, wrapper, artifact.payloads))
    except BaseException:
        handle.remove()
        raise
    return handle


def install_artifact(wrapper: PipelineWrapper, artifact: ErasureArtifact, where: str = "artifact") -> ArtifactHandle:
    """Install the artifact on ``wrapper`` after checking it was made for these base weights and fits the live
    pipeline (``ArtifactMismatchError`` otherwise, before anything changes); a second installation is refused."""
    check_artifact_base(wrapper, artifact, where)
    try:
        return _install(wrapper, artifact)
    except ValueError as err:
        raise ArtifactMismatchError(f"{where}: {err}") from err
