"""Run attacks against one erasure and write what they found: a resumable folder and an ASR table.

Layout of the output folder (one subfolder per attacked concept, ``<concept>/``, named by
``pipelines.tokenizer.concept_folder``: distinct concepts, distinct folders)::

    <concept>/attack.json        settings: concept, probes, seed, sampler, erasure; a rerun must match them
    <concept>/original/          the original model's images of the probes, and its rate (what there was to erase)
    <concept>/unattacked/        the erased model's images of the same probes, and its rate
    <concept>/<attack>/          one folder per attack: images/NNN.png, result.json (written last), and the
                                 adversarial embeddings (embeddings.safetensors) where the attack makes them
    <concept>/comparison.png     the first probes as each row drew them, side by side
    <concept>/attacks.json       the table: every row's rate with N, k and its Wilson 95% interval, CLIP and judge

A killed run resumes by rerunning the same command: every finished row (its ``result.json``) is kept and the rest
run. A row is one attack on one concept, about a minute on the micro model, so at most that much is lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.checks import error_line
from pipelines.files import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, png_bytes
from pipelines.tokenizer import concept_folder

from ..grids import labelled_grid
from .base import AttackResult, AttackTarget, attack_success, check_attack, get_attack, run_attack

__all__ = ["BASELINES", "SUITE_SCHEMA_VERSION", "asr_table", "check_suite_folder", "run_attack_suite"]

logger = logging.getLogger(__name__)

SUITE_SCHEMA_VERSION = 1
#: The rows every suite has besides its attacks: the original model's rate and the erased model's, unattacked.
BASELINES = ("original", "unattacked")
_GRID_IMAGES = 8


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({error_line(err)}); use another --out folder") from None
    if not isinstance(found, dict) or found.get("schema_version") != SUITE_SCHEMA_VERSION:
        raise ValueError(f"{path} is not an attack run of this version; use another --out folder")
    return found


def check_suite_folder(out_dir: str | Path, concepts: Sequence[str]) -> None:
    """``ValueError`` in one line when ``out_dir`` cannot take a suite run on ``concepts``, before any model loads:
    a concept's folder is a file, or holds an unreadable ``attack.json`` or one of another version."""
    for concept in concepts:
        concept_dir = Path(out_dir) / concept_folder(concept)
        if concept_dir.exists() and not concept_dir.is_dir():
            raise ValueError(f"{concept_dir} is a file, not a folder; use another --out folder")
        if (concept_dir / "attack.json").exists():
            _read_settings(concept_dir / "attack.json")


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``attack.json`` on the first run; on a rerun refuse other settings (``ValueError``, one line)."""
    path = out / "attack.json"
    if path.exists():
        found = _read_settings(path)
        expected = json.loads(json.dumps(settings))  # as the file holds it (tuples become lists)
        if found != expected:
            changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise ValueError(
                f"{out} holds an attack run with other settings ({', '.join(changed)}); use another --out"
            )
        return
    atomic_write_json(path, settings)


def _write_row(folder: Path, images: list[Image.Image], row: dict[str, Any], result: AttackResult | None) -> None:
    """Images and embeddings first, ``result.json`` last: a row is done exactly when its JSON exists."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        atomic_write_bytes(folder / "images" / f"{i:03d}.png", png_bytes(image))
    if result is not None and result.embeddings is not None:
        atomic_save_safetensors({"embeddings": result.embeddings.contiguous()}, folder / "embeddings.safetensors")
    atomic_write_json(folder / "result.json", row)


def _rate_row(name: str, kind: str, success: dict[str, Any], result: AttackResult | None) -> dict[str, Any]:
    row = {"row": name, "kind": kind, "clip": success["clip"], "judge": success["judge"],
           "clip_verdicts": success["clip_verdicts"]}  # fmt: skip
    if result is not None:
        row.update(config=result.config, seconds=result.seconds, info=result.info, prompts=result.prompts)
    return json.loads(json.dumps(row))  # as a rerun reads it back (tuples become lists)


