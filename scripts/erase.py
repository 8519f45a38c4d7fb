#!/usr/bin/env python
"""Erase concepts from a Stable Diffusion model and save an artifact any diffusers app can load.

python scripts/erase.py --concept "van gogh"
python scripts/erase.py --concept "van gogh" --concept monet --method uce --out erased/impressionists
python scripts/erase.py --model CompVis/stable-diffusion-v1-4 --concept "van gogh" --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

# This file is named like the package it drives; drop its own folder from the import path so that
# ``import erase`` finds the package, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", action="append", required=True, help="concept to erase (repeatable)")
    parser.add_argument("--method", default="uce", help="erasure method (default: uce; see --list-methods)")
    parser.add_argument(
        "--model", default="micro", help="'micro' (embedded default), a local diffusers folder or hub id"
    )
    parser.add_argument("--guide", action="append", help="what each concept becomes (default: the empty prompt)")
    parser.add_argument("--preserve", action="append", help="concept to keep intact (repeatable; default: a set)")
    parser.add_argument("--out", help="artifact folder (default: erased/<concept>-<method>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-check", action="store_true", help="skip the before/after check on fixed seeds")
    parser.add_argument("--check-images", type=int, default=8, help="images per group in the check (default: 8)")
    parser.add_argument("--scorer", help="CLIP scorer for the check (default: micro for the micro model)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    parser.add_argument("--verbose", action="store_true", help="log progress details")
    return parser.parse_args(argv)


def print_summary(summary) -> None:  # noqa: ANN001 - erase.workflow.EraseSummary
    print(f"Erased {', '.join(repr(c) for c in summary.concepts)} from {summary.model} with {summary.method}")
    print(f"  edit took {summary.edit_seconds:.3f} s over {summary.layers} layers ({summary.weight_format} weights)")
    if summary.check:
        c = summary.check
        print(f"  target accuracy     {c.target_before:6.1%} -> {c.target_after:6.1%}  (lower is better)")
        print(
            f"  preserved accuracy  {c.preserved_before:6.1%} -> {c.preserved_after:6.1%}  ({c.images} images scored)"
        )
        print(f"  before/after grid:  {summary.grid}")
    print(f"  artifact:           {summary.out}")
    print(f"  load it in diffusers: {summary.load_code}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.model in ("micro", "tiny") or os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from erase import ArtifactError, get_method
    from erase.workflow import run_erase
    from pipelines import ModelNotFoundError, load_pipeline

    try:
        get_method(args.method)
        if args.check_images < 1:
            raise ValueError(f"--check-images must be >= 1, got {args.check_images}")
        start = time.perf_counter()
        wrapper = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        load_seconds = time.perf_counter() - start
        summary = run_erase(
            wrapper,
            args.concept,
            method=args.method,
            guides=args.guide,
            preserve=args.preserve,
            out=args.out,
            overwrite=args.overwrite,
            check=not args.no_check,
            check_images=args.check_images,
            scorer=args.scorer,
        )
    except (ValueError, TypeError, ModelNotFoundError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary.extra["load_seconds"] = load_seconds
    if args.json:
        print(summary.to_json())
    else:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
