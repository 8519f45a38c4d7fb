#!/usr/bin/env python
"""Benchmark the SAE family's runtime cost: generation with an attached intervention against the bare pipeline.

    python scripts/bench_sae.py                                   # itd and saeuron on micro, van gogh
    python scripts/bench_sae.py --method saeuron --images 32 --repeats 5
    python scripts/bench_sae.py --erasure erased/van-gogh-itd     # an artifact you made

Same prompts and seeds both ways (half name the concept, so itd's gate fires on them), timed alternately (bare,
attached, bare, ...) to cancel drift; prints the median seconds of each and the overhead. Goals: itd at most 5%,
saeuron at most 15%.

Figures: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import erase  # noqa: E402
from erase.core.inputs import (  # noqa: E402
    check_concept_text,
    check_option_minimums,
    config_from_overrides,
    error_line,
    parse_config_overrides,
)
from pipelines import load_pipeline, set_library_verbosity  # noqa: E402

PROMPTS = ("a red star in the style of {}", "a blue circle, {}", "a green moon", "a yellow heart drawing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="micro")
    parser.add_argument("--method", action="append", help="a runtime (SAE) method; default: every one registered")
    parser.add_argument("--erasure", help="an SAE-family artifact folder instead of making one")
    parser.add_argument("--concept", default="van gogh")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method setting")
    parser.add_argument("--images", type=int, default=16, help="images per timed run (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs each way (default: 3)")
    return parser.parse_args(argv)


def overhead(wrapper, artifact, prompts: list[str], seeds: list[int], steps: int, repeats: int) -> tuple:  # noqa: ANN001
    """Median seconds of generating ``prompts`` bare and with the artifact attached (one warm-up each first)."""
    bare, attached = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        wrapper.generate(prompts, seeds, steps=steps, progress=False)
        middle = time.perf_counter()
        with artifact.applied(wrapper):
            wrapper.generate(prompts, seeds, steps=steps, progress=False)
        if i:  # the first round warms both up
            bare.append(middle - start)
            attached.append(time.perf_counter() - middle)
    return statistics.median(bare), statistics.median(attached)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_library_verbosity(False)
    try:
        check_option_minimums(args, {"images": 1, "steps": 1, "repeats": 1})
        concept = check_concept_text(args.concept, "concept to erase")
        overrides = parse_config_overrides(args.set)
        artifacts, configs = {}, {}
        if args.erasure:
            artifact = erase.load_artifact(args.erasure)
            artifacts[artifact.method] = artifact
        else:
            runtime = [m for m in erase.available_methods() if erase.get_method(m).runtime]
            for method in args.method or runtime:
                if method not in runtime:
                    raise ValueError(f"{method!r} is no runtime method; runtime methods: {', '.join(runtime)}")
                configs[method] = config_from_overrides(erase.get_method(method).config_class, overrides, method)
        wrapper = load_pipeline(args.model)
        for method, config in configs.items():
            artifacts[method] = erase.erase_concepts(wrapper, erase.ConceptSpec((concept,)), method, config)
        for method, artifact in artifacts.items():
            if not erase.get_method(artifact.method).runtime:
                raise ValueError(f"{method} is not a runtime intervention")
            erase.check_artifact_base(wrapper, artifact)
    except (ValueError, TypeError, KeyError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    prompts = [PROMPTS[i % len(PROMPTS)].format(concept) for i in range(args.images)]
    seeds = list(range(args.images))
    for method, artifact in artifacts.items():
        bare, attached = overhead(wrapper, artifact, prompts, seeds, args.steps, args.repeats)
        print(f"{method:8s} {args.images} images x {args.steps} steps: bare {bare:.2f} s, attached {attached:.2f} s, "
              f"overhead {100 * (attached / bare - 1):+.1f}%  (hook point {artifact.layers[0]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
