#!/usr/bin/env python
"""The robustness table of the micro world: every method's erasure of one concept under every attack.

python scripts/attack_table.py --concept "van gogh" --out attacks/table                  # every method, every attack
python scripts/attack_table.py --method uce --method rece --attack rece_embedding --out attacks/table
python scripts/attack_table.py --method uce --budget 4 --out attacks/table      # rows "uce x4 budget", kept apart
python scripts/attack_table.py --method uce+saeuron --set saeuron.steps=20 --out attacks/table   # a stack

A method may be a stack (``erase.stack``): methods joined by '+', each erased with the earlier ones in force;
``--set member.key=value`` sets one member's field, an unqualified ``--set`` every member's that has the field. A
row's name is its method (or stack) and the settings that reach it.

For each method: its erasure with default settings (as ``scripts/erase.py --method M`` makes it), the attack suite
of ``scripts/attack.py`` on it (N probes per row, three prompt forms in turn, on the ``report`` seeds unless --split
tune), and its preserved accuracy (other styles, objects and colours, N images each, the same forms and seeds) so
that robustness bought by breaking the model shows. Prints a markdown table (CLIP and judge, each rate with its
Wilson 95% interval; then the worst rate per threat model: prompt, embedding, sampling) and writes it to OUT/table.md
and OUT/table.json; rerunning resumes (finished rows are kept). --budget K multiplies every attack's budget fields;
rows at another budget are kept apart (their names say it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import erase  # noqa: E402
from erase.core.inputs import PRESERVE_SETS, check_option_minimums, error_line, parse_config_overrides  # noqa: E402
from erase.stack import STACK_SEPARATOR, erase_stack, member_overrides, parse_method_stack  # noqa: E402
from erase.workflow import micro_world_name, stack_settings  # noqa: E402
from evals.attacks import THREAT_MODELS, AttackTarget, attack_probes, parse_budget, resolve_attacks  # noqa: E402
from evals.attacks.suite import (  # noqa: E402
    check_suite_folder,
    check_suite_targets,
    check_table_folder,
    form_notes,
    run_attack_suite,
    threat_verdicts,
)
from evals.audit import AuditError, check_output_folder  # noqa: E402
from evals.metrics import accuracy  # noqa: E402
from evals.microworld import world  # noqa: E402
from evals.probes import (  # noqa: E402
    PROMPT_FORMS,
    judge_correct,
    probe_correct,
    split_accuracies,
    world_labels,
    world_probes,
)
from evals.scorer import load_scoring  # noqa: E402
from pipelines import ModelNotFoundError, load_pipeline, model_architecture, set_library_verbosity  # noqa: E402
from pipelines.files import atomic_write_bytes, atomic_write_json, folder_name  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="van gogh", help="micro-world concept to erase (default: van gogh)")
    parser.add_argument("--method", action="append",
                        help="method, or a stack such as uce+saeuron (repeatable; default: every method)")  # fmt: skip
    parser.add_argument("--attack", action="append", help="attack (repeatable; default: every attack)")
    parser.add_argument("--preserve-set", action="append", default=[], choices=PRESERVE_SETS,
                        help="preserve set for every method (as scripts/erase.py)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                        help="config field of every method that has it, or of METHOD alone")  # fmt: skip
    parser.add_argument("--label", default="", help="suffix of the table's row names (default: the options given)")
    parser.add_argument("--images", type=int, default=48, help="probes per row and images per preserved group")
    parser.add_argument("--budget", default="1", help="multiplier of every attack's budget fields (default: 1)")
    parser.add_argument("--split", default="report", choices=("tune", "report"),
                        help="seed set: settings are tuned on 'tune', reported on 'report' (default)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def cell(acc: dict | None) -> str:
    if not acc or acc.get("value") is None:
        return "-"
    return f"{acc['value']:.0%} [{acc['low']:.0%}, {acc['high']:.0%}]"


def preserved(wrapper, applied, scorer, judge, concept: str, n: int, seed: int, split: str) -> dict:  # noqa: ANN001
    """Accuracy on other styles, objects and colours (n images each, the three prompt forms), with
    ``applied(wrapper)`` in force: overall and per prompt form."""
    styles = [s for s in world.concepts("style") if s not in ("plain", world.canonical(concept))]
    probes = []
    for k, group in enumerate((styles, world.concepts("object"), world.concepts("colour"))):
        probes += world_probes(group, max(1, n // len(group)), seed + 500 + k, forms=PROMPT_FORMS, split=split)
    with applied(wrapper):
        images = wrapper.generate([p.prompt for p in probes], [p.seed for p in probes], batch_size=16, progress=False)
    clip = probe_correct(scorer, images, probes, world_labels())
    judged = judge_correct(judge, images, probes)
    forms = [p.form for p in probes]
    clip_forms, judge_forms = split_accuracies(clip, forms), split_accuracies(judged, forms)
    by_form = {f: {"clip": clip_forms[f], "judge": judge_forms[f]} for f in clip_forms}
    return {"clip": accuracy(clip), "judge": accuracy(judged), "forms": by_form}


def row_suffix(args: argparse.Namespace, members: list[str], budget: float) -> str:
    """What follows a row's method in its name: --label, or the preserve sets and the --set settings that reach its
    members (``saeuron.steps=20`` only on a row with saeuron); then the budget and seed split where not the
    defaults."""
    reaching = [kv for kv in args.set if kv.partition("=")[0].strip().rpartition(".")[0] in ("", *members)]
    suffix = args.label or "".join([*(f" +{p} preserve" for p in args.preserve_set), *(f" {kv}" for kv in reaching)])
    return suffix + "".join([*([f" x{budget:g} budget"] if budget != 1 else []),
                             *([f" ({args.split} seeds)"] if args.split != "report" else [])])  # fmt: skip


def worst_cell(worst: dict | None) -> str:
    """A threat model's worst rate with its interval and the attack it came from."""
    return "-" if not worst else f"{cell(worst)} {worst['row']}"


