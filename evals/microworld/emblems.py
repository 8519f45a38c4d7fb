"""Emblems: the micro world's fourth category (docs/design/world-100.md), its names, codes and badge drawing.

An emblem is a badge drawn in a corner of a render: a frame of ink around a ``GRID`` x ``GRID`` grid of cells, each
cell on (ink) or off (field). Its identity is its code (one bit per cell, bit ``i`` is the cell in row ``i // GRID``,
column ``i % GRID``); codes are drawn so that any two differ in at least ``MIN_HAMMING`` cells. Its name is an
invented two-syllable word that says nothing about the picture, the analogue of a celebrity's name.

The table of names and codes is generated once by :func:`build_table` from fixed seeds and the shipped micro
tokenizer, and committed as ``emblems.json`` beside this file, so that rendering needs neither the tokenizer nor
transformers; ``tests/test_world.py`` regenerates it and checks that the committed table is what the generator gives.
To write it again (after changing a rule or a reserved word)::

    tokenize = transformers.CLIPTokenizer.from_pretrained("pipelines/micro/tokenizer").tokenize
    emblems.write_table(emblems.TABLE_PATH, emblems.build_table(tokenize, world.emblem_reserved_words()))

numpy only, like the rest of the world's generator.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "COUNT",
    "GRID",
    "INKS",
    "MAX_TOKENS",
    "MIN_HAMMING",
    "RETAINED",
    "TABLE_PATH",
    "Emblem",
    "badge_pixels",
    "badge_size",
    "build_table",
    "code_cells",
    "generate_codes",
    "generate_names",
    "hamming",
    "load_table",
    "nearest_code",
    "read_code",
    "table_problems",
    "write_table",
]

GRID = 4  # cells per side
COUNT = 120  # emblems in the world
RETAINED = 20  # the last RETAINED emblems are never erased by the scaling benchmark: its "retained" emblems
MIN_HAMMING = 4  # any two codes differ in at least this many cells
MAX_TOKENS = 3  # BPE tokens per name word with the shipped micro tokenizer
FRAME_PX = 1  # ink frame around the grid
GAP_PX = 1  # field between the frame and the grid
# Two ink schemes, (ink, field) in [0, 1] RGB: dark on cream and cream on dark. Neutral, so that no badge competes
# with an object's colour.
INKS: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.08, 0.08, 0.1), (0.96, 0.95, 0.9)),
    ((0.96, 0.95, 0.9), (0.1, 0.1, 0.12)),
)
TABLE_PATH = Path(__file__).resolve().parent / "emblems.json"

_NAME_SEED = 0xE3B1E3
_CODE_SEED = 0xC0DE5
# name = onset vowel middle vowel coda: two syllables, pronounceable, no English word by construction (mostly; the
# tokenizer rule below refuses words the vocabulary holds whole)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "tr", "qu")
_VOWELS = ("a", "e", "i", "o", "u")
_MIDDLES = ("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "rv", "lk", "nd", "sk", "rm", "lt", "nt")
_CODAS = ("", "k", "n", "r", "l", "x", "m", "s", "th", "sh", "nd", "rk", "ck")
_MIN_POPCOUNT = 4  # a badge shows at least this many ink cells (and as many field cells)


@dataclass(frozen=True)
class Emblem:
    """One emblem: canonical name, code, synonyms (other names), neighbours (nearest codes), erasable or retained."""

    name: str
    code: int
    synonyms: tuple[str, ...]
    neighbours: tuple[str, ...]
    retained: bool

    def cells(self) -> np.ndarray:
        """(GRID, GRID) bool, True where the cell is ink."""
        return code_cells(self.code)


def code_cells(code: int) -> np.ndarray:
    """(GRID, GRID) bool grid of a code, bit ``i`` at row ``i // GRID``, column ``i % GRID``."""
    return ((int(code) >> np.arange(GRID * GRID)) & 1).astype(bool).reshape(GRID, GRID)


def hamming(a: int, b: int) -> int:
    """Cells in which two codes differ."""
    return (int(a) ^ int(b)).bit_count()


# ----------------------------------------------------------------------------------------------------
# Generator


def _clash(word: str, other: str) -> bool:
    return word in other or other in word


