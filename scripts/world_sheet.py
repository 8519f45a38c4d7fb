"""Render a contact sheet of the micro world: rows = styles, columns = objects (colours cycle)."""

from __future__ import annotations

import argparse

from evals.microworld.world import contact_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/world_sheet.png", help="output PNG path")
    parser.add_argument("--seed", type=int, default=0, help="layout seed")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling per cell")
    parser.add_argument("--no-labels", action="store_true", help="omit the style names column")
    args = parser.parse_args()
    contact_sheet(seed=args.seed, scale=args.scale, label=not args.no_labels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
