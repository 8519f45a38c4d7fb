"""Prompt suites for generation audits: which (prompt, seed) images to make, and how to judge each one.

A suite is a table of rows ``prompt, seed, concept, category, role``:

* ``prompt``: the text given to the model;
* ``seed``: the seed of the image's starting noise (an audit with ``images_per_prompt = k`` also makes seeds
  ``seed + 1 .. seed + k - 1``, see :meth:`Suite.expand`);
* ``concept``: the concept the image should show (synonym rows name the target under another name but are judged as
  the target, so ``concept`` is the target's name);
* ``category``: the zero-shot label set the image is judged among: every concept of that category in the suite
  (for the micro world, every concept of the world's category);
* ``role``: why the row is there, one of :data:`ROLES`:

  ``target``     names an erased concept (accuracy should fall: efficacy);
  ``synonym``    names an erased concept by another name (should fall too: generality);
  ``neighbour``  names a concept close to a target (should stay: specificity);
  ``unrelated``  names anything else (should stay: preservation).

Files are CSV with that header, or JSONL with one object per line holding those keys. :func:`load_suite` validates
every row and raises :class:`SuiteError` naming the file and line (``prompts.csv line 7: role 'foo' is not one of
...``). :func:`world_suite` builds a suite from the micro world; :func:`resolve_suite` turns ``"world"``, the name
of a shipped suite (``evals/suites/*.csv``) or a path into a :class:`Suite`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .microworld import world
from .probes import PROMPT_FORMS, check_forms, form_prompt, world_concept

__all__ = [
    "COLUMNS",
    "CONCEPT_TEMPLATES",
    "ROLES",
    "Suite",
    "SuiteError",
    "SuiteRow",
    "concept_suite",
    "load_suite",
    "resolve_suite",
    "shipped_suites",
    "suite_path",
    "world_suite",
]

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("target", "synonym", "neighbour", "unrelated")
COLUMNS: tuple[str, ...] = ("prompt", "seed", "concept", "category", "role")
#: Largest seed a row may carry (torch generators take 64-bit seeds; expansion adds up to images_per_prompt - 1).
MAX_SEED = 2**62


class SuiteError(ValueError):
    """A prompt suite is malformed; the message names the file and line."""


@dataclass(frozen=True)
class SuiteRow:
    prompt: str
    seed: int
    concept: str
    category: str
    role: str


@dataclass(frozen=True)
class Suite:
    """Rows plus the zero-shot label set of each category (``labels[category]`` holds every concept judged there)."""

    name: str
    rows: tuple[SuiteRow, ...]
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""  # file path, or how the suite was built

    def __post_init__(self) -> None:
        if not self.rows:
            raise SuiteError(f"suite {self.name!r} has no rows")
        # Categories without an explicit label set are judged among the concepts the suite names for them.
        labels = {k: tuple(v) for k, v in self.labels.items()}
        for row in self.rows:
            labels.setdefault(row.category, ())
            if row.concept not in labels[row.category]:
                if self.labels.get(row.category):
                    raise SuiteError(
                        f"suite {self.name!r}: concept {row.concept!r} is not among the {row.category} labels"
                    )
                labels[row.category] = (*labels[row.category], row.concept)
        object.__setattr__(self, "labels", labels)

    def expand(self, images_per_prompt: int) -> Suite:
        """Every row repeated ``images_per_prompt`` times with seeds ``seed, seed + 1, ...``.

        Raises :class:`SuiteError` if that makes the same (prompt, seed) image twice.
        """
        if images_per_prompt < 1:
            raise SuiteError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        if images_per_prompt == 1:
            return self
        rows = tuple(replace(r, seed=r.seed + i) for r in self.rows for i in range(images_per_prompt))
        seen: set[tuple[str, int]] = set()
        for r in rows:
            if (r.prompt, r.seed) in seen:
                raise SuiteError(
                    f"suite {self.name!r}: {images_per_prompt} images per prompt make prompt {r.prompt!r} with seed "
                    f"{r.seed} twice; space the rows' seeds further apart"
                )
            seen.add((r.prompt, r.seed))
        return Suite(self.name, rows, self.labels, self.source)

    def roles(self) -> list[str]:
        """Roles present, in :data:`ROLES` order."""
        present = {r.role for r in self.rows}
        return [r for r in ROLES if r in present]

    def to_csv(self) -> str:
        """The rows as CSV text with the :data:`COLUMNS` header (what :func:`load_suite` reads)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in self.rows:
            writer.writerow([r.prompt, r.seed, r.concept, r.category, r.role])
        return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Files