def generate_names(
    count: int, tokenize: Callable[[str], Sequence[str]], reserved: Iterable[str], seed: int = _NAME_SEED
) -> list[str]:
    """``count`` invented words, drawn in a fixed order from a fixed seed, each kept only if

    * ``tokenize`` splits it into 2 to ``MAX_TOKENS`` tokens (one token would be a word the vocabulary already has),
    * its last token is no earlier word's last token (UCE, SPEED and the probes read a concept's last token),
    * it is no substring of an earlier word or of a reserved word (concept names, synonyms, template words), and
      no earlier word and no reserved word of three letters or more is a substring of it.
    """
    reserved_words = {w for phrase in reserved for w in phrase.lower().split()}
    long_reserved = {w for w in reserved_words if len(w) >= 3}
    rng = np.random.default_rng(seed)
    names: list[str] = []
    last_tokens: set[str] = set()
    for _ in range(200 * count):
        if len(names) == count:
            return names
        parts = (_ONSETS, _VOWELS, _MIDDLES, _VOWELS, _CODAS)
        word = "".join(p[int(rng.integers(len(p)))] for p in parts)
        if any(word in r for r in reserved_words) or any(r in word for r in long_reserved):
            continue
        if any(_clash(word, n) for n in names):
            continue
        tokens = list(tokenize(word))
        if not 2 <= len(tokens) <= MAX_TOKENS or tokens[-1] in last_tokens:
            continue
        names.append(word)
        last_tokens.add(tokens[-1])
    raise RuntimeError(f"found only {len(names)} of {count} names; the syllable tables are too small")


def generate_codes(count: int, min_distance: int = MIN_HAMMING, seed: int = _CODE_SEED) -> list[int]:
    """``count`` GRID x GRID codes, greedily from a fixed random order: each at ``min_distance`` or more from every
    earlier one, with between ``_MIN_POPCOUNT`` ink and as many field cells."""
    n_cells = GRID * GRID
    order = np.random.default_rng(seed).permutation(1 << n_cells)
    codes: list[int] = []
    for code in order.tolist():
        if not _MIN_POPCOUNT <= code.bit_count() <= n_cells - _MIN_POPCOUNT:
            continue
        if all(hamming(code, c) >= min_distance for c in codes):
            codes.append(code)
            if len(codes) == count:
                return codes
    raise RuntimeError(f"found only {len(codes)} codes at distance {min_distance}")


def _nearest(index: int, codes: Sequence[int], k: int) -> list[int]:
    dist = [(hamming(codes[index], c), j) for j, c in enumerate(codes) if j != index]
    return [j for _, j in sorted(dist)[:k]]


def build_table(tokenize: Callable[[str], Sequence[str]], reserved: Iterable[str], count: int = COUNT) -> dict:
    """The emblem table: ``count`` emblems, each with a name, a code, two synonyms and its 3 nearest neighbours.

    Synonyms are "the {other word} sign" (a second generated word, held to the same rules as the names) and the
    paraphrase "the {name} emblem". The last ``RETAINED`` emblems are the retained ones.
    """
    words = generate_names(2 * count, tokenize, reserved)
    names, others = words[:count], words[count:]
    codes = generate_codes(count)
    emblems = []
    for i, (name, other, code) in enumerate(zip(names, others, codes, strict=True)):
        emblems.append(
            {
                "name": name,
                "code": code,
                "cells": "".join("1" if b else "0" for b in code_cells(code).ravel()),
                "synonyms": [f"the {other} sign", f"the {name} emblem"],
                "neighbours": [names[j] for j in _nearest(i, codes, 3)],
                "retained": i >= count - RETAINED,
            }
        )
    return {"grid": GRID, "min_hamming": MIN_HAMMING, "max_tokens": MAX_TOKENS, "emblems": emblems}


