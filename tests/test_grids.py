import numpy as np
import pytest
from PIL import Image

from evals.grids import labelled_grid


def _ink_rows(grid: Image.Image, label_width: int) -> int:
    labels = np.asarray(grid.convert("L"))[:, :label_width]
    return int((labels < 128).any(axis=1).sum())


def test_long_labels_wrap_instead_of_being_cut():
    tile = np.full((64, 64, 3), 200, dtype=np.uint8)
    short = labelled_grid([[tile, tile]], ["a star"], ["before", "after"])
    long_label = "something yellow in the style of vincent van gogh, with a second clause to make it wrap twice"
    long = labelled_grid([[tile, tile]], [long_label], ["before", "after"])
    assert long.size[0] == short.size[0] == 240 + 2 * 64
    # the whole prompt is drawn: its ink covers several text lines, the short one a single line
    assert _ink_rows(long, 240) > 2 * _ink_rows(short, 240)


def test_grid_layout_and_blank_cells():
    tile = Image.new("RGB", (32, 32), (255, 0, 0))
    grid = labelled_grid([[tile, None], [None, tile]], ["one", "two"], title="t")
    assert grid.size[0] == 240 + 2 * 64  # cells are at least 64 px
    pixels = np.asarray(grid)
    top = grid.size[1] - 2 * 64
    assert (pixels[top + 10, 240 + 10] == [255, 0, 0]).all() and (pixels[top + 10, 240 + 64 + 10] == 255).all()
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid([[tile]], ["a", "b"])
