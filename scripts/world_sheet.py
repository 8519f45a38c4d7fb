"""Render a contact sheet of the micro world: rows = styles, columns = objects (colours cycle)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from erase.core.layout import check_replaceable_file, check_writable_folder  # noqa: E402
from evals.microworld.world import contact_sheet  # noqa: E402
from pipelines.checks import check_option_minimums, error_line, run_script  # noqa: E402
from pipelines.files import atomic_write_bytes, png_bytes  # noqa: E402

#: the PNG text chunk every sheet carries: an existing --out holding it is an earlier sheet, which a rerun replaces
SHEET_MARK = {"erase": "world_sheet"}


def is_world_sheet(path: Path) -> bool:
    """Whether ``path`` is a PNG this script wrote (it carries :data:`SHEET_MARK`)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and all(image.text.get(k) == v for k, v in SHEET_MARK.items())
    except (OSError, ValueError):  # not an image, unreadable
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/world_sheet.png", help="output PNG path")
    parser.add_argument("--seed", type=int, default=0, help="layout seed")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling per cell")
    parser.add_argument("--no-labels", action="store_true", help="omit the style names column")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a sheet")
    args = parser.parse_args()
    try:
        check_option_minimums(args, {"seed": 0, "scale": 1})
        if not args.out.lower().endswith(".png"):
            raise ValueError(f"--out must name a .png file, got {args.out!r}")
        check_replaceable_file(args.out, "--out", lambda found: args.overwrite or is_world_sheet(found),
                               "an earlier world sheet", "choose another file, or pass --overwrite")  # fmt: skip
        check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
        sheet = contact_sheet(seed=args.seed, scale=args.scale, label=not args.no_labels)
        atomic_write_bytes(args.out, png_bytes(sheet, text=SHEET_MARK))
    except (ValueError, OSError) as err:
        parser.error(error_line(err))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_script(main))
