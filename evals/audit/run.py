"""Running an audit: the output folder and its settings guard, generation (resumable, multi-process), then scoring
and the report on process 0. The folder's layout and ``metrics.json`` are described in :mod:`evals.audit`.

**Resumable.** Every image is written atomically (temporary file + ``os.replace``) and an image already on disk is
never generated or written again (one that does not decode whole, e.g. truncated by a copy, counts as missing).
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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, PipelineWrapper
from pipelines.files import foreign_entries, png_bytes, remove_stale_temporaries, write_synced_sibling
from pipelines.tokenizer import concept_folder

from ..attacks import AttackTarget, attack_labels, check_budget
from ..attacks import attack_probes as make_probes
from ..attacks.suite import check_suite_folder, check_suite_targets, run_attack_suite
from ..scorer import ClipScorer
from ..suites import Suite, SuiteRow, load_suite
from .common import (
    ORIGINAL,
    SCHEMA_VERSION,
    AuditError,
    AuditModel,
    image_name,
    json_text,
    make_folder,
    reason,
    write_file,
)
from .report import write_report
from .scoring import compute_metrics

__all__ = [
    "SETTINGS_FILE",
    "check_audit_folder",
    "check_output_folder",
    "generate_audit_images",
    "generation_summary",
    "rewrite_report",
    "run_audit",
]

logger = logging.getLogger(__name__)

#: The folder's settings guard (what it was made with); a rerun with other settings is refused.
SETTINGS_FILE = "audit.json"

# ----------------------------------------------------------------------------------------------------------------
# Files


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
        why = "read-only file system" if read_only else "permission denied"
        raise AuditError(f"{where}{existing} is not writable ({why})")


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
        "erasures": [m.key for m in models if m.edit is not None],
    }


def _describe(value: Any) -> str:
    if isinstance(value, dict) and {"name", "images", "sha256"} <= set(value):
        return f"{value['name']!r} ({value['images']} images, sha256 {str(value['sha256'])[:12]})"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``path`` whole unless it exists; False when another process made it first (then it is left alone)."""
    try:
        tmp = write_synced_sibling(path, data)
    except OSError as err:
        raise AuditError(f"cannot write {path}: {reason(err)}") from err
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: last writer wins, as before
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise AuditError(f"cannot write {path}: {reason(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return True


def check_audit_folder(out_dir: str | Path) -> None:
    """:class:`AuditError` when ``out_dir`` holds files but no audit (no ``audit.json``): an audit writes
    ``report.html``, ``metrics.json``, ``images/`` and more into its folder and would replace a user's files of those
    names. A new or empty folder (hidden entries aside), or an earlier audit to resume, passes."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / SETTINGS_FILE).exists():
        return
    listed = foreign_entries(out_dir)
    if listed:
        raise AuditError(
            f"{out_dir} holds files but no audit ({listed}); an audit would write its report, metrics and images "
            "among them: choose a new or empty output folder"
        )


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Pin ``settings`` to ``out_dir`` (``audit.json``), or refuse a folder whose audit was made with others."""
    path = out_dir / SETTINGS_FILE
    check_audit_folder(out_dir)
    if path.exists() and not path.is_file():
        raise AuditError(f"{path} is not a file; use another output folder")
    # Concurrent audits into one folder: the first to link its audit.json wins, the others compare against it.
    if not path.exists() and _create_exclusive(path, json_text(settings).encode("utf-8")):
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, not UTF-8
        why = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise AuditError(f"{path} is corrupt ({why}); use another output folder") from None
    except OSError as err:
        raise AuditError(f"cannot read {path}: {reason(err)}") from err
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
    for folder in folders:
        remove_stale_temporaries(folder)


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
        make_folder(folder)
        edit = model.edit(wrapper) if model.edit is not None else contextlib.nullcontext()
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
                    write_file(path, png_bytes(image))
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
    attacks: Sequence[str] = (),
    attack_probes: int = 48,
    attack_budget: float = 1.0,
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
        attacks: attacks (``evals.attacks``) to run against every erased concept of every erasure, after the metrics:
            their success rates go into ``metrics.json`` (``"attacks"``) and the report; their images into
            ``OUT/attacks/<model-key>/`` (resumed like the rest).
        attack_probes: probes (images) per attack row (three prompt forms in turn, on the ``report`` seeds).
        attack_budget: the multiplier of every attack's budget fields (:func:`evals.attacks.budget_config`). Every
            attack is checked against every erased concept, and the attack folders against the budget, before any
            image is generated.

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
    if attacks:
        attack_budget = check_budget(attack_budget)
        planned = _attack_targets(wrapper, erasures, None, attack_probes, steps=steps, guidance=guidance,
                                  batch_size=batch_size, progress=progress)  # fmt: skip
        check_suite_targets([t for _, t in planned], attacks, budget=attack_budget)
        for model, target in planned:
            check_suite_folder(out_dir / "attacks" / model.key, [target.concept], attack_budget)
    settings = _settings(wrapper, steps, guidance)
    make_folder(out_dir)
    _check_settings(out_dir, _folder_settings(settings, expanded, models, batch_size, num_processes))
    if process_index == 0:
        _remove_stale_temporaries(out_dir)
        write_file(out_dir / "suite.csv", expanded.to_csv().encode("utf-8"))

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
    write_file(out_dir / f"generation-{process_index}.json", json_text(throughput).encode("utf-8"))
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
    result = compute_metrics(expanded, models, unique, images, scorer, judge, protocol)
    if attacks:
        result["attacks"] = run_attack_section(wrapper, models[1:], out_dir, scorer, judge, attacks, attack_probes,
                                               steps=steps, guidance=guidance, batch_size=batch_size,
                                               progress=progress, budget=attack_budget)  # fmt: skip
    write_file(out_dir / "metrics.json", json_text(result).encode("utf-8"))
    write_report(out_dir, result, expanded, unique, images)
    logger.info("audit written to %s", out_dir)
    return result


def _attack_targets(
    wrapper: PipelineWrapper,
    erasures: Sequence[AuditModel],
    scorer: ClipScorer | None,
    probes: int,
    *,
    steps: int,
    guidance: float,
    batch_size: int,
    progress: bool,
) -> list[tuple[AuditModel, AttackTarget]]:
    """The attack target of each erased concept of each erasure, with its ``probes`` probes (report seeds)."""
    planned = []
    for model in erasures:
        metadata = model.metadata or {}
        for concept in metadata.get("concepts", []):
            labels = attack_labels(concept, metadata.get("preserve", []))
            target = AttackTarget(wrapper, model.edit, concept, make_probes(concept, probes, 0), labels=labels,
                                  scorer=scorer, steps=steps, guidance=guidance, batch_size=batch_size,
                                  progress=progress)  # fmt: skip
            planned.append((model, target))
    return planned


def run_attack_section(
    wrapper: PipelineWrapper,
    erasures: Sequence[AuditModel],
    out_dir: Path,
    scorer: ClipScorer,
    judge: torch.nn.Module | None,
    attacks: Sequence[str],
    probes: int,
    *,
    steps: int,
    guidance: float,
    batch_size: int,
    progress: bool,
    budget: float = 1.0,
) -> list[dict[str, Any]]:
    """Each attack against each erased concept of each erasure (:func:`evals.attacks.suite.run_attack_suite`, at
    ``budget``): one summary per (erasure, concept), with where its comparison grid lies relative to ``out_dir``."""
    sections = []
    planned = _attack_targets(wrapper, erasures, scorer, probes, steps=steps, guidance=guidance,
                              batch_size=batch_size, progress=progress)  # fmt: skip
    for model, target in planned:
        folder = out_dir / "attacks" / model.key
        summary = run_attack_suite(target, attacks, folder, scorer=scorer, judge=judge, erasure=model.metadata or {},
                                   budget=budget)  # fmt: skip
        comparison = (folder / concept_folder(target.concept) / "comparison.png").relative_to(out_dir)
        sections.append({"model": model.key, "label": model.label, **summary, "comparison": str(comparison)})
    return sections


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
            why = str(err).strip() or type(err).__name__
            raise AuditError(
                f"cannot read the image {path} ({why}); delete it and rerun to generate it again"
            ) from err
    return arrays


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


def rewrite_report(out_dir: str | Path) -> None:
    """Write ``report.html`` and the grids of a finished audit again from its folder (``metrics.json``, ``suite.csv``
    and the images), without generating or scoring anything: a report layout that changed applies to old audits."""
    out_dir = Path(out_dir)
    try:
        result = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        rows = load_suite(out_dir / "suite.csv").rows
    except (OSError, ValueError) as err:
        raise AuditError(f"{out_dir} holds no finished audit to report on ({err})") from err
    protocol = result["protocol"]["suite"]
    labels = {cat: tuple(names) for cat, names in protocol["labels"].items()}
    suite = Suite(protocol["name"], rows, labels, protocol["source"])
    unique = _unique_images(suite.rows)
    images = {m["key"]: _load_images(out_dir / "images" / m["key"], unique) for m in result["models"]}
    write_report(out_dir, result, suite, unique, images)
