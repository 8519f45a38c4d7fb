"""Batch generation audits: the original model and each erased artifact on one prompt suite, under identical seeds.

:func:`run_audit` generates every (prompt, seed) image of the suite with the base model and with each erasure
artifact applied temporarily (``wrapper.weight_deltas``), scores them with CLIP (and the micro world's judge when
given one), and writes::

    OUT/
      audit.json                   what the folder holds: the settings that fix the pixels (model, fingerprint,
                                   steps, guidance, size, scheduler, batch size, processes), the suite, the erasures
      suite.csv                    the expanded suite: one row per image
      generation-<p>.json          process p's last run: images it generated, seconds, images per second
      images/<model-key>/<sha1(prompt)[:10]>-<seed>.png
      grids/<category>.png         a labelled grid per category: rows concept x model, columns seeds
      metrics.json                 everything below
      report.html                  self-contained report (images embedded, bar charts as inline SVG, protocol)

``<model-key>`` is ``original`` or ``<artifact folder name>-<sha1(erasure.json)[:8]>``.

**Resumable.** Every image is written atomically (temporary file + ``os.replace``) and an image already on disk is
never generated or written again (one that no longer decodes whole, e.g. truncated by a copy, counts as missing).
Images are generated in fixed batches (the process's images in suite order, cut every ``batch_size``); a batch is
generated only if one of its images is missing, and a batch that was interrupted half-written is generated again whole
(only its missing images are written), so an image's pixels never depend on where a run was stopped. Metrics are
computed from the PNGs on disk, hence a killed and rerun audit ends with exactly the metrics of an uninterrupted one.
``audit.json`` guards the folder: rerunning into it with settings that change pixels (another model, steps, guidance,
batch size or number of processes, which decide how images are batched) or that would replace its report (another suite
or set of erasures) is refused instead of mixing images. Temporary files left by a killed run are removed when the
audit is resumed. A write that fails (disk full, read-only folder) raises :class:`AuditError` naming the file; what is
on disk stays valid, so the same command resumes once it can write.

**Multi-process.** Unique images are dealt round-robin: process ``p`` of ``P`` makes images ``p, p + P, ...`` of the
suite order. After its share each process calls ``barrier`` (e.g. ``accelerate.PartialState().wait_for_everyone``);
then process 0 alone checks that every image exists and computes the metrics.

**metrics.json** (``"schema_version": 1``; :data:`METRICS_SCHEMA` is its JSON Schema)::

    {
      "schema_version": 1,
      "protocol": {model, model_fingerprint, scheduler, steps, guidance, height, width, negative_prompt,
                   batch_size, images_per_prompt, num_processes, scorer, judge (bool), erase_version,
                   suite: {name, source, file, rows, prompts, roles, labels: {category: [concept, ...]}},
                   seeds: {count, min, max}},
      "models": [                                  # "original" first, then one entry per artifact
        {key, label, images,
         artifact: null | {folder, method, concepts, guides, preserve, base_model, base_fingerprint,
                           weight_format, config, created, erase_version},
         clip:  {efficacy, generality, specificity, preservation: ACC, harmonic_mean: float | null},
         judge: null | the same, with the judge's verdicts instead of CLIP's,
         clip_score: {all, target, synonym, neighbour, unrelated: STAT},
         vs_original: null (for "original") | {image_similarity: {all, <role>...: STAT},
                                                cmmd: {all, <role>...: float | null}},
         per_concept: [{concept, category, role, clip: ACC, judge: ACC | null, clip_score: STAT,
                        clip_reads_as: {label: images}}],
         per_category: {category: {clip: float | null, judge: float | null, concepts: int}}}
      ]
    }

    ACC  = {value: k/n | null, low, high: Wilson 95% bounds | null, n, k}
    STAT = {mean | null, std | null, n}

Accuracy is the fraction of images whose zero-shot verdict among the category's labels is the row's concept; the
role metrics (efficacy = target rows, generality = synonym, specificity = neighbour, preservation = unrelated) and
CLIP score, image similarity and CMMD are defined in :mod:`evals.metrics`. ``per_category`` is the unweighted mean
of that category's ``per_concept`` accuracies (all roles). ``clip_reads_as`` counts the zero-shot verdicts of a
(concept, role)'s images, most common first: what an erased concept's prompts turn into.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import html
import importlib.metadata
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, PipelineWrapper
from pipelines.files import atomic_write_bytes, png_bytes, temporary_sibling

from .. import metrics as M
from ..grids import labelled_grid
from ..probes import GENERIC_TEMPLATES
from ..scorer import TEMPLATES, ClipScorer
from ..suites import ROLES, Suite, SuiteRow

__all__ = [
    "METRICS_SCHEMA",
    "ORIGINAL",
    "SCHEMA_VERSION",
    "AuditError",
    "AuditModel",
    "check_output_folder",
    "generate_audit_images",
    "generation_summary",
    "image_name",
    "per_concept_table",
    "run_audit",
    "summary_table",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ORIGINAL = "original"
SETTINGS_FILE = "audit.json"
GRID_SEEDS = 4  # images per (concept, model) row in the category grids
REPORT_IMAGES = 6  # images per model in each prompt group of the report
REPORT_THUMB = 128  # largest side of an image embedded in the report (px)
# A temporary file of pipelines.files.temporary_sibling: ".<name>.<pid>.<12 hex>.tmp".
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")
_STALE_SECONDS = 10.0  # a dead writer's temporary file is removed once this old (another machine may share the folder)
_ABANDONED_SECONDS = 86400.0  # ... and anyone's once this old (its pid may have been reused)


class AuditError(ValueError):
    """The audit cannot run as asked (an output folder made with other settings, images missing, bad arguments)."""


@dataclass(frozen=True)
class AuditModel:
    """One column of the audit: the original model (``deltas is None``) or the base with one erasure applied.

    Erased models are built by the caller, which reads and checks the artifact (``erase.workflow.audit_models``):
    evals sits below erase and never imports it.
    """

    key: str
    label: str
    folder: str | None = None
    deltas: dict[str, torch.Tensor] | None = None  # the weight changes the erasure applies
    metadata: dict[str, Any] | None = None  # erasure.json as saved

    @classmethod
    def erased(cls, folder: str | Path, metadata_json: bytes, deltas: dict[str, torch.Tensor]) -> AuditModel:
        """The column of one artifact folder; its key is fixed by the folder's name and its erasure.json bytes."""
        folder = Path(folder)
        key = f"{_slug(folder.resolve().name)}-{hashlib.sha1(metadata_json).hexdigest()[:8]}"
        return cls(key, folder.resolve().name, str(folder), deltas, json.loads(metadata_json))


