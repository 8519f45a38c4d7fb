#!/usr/bin/env python
"""Measure a closed-form erasure on the micro world: accuracy of each probe group before and after the edit.

    python scripts/measure_erasure.py --concept "van gogh" --images 100
    python scripts/measure_erasure.py --concept "van gogh" --concept mondrian --concept seurat \\
        --concept picasso --concept monet --images 100 --json out.json

Groups: each erased concept under its canonical name and under every synonym; every other style; objects and
colours (pooled). Accuracy = micro-CLIP zero-shot verdict equals the named concept (the judge's beside it). For a
group of one concept the last column says what its images read as after the edit (the two most common verdicts).

Every group's prompts take three forms in turn: the concept alone in the world's templates, with one other attribute
(an object or a colour, for a style), with both ("a blue heart in the style of van gogh"); each figure is given per
form too, and a group whose after-edit figures differ between forms by more than 5 points is flagged ("!") and
listed. Images are drawn on the ``report`` seeds, apart from the ``tune`` seeds (--split tune) a setting is chosen on.

The edit is the one ``scripts/erase.py`` makes with the same options (``--concept-type``, ``--guide``, ``--preserve``,
``--preserve-set``, ``--expand-prompts``, ``--set KEY=VALUE``), a stack too (``--method uce+saeuron --set
saeuron.steps=20``: each member made with the earlier ones in force). Bad input is a one-line error and exit 2,
before any image is generated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

# scripts/erase.py would shadow the erase package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from erase.core.inputs import (  # noqa: E402
    CONCEPT_TYPES,
    PRESERVE_SETS,
    check_concept_text,
    check_option_minimums,
    error_line,
    parse_config_overrides,
)
from erase.core.layout import check_result_file  # noqa: E402
from erase.stack import erase_stack, member_overrides, parse_method_stack  # noqa: E402
from erase.workflow import micro_world_name, stack_settings  # noqa: E402
from evals.metrics import wilson_interval  # noqa: E402
from evals.microworld import world  # noqa: E402
from evals.probes import (  # noqa: E402
    FORM_GAP,
    FORM_TITLES,
    PROMPT_FORMS,
    Probe,
    judge_correct,
    probe_correct,
    probe_verdicts,
    world_labels,
    world_probes,
)
from evals.scorer import ClipScorer  # noqa: E402
from pipelines import load_pipeline, resolve_device, set_library_verbosity  # noqa: E402
from pipelines.files import atomic_write_json  # noqa: E402

#: ``schema_version`` of the ``--json`` file. 2: probes of three prompt forms with per-form figures, a seed split.
RESULTS_SCHEMA_VERSION = 2


def probe_groups(targets: list[str], n: int, seed: int, split: str = "report") -> dict[str, list[Probe]]:
    groups: dict[str, list[Probe]] = {}
    kw = {"forms": PROMPT_FORMS, "split": split}
    for t in targets:
        groups[f"erased: {t}"] = world_probes([t], n, seed, **kw)
        for k, syn in enumerate(world.synonyms(t)):
            groups[f"erased: {t} as '{syn}'"] = world_probes([t], n, seed + 10 + k, name_as=syn, **kw)
    for s in world.concepts("style"):
        if s not in targets and s != "plain":
            groups[f"kept style: {s}"] = world_probes([s], n, seed + 100, **kw)
    objects, colours = world.concepts("object"), world.concepts("colour")
    # at least n images in the pooled groups too: the same number of each object (colour), rounded up
    groups["kept: objects"] = world_probes(objects, -(-n // len(objects)), seed + 200, **kw)
    groups["kept: colours"] = world_probes(colours, -(-n // len(colours)), seed + 300, **kw)
    return groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", action="append", required=True, help="micro-world concept to erase")
    parser.add_argument("--method", default="uce", help="erasure method, or a stack such as uce+saeuron")
    parser.add_argument("--concept-type", default="art", choices=sorted(CONCEPT_TYPES))
    parser.add_argument("--guide", action="append", help="what each concept becomes (default: by --concept-type)")
    parser.add_argument("--preserve", action="append", help="concept to keep intact (repeatable; default: none)")
    parser.add_argument("--preserve-set", action="append", default=[], choices=PRESERVE_SETS)
    parser.add_argument("--expand-prompts", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                        help="config field of every member that has it, or of METHOD alone")  # fmt: skip
    parser.add_argument("--images", type=int, default=100, help="images per group")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--split", default="report", choices=("tune", "report"),
                        help="seed set: settings are chosen on 'tune', reported on 'report' (default)")  # fmt: skip
    parser.add_argument("--group", action="append", help="measure only groups whose name contains this (repeatable)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_library_verbosity(False)
    try:
        check_option_minimums(args, {"images": 1, "batch_size": 1})
        for concept in args.concept:
            check_concept_text(concept, "concept to erase")
        # a concept outside the world has no probes to measure; a world name in any spelling will do
        args.concept = [micro_world_name(c, "concept to erase", outside=None) for c in args.concept]
        methods = parse_method_stack(args.method)  # before the model loads
        if args.json:
            check_writable_file(args.json)
            check_result_file(args.json, "--json", ("schema_version", "concepts", "groups"))
        device = resolve_device(args.device)
        wrapper = load_pipeline("micro", device=device)
        # the settings scripts/erase.py uses for the same options
        members = stack_settings(
            wrapper, args.concept, methods, args.guide, args.preserve,
            member_overrides(methods, parse_config_overrides(args.set)),
            concept_type=args.concept_type, preserve_sets=args.preserve_set, expand_prompts=args.expand_prompts,
        )  # fmt: skip
        spec = members[0][1]
        groups = probe_groups(list(spec.targets), args.images, args.seed, args.split)
        if args.group:
            groups = {name: g for name, g in groups.items() if any(part in name for part in args.group)}
            if not groups:
                raise ValueError(f"no group matches {args.group}")
        stack = erase_stack(wrapper, members)
        artifact = stack.members[0] if len(members) == 1 else stack
    except (ValueError, TypeError, KeyError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    measure(wrapper, args, artifact, groups)
    return 0


def check_writable_file(path: str) -> None:
    """``OSError`` now, not after the measurement, when ``path`` cannot be written (probed with a sibling file)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OSError(f"--json {path} is a folder")
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "x"):
            pass
    except OSError as err:
        raise OSError(f"--json {path}: cannot write in {folder} ({err.strerror})") from None
    os.unlink(probe)


