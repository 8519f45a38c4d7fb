"""Labelled image grids: the pictures people look at (erase.py's before/after, an audit's per-category grids)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["labelled_grid"]

# PIL's default bitmap font: about 6 px per character, 11 px per line.
_CHAR_W, _LINE_H = 6, 11


def labelled_grid(
    rows: Sequence[Sequence[Image.Image | np.ndarray | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str] = (),
    title: str = "",
    label_width: int = 240,
    max_cell: int = 256,
) -> Image.Image:
    """One row per label, images left to right (``None`` leaves a blank cell). Row labels are wrapped, never cut:
    a grid exists so a person can see which prompt made which image. Cells are at least 64 px, upscaled with
    nearest-neighbour so small images stay crisp."""
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    tiles = [[Image.fromarray(t) if isinstance(t, np.ndarray) else t for t in row] for row in rows]
    sizes = [t.size[0] for row in tiles for t in row if t is not None]
    columns = max([len(col_labels), *(len(row) for row in tiles)], default=0)
    chars = max(8, (label_width - 8) // _CHAR_W)
    wrapped = [textwrap.wrap(label, chars) or [""] for label in row_labels]
    cell = max(64, min(max(sizes, default=64), max_cell), max((len(w) * _LINE_H + 4 for w in wrapped), default=0))
    head = (_LINE_H + 8) * (bool(title) + bool(col_labels))
    grid = Image.new("RGB", (label_width + cell * columns, head + cell * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    y = 4
    if title:
        draw.text((4, y), title, fill="black")
        y += _LINE_H + 8
    for j, text in enumerate(col_labels):
        draw.text((label_width + j * cell + 4, y), text, fill="black")
    for i, (row, lines) in enumerate(zip(tiles, wrapped, strict=True)):
        top = head + i * cell
        draw.multiline_text((4, top + (cell - len(lines) * _LINE_H) // 2), "\n".join(lines), fill="black", spacing=0)
        for j, tile in enumerate(row):
            if tile is not None:
                grid.paste(
                    tile.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (label_width + j * cell, top)
                )
    return grid