# ----------------------------------------------------------------------------------------------------------------
# Files


def image_name(prompt: str, seed: int) -> str:
    """``<sha1(prompt)[:10]>-<seed>.png``: a file name fixed by the image's prompt and seed alone."""
    return f"{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}-{int(seed)}.png"


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "artifact"


def _reason(err: OSError) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space and rerun the same command to resume"
    return reason


def _write(path: Path, data: bytes) -> None:
    """Atomic write; a failure (disk full, read-only folder) is an :class:`AuditError` naming the file."""
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise AuditError(f"cannot write {path}: {_reason(err)}") from err


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise AuditError(f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AuditError(f"cannot create the folder {path}: {_reason(err)}") from err


def check_output_folder(out_dir: str | Path) -> None:
    """Raise :class:`AuditError` when ``out_dir`` cannot hold an audit, before any model loads; writes nothing.

    Refused: a file (or a dangling link) where the folder or one of its parents should be, and a folder that this
    process cannot write to (read-only file system, permissions), or whose nearest existing parent it cannot write to.
    A disk that fills up later is still only found when a write fails (:class:`AuditError` naming the file).
    """
    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists():
        if existing.is_symlink():
            raise AuditError(f"cannot create the folder {out_dir}: {existing} is a link to nothing")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out_dir else f"cannot create the folder {out_dir}: "
        raise AuditError(f"{where}{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        where = "" if existing == out_dir else f"cannot create the folder {out_dir}: "
        reason = "read-only file system" if read_only else "permission denied"
        raise AuditError(f"{where}{existing} is not writable ({reason})")


# ----------------------------------------------------------------------------------------------------------------
# Models and settings


def _settings(wrapper: PipelineWrapper, steps: int, guidance: float) -> dict[str, Any]:
    # Everything that changes pixels. The fingerprint covers the cross-attention projections only: cheap even for
    # SDXL, and it is what erasure methods edit, so an edited base saved as a new model is told apart.
    layers = [f"unet.{layer.name}" for layer in wrapper.cross_attention_layers()]
    return {
        "schema_version": SCHEMA_VERSION,
        "model": wrapper.model_id,
        "model_fingerprint": wrapper.fingerprint(layers),
        "scheduler": type(wrapper.pipe.scheduler).__name__,
        "steps": int(steps),
        "guidance": float(guidance),
        "height": wrapper.image_size,
        "width": wrapper.image_size,
        "negative_prompt": "",
        "dtype": str(wrapper.dtype).removeprefix("torch."),
    }


def _folder_settings(
    pixels: dict[str, Any], suite: Suite, models: Sequence[AuditModel], batch_size: int, num_processes: int
) -> dict[str, Any]:
    """What ``audit.json`` pins: the pixel settings, the batching (images of one batch are generated together, which
    moves pixels by a least significant bit), the expanded suite and the erasures (which decide the report)."""
    suite_text = json.dumps({"rows": suite.to_csv(), "labels": suite.labels}, sort_keys=True)
    return {
        **pixels,
        "batch_size": int(batch_size),
        "num_processes": int(num_processes),
        "suite": {
            "name": suite.name,
            "images": len(suite.rows),
            "sha256": hashlib.sha256(suite_text.encode("utf-8")).hexdigest(),
        },
        "erasures": [m.key for m in models if m.deltas is not None],
    }


def _describe(value: Any) -> str:
    if isinstance(value, dict) and {"name", "images", "sha256"} <= set(value):
        return f"{value['name']!r} ({value['images']} images, sha256 {str(value['sha256'])[:12]})"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``path`` whole unless it exists; False when another process made it first (then it is left alone)."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: last writer wins, as before
            os.replace(tmp, path)
        return True
    except OSError as err:
        raise AuditError(f"cannot write {path}: {_reason(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Pin ``settings`` to ``out_dir`` (``audit.json``), or refuse a folder whose audit was made with others."""
    path = out_dir / SETTINGS_FILE
    if path.exists() and not path.is_file():
        raise AuditError(f"{path} is not a file; use another output folder")
    # Concurrent audits into one folder: the first to link its audit.json wins, the others compare against it.
    if not path.exists() and _create_exclusive(path, _json_text(settings).encode("utf-8")):
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, not UTF-8
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise AuditError(f"{path} is corrupt ({reason}); use another output folder") from None
    except OSError as err:
        raise AuditError(f"cannot read {path}: {_reason(err)}") from err
    if not isinstance(saved, dict):
        raise AuditError(
            f"{path} is not an audit's settings (a JSON {type(saved).__name__}, not an object); "
            "use another output folder"
        )
    unrecorded = [k for k in settings if k not in saved]
    if unrecorded:
        raise AuditError(
            f"{out_dir} holds an audit made by an older version (its {SETTINGS_FILE} does not record "
            f"{', '.join(unrecorded)}); use another output folder"
        )
    diffs = [f"{k} {_describe(saved[k])} -> {_describe(v)}" for k, v in settings.items() if saved[k] != v]
    if diffs:
        raise AuditError(
            f"{out_dir} holds an audit made with other settings ({'; '.join(diffs)}); use another output folder"
        )


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary files a killed run left (``.<name>.<pid>.<hex>.tmp``), never a live writer's."""
    folders = [out_dir, out_dir / "grids"]
    if (out_dir / "images").is_dir():
        folders += [f for f in (out_dir / "images").iterdir() if f.is_dir()]
    now = time.time()
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _TEMPORARY.match(path.name)
            if not match:
                continue
            try:
                age = now - path.lstat().st_mtime
            except FileNotFoundError:
                continue  # its writer just renamed it
            if age > _ABANDONED_SECONDS or (age > _STALE_SECONDS and not _process_alive(int(match.group(1)))):
                logger.info("removing %s, left by a run that was stopped", path)
                with contextlib.suppress(OSError):
                    path.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not a pid this system can tell about: leave its file alone
    return True


def _image_ok(path: Path, size: int) -> bool:
    """Whether ``path`` holds a whole image of ``size`` x ``size``; a damaged one is logged (and then regenerated)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.load()
            found = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        logger.warning("%s is damaged (%s): generating it again", path, str(err).strip() or type(err).__name__)
        return False
    if found != (size, size):
        logger.warning("%s is %dx%d, not %dx%d: generating it again", path, *found, size, size)
        return False
    return True


def _unique_images(rows: Sequence[SuiteRow]) -> list[tuple[str, int]]:
    seen: dict[tuple[str, int], None] = {}
    for row in rows:
        seen.setdefault((row.prompt, row.seed), None)
    return list(seen)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def generate_audit_images(
    wrapper: PipelineWrapper,
    rows: Sequence[SuiteRow],
    models: Sequence[AuditModel],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    on_image: Callable[[Path], None] | None = None,
) -> int:
    """Generate this process's share of every model's images that are not on disk yet; returns how many it wrote.

    See the module docstring for the fixed batches and the round-robin split. An image on disk that does not decode
    whole (or has another size) is logged and generated again with its batch. ``on_image(path)`` is called after
    each image is written (progress reporting, tests that interrupt a run). A failed write raises
    :class:`AuditError` naming the file.
    """
    out_dir = Path(out_dir)
    share = _unique_images(rows)[process_index::num_processes]
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    written = 0
    for model in models:
        folder = out_dir / "images" / model.key
        todo = []
        for batch in batches:
            needed = {(p, s) for p, s in batch if not _image_ok(folder / image_name(p, s), wrapper.image_size)}
            if needed:
                todo.append((batch, needed))
        if not todo:
            continue
        logger.info("%s: %d of %d batches to generate", model.key, len(todo), len(batches))
        _make_folder(folder)
        edit = wrapper.weight_deltas(model.deltas) if model.deltas is not None else contextlib.nullcontext()
        with edit:
            for batch, needed in tqdm(todo, desc=f"audit {model.key}", unit="batch", disable=not progress):
                prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
                images = wrapper.generate(
                    prompts, seeds, steps=steps, guidance=guidance, batch_size=len(batch), progress=False
                )
                for (prompt, seed), image in zip(batch, images, strict=True):
                    if (prompt, seed) not in needed:
                        continue  # written before an interruption: keep the file as it is
                    path = folder / image_name(prompt, seed)
                    _write(path, png_bytes(image))
                    written += 1
                    if on_image is not None:
                        on_image(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# The audit


def run_audit(
    wrapper: PipelineWrapper,
    suite: Suite,
    erasures: Sequence[AuditModel],
    out_dir: str | Path,
    scorer: ClipScorer | None,
    judge: torch.nn.Module | None = None,
    *,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    barrier: Callable[[], None] | None = None,
    scorer_name: str = "",
    on_image: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Audit ``erasures`` against ``wrapper``'s base model on ``suite``.

    Args:
        wrapper: the base model; artifacts are applied to it temporarily and it is left as it was.
        suite: the prompt suite; every row becomes ``images_per_prompt`` images (:meth:`Suite.expand`).
        erasures: the erased models (:meth:`AuditModel.erased`), already checked against the base: what
            ``erase.workflow.audit_models`` returns for artifact folders.
        out_dir: output folder (layout in the module docstring); an existing audit in it is resumed.
        scorer: CLIP scorer for the metrics; only process 0 needs one (others may pass None).
        judge: the micro world's :class:`evals.microworld.judge.Judge`; its accuracies are reported beside CLIP's
            when every suite category and label is one of its classes.
        images_per_prompt, batch_size, steps, guidance: generation settings.
        process_index, num_processes: this process's place in a multi-process run (see module docstring).
        barrier: called once every process's images are written; must block until all processes reach it.
        scorer_name: how the scorer was specified, for the protocol.
        on_image: called with each image path as it is written.

    Returns the metrics (as written to ``metrics.json``) on process 0, and
    ``{"process_index": p, "images_generated": n}`` on the others.
    """
    if not 0 <= process_index < num_processes:
        raise AuditError(f"process_index {process_index} is not in 0 .. {num_processes - 1}")
    for name, value in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size), ("steps", steps)):
        if value < 1:
            raise AuditError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    expanded = suite.expand(images_per_prompt)
    for prompt in dict.fromkeys(r.prompt for r in expanded.rows):
        wrapper.check_prompt(prompt, "suite prompt")
    models = [AuditModel(ORIGINAL, ORIGINAL), *erasures]
    keys = [m.key for m in models]
    if len(set(keys)) != len(keys):
        raise AuditError(f"an erasure is given twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    settings = _settings(wrapper, steps, guidance)
    _make_folder(out_dir)
    _check_settings(out_dir, _folder_settings(settings, expanded, models, batch_size, num_processes))
    if process_index == 0:
        _remove_stale_temporaries(out_dir)
        _write(out_dir / "suite.csv", expanded.to_csv().encode("utf-8"))

    start = time.perf_counter()
    generated = generate_audit_images(
        wrapper,
        expanded.rows,
        models,
        out_dir,
        batch_size=batch_size,
        steps=steps,
        guidance=guidance,
        process_index=process_index,
        num_processes=num_processes,
        progress=progress,
        on_image=on_image,
    )
    seconds = time.perf_counter() - start
    throughput = {
        "process_index": process_index,
        "images_generated": generated,
        "seconds": round(seconds, 3),
        "images_per_second": round(generated / seconds, 3) if generated else None,
        "batch_size": batch_size,
    }
    # Kept out of metrics.json, which must not depend on how a run was split or interrupted.
    _write(out_dir / f"generation-{process_index}.json", _json_text(throughput).encode("utf-8"))
    logger.info("process %d of %d generated %d images in %.1f s", process_index, num_processes, generated, seconds)
    if barrier is not None:
        barrier()
    if process_index != 0:
        return {"process_index": process_index, "images_generated": generated}

    if scorer is None:
        raise AuditError("the main process needs a CLIP scorer to compute the metrics")
    unique = _unique_images(expanded.rows)
    missing = [
        (m.key, p, s)
        for m in models
        for p, s in unique
        if not (out_dir / "images" / m.key / image_name(p, s)).is_file()
    ]
    if missing:
        key, prompt, seed = missing[0]
        raise AuditError(
            f"{len(missing)} images are missing (first: {key} {prompt!r} seed {seed}); run every process of the "
            "audit before the metrics"
        )
    protocol = {
        **{k: v for k, v in settings.items() if k != "schema_version"},
        "batch_size": batch_size,
        "images_per_prompt": images_per_prompt,
        "num_processes": num_processes,
        "scorer": scorer_name or "unspecified",
        "judge": judge is not None,
        "erase_version": _erase_version(),
        "suite": {
            "name": suite.name,
            "source": suite.source,
            "file": "suite.csv",
            "rows": len(expanded.rows),
            "prompts": len({r.prompt for r in expanded.rows}),
            "roles": expanded.roles(),
            "labels": {k: list(v) for k, v in expanded.labels.items()},
        },
        "seeds": {
            "count": len({s for _, s in unique}),
            "min": min(s for _, s in unique),
            "max": max(s for _, s in unique),
        },
    }
    images = {m.key: _load_images(out_dir / "images" / m.key, unique) for m in models}
    result = _compute_metrics(expanded, models, unique, images, scorer, judge, protocol)
    _write(out_dir / "metrics.json", _json_text(result).encode("utf-8"))
    _write_category_grids(out_dir, expanded, models, unique, images)
    _write(out_dir / "report.html", _report_html(result, expanded, models, unique, images).encode("utf-8"))
    logger.info("audit written to %s", out_dir)
    return result


def _erase_version() -> str:
    """The installed erase distribution's version, read from its metadata (evals does not import erase)."""
    try:
        return importlib.metadata.version("erase")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_images(folder: Path, unique: Sequence[tuple[str, int]]) -> list[np.ndarray]:
    arrays = []
    for prompt, seed in unique:
        path = folder / image_name(prompt, seed)
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            reason = str(err).strip() or type(err).__name__
            raise AuditError(
                f"cannot read the image {path} ({reason}); delete it and rerun to generate it again"
            ) from err
    return arrays


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _judge_usable(judge: torch.nn.Module | None, suite: Suite) -> bool:
    if judge is None:
        return False
    classes = getattr(getattr(judge, "config", None), "classes", None) or {}
    usable = all(cat in classes and set(labels) <= set(classes[cat]) for cat, labels in suite.labels.items())
    if not usable:
        logger.info("the judge's classes do not cover this suite's labels: judge accuracies are left out")
    return usable


def _role_block(correct: Sequence[bool], rows: Sequence[SuiteRow]) -> dict[str, Any]:
    block = {
        name: M.accuracy([c for c, r in zip(correct, rows, strict=True) if r.role == role])
        for role, name in M.ROLE_METRICS.items()
    }
    block["harmonic_mean"] = M.harmonic_mean(block["efficacy"]["value"], block["preservation"]["value"])
    return block


def _by_role(values: Sequence[float], rows: Sequence[SuiteRow]) -> dict[str, dict]:
    out = {"all": M.mean_std(values)}
    for role in ROLES:
        out[role] = M.mean_std([v for v, r in zip(values, rows, strict=True) if r.role == role])
    return out


def _compute_metrics(
    suite: Suite,
    models: Sequence[AuditModel],
    unique: Sequence[tuple[str, int]],
    images: dict[str, list[np.ndarray]],
    scorer: ClipScorer,
    judge: torch.nn.Module | None,
    protocol: dict[str, Any],
) -> dict[str, Any]:
    rows = suite.rows
    index = {key: i for i, key in enumerate(unique)}
    row_image = [index[(r.prompt, r.seed)] for r in rows]
    class_embeddings = {
        cat: scorer.class_embeddings(list(labels), TEMPLATES.get(cat, GENERIC_TEMPLATES))
        for cat, labels in suite.labels.items()
    }
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    prompt_embeddings = dict(zip(prompts, scorer.text_embeddings(prompts), strict=True))
    text = torch.stack([prompt_embeddings[r.prompt] for r in rows])
    use_judge = _judge_usable(judge, suite)
    embeddings: dict[str, torch.Tensor] = {}
    entries = []
    for model in models:
        emb = scorer.image_embeddings(images[model.key])[row_image]
        embeddings[model.key] = emb
        clip_ok, clip_verdicts = [False] * len(rows), [""] * len(rows)
        for cat, labels in suite.labels.items():
            idx = [i for i, r in enumerate(rows) if r.category == cat]
            ok, verdicts = M.zero_shot_correct(emb[idx], class_embeddings[cat], labels, [rows[i].concept for i in idx])
            for i, flag, verdict in zip(idx, ok, verdicts, strict=True):
                clip_ok[i], clip_verdicts[i] = flag, verdict
        judge_ok: list[bool] | None = None
        if use_judge:
            predictions = judge.predict(np.stack(images[model.key]))
            judge_ok = [predictions[r.category][row_image[i]] == r.concept for i, r in enumerate(rows)]
        scores = M.clip_scores(emb, text).tolist()
        vs_original = None
        if model.key != ORIGINAL:
            base = embeddings[ORIGINAL]
            similarity = M.paired_similarity(base, emb).tolist()
            cmmd = {"all": M.cmmd(base, emb)}
            for role in ROLES:
                idx = [i for i, r in enumerate(rows) if r.role == role]
                cmmd[role] = M.cmmd(base[idx], emb[idx])
            vs_original = {"image_similarity": _by_role(similarity, rows), "cmmd": cmmd}
        per_concept = []
        groups = dict.fromkeys((r.concept, r.category, r.role) for r in rows)
        for concept, category, role in groups:
            idx = [i for i, r in enumerate(rows) if (r.concept, r.category, r.role) == (concept, category, role)]
            per_concept.append(
                {
                    "concept": concept,
                    "category": category,
                    "role": role,
                    "clip": M.accuracy([clip_ok[i] for i in idx]),
                    "judge": M.accuracy([judge_ok[i] for i in idx]) if judge_ok is not None else None,
                    "clip_score": M.mean_std([scores[i] for i in idx]),
                    "clip_reads_as": dict(Counter(clip_verdicts[i] for i in idx).most_common()),
                }
            )
        per_category = {}
        for cat in suite.labels:
            mine = [c for c in per_concept if c["category"] == cat]
            clip_values = [c["clip"]["value"] for c in mine]
            judge_values = [c["judge"]["value"] for c in mine if c["judge"] is not None]
            per_category[cat] = {
                "clip": float(np.mean(clip_values)) if clip_values else None,
                "judge": float(np.mean(judge_values)) if judge_values else None,
                "concepts": len({c["concept"] for c in mine}),
            }
        entries.append(
            {
                "key": model.key,
                "label": model.label,
                "images": len(unique),
                "artifact": _provenance(model),
                "clip": _role_block(clip_ok, rows),
                "judge": _role_block(judge_ok, rows) if judge_ok is not None else None,
                "clip_score": _by_role(scores, rows),
                "vs_original": vs_original,
                "per_concept": per_concept,
                "per_category": per_category,
            }
        )
    return {"schema_version": SCHEMA_VERSION, "protocol": protocol, "models": entries}


def _provenance(model: AuditModel) -> dict[str, Any] | None:
    if model.deltas is None:
        return None
    meta = model.metadata or {}
    return {
        "folder": model.folder,
        "method": meta.get("method"),
        "concepts": meta.get("concepts", []),
        "guides": meta.get("guides", []),
        "preserve": meta.get("preserve", []),
        "base_model": meta.get("base_model"),
        "base_fingerprint": meta.get("base_fingerprint"),
        "weight_format": meta.get("weight_format"),
        "config": meta.get("config", {}),
        "created": meta.get("created"),
        "erase_version": meta.get("erase_version"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Schema

_NUM = {"type": ["number", "null"]}
_ACC = {
    "type": "object",
    "required": ["value", "low", "high", "n", "k"],
    "properties": {
        "value": _NUM,
        "low": _NUM,
        "high": _NUM,
        "n": {"type": "integer", "minimum": 0},
        "k": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}
_STAT = {
    "type": "object",
    "required": ["mean", "std", "n"],
    "properties": {"mean": _NUM, "std": _NUM, "n": {"type": "integer", "minimum": 0}},
    "additionalProperties": False,
}
_ROLE_KEYS = ["all", *ROLES]
_BY_ROLE_STAT = {
    "type": "object",
    "required": _ROLE_KEYS,
    "properties": {k: _STAT for k in _ROLE_KEYS},
    "additionalProperties": False,
}
_ROLE_BLOCK = {
    "type": "object",
    "required": [*M.ROLE_METRICS.values(), "harmonic_mean"],
    "properties": {**{name: _ACC for name in M.ROLE_METRICS.values()}, "harmonic_mean": _NUM},
    "additionalProperties": False,
}
#: JSON Schema (draft 2020-12) of ``metrics.json``.
METRICS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "erase audit metrics",
    "type": "object",
    "required": ["schema_version", "protocol", "models"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "protocol": {
            "type": "object",
            "required": [
                "model",
                "model_fingerprint",
                "scheduler",
                "steps",
                "guidance",
                "height",
                "width",
                "batch_size",
                "images_per_prompt",
                "num_processes",
                "scorer",
                "judge",
                "suite",
                "seeds",
            ],
            "properties": {
                "model": {"type": "string"},
                "model_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "steps": {"type": "integer", "minimum": 1},
                "guidance": {"type": "number"},
                "images_per_prompt": {"type": "integer", "minimum": 1},
                "judge": {"type": "boolean"},
                "suite": {
                    "type": "object",
                    "required": ["name", "source", "file", "rows", "prompts", "roles", "labels"],
                    "properties": {
                        "roles": {"type": "array", "items": {"enum": list(ROLES)}},
                        "labels": {
                            "type": "object",
                            "additionalProperties": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
                "seeds": {
                    "type": "object",
                    "required": ["count", "min", "max"],
                    "properties": {k: {"type": "integer"} for k in ("count", "min", "max")},
                },
            },
        },
        "models": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "key",
                    "label",
                    "images",
                    "artifact",
                    "clip",
                    "judge",
                    "clip_score",
                    "vs_original",
                    "per_concept",
                    "per_category",
                ],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "label": {"type": "string"},
                    "images": {"type": "integer", "minimum": 0},
                    "artifact": {
                        "type": ["object", "null"],
                        "required": ["folder", "method", "concepts", "base_model", "base_fingerprint"],
                    },
                    "clip": _ROLE_BLOCK,
                    "judge": {"anyOf": [_ROLE_BLOCK, {"type": "null"}]},
                    "clip_score": _BY_ROLE_STAT,
                    "vs_original": {
                        "anyOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "required": ["image_similarity", "cmmd"],
                                "additionalProperties": False,
                                "properties": {
                                    "image_similarity": _BY_ROLE_STAT,
                                    "cmmd": {
                                        "type": "object",
                                        "required": _ROLE_KEYS,
                                        "properties": {k: _NUM for k in _ROLE_KEYS},
                                        "additionalProperties": False,
                                    },
                                },
                            },
                        ]
                    },
                    "per_concept": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "concept",
                                "category",
                                "role",
                                "clip",
                                "judge",
                                "clip_score",
                                "clip_reads_as",
                            ],
                            "additionalProperties": False,
                            "properties": {
                                "concept": {"type": "string"},
                                "category": {"type": "string"},
                                "role": {"enum": list(ROLES)},
                                "clip": _ACC,
                                "judge": {"anyOf": [_ACC, {"type": "null"}]},
                                "clip_score": _STAT,
                                "clip_reads_as": {
                                    "type": "object",
                                    "additionalProperties": {"type": "integer", "minimum": 1},
                                },
                            },
                        },
                    },
                    "per_category": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["clip", "judge", "concepts"],
                            "additionalProperties": False,
                            "properties": {"clip": _NUM, "judge": _NUM, "concepts": {"type": "integer"}},
                        },
                    },
                },
            },
        },
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Summary table


