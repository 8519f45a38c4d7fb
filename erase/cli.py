"""Erase concepts from a Stable Diffusion model and save an artifact any diffusers app can load.

erase-concept --concept "van gogh"
erase-concept --concept "van gogh" --concept monet --out erased/impressionists
erase-concept --concept "a dog" --concept-type object --guide "an animal"
erase-concept --model CompVis/stable-diffusion-v1-4 --concept "van gogh" --device cuda
erase-concept --model ./my-sd-folder --concept "van gogh" --no-check        # offline, no scorer
erase-concept --concept "van gogh" --set token_positions=from_last --set lamb=1.0
erase-concept --concept "van gogh" --method esd --lr 1e-3 --steps 200   # LoRA training
erase-concept --concept "van gogh" --method uce+saeuron --set saeuron.steps=20   # a stack: uce, then saeuron on it
erase-concept --list-methods

``python scripts/erase.py`` and ``python -m erase.cli`` take the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

# The command line's front end (``erase-concept``, ``python scripts/erase.py``): the one module of erase that reads
# argv and the environment and prints; the library it calls does none of these.
from pipelines.checks import run_script

from .core.inputs import CONCEPT_TYPES, DEFAULT_CONCEPT_TYPE, PRESERVE_SETS, error_line  # torch-free

__all__ = ["EXIT_BAD_INPUT", "main", "parse_args"]

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to erase")
    what.add_argument("--concept", action="append", help="concept to erase (repeatable)")
    what.add_argument(
        "--concept-type",
        default=DEFAULT_CONCEPT_TYPE,
        choices=sorted(CONCEPT_TYPES),
        help="sets the default guide and --expand-prompts' templates, as the reference UCE does: 'art' guides to "
        "'art', 'object' and 'other' to the empty prompt (default: art)",
    )
    what.add_argument("--guide", action="append", help="what each concept becomes (default: by --concept-type)")
    what.add_argument("--preserve", action="append", help="concept to keep intact (repeatable; default: none)")
    what.add_argument(
        "--preserve-set",
        action="append",
        choices=PRESERVE_SETS,
        default=[],
        help="add a named preserve set: 'world' (every other micro-world concept) or 'generic' (common artists and "
        "subjects)",
    )
    what.add_argument(
        "--expand-prompts", action="store_true", help="also edit the concept in its type's five templates"
    )
    how = parser.add_argument_group("how")
    how.add_argument(
        "--method", default="uce",
        help="erasure method (default: uce; see --list-methods), or a stack of methods applied in order, each made "
        "with the earlier ones in force: uce+saeuron",
    )  # fmt: skip
    how.add_argument("--list-methods", action="store_true", help="list the erasure methods and exit")
    how.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of the method's config (VALUE is JSON, or a plain string), e.g. lamb=1.0 (repeatable); in a "
        "stack, saeuron.steps=20 sets one member's, a plain KEY every member's that has it",
    )
    train = parser.add_argument_group("training (the LoRA methods: esd, ca, spm)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the method's)")
    train.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    train.add_argument("--rank", type=int, help="LoRA rank (default: the method's)")
    train.add_argument(
        "--restart", action="store_true", default=None,
        help="start afresh: delete the run's checkpoints in --set checkpoint_dir=... (a damaged one, say) first",
    )  # fmt: skip
    how.add_argument(
        "--model",
        default="micro",
        help="'micro' (embedded default), 'tiny', 'tiny-sd2', 'tiny-sdxl', 'tiny-sd3' or 'tiny-flux' (random test "
        "pipelines), a local diffusers folder (SD 1.x/2.x, SDXL, SD3, Flux), or a hub id such as "
        "CompVis/stable-diffusion-v1-4",
    )
    how.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps (default: cpu)")
    how.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    out = parser.add_argument_group("output")
    out.add_argument("--out", help="artifact folder (default: erased/<concept>-<method>)")
    out.add_argument("--overwrite", action="store_true", help="replace an earlier artifact at --out")
    out.add_argument(
        "--format",
        default="diffusers",
        choices=["diffusers", "kohya"],
        help="'kohya' also writes the LoRA in the key layout Automatic1111, ComfyUI and kohya-ss read, "
        "lora_kohya.safetensors in the artifact (default: diffusers only)",
    )
    out.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument("--verbose", action="store_true", help="log details, and show the libraries' loading bars")
    check = parser.add_argument_group("the before/after check on fixed seeds")
    check.add_argument("--no-check", action="store_true", help="skip it (needs no scorer: use offline on SD)")
    check.add_argument("--check-images", type=int, default=8, help="images per group (default: 8)")
    check.add_argument("--check-steps", type=int, help="sampling steps (default: 20)")
    check.add_argument("--check-guidance", type=float, help="classifier-free guidance scale (default: 7.5)")
    check.add_argument(
        "--seed", type=int, default=0, help="seed of the training (LoRA methods) and of the check (default: 0)"
    )
    check.add_argument(
        "--scorer",
        help="CLIP scorer: 'micro', a local CLIP folder or open_clip:NAME/PRETRAINED (default: micro for the micro "
        "model, open_clip:ViT-L-14/openai otherwise)",
    )
    args = parser.parse_args(argv)
    if not args.concept and not args.list_methods:
        parser.error("the following arguments are required: --concept")
    return args


def validate_early(args: argparse.Namespace) -> None:
    """Everything that needs neither torch nor the model: concepts, numbers, --set, --out."""
    from .core.inputs import check_concept_text, check_option_minimums
    from .core.layout import check_output_folder, default_output_folder

    concepts = [check_concept_text(c, "concept to erase") for c in args.concept]
    check_option_minimums(args, {"check_images": 1, "check_steps": 1, "steps": 1, "rank": 1, "seed": 0,
                                 "check_guidance": 0})  # fmt: skip
    if args.lr is not None and not 0 < args.lr < 1:
        raise ValueError(f"--lr must be in (0, 1), got {args.lr}")
    config_overrides(args)
    check_output_folder(args.out or default_output_folder(concepts, args.method), args.overwrite)


def config_overrides(args: argparse.Namespace, member_fields: dict[str, set[str]] | None = None) -> dict:
    """``--set`` plus the training flags as config fields; ``member_fields`` (each member's config fields, one member
    for a single method) refuses a flag no member has. ``--seed`` seeds each member that has a seed and was given
    none; the check always."""
    from .core.inputs import parse_config_overrides

    overrides = parse_config_overrides(args.set)
    for flag in ("steps", "lr", "rank", "restart"):
        value = getattr(args, flag)
        if value is None:
            continue
        if flag in overrides:
            raise ValueError(f"--{flag} and --set {flag}=... both given: give one")
        if member_fields is not None and not any(flag in f for f in member_fields.values()):
            raise ValueError(f"--{flag} does not apply to method {args.method!r}: it has no {flag} setting")
        overrides[flag] = value
    for member, fields in (member_fields or {}).items():
        if "seed" in fields and "seed" not in overrides and f"{member}.seed" not in overrides:
            overrides["seed" if len(member_fields) == 1 else f"{member}.seed"] = args.seed
    return overrides


def print_summary(summary) -> None:  # noqa: ANN001 - erase.workflow.EraseSummary
    guides = ", ".join(repr(g) for g in summary.extra["guides"])
    print(f"Erased {', '.join(repr(c) for c in summary.concepts)} from {summary.model} with {summary.method}")
    guided = f"guided to {guides}; " if summary.extra["guides"] else ""  # empty: the method takes no guide
    print(f"  {guided}{len(summary.extra['preserve'])} concept(s) preserved")
    if "members" in summary.extra:
        print(f"  edit took {summary.edit_seconds:.3f} s: a stack of {' then '.join(summary.extra['members'])}, "
              f"{summary.layers} modules")  # fmt: skip
    elif summary.weight_format == "intervention":
        info = summary.extra["info"]
        features = f"{info['features']} features" if "features" in info else "per-timestep features"
        print(f"  edit took {summary.edit_seconds:.3f} s: an SAE intervention at {info['hook_point']} ({features})")
    else:
        took = f"{summary.edit_seconds:.3f} s over {summary.layers} layers ({summary.weight_format} weights)"
        print(f"  edit took {took}")
        median, largest = summary.relative_change_median, summary.relative_change_max
        print(f"  edit size           {median:.3f} (median), {largest:.3f} (max) of each weight's norm")
    if summary.check:
        c = summary.check
        print(f"  target accuracy     {c.target_before:6.1%} -> {c.target_after:6.1%}  (lower is better)")
        print(
            f"  preserved accuracy  {c.preserved_before:6.1%} -> {c.preserved_after:6.1%}  ({c.images} images scored)"
        )
        print(f"  before/after grid:  {summary.grid}")
    for warning in summary.warnings:
        print(f"  warning: {warning}")
    print(f"  artifact:           {summary.out}")
    if "kohya_lora" in summary.extra:
        print(f"  for A1111/ComfyUI:  {summary.extra['kohya_lora']}  (copy it to their LoRA folder)")
    print(f"  load it:            import erase; {summary.load_code}  (handle.remove() undoes it)")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), erase, print the summary; the exit code (0, 2 on bad input, 130
    when interrupted, 1 when the summary cannot be written: ``pipelines.checks.run_script``)."""
    return run_script(lambda: erase_main(argv))