def measure(wrapper, args, artifact, groups) -> None:  # noqa: ANN001 - the objects main built
    print(
        f"{artifact.method} edit of {artifact.concepts} (guides {artifact.guides}, {len(artifact.preserve)} "
        f"preserved): {artifact.seconds:.3f} s, {len(artifact.layers)} layers"
    )
    probes = [p for g in groups.values() for p in g]
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    start = time.perf_counter()
    before = wrapper.generate(prompts, seeds, batch_size=args.batch_size)
    with artifact.applied(wrapper):
        after = wrapper.generate(prompts, seeds, batch_size=args.batch_size)
    print(f"generated {2 * len(probes)} images in {time.perf_counter() - start:.1f} s")
    scorer = ClipScorer.from_pretrained("micro", device=wrapper.device)
    labels = world_labels()
    ok_before = probe_correct(scorer, before, probes, labels)
    read_after = probe_verdicts(scorer, after, probes, labels)
    ok_after = [v == p.concept for v, p in zip(read_after, probes, strict=True)]
    judge_before = judge_after = None
    try:
        from evals.microworld.judge import load_judge

        judge = load_judge()
        judge_before, judge_after = judge_correct(judge, before, probes), judge_correct(judge, after, probes)
    except (ImportError, OSError, ValueError) as err:
        print(f"judge unavailable: {err}")
    results, start, flagged = {}, 0, []
    titles = " / ".join(FORM_TITLES[f] for f in PROMPT_FORMS)
    header = f"{'group':42s} {'N':>4s}  {'CLIP before':>11s} {'CLIP after':>10s}"
    print(header + f"  {'after 95% CI':>14s}  {'judge before':>12s} {'judge after':>11s}  CLIP after: {titles}"
          "  after, CLIP reads it as")  # fmt: skip
    for name, group in groups.items():
        sl = slice(start, start + len(group))
        start += len(group)
        row = {
            "n": len(group),
            "clip_before": float(np.mean(ok_before[sl])),
            "clip_after": float(np.mean(ok_after[sl])),
        }
        if len({p.concept for p in group}) == 1:  # what an erased concept turned into (or a kept one stayed)
            row["after_reads_as"] = dict(Counter(read_after[sl]).most_common())
        if judge_before is not None:
            row.update(judge_before=float(np.mean(judge_before[sl])), judge_after=float(np.mean(judge_after[sl])))
        flags = {"clip_before": ok_before[sl], "clip_after": ok_after[sl]}
        if judge_before is not None:
            flags.update(judge_before=judge_before[sl], judge_after=judge_after[sl])
        row["forms"], row["form_gap"] = form_figures(group, flags)
        row["forms_differ"] = any(g is not None and g > FORM_GAP + 1e-9 for k, g in row["form_gap"].items()
                                  if k.endswith("_after"))  # fmt: skip
        results[name] = row
        jb = f"{row['judge_before']:12.1%} {row['judge_after']:11.1%}" if judge_before is not None else ""
        low, high = wilson_interval(int(np.sum(ok_after[sl])), len(group))
        ci = f"[{low:.0%}, {high:.0%}]"
        reads = ", ".join(f"{c} {k / len(group):.0%}" for c, k in list(row.get("after_reads_as", {}).items())[:2])
        per_form = " / ".join(
            f"{row['forms'][f]['clip_after']:.0%}" if f in row["forms"] else "-" for f in PROMPT_FORMS
        )
        per_form += " !" if row["forms_differ"] else "  "
        cells = f"{row['clip_before']:11.1%} {row['clip_after']:10.1%}  {ci:>14s}  {jb}"
        print(f"{name:42s} {len(group):4d}  {cells}  {per_form:>{len(titles) + 12}s}  {reads}")
        if row["forms_differ"]:
            flagged.append(name)
    if flagged:
        print(f"\n! after the edit, these groups differ by more than {FORM_GAP:.0%} between prompt forms "
              f"(CLIP or judge): {', '.join(flagged)}")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, {"schema_version": RESULTS_SCHEMA_VERSION, "concepts": args.concept,
                                      "method": artifact.method, "guides": artifact.guides,
                                      "preserve": artifact.preserve, "config": artifact.config,
                                      "split": args.split, "seed": args.seed, "forms": list(PROMPT_FORMS),
                                      "edit_seconds": artifact.seconds, "info": artifact.info, "groups": results,
                                      "torch_threads": torch.get_num_threads()})  # fmt: skip


def form_figures(group: list[Probe], flags: dict[str, list[bool]]) -> tuple[dict, dict]:
    """Each prompt form's figures of one group (``{form: {"n", <figure>: share}}``) and, per figure, the largest
    difference between two forms (None with fewer than two forms)."""
    forms = {}
    for form in PROMPT_FORMS:
        idx = [i for i, p in enumerate(group) if p.form == form]
        if idx:
            forms[form] = {"n": len(idx), **{k: float(np.mean([v[i] for i in idx])) for k, v in flags.items()}}
    gaps = {}
    for key in flags:
        values = [f[key] for f in forms.values()]
        gaps[key] = max(values) - min(values) if len(values) > 1 else None
    return forms, gaps


if __name__ == "__main__":
    sys.exit(run_script(main))