def _pct(acc: dict | None) -> str:
    if not acc or acc.get("value") is None:
        return "-"
    return f"{acc['value']:.0%} [{acc['low']:.0%},{acc['high']:.0%}] n={acc['n']}"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(result: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics, one column per model (what ``scripts/audit.py`` prints)."""
    models = result["models"]
    lines: list[tuple[str, list[str]]] = []
    for name in M.ROLE_METRICS.values():
        lines.append((f"{name} (clip)", [_pct(m["clip"][name]) for m in models]))
    if any(m["judge"] for m in models):
        for name in M.ROLE_METRICS.values():
            lines.append((f"{name} (judge)", [_pct(m["judge"][name]) if m["judge"] else "-" for m in models]))
    lines.append(("harmonic mean (clip)", [_num(m["clip"]["harmonic_mean"]) for m in models]))
    lines.append(("clip score", [_num(m["clip_score"]["all"]["mean"], ".2f") for m in models]))
    lines.append(
        (
            "image similarity",
            [_num(m["vs_original"]["image_similarity"]["all"]["mean"]) if m["vs_original"] else "-" for m in models],
        )
    )
    lines.append(("cmmd", [_num(m["vs_original"]["cmmd"]["all"]) if m["vs_original"] else "-" for m in models]))
    for cat in models[0]["per_category"]:
        lines.append((f"mean accuracy: {cat}", [_num(m["per_category"][cat]["clip"], ".0%") for m in models]))
    headers = ["metric", *[m["label"] for m in models]]
    table = [headers, *[[name, *cells] for name, cells in lines]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def generation_summary(out_dir: str | Path, num_processes: int = 1) -> str:
    """One line on the last run's generation throughput, over its processes' ``generation-<p>.json``."""
    files = [Path(out_dir) / f"generation-{p}.json" for p in range(num_processes)]
    runs = [json.loads(f.read_text(encoding="utf-8")) for f in files if f.is_file()]
    generated = sum(r["images_generated"] for r in runs)
    if not generated:
        return "generation: nothing to generate (every image was already on disk)"
    seconds = max(r["seconds"] for r in runs)  # processes run side by side
    return (
        f"generation: {generated} images in {seconds:.1f} s, {generated / seconds:.2f} images/s "
        f"({num_processes} process(es), batch size {runs[0]['batch_size']})"
    )


def _clip_cell(entry: dict[str, Any]) -> str:
    """CLIP accuracy, and what the images mostly read as when that is another concept (an erased style's new one)."""
    counts = entry["clip_reads_as"]
    top = next(iter(counts), entry["concept"])
    other = top != entry["concept"] and counts[top] > counts.get(entry["concept"], 0)  # ties are no verdict
    return _pct(entry["clip"]) + (f" -> {top}" if other else "")


def per_concept_table(result: dict[str, Any]) -> str:
    """A plain-text table of CLIP (and judge) accuracy per (concept, role), one column per model; ``-> x`` marks a
    cell whose images read as ``x`` more often than as their own concept."""
    models = result["models"]
    judged = any(m["judge"] for m in models)
    headers = ["category", "concept", "role", *[m["label"] for m in models]]
    if judged:
        headers += [f"{m['label']} (judge)" for m in models]
    table = [headers]
    for i, entry in enumerate(models[0]["per_concept"]):
        cells = [entry["category"], entry["concept"], entry["role"]]
        cells += [_clip_cell(m["per_concept"][i]) for m in models]
        if judged:
            cells += [_pct(m["per_concept"][i]["judge"]) for m in models]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Grids and report


def _write_category_grids(
    out_dir: Path,
    suite: Suite,
    models: Sequence[AuditModel],
    unique: Sequence[tuple[str, int]],
    images: dict[str, list[np.ndarray]],
) -> None:
    index = {key: i for i, key in enumerate(unique)}
    for category in suite.labels:
        concepts = list(dict.fromkeys(r.concept for r in suite.rows if r.category == category))
        labels, tiles = [], []
        for concept in concepts:
            picks = list(dict.fromkeys((r.prompt, r.seed) for r in suite.rows if r.concept == concept))[:GRID_SEEDS]
            for model in models:
                labels.append(concept if len(models) == 1 else f"{concept} [{model.label}]")
                tiles.append([images[model.key][index[p]] for p in picks])
        if tiles:
            grid = labelled_grid(tiles, labels, title=f"{category}: rows concept x model, columns seeds")
            _write(out_dir / "grids" / f"{_slug(category)}.png", png_bytes(grid))


def _thumb_uri(array: np.ndarray) -> str:
    image = Image.fromarray(array)
    if max(image.size) > REPORT_THUMB:
        image.thumbnail((REPORT_THUMB, REPORT_THUMB), Image.Resampling.LANCZOS)
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _bar_chart(title: str, bars: list[tuple[str, float | None, float | None, float | None]], vmax: float) -> str:
    """An inline SVG: one horizontal bar per (label, value, low, high), whiskers from low to high."""
    row_h, label_w, plot_w, top = 22, 200, 300, 24
    height = top + row_h * len(bars) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 90}" height="{height}" role="img">',
        f'<text x="4" y="15" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    scale = plot_w / vmax if vmax > 0 else 0.0
    for i, (label, value, low, high) in enumerate(bars):
        y = top + i * row_h
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{html.escape(label[:30])}</text>')
        parts.append(
            f'<line x1="{label_w}" y1="{y}" x2="{label_w}" y2="{y + row_h - 4}" stroke="#888" stroke-width="1"/>'
        )
        if value is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + 14}" font-size="12" fill="#888">n/a</text>')
            continue
        colour = "#9aa9c4" if i == 0 else "#d9825b"
        width = max(0.0, value) * scale
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 10}" fill="{colour}"/>')
        if low is not None and high is not None:
            x1, x2, ym = label_w + low * scale, label_w + high * scale, y + 3 + (row_h - 10) / 2
            parts.append(f'<line x1="{x1:.1f}" y1="{ym}" x2="{x2:.1f}" y2="{ym}" stroke="black" stroke-width="1.2"/>')
            for x in (x1, x2):
                parts.append(f'<line x1="{x:.1f}" y1="{ym - 5}" x2="{x:.1f}" y2="{ym + 5}" stroke="black"/>')
        parts.append(f'<text x="{label_w + plot_w + 6}" y="{y + 14}" font-size="12">{value:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _mean_interval(stat: dict) -> tuple[float | None, float | None, float | None]:
    if stat["mean"] is None:
        return None, None, None
    half = M.Z95 * stat["std"] / np.sqrt(stat["n"]) if stat["n"] > 1 else 0.0
    return stat["mean"], stat["mean"] - half, stat["mean"] + half


def _charts(result: dict[str, Any]) -> list[str]:
    models = result["models"]
    charts = []
    for source in ("clip", "judge"):
        if not any(m[source] for m in models):
            continue
        for name in M.ROLE_METRICS.values():
            bars = []
            for m in models:
                acc = m[source][name] if m[source] else {"value": None, "low": None, "high": None, "n": 0}
                bars.append((f"{m['label']} (n={acc['n']})", acc["value"], acc["low"], acc["high"]))
            charts.append(_bar_chart(f"{name} ({source}), Wilson 95% interval", bars, 1.0))
        bars = [(m["label"], m[source]["harmonic_mean"] if m[source] else None, None, None) for m in models]
        charts.append(_bar_chart(f"harmonic mean of 1 - efficacy and preservation ({source})", bars, 1.0))
    bars = [(m["label"], *_mean_interval(m["clip_score"]["all"])) for m in models]
    vmax = max([b[3] for b in bars if b[3] is not None] + [1.0]) * 1.1
    charts.append(_bar_chart("CLIP score (mean, 95% normal interval)", bars, vmax))
    erased = [m for m in models if m["vs_original"]]
    if erased:
        bars = [(m["label"], *_mean_interval(m["vs_original"]["image_similarity"]["all"])) for m in erased]
        charts.append(_bar_chart("CLIP image similarity to the original (same seed)", bars, 1.0))
        values = [m["vs_original"]["cmmd"]["all"] for m in erased]
        vmax = max([abs(v) for v in values if v is not None] + [1e-9]) * 1.1
        charts.append(
            _bar_chart(
                "CMMD to the original (x1000, unbiased)",
                [(m["label"], v, None, None) for m, v in zip(erased, values, strict=True)],
                vmax,
            )
        )
    return charts


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _report_html(
    result: dict[str, Any],
    suite: Suite,
    models: Sequence[AuditModel],
    unique: Sequence[tuple[str, int]],
    images: dict[str, list[np.ndarray]],
) -> str:
    protocol = result["protocol"]
    index = {key: i for i, key in enumerate(unique)}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>erase audit</title><style>",
        "body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse;margin:.5em 0}",
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left;vertical-align:top}",
        "img.t{width:96px;height:96px;image-rendering:pixelated;margin:1px} .charts svg{margin:4px 12px 4px 0}",
        "th.p{max-width:140px;font-weight:normal}",
        "pre{background:#f4f4f4;padding:6px;font-size:12px}</style></head><body>",
        f"<h1>Erasure audit: {html.escape(protocol['model'])}</h1>",
        "<h2>Summary</h2>",
        f"<pre>{html.escape(summary_table(result))}</pre>",
        "<h2>Metrics</h2><div class='charts'>",
        *_charts(result),
        "</div>",
        "<p>efficacy = zero-shot accuracy on target prompts (lower is better after erasure); generality = the same on "
        "synonym prompts; specificity = accuracy on neighbour concepts; preservation = accuracy on unrelated "
        "prompts. Zero-shot: argmax of CLIP cosine similarity over the category's labels. CMMD: unbiased MMD^2 with "
        "a Gaussian RBF kernel (sigma 10) on CLIP image embeddings, times 1000.</p>",
        "<h2>Protocol</h2>",
    ]
    seeds = protocol["seeds"]
    parts.append(
        _table(
            ["setting", "value"],
            [
                ["model", protocol["model"]],
                ["model fingerprint (cross-attention)", protocol["model_fingerprint"][:16]],
                ["scheduler", protocol["scheduler"]],
                ["steps", protocol["steps"]],
                ["guidance", protocol["guidance"]],
                ["image size", f"{protocol['width']}x{protocol['height']}"],
                ["suite", f"{protocol['suite']['name']} ({protocol['suite']['source']})"],
                ["images", f"{protocol['suite']['rows']} per model, {protocol['images_per_prompt']} per prompt"],
                ["seeds", f"{seeds['count']} distinct, {seeds['min']} .. {seeds['max']} (suite.csv lists them)"],
                ["scorer", protocol["scorer"]],
                ["judge", "yes" if protocol["judge"] else "no"],
                ["batch size / processes", f"{protocol['batch_size']} / {protocol['num_processes']}"],
                ["erase version", protocol["erase_version"]],
            ],
        )
    )
    for m in result["models"]:
        art = m["artifact"]
        if art:
            parts.append(f"<h3>Artifact {html.escape(m['label'])}</h3>")
            parts.append(
                _table(
                    ["field", "value"],
                    [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in art.items()],
                )
            )
    parts.append(
        "<h2>Images</h2><p>Per prompt group (role, concept): one row per model, same seeds in each column.</p>"
    )
    reads_as = {
        (m["key"], c["role"], c["concept"]): c["clip_reads_as"] for m in result["models"] for c in m["per_concept"]
    }
    groups = dict.fromkeys((r.role, r.concept) for r in suite.rows)
    for role, concept in groups:
        picks = list(dict.fromkeys((r.prompt, r.seed) for r in suite.rows if (r.role, r.concept) == (role, concept)))
        picks = picks[:REPORT_IMAGES]
        parts.append(f"<h3>{html.escape(role)}: {html.escape(concept)}</h3><table>")
        captions = "".join(f"<th class='p'>{html.escape(p)}<br>seed {s}</th>" for p, s in picks)
        parts.append(f"<tr><th>model</th>{captions}</tr>")
        for model in models:
            cells = "".join(
                f"<td><img class='t' alt='{html.escape(p)}' src='{_thumb_uri(images[model.key][index[(p, s)]])}'></td>"
                for p, s in picks
            )
            counts = reads_as.get((model.key, role, concept), {})
            reads = ", ".join(f"{c} {k}/{sum(counts.values())}" for c, k in list(counts.items())[:3])
            parts.append(
                f"<tr><th>{html.escape(model.label)}<br><small>reads as {html.escape(reads)}</small></th>{cells}</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
