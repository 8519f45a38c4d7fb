#!/usr/bin/env python
"""Throughput of the audit's image generation against a bare diffusers loop at the same batch size.

    python scripts/bench_audit.py                                   # micro model, 64 images, batch 8, 20 steps
    python scripts/bench_audit.py --model tiny --images 128 --steps 4

The audit side is ``evals.audit.generate_audit_images`` into a fresh folder: per-seed starting noise, generation,
PNG encoding and atomic writes. The bare side is ``pipe(prompt=[...], generator=[...], output_type="pil")`` over the
same prompts, seeds and batches, writing nothing. Both get one warm-up batch first, then they alternate in rounds.
Prints images/s for each and the ratio (audit / bare; 1.0 means the audit adds no overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from evals.audit import ORIGINAL, AuditModel, generate_audit_images  # noqa: E402
from evals.suites import world_suite  # noqa: E402
from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, resolve_device  # noqa: E402
from pipelines.checks import check_option_minimums, error_line, run_script  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="micro")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--round-images", type=int, default=16, help="images per alternating round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    try:
        check_option_minimums(args, {"images": 1, "batch_size": 1, "steps": 1, "guidance": 0, "round_images": 1,
                                     "threads": 1})  # fmt: skip
        device = resolve_device(args.device)
        wrapper = load_pipeline(args.model, device=device)
    except (ValueError, TypeError, OSError) as err:
        parser.error(error_line(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = world_suite(["van gogh"])
    rows = [suite.rows[i % len(suite.rows)] for i in range(args.images)]
    rows = [type(r)(r.prompt, r.seed + i, r.concept, r.category, r.role) for i, r in enumerate(rows)]
    prompts, seeds = [r.prompt for r in rows], [r.seed for r in rows]
    pipe, size, b = wrapper.pipe, wrapper.image_size, args.batch_size

    def bare(start: int, stop: int) -> None:
        for i in range(start, stop, b):
            chunk = slice(i, min(i + b, stop))
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
            pipe(
                prompt=prompts[chunk],
                negative_prompt=[""] * len(prompts[chunk]),
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=size,
                width=size,
                generator=generators,
                output_type="pil",
            )

    def audit(out: str, selection: list) -> None:
        generate_audit_images(
            wrapper,
            selection,
            [AuditModel(ORIGINAL, ORIGINAL)],
            out,
            batch_size=b,
            steps=args.steps,
            guidance=args.guidance,
            progress=False,
        )

    # Rounds alternate audit and bare over the same images, so drift (other load, clock changes) hits both alike.
    audit_s = bare_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        bare(0, b)  # warm-up
        audit(os.path.join(tmp, "warm"), rows[:b])
        for round_start in range(0, len(rows), args.round_images):
            stop = min(round_start + args.round_images, len(rows))
            start = time.perf_counter()
            audit(os.path.join(tmp, "run"), rows[round_start:stop])
            audit_s += time.perf_counter() - start
            start = time.perf_counter()
            bare(round_start, stop)
            bare_s += time.perf_counter() - start
    n = len(rows)
    print(f"model {wrapper.model_id}, {n} images, batch {b}, {args.steps} steps, device {args.device}")
    print(f"  audit generation (PNG writes included): {n / audit_s:8.2f} images/s  ({audit_s:.2f} s)")
    print(f"  bare diffusers loop:                    {n / bare_s:8.2f} images/s  ({bare_s:.2f} s)")
    print(f"  8 images (bare loop):                   {8 * bare_s / n:8.2f} s")
    print(f"  ratio audit / bare:                     {bare_s / audit_s:8.3f}")


if __name__ == "__main__":
    sys.exit(run_script(main))