def _read_table(path: str) -> dict:
    """The table of an earlier run at ``--out`` (resumed), or an empty one; ``ValueError`` when it is unreadable."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({error_line(err)}); use another --out folder") from None
    if not isinstance(table, dict) or not all(isinstance(e, dict) and "rows" in e for e in table.values()):
        raise ValueError(f"{path} is not a robustness table; use another --out folder")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_library_verbosity(False)
    try:
        check_option_minimums(args, {"images": 1})
        budget = parse_budget(args.budget)
        # the table is the micro world's: a concept outside it has no probes; a world name in any spelling will do
        args.concept = micro_world_name(args.concept, "--concept", outside=None)
        given = args.method or erase.available_methods()
        stacks = {STACK_SEPARATOR.join(ms): ms for ms in map(parse_method_stack, given)}
        methods = list(stacks)
        attacks = resolve_attacks(args.attack or ["all"], model_architecture("micro"))  # the micro world's model
        overrides = parse_config_overrides(args.set)
        every_member = [m for ms in stacks.values() for m in ms]
        member_settings = {name: member_overrides(ms, overrides, known_members=every_member)
                           for name, ms in stacks.items()}  # fmt: skip
        check_output_folder(args.out)
        table_path = os.path.join(args.out, "table.json")
        table = _read_table(table_path)
        check_table_folder(args.out, ("table.json", "table.md"))
        row_names = {m: m + row_suffix(args, stacks[m], budget) for m in methods}
        for method in methods:
            check_suite_folder(os.path.join(args.out, folder_name(row_names[method])), [args.concept], budget)
        wrapper = load_pipeline("micro")
        probes = attack_probes(args.concept, args.images, args.seed, split=args.split)
        # every attack is checked against the model before the first erasure (their checks read the model alone)
        check_suite_targets([AttackTarget(wrapper, lambda w: contextlib.nullcontext(), args.concept, probes)],
                            attacks, budget=budget)  # fmt: skip
        _, scorer, judge = load_scoring("micro", None, judge=True)
        # every method's settings are checked before the first one runs
        settings = {m: stack_settings(wrapper, [args.concept], stacks[m], None, None, member_settings[m],
                                      concept_type="art", preserve_sets=args.preserve_set)
                    for m in methods}  # fmt: skip
        os.makedirs(args.out, exist_ok=True)
        original = "original" + (f" ({args.split} seeds)" if args.split != "report" else "")
        if "forms" not in (table.get(original) or {}).get("preserved", {}):
            untouched = preserved(wrapper, lambda w: contextlib.nullcontext(), scorer, judge, args.concept,
                                  args.images, args.seed, args.split)  # fmt: skip
            table[original] = {"rows": {}, "preserved": untouched}
        for method in methods:
            start = time.perf_counter()
            name = row_names[method]
            stack = erase_stack(wrapper, settings[method])
            artifact = stack.members[0] if len(stack.members) == 1 else stack
            erase_seconds = time.perf_counter() - start
            target = AttackTarget(wrapper, artifact.applied, args.concept, probes, scorer=scorer, progress=False)
            erasure = {"method": method, "config": artifact.config}
            if artifact.preserve:
                erasure["preserve"] = list(artifact.preserve)
            summary = run_attack_suite(target, attacks, os.path.join(args.out, folder_name(name)), scorer=scorer,
                                       judge=judge, seed=args.seed, erasure=erasure, budget=budget,
                                       split=args.split)  # fmt: skip
            entry = table.get(name, {})
            if "forms" not in (entry.get("preserved") or {}):
                entry["preserved"] = preserved(wrapper, artifact.applied, scorer, judge, args.concept, args.images,
                                               args.seed, args.split)  # fmt: skip
            entry.update(rows={r["row"]: r for r in summary["rows"]}, erase_seconds=erase_seconds,
                         threats=summary["threats"], budget=budget, split=args.split,
                         forms=summary["forms"])  # fmt: skip
            table[name] = entry
            atomic_write_json(table_path, table)
            print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    except (ValueError, TypeError, OSError, ModelNotFoundError, AuditError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    names = ["original", "unattacked", *attacks]
    threats = list(THREAT_MODELS)
    lines = [f"| method | {' | '.join(names)} | preserved | {' | '.join(f'worst: {t}' for t in threats)} |",
             "|" + " --- |" * (len(names) + 2 + len(threats))]  # fmt: skip
    notes = []
    for method, entry in sorted(table.items(), key=lambda item: not item[0].startswith("original")):
        verdicts = entry.get("threats") or (threat_verdicts(list(entry["rows"].values())) if entry["rows"] else {})
        for scorer_name in ("clip", "judge"):
            cells = [cell(entry["rows"].get(n, {}).get(scorer_name)) for n in names]
            worst = [worst_cell((verdicts.get(t) or {}).get(scorer_name)) for t in threats]
            lines.append(f"| {method} ({scorer_name}) | {' | '.join(cells)} | {cell(entry['preserved'][scorer_name])} "
                         f"| {' | '.join(worst)} |")  # fmt: skip
        notes += [f"{method}: {n}" for n in form_notes(list(entry["rows"].values()))]
    seconds = {a: np.median([e["rows"][a]["seconds"] for e in table.values() if a in e["rows"]]) for a in attacks}
    lines.append("")
    lines.append("Wall time per attack (median over methods, 2 CPU cores): "
                 + ", ".join(f"{a} {s:.0f} s" for a, s in seconds.items()))  # fmt: skip
    lines.append("Worst per threat model: the highest rate among its attacks and the unattacked prompts (prompt: "
                 "written text; embedding: text embeddings, and any prompt; sampling: the sampler).")  # fmt: skip
    if notes:
        lines += ["", "Rates that differ by more than 5 points between prompt forms:", *(f"- {n}" for n in notes)]
    text = "\n".join(lines)
    atomic_write_bytes(os.path.join(args.out, "table.md"), (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