def run_attack_suite(
    target: AttackTarget,
    attacks: Sequence[str],
    out_dir: str | Path,
    *,
    scorer: Any,
    judge: Any = None,
    seed: int = 0,
    configs: dict[str, Any] | None = None,
    erasure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the baselines and ``attacks`` on ``target`` and write them under ``out_dir``; returns ``attacks.json``.

    ``configs`` maps an attack name to its config (its default otherwise); ``erasure`` is what identifies the
    attacked erasure (its ``erasure.json``), recorded and checked on a rerun.
    """
    out = Path(out_dir)
    configs = dict(configs or {})
    for name in attacks:
        check_attack(name, target, configs.get(name))  # an unknown name or a target it refuses: before any image
    settings = {
        "schema_version": SUITE_SCHEMA_VERSION,
        "concept": target.concept,
        "probes": [[p.prompt, p.seed] for p in target.probes],
        "seed": seed,
        "steps": target.steps,
        "guidance": target.guidance,
        "batch_size": target.batch_size,  # images drawn together differ from those drawn apart in the last bit
        "erasure": erasure,
    }
    concept_dir = out / concept_folder(target.concept)
    concept_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(concept_dir, settings)
    rows = []
    for name in (*BASELINES, *attacks):
        folder = concept_dir / name
        config = configs.get(name)
        row = _finished_row(folder, len(target.probes))
        if row is not None and (name in BASELINES or row.get("config") == _config_dict(name, config)):
            logger.info("%s: already done, kept", name)
            rows.append(row)
            continue
        if name in BASELINES:
            prompts, seeds = [p.prompt for p in target.probes], [p.seed for p in target.probes]
            if name == "original":
                images = target.generate(prompts, seeds)
            else:
                with target.erased_model():
                    images = target.generate(prompts, seeds)
            result, kind = None, "baseline"
        else:
            result = run_attack(name, target, config, seed)
            images, kind = result.images, get_attack(name).kind
        row = _rate_row(name, kind, attack_success(images, target.probes, scorer, target.labels, judge), result)
        _write_row(folder, images, row, result)
        rows.append(row)
    _write_comparison(concept_dir, [r["row"] for r in rows], target)
    summary = {"schema_version": SUITE_SCHEMA_VERSION, "concept": target.concept, "n": len(target.probes),
               "seed": seed, "erasure": erasure,
               "rows": [{k: v for k, v in r.items() if k != "clip_verdicts"} for r in rows]}  # fmt: skip
    atomic_write_json(concept_dir / "attacks.json", summary)
    return summary


def _finished_row(folder: Path, images: int) -> dict[str, Any] | None:
    """A row's ``result.json`` when the row is finished and intact; ``None`` (the row is run again) when it is
    missing, unreadable, or one of its images is (a run killed while the disk filled, a file damaged since)."""
    try:
        row = json.loads((folder / "result.json").read_text())
        for i in range(images):
            with Image.open(folder / "images" / f"{i:03d}.png") as image:
                image.load()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        logger.warning("%s: %s; running the row again", folder, error_line(err))
        return None
    return row if isinstance(row, dict) else None


def _write_comparison(concept_dir: Path, names: list[str], target: AttackTarget) -> None:
    """``comparison.png``: the first probes (columns) as each row drew them (original, unattacked, each attack)."""
    shown = list(range(min(_GRID_IMAGES, len(target.probes))))
    grid_rows = [[Image.open(concept_dir / name / "images" / f"{i:03d}.png").convert("RGB") for i in shown]
                 for name in names]  # fmt: skip
    columns = [f"seed {target.probes[i].seed}" for i in shown]
    title = f"{target.concept!r}: the first {len(shown)} probes, e.g. {target.probes[0].prompt!r}"
    grid = labelled_grid(grid_rows, names, columns, title=title, label_width=120)
    atomic_write_bytes(concept_dir / "comparison.png", png_bytes(grid))


def _config_dict(name: str, config: Any) -> dict[str, Any]:
    attack = get_attack(name)
    return json.loads(json.dumps(dataclasses.asdict(attack.config_class() if config is None else config)))


def asr_table(summary: dict[str, Any]) -> str:
    """The rows as a plain-text table: rate (k/N) and Wilson 95% interval, CLIP and judge, and wall time."""

    def cell(acc: dict[str, Any] | None) -> str:
        if not acc or acc.get("value") is None:
            return "-"
        return f"{acc['value']:6.1%} ({acc['k']}/{acc['n']}) [{acc['low']:.0%}, {acc['high']:.0%}]"

    lines = [f"concept {summary['concept']!r}, N = {summary['n']} probes, seed {summary['seed']}",
             f"{'row':16s} {'kind':9s}  {'CLIP':>28s}  {'judge':>28s}  {'seconds':>7s}"]  # fmt: skip
    for row in summary["rows"]:
        seconds = f"{row['seconds']:7.1f}" if "seconds" in row else f"{'':7s}"
        lines.append(
            f"{row['row']:16s} {row['kind']:9s}  {cell(row['clip']):>28s}  {cell(row['judge']):>28s}  {seconds}"
        )
    return "\n".join(lines)