def _row_from_fields(values: dict[str, object], where: str) -> SuiteRow:
    missing = [c for c in COLUMNS if c not in values or values[c] is None]
    if missing:
        raise SuiteError(f"{where}: missing {', '.join(missing)}")
    text = {c: str(values[c]).strip() for c in ("prompt", "concept", "category", "role")}
    for column in ("prompt", "concept", "category"):
        if not text[column]:
            raise SuiteError(f"{where}: {column} is empty")
    if text["role"] not in ROLES:
        raise SuiteError(f"{where}: role {text['role']!r} is not one of {', '.join(ROLES)}")
    raw_seed = values["seed"]
    if isinstance(raw_seed, bool) or isinstance(raw_seed, float):
        raise SuiteError(f"{where}: seed {raw_seed!r} is not a whole number")
    try:
        seed = int(str(raw_seed).strip())
    except ValueError:
        raise SuiteError(f"{where}: seed {raw_seed!r} is not a whole number") from None
    if not 0 <= seed <= MAX_SEED:
        raise SuiteError(f"{where}: seed {seed} is outside 0 .. 2**62")
    return SuiteRow(text["prompt"], seed, text["concept"], text["category"], text["role"])


def _read_csv(path: Path, text: str) -> list[tuple[int, SuiteRow]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise SuiteError(f"{path} line 1: the file is empty; expected the header {','.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise SuiteError(f"{path} line 1: header lacks {', '.join(missing)} (expected {','.join(COLUMNS)})")
    rows = []
    for record in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise SuiteError(f"{path} line {line}: {len(record)} fields, the header has {len(header)}")
        rows.append((line, _row_from_fields(dict(zip(header, record, strict=True)), f"{path} line {line}")))
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, SuiteRow]]:
    rows = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            values = json.loads(content)
        except json.JSONDecodeError as err:
            raise SuiteError(f"{path} line {line}: not JSON ({err.msg})") from None
        if not isinstance(values, dict):
            raise SuiteError(f"{path} line {line}: expected a JSON object, got {type(values).__name__}")
        rows.append((line, _row_from_fields(values, f"{path} line {line}")))
    return rows


