"""Render a contact sheet of the micro world: rows = styles, columns = objects (colours cycle)."""

from __future__ import annotations

import argparse
import os
import sys

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from erase.core.layout import check_writable_folder  # noqa: E402
from evals.microworld.world import contact_sheet  # noqa: E402
from pipelines.checks import check_option_minimums, error_line, run_script  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/world_sheet.png", help="output PNG path")
    parser.add_argument("--seed", type=int, default=0, help="layout seed")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling per cell")
    parser.add_argument("--no-labels", action="store_true", help="omit the style names column")
    args = parser.parse_args()
    try:
        check_option_minimums(args, {"seed": 0, "scale": 1})
        if not args.out.lower().endswith(".png"):
            raise ValueError(f"--out must name a .png file, got {args.out!r}")
        folder = check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
        folder.mkdir(parents=True, exist_ok=True)
        contact_sheet(seed=args.seed, scale=args.scale, label=not args.no_labels).save(args.out)
    except (ValueError, OSError) as err:
        parser.error(error_line(err))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_script(main))
