#!/usr/bin/env python
"""Benchmark the SAE family's runtime cost: generation with an attached intervention against the bare pipeline.

    python scripts/bench_sae.py                                   # itd and saeuron on micro, van gogh
    python scripts/bench_sae.py --method saeuron --images 32 --repeats 5
    python scripts/bench_sae.py --erasure erased/van-gogh-itd     # an artifact you made

Same prompts and seeds both ways (half name the concept, so itd's gate fires on them), timed alternately (bare,
attached, bare, ...) to cancel drift; prints the median seconds of each and the overhead, and how many images the
attachment changed (concept prompts and the others, last round), which shows the intervention ran. ``--json`` prints
the same as one JSON object. Goals: itd at most 5%, saeuron at most 15%.

Figures: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

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
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return parser.parse_args(argv)


def overhead(wrapper, artifact, prompts: list[str], seeds: list[int], steps: int, repeats: int) -> dict:  # noqa: ANN001
    """Median seconds of generating ``prompts`` bare and with the artifact attached (one warm-up each first), the
    overhead ``attached / bare - 1``, and which images of the last round the attachment changed."""
    bare, attached = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        bare_images = wrapper.generate(prompts, seeds, steps=steps, progress=False)
        middle = time.perf_counter()
        with artifact.applied(wrapper):
            attached_images = wrapper.generate(prompts, seeds, steps=steps, progress=False)
        if i:  # the first round warms both up
            bare.append(middle - start)
            attached.append(time.perf_counter() - middle)
    bare_median, attached_median = statistics.median(bare), statistics.median(attached)
    changed = [a.tobytes() != b.tobytes() for a, b in zip(attached_images, bare_images, strict=True)]
    return {
        "bare_seconds": bare_median,
        "attached_seconds": attached_median,
        "overhead": attached_median / bare_median - 1,
        "changed_images": changed,
    }


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
    templates = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    prompts, seeds = [t.format(concept) for t in templates], list(range(args.images))
    names_concept = ["{}" in t for t in templates]
    results = {}
    for method, artifact in artifacts.items():
        result = overhead(wrapper, artifact, prompts, seeds, args.steps, args.repeats)
        changed = result.pop("changed_images")
        result["hook_point"] = artifact.layers[0]
        result["concept_images"] = sum(names_concept)
        result["concept_images_changed"] = sum(c for c, named in zip(changed, names_concept, strict=True) if named)
        result["other_images"] = args.images - sum(names_concept)
        result["other_images_changed"] = sum(c for c, named in zip(changed, names_concept, strict=True) if not named)
        results[method] = result
        if not args.json:
            print(f"{method:8s} {args.images} images x {args.steps} steps: bare {result['bare_seconds']:.2f} s, "
                  f"attached {result['attached_seconds']:.2f} s, overhead {100 * result['overhead']:+.1f}%, "
                  f"changed {result['concept_images_changed']}/{result['concept_images']} concept images and "
                  f"{result['other_images_changed']}/{result['other_images']} others  "
                  f"(hook point {result['hook_point']})")  # fmt: skip
    if args.json:
        settings = {"model": args.model, "concept": concept, "images": args.images, "steps": args.steps,
                    "repeats": args.repeats}  # fmt: skip
        print(json.dumps({**settings, "methods": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