def load_suite(path: str | Path, name: str | None = None) -> Suite:
    """Read and validate a CSV (``.csv``) or JSONL (``.jsonl`` / ``.json``) suite file.

    Raises :class:`SuiteError` naming the file and line on the first bad row, on a repeated (prompt, seed) pair and
    on an empty file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(f"{path}: cannot read it ({err})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        numbered = _read_csv(path, text)
    elif suffix in (".jsonl", ".json"):
        numbered = _read_jsonl(path, text)
    else:
        raise SuiteError(f"{path}: unknown suite format {suffix!r}; use .csv or .jsonl")
    if not numbered:
        raise SuiteError(f"{path}: no rows")
    first_line: dict[tuple[str, int], int] = {}
    for line, row in numbered:
        key = (row.prompt, row.seed)
        if key in first_line:
            raise SuiteError(
                f"{path} line {line}: prompt {row.prompt!r} with seed {row.seed} repeats line {first_line[key]}"
            )
        first_line[key] = line
    return Suite(name or path.stem, tuple(row for _, row in numbered), source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Built-in suites


def suite_path() -> Path:
    """The folder of the shipped suites, ``evals/suites/``."""
    return Path(__file__).resolve().parent / "suites"


def shipped_suites() -> list[str]:
    """Names of the shipped suites (file stems in :func:`suite_path`), plus ``"world"``."""
    return ["world", *sorted(p.stem for p in suite_path().glob("*.csv"))]


def _prompt_seed(prompt: str, seed: int) -> int:
    # Seeds follow from the prompt text, so a prompt gets the same images whichever targets the suite was built for
    # (audits of different erasures share their original-model images, and comparisons across audits are paired).
    digest = int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8], 16)
    return (seed * 1_000_003 + (digest % 1_000_000) * 1000) % 1_000_000_000


def world_suite(
    targets: Iterable[str] = (),
    images_per_prompt: int = 1,
    seed: int = 0,
    prompts_per_concept: int = 2,
    forms: Sequence[str] = PROMPT_FORMS,
) -> Suite:
    """A suite over the micro world for erasing ``targets`` (any names of world concepts; none audits the model).

    For each target: ``prompts_per_concept`` prompts naming it (role ``target``), as many naming each of its
    synonyms (``synonym``, judged as the target), and as many for each of its neighbours that is not itself a
    target (``neighbour``); then as many for every other concept of every category (``unrelated``), "plain" style
    excepted since captions rarely name it. Each of those is made in every prompt form of ``forms``
    (:data:`evals.probes.PROMPT_FORMS`): the attribute alone with the world's templates (``world.prompt(...,
    template=k)``), then with one other attribute, then with both (random other attributes and templates, fixed by
    the prompt's concept, form, index and ``seed``). Each category is judged among all of its world concepts.

    Row seeds depend on the prompt and ``seed`` only; ``world_suite(t, k) == world_suite(t, 1).expand(k)``.
    """
    if prompts_per_concept < 1:
        raise SuiteError(f"prompts_per_concept must be >= 1, got {prompts_per_concept}")
    try:
        forms = check_forms(forms)
    except ValueError as err:
        raise SuiteError(str(err)) from None
    canon: list[str] = []
    for name in targets:
        read = world_concept(name)  # any spelling erase.py's check takes for a world concept ("a circle")
        if read is None:
            raise SuiteError(f"{name!r} is not a micro-world concept; the world suite audits world concepts")
        concept = world.canonical(read)
        if concept not in canon:
            canon.append(concept)
    rows: list[SuiteRow] = []

    def add(name: str, concept: str, role: str) -> None:
        category = world.category_of(concept)
        n_templates = len(world.templates_for(**{c: c == category for c in world.CATEGORIES}))
        for form in forms:
            for k in range(prompts_per_concept):
                if form == "alone":
                    text = world.prompt(**{category: name}, template=k % n_templates)
                else:
                    key = hashlib.sha1(f"{name}|{form}|{k}|{seed}".encode()).hexdigest()[:8]
                    text, _ = form_prompt(category, name, form, np.random.default_rng(int(key, 16)))
                if any(r.prompt == text for r in rows):
                    continue  # more prompts asked than the category has templates
                rows.append(SuiteRow(text, _prompt_seed(text, seed), concept, category, role))

    neighbour_set: list[str] = []
    for target in canon:
        add(target, target, "target")
        for synonym in world.synonyms(target):
            add(synonym, target, "synonym")
        for neighbour in world.neighbours(target):
            if neighbour not in canon and neighbour not in neighbour_set:
                neighbour_set.append(neighbour)
                add(neighbour, neighbour, "neighbour")
    for category in world.CATEGORIES:
        for concept in world.concepts(category):
            if concept not in canon and concept not in neighbour_set and concept != "plain":
                add(concept, concept, "unrelated")
    labels = {c: tuple(world.concepts(c)) for c in world.CATEGORIES}
    what = f"targets={canon}, seed={seed}, prompts_per_concept={prompts_per_concept}, forms={list(forms)}"
    return Suite("world", tuple(rows), labels, f"evals.suites.world_suite({what})").expand(images_per_prompt)


#: Templates of :func:`concept_suite`, for concepts of unknown kind (styles, objects, characters).
CONCEPT_TEMPLATES: tuple[str, ...] = ("a painting in the style of {}", "a picture of {}", "{}")


def concept_suite(targets: Sequence[str], preserve: Sequence[str], images_per_prompt: int = 1, seed: int = 0) -> Suite:
    """A suite for concepts outside the micro world (hub models), built from an erasure's own concept lists.

    Each target gets the three :data:`CONCEPT_TEMPLATES` prompts (role ``target``), each preserved concept the
    first two (``unrelated``); all are judged among one label set ``"concept"`` = targets + preserved concepts, as
    ``scripts/erase.py``'s self-check does. There are no synonym or neighbour rows: write a suite file for those.
    """
    targets = list(dict.fromkeys(t.strip() for t in targets if t.strip()))
    kept = [p for p in dict.fromkeys(p.strip() for p in preserve if p.strip()) if p not in targets]
    if not targets:
        raise SuiteError("concept_suite needs at least one target concept")
    rows = [
        SuiteRow(t.format(c), _prompt_seed(t.format(c), seed), c, "concept", role)
        for concepts, role, templates in (
            (targets, "target", CONCEPT_TEMPLATES),
            (kept, "unrelated", CONCEPT_TEMPLATES[:2]),
        )
        for c in concepts
        for t in templates
    ]
    what = f"targets={targets}, preserve={kept}, seed={seed}"
    labels = {"concept": (*targets, *kept)}
    return Suite("concepts", tuple(rows), labels, f"evals.suites.concept_suite({what})").expand(images_per_prompt)


def resolve_suite(spec: str | Path, targets: Sequence[str] = (), seed: int = 0) -> Suite:
    """``"world"`` (:func:`world_suite` for ``targets``), a shipped suite name, or a CSV/JSONL path.

    Images per prompt are applied later (:meth:`Suite.expand`), by the audit.
    """
    text = str(spec)
    if text == "world":
        return world_suite(targets, 1, seed)
    shipped = suite_path() / f"{text}.csv"
    if "/" not in text and shipped.is_file():
        return load_suite(shipped, text)
    path = Path(text)
    if path.suffix.lower() in (".csv", ".jsonl", ".json") or path.exists():
        return load_suite(path)
    raise SuiteError(f"unknown suite {text!r}: expected one of {', '.join(shipped_suites())} or a .csv/.jsonl file")