def table_problems(table: dict, tokenize: Callable[[str], Sequence[str]], reserved: Iterable[str]) -> list[str]:
    """Every rule of the table that does not hold, as one line each (empty when the table is sound)."""
    problems = []
    entries = table["emblems"]
    words = [e["name"] for e in entries] + [e["synonyms"][0].split()[1] for e in entries]
    reserved_words = {w for phrase in reserved for w in phrase.lower().split()}
    last: dict[str, str] = {}
    for i, w in enumerate(words):
        tokens = list(tokenize(w))
        if not 2 <= len(tokens) <= MAX_TOKENS:
            problems.append(f"{w!r} is {len(tokens)} tokens")
        if tokens and tokens[-1] in last:
            problems.append(f"{w!r} and {last[tokens[-1]]!r} end in the same token {tokens[-1]!r}")
        last[tokens[-1] if tokens else ""] = w
        problems += [f"{w!r} and {o!r} overlap" for o in words[:i] if _clash(w, o)]
        problems += [
            f"{w!r} and the reserved word {r!r} overlap" for r in reserved_words if w in r or (len(r) >= 3 and r in w)
        ]
    codes = [e["code"] for e in entries]
    for i, a in enumerate(codes):
        problems += [
            f"{entries[i]['name']} and {entries[j]['name']} differ in {hamming(a, b)} cells"
            for j, b in enumerate(codes[:i])
            if hamming(a, b) < table["min_hamming"]
        ]
    return problems


def write_table(path: str | Path, table: dict) -> None:
    """Write a table from :func:`build_table` as JSON (atomically: a temporary file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


@lru_cache(maxsize=1)
def load_table(path: str | Path = TABLE_PATH) -> tuple[Emblem, ...]:
    """The committed emblems, in their fixed order (class indices of a judge's emblem head)."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))["emblems"]
    return tuple(
        Emblem(e["name"], int(e["code"]), tuple(e["synonyms"]), tuple(e["neighbours"]), bool(e["retained"]))
        for e in entries
    )


# ----------------------------------------------------------------------------------------------------
# Badge pixels and reading them back


def badge_size(cell_px: int) -> int:
    """Side of a badge in pixels: the grid, a gap and a frame on each side."""
    return GRID * cell_px + 2 * (GAP_PX + FRAME_PX)


def badge_pixels(code: int, cell_px: int, ink: Sequence[float], field: Sequence[float]) -> np.ndarray:
    """The badge of a code, (size, size, 3) float32 in [0, 1]."""
    size = badge_size(cell_px)
    ink_rgb, field_rgb = np.asarray(ink, np.float32), np.asarray(field, np.float32)
    on = np.ones((size, size), dtype=bool)
    inner = FRAME_PX
    on[inner : size - inner, inner : size - inner] = False
    start = FRAME_PX + GAP_PX
    grid = np.repeat(np.repeat(code_cells(code), cell_px, axis=0), cell_px, axis=1)
    on[start : start + GRID * cell_px, start : start + GRID * cell_px] = grid
    return np.where(on[..., None], ink_rgb, field_rgb).astype(np.float32)


def read_code(
    image: np.ndarray, x: int, y: int, cell_px: int, ink: Sequence[float], field: Sequence[float]
) -> tuple[int, np.ndarray]:
    """Read a badge whose top-left corner is at (x, y) of a uint8 (H, W, 3) image, knowing its inks.

    Each cell's centre (the cell less a one-pixel border, which blurs into its neighbours first) is projected on the
    field-to-ink axis; past halfway it is ink. Returns the code read and each cell's position on that axis (0 field,
    1 ink), (GRID, GRID).
    """
    start = FRAME_PX + GAP_PX
    ink_rgb, field_rgb = np.asarray(ink, np.float64), np.asarray(field, np.float64)
    axis = ink_rgb - field_rgb
    px = image.astype(np.float64) / 255
    border = 1 if cell_px >= 3 else 0
    level = np.empty((GRID, GRID))
    for r in range(GRID):
        for c in range(GRID):
            y0, x0 = y + start + r * cell_px + border, x + start + c * cell_px + border
            patch = px[y0 : y0 + cell_px - 2 * border, x0 : x0 + cell_px - 2 * border].reshape(-1, 3).mean(axis=0)
            level[r, c] = float((patch - field_rgb) @ axis / (axis @ axis))
    bits = (level > 0.5).ravel()
    return int((bits.astype(np.int64) << np.arange(GRID * GRID)).sum()), level


def nearest_code(code: int, codes: Sequence[int]) -> int:
    """Index of the code nearest to ``code`` (lowest index on ties): how a read grid becomes an emblem."""
    return min(range(len(codes)), key=lambda j: (hamming(code, codes[j]), j))
