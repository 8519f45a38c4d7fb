#!/usr/bin/env python
"""Audit erasure artifacts: generate a prompt suite with the original model and each artifact, score, report.

python scripts/audit.py --out audits/micro                                     # the micro model alone
python scripts/audit.py --erasure erased/van-gogh-uce --out audits/vg          # before/after one erasure
python scripts/audit.py --erasure erased/van-gogh-uce --attack all --out audits/vg   # ... and every attack on it
python scripts/audit.py --erasure erased/van-gogh-uce --attack all --budget 4 --out audits/vg-x4   # 4x attack budgets
python scripts/audit.py --model CompVis/stable-diffusion-v1-4 --suite art_styles --erasure erased/vg --out a/vg
accelerate launch --num_processes 2 scripts/audit.py --erasure erased/vg --out audits/vg
accelerate launch --multi_gpu --num_processes 2 scripts/audit.py --device cpu ...   # two CPU processes

Writes OUT/metrics.json, OUT/report.html, OUT/grids/<category>.png and the images, and prints the verdict (each
erased concept's accuracy before -> after against the limits), the headline metrics and the per-concept table;
rerunning the same command resumes an interrupted audit. With --attack, each erased concept is attacked too (probes of
three prompt forms, on seeds apart from any a setting was tuned on) and the verdict counts the attacks: each threat
model (prompt, embedding, sampling: what the attacker controls) whose worst attack brings the concept back in more
than 10% of its images fails the erasure. Suites: "world" (the micro world, built for the erased
concepts), a shipped suite (art_styles, objects, general) or --prompts FILE (CSV/JSONL: prompt,seed,concept,category,
role).

With accelerate 1.x, ``accelerate launch --cpu`` starts one process unless mpirun is set up; on a CPU-only machine
``--multi_gpu`` (torchrun) with ``--device cpu`` starts real CPU processes, joined by gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS  # noqa: E402
from pipelines.checks import run_script  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="micro", help="'micro' (default), 'tiny', a local diffusers folder or hub id"
    )
    parser.add_argument("--erasure", action="append", default=[], help="erasure artifact or stack folder (repeatable)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--suite",
        help="'world' (default for micro), a shipped suite (art_styles, objects, general) or a file; default for"
        " other models: the erasures' targets and preserve sets, or 'general' without --erasure",
    )
    source.add_argument("--prompts", help="prompt suite file (.csv or .jsonl)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="seeds per suite row (default: 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default: 8)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default: {DEFAULT_STEPS})")
    parser.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the world suite's prompts (default: 0)")
    parser.add_argument(
        "--scorer", help="CLIP scorer: 'micro' (default for micro), a CLIP folder or open_clip:NAME/PRETRAINED"
    )
    parser.add_argument("--no-judge", action="store_true", help="skip the micro world's judge")
    parser.add_argument(
        "--attack",
        action="append",
        default=[],
        help="also attack each erased concept: an attack name or 'all' (repeatable); adds an attacks section",
    )
    parser.add_argument("--attack-images", type=int, default=48, help="probes per attack row (default: 48)")
    parser.add_argument("--budget", default="1", help="multiplier of every attack's budget fields (default: 1)")
    parser.add_argument("--out", required=True, help="output folder (an existing audit there is resumed)")
    parser.add_argument("--device", help="torch device (default: accelerate's device for this process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="log progress details")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from erase.core.layout import check_erasure_folder
    from pipelines.checks import check_option_minimums, error_line

    try:  # what needs no model is checked before torch is imported
        check_option_minimums(args, {"images_per_prompt": 1, "batch_size": 1, "steps": 1, "attack_images": 1})
        for folder in args.erasure:
            check_erasure_folder(folder)
    except ValueError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.model in ("micro", "tiny", "tiny-sdxl") or os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from accelerate import PartialState

    from erase import ArtifactError
    from erase.stack import read_erasure
    from erase.workflow import audit_models
    from evals.audit import (
        AuditError,
        check_audit_folder,
        check_output_folder,
        generation_summary,
        per_concept_table,
        run_audit,
        summary_table,
        verdict_text,
    )
    from evals.suites import SuiteError, concept_suite, resolve_suite
    from pipelines import (
        ModelNotFoundError,
        check_model_reference,
        load_pipeline,
        model_architecture,
        resolve_device,
        set_library_verbosity,
        world_file,
    )
    from pipelines.files import claim_folder

    set_library_verbosity(args.verbose)
    claim = contextlib.ExitStack()  # the --out folder, held by the main process from its check to the end of the run
    try:
        from evals.attacks import parse_budget

        budget = parse_budget(args.budget)
        if budget != 1.0 and not args.attack:
            raise ValueError("--budget multiplies the attacks' budgets: give --attack too")
        # Everything that can be checked is checked before the scorer and the model load: the device, the output
        # folder, the artifacts, the suite.
        device = resolve_device(args.device) if args.device is not None else None
        # accelerate only forms a multi-process CPU group when asked for the CPU explicitly (and its --cpu launcher
        # starts a single process without mpirun), so on a machine without an accelerator the state is built with
        # cpu=True.
        use_cpu = (
            (device is not None and device.type == "cpu")
            or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
            or not torch.cuda.is_available()
        )
        state = PartialState(cpu=use_cpu)
        main_process = state.is_main_process
        device = device or state.device
        check_output_folder(args.out)
        check_audit_folder(args.out)
        if main_process:  # the processes of one launch write one audit together
            claim.enter_context(claim_folder(args.out))
        attacks = []
        from evals.attacks import resolve_attacks

        if args.attack:
            attacks = resolve_attacks(args.attack)
            if not args.erasure:
                raise ValueError("--attack needs an --erasure to attack")
        artifacts = [read_erasure(folder) for folder in args.erasure]  # artifacts, or stacks of them
        targets = [c for a in artifacts for c in a.concepts]
        micro = world_file(args.model) is not None
        if args.prompts:
            suite = resolve_suite(args.prompts)
        elif args.suite or micro or not artifacts:
            suite_name = args.suite or ("world" if micro else "general")
            suite = resolve_suite(suite_name, targets if suite_name == "world" else (), seed=args.seed)
        else:
            # A hub model with erasures and no suite: the erasures' own targets and preserve sets.
            preserve = [p for a in artifacts for p in a.preserve]
            suite = concept_suite(targets, preserve, seed=args.seed)
        steps, guidance = args.steps, args.guidance
        check_model_reference(args.model)
        if attacks:  # an attack the model's kind refuses: before the scorer and the model load, where that is known
            attacks = resolve_attacks(args.attack, model_architecture(args.model))
        from evals.scorer import default_scorer, load_scoring

        scorer_name, scorer, judge = args.scorer or default_scorer(args.model), None, None
        if main_process:  # only the main process scores; the others just generate
            scorer_name, scorer, judge = load_scoring(
                args.model, args.scorer, judge=not args.no_judge, device=device, progress=not args.quiet
            )
        wrapper = load_pipeline(args.model, device=device)
        if attacks:
            attacks = resolve_attacks(args.attack, wrapper.architecture)  # a hub model's kind is known once it loads
        result = run_audit(
            wrapper,
            suite,
            audit_models(wrapper, args.erasure, artifacts),
            args.out,
            scorer,
            judge,
            images_per_prompt=args.images_per_prompt,
            batch_size=args.batch_size,
            steps=steps,
            guidance=guidance,
            process_index=state.process_index,
            num_processes=state.num_processes,
            progress=not args.quiet and main_process,
            barrier=state.wait_for_everyone,
            scorer_name=scorer_name,
            attacks=attacks,
            attack_probes=args.attack_images,
            attack_budget=budget,
        )
    except (ValueError, TypeError, OSError, ModelNotFoundError, ArtifactError, SuiteError, AuditError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        claim.close()
    if main_process:
        print(verdict_text(result))
        print()
        print(summary_table(result))
        print()
        print(per_concept_table(result))
        if result.get("attacks"):
            from evals.attacks.suite import asr_table

            for section in result["attacks"]:
                print(f"\nattacks on {section['label']}:")
                print(asr_table(section))
        print(f"\n{generation_summary(args.out, state.num_processes)}")
        print(f"metrics: {os.path.join(args.out, 'metrics.json')}")
        print(f"report:  {os.path.join(args.out, 'report.html')}")
        print(f"grids:   {os.path.join(args.out, 'grids')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
