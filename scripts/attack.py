#!/usr/bin/env python
"""Attack an erasure: try to bring its concept back, and report the attack success rate of each attack.

python scripts/attack.py --erasure erased/van-gogh-uce --out attacks/vg-uce                  # every attack
python scripts/attack.py --erasure erased/van-gogh-uce --attack rece_embedding --out attacks/vg
python scripts/attack.py --erasure erased/van-gogh-uce --attack noise_probe --set noise_probe.candidates=16 --out a/vg
python scripts/attack.py --erasure erased/van-gogh-uce --budget 4 --out attacks/vg-uce-x4       # 4x every budget

For each erased concept: N probe prompts naming it (--images, default 48) drawn by the original model, by the erased
model, and by the erased model under each attack. The probes' prompts take three forms in turn (the concept alone in
the world's templates, with one other attribute, with both: "a blue heart in the style of van gogh") on the
``report`` seeds (--split tune for the seeds settings are chosen on). The success rate of a row is the share of its
images the scorer (and on the micro world the judge) reads as the erased concept, with its Wilson 95% interval,
overall and per prompt form; rows whose forms differ by more than 5 points are listed. Each attack belongs to a
threat model (what the attacker controls: prompt, embedding, sampling); the verdict per threat model is the worst
rate within it. --budget K multiplies the fields of every attack's config that set its cost (steps, candidates,
generations; evals.attacks.budget_fields), after --set. Writes, per concept, OUT/<concept>/attack.json (settings),
OUT/<concept>/<row>/ (images, result.json), OUT/<concept>/comparison.png and OUT/<concept>/attacks.json (the table),
and prints the table; rerunning the same command resumes (a run at another budget needs another --out). Attacks: see
evals/attacks/__init__.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--erasure", required=True, help="erasure artifact folder, or a stack folder")
    parser.add_argument("--attack", action="append", help="attack name, or 'all' (default: all; repeatable)")
    parser.add_argument("--out", required=True, help="output folder (an earlier run there is resumed)")
    parser.add_argument("--model", help="base model (default: the artifact's own base model)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="an attack's budget setting, e.g. noise_probe.candidates=4 (repeatable; see evals/attacks)",
    )
    parser.add_argument("--budget", default="1", help="multiplier of every attack's budget fields (default: 1)")
    parser.add_argument("--images", type=int, default=48, help="probes (images) per row (default: 48)")
    parser.add_argument(
        "--split",
        default="report",
        choices=("tune", "report"),
        help="seed set of the probes: settings are tuned on 'tune', reported on 'report' (default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes and the attacks (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per generation batch (default: 16)")
    parser.add_argument(
        "--scorer", help="CLIP scorer: 'micro' (default for micro), a CLIP folder or open_clip:NAME/PRETRAINED"
    )
    parser.add_argument("--no-judge", action="store_true", help="skip the micro world's judge")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="log progress details")
    return parser.parse_args(argv)


def budget_overrides(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``ATTACK.KEY=VALUE`` pairs as ``{attack: {key: value}}`` (values read as JSON where they parse)."""
    from erase.core.inputs import parse_config_overrides

    grouped: dict[str, dict[str, object]] = {}
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot or "=" not in rest:
            raise ValueError(f"--set {pair!r}: expected ATTACK.KEY=VALUE, e.g. noise_probe.candidates=4")
        grouped.setdefault(name, {}).update(parse_config_overrides([rest]))
    return grouped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from erase.core.layout import check_erasure_folder
    from pipelines.checks import check_option_minimums, error_line

    try:  # what needs no model is checked before torch is imported
        check_option_minimums(args, {"images": 1, "batch_size": 1})
        check_erasure_folder(args.erasure)
    except ValueError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from erase import ArtifactError
    from erase.stack import check_erasure_base, read_erasure
    from evals.attacks import (
        AttackTarget,
        attack_configs,
        attack_labels,
        attack_probes,
        available_attacks,
        resolve_attacks,
    )
    from evals.attacks.suite import asr_table, check_suite_folder, check_suite_targets, run_attack_suite
    from evals.audit import AuditError, check_output_folder
    from evals.scorer import load_scoring
    from pipelines import (
        ModelNotFoundError,
        check_model_reference,
        load_pipeline,
        model_architecture,
        resolve_device,
        set_library_verbosity,
    )
    from pipelines.files import claim_folder
    from pipelines.tokenizer import concept_folder

    set_library_verbosity(args.verbose)
    claim = contextlib.ExitStack()  # the --out folder, held from its check to the end of the run
    try:
        from evals.attacks import parse_budget

        budget = parse_budget(args.budget)
        names = args.attack or ["all"]
        attacks = resolve_attacks(names)
        configs = attack_configs(budget_overrides(args.set))
        device = resolve_device(args.device)
        check_output_folder(args.out)
        claim.enter_context(claim_folder(args.out))
        artifact = read_erasure(args.erasure)  # an artifact, or a stack of them
        check_suite_folder(args.out, artifact.concepts, budget)
        model = args.model or artifact.base_model
        check_model_reference(model)
        attacks = resolve_attacks(names, model_architecture(model))  # an attack the model's kind refuses: here
        if model in ("micro", "tiny", "tiny-sdxl") or os.path.isdir(model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _, scorer, judge = load_scoring(model, args.scorer, judge=not args.no_judge, device=device)
        wrapper = load_pipeline(model, device=device)
        attacks = resolve_attacks(names, wrapper.architecture)  # a hub model's kind is known once it loads
        if "all" in names and len(attacks) < len(available_attacks()):
            skipped = [a for a in available_attacks() if a not in attacks]
            print(f"note: not run on {wrapper.architecture} pipelines: {', '.join(skipped)}", file=sys.stderr)
        check_erasure_base(wrapper, artifact, where=args.erasure)
        erasure = {"folder": os.path.abspath(args.erasure), "method": artifact.method, "concepts": artifact.concepts,
                   "base_fingerprint": artifact.base_fingerprint, "config": artifact.config}  # fmt: skip
        targets = [AttackTarget(wrapper, artifact.applied, concept,
                                attack_probes(concept, args.images, args.seed, split=args.split),
                                labels=attack_labels(concept, artifact.preserve), scorer=scorer,
                                batch_size=args.batch_size, progress=not args.quiet)
                   for concept in artifact.concepts]  # fmt: skip
        check_suite_targets(targets, attacks, configs, budget)  # every concept's attacks, before the first image
        for target in targets:
            concept = target.concept
            summary = run_attack_suite(target, attacks, args.out, scorer=scorer, judge=judge, seed=args.seed,
                                       configs=configs, erasure=erasure, budget=budget, split=args.split)  # fmt: skip
            print(asr_table(summary))
            print(f"table and images: {os.path.join(args.out, concept_folder(concept))}")
    except (ValueError, TypeError, OSError, ModelNotFoundError, ArtifactError, AuditError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        claim.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