def erase_main(argv: list[str] | None) -> int:
    """:func:`main`'s work."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.model in ("micro", "tiny", "tiny-sd2", "tiny-sdxl", "tiny-sd3", "tiny-flux") or os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise ValueError(
                "erase-concept (scripts/erase.py) runs as one process: for multi-process training launch your own "
                "script that calls erase.erase_concepts (see the README)"
            )
        if not args.list_methods:
            validate_early(args)
        import torch

        from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, resolve_device, set_library_verbosity

        from . import available_methods, get_method
        from .core.inputs import config_from_overrides
        from .stack import member_overrides, parse_method_stack
        from .workflow import run_erase

        if args.list_methods:
            for name in available_methods():
                method = get_method(name)
                print(f"{name:8s} {method.family:12s} {method.summary}")
            return 0
        set_library_verbosity(args.verbose)
        methods = parse_method_stack(args.method)
        if args.format == "kohya" and len(methods) > 1:
            raise ValueError(f"--format kohya: the stack {args.method} is several erasures, not one LoRA")
        if args.format == "kohya" and get_method(methods[0]).runtime:
            raise ValueError(f"--format kohya: {args.method} changes no weights (a runtime edit): it has no LoRA form")
        classes = {m: get_method(m).config_class for m in methods}
        overrides = config_overrides(args, {m: {f.name for f in dataclasses.fields(c)} for m, c in classes.items()})
        for m, member in member_overrides(methods, overrides).items():  # values, before the model
            try:
                config_from_overrides(classes[m], member, f"method {m!r}")
            except ValueError as err:  # in a stack, say whose setting it is
                raise ValueError(f"{m}: {error_line(err)}" if len(methods) > 1 else error_line(err)) from None
        device = resolve_device(args.device)
        start = time.perf_counter()
        wrapper = load_pipeline(args.model, device=device, dtype=getattr(torch, args.dtype))
        load_seconds = time.perf_counter() - start
        summary = run_erase(
            wrapper,
            args.concept,
            method=args.method,
            concept_type=args.concept_type,
            guides=args.guide,
            preserve=args.preserve,
            preserve_sets=args.preserve_set,
            expand_prompts=args.expand_prompts,
            out=args.out,
            overwrite=args.overwrite,
            check=not args.no_check,
            check_images=args.check_images,
            check_steps=args.check_steps or DEFAULT_STEPS,
            check_guidance=DEFAULT_GUIDANCE if args.check_guidance is None else args.check_guidance,
            check_seed=args.seed,
            scorer=args.scorer,
            config_overrides=overrides,
            progress=not (args.quiet or args.json),
            lora_format=args.format,
        )
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:  # bad input; ModelNotFoundError and ArtifactError included
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary.extra["load_seconds"] = load_seconds
    if args.json:
        print(summary.to_json())
        for warning in summary.warnings:  # in the JSON too; said where a person reads it
            print(f"warning: {warning}", file=sys.stderr)
    else:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
