#!/usr/bin/env python
"""Regenerate the measured tables of the docs from the JSON files the measuring scripts write.

    python scripts/make_docs.py            # rewrite every generated table
    python scripts/make_docs.py --check    # exit 1 when a committed table differs from its JSON

A generated table sits between two markers in a Markdown file (the model cards under pipelines/, docs/*.md)::

    <!-- table: KIND SOURCE -->
    ...
    <!-- end table -->

SOURCE is a file or a glob relative to the repository root; KIND names how it is read:

    sae       sae.json files (scripts/train_sae.py): the SAEs' sizes, data and held-out quality
    erasure   a ``scripts/measure_erasure.py --json`` file: accuracy of each probe group before and after the edit
              (and, from files that have them, after the edit per prompt form, "!" past a 5-point difference)
    attacks   the ``table.json`` of ``scripts/attack_table.py``: attack success rates and preserved accuracy (and,
              from tables that have them, the worst rate per threat model)
    suite     ``scripts/attack.py``'s ``<concept>/attacks.json`` files (a glob): the same table, a row per concept
    matrix    the method registry itself (SOURCE erase/core/registry.py): which architecture each method runs on

A block whose SOURCE matches no file is left as it is and listed as pending: its table is recorded by hand from
the command its heading gives, until that command writes SOURCE.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

# scripts/erase.py would shadow the erase package (the matrix table reads its registry): drop this folder from the
# import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from pipelines.checks import run_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ("README.md", "pipelines/micro/README.md", "pipelines/saes/README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- table: (\w+) (\S+) -->\n)(.*?)(<!-- end table -->)", re.DOTALL)


def pct(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def sae_table(paths: list[Path]) -> str:
    """One row per SAE folder, from its ``sae.json``."""
    lines = [
        "| folder | hook point | features, k | trained on | epochs | FVU (held out) | features that fire on no "
        "held-out token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(paths):
        meta = json.loads(path.read_text())
        collection, quality = meta.get("collection", {}), meta.get("quality", {})
        data = f"{collection.get('prompts', '-')} prompts, {collection.get('tokens', 0):,} tokens"
        if "steps" in collection:
            data += f" ({collection['steps']} sampling steps, guidance {collection.get('guidance', '-')})"
        fvu = quality.get("fvu")
        fvu_cell = "-" if fvu is None else f"{fvu:.3f} ({quality.get('held_out_tokens', 0):,} tokens)"
        lines.append(
            f"| `{path.parent.name}` | `{meta['hook_point']}` | {meta['latents']}, {meta['k']} | {data} | "
            f"{meta.get('training', {}).get('epochs', '-')} | {fvu_cell} | {pct(quality.get('dead_share'))}% |"
        )
    return "\n".join(lines)


FORM_TITLES = {"alone": "alone", "one_other": "+1", "both_others": "+2"}
THREATS = ("prompt", "embedding", "sampling")


def erasure_table(paths: list[Path]) -> str:
    """Each probe group's accuracy before -> after, micro CLIP and judge, from ``measure_erasure.py --json``; files
    with prompt forms get a column of the CLIP rate after the edit per form."""
    blocks = []
    for path in sorted(paths):
        result = json.loads(path.read_text())
        preserve = ", ".join(result.get("preserve", [])) or "nothing"
        head = (
            f"`{path.name}`: {result.get('method', '?')} erasing {', '.join(result.get('concepts', []))} (guide "
            f"{', '.join(repr(g) for g in result.get('guides', []))}; preserved: {preserve})"
        )
        forms = result.get("forms") or []
        if forms:
            head += f"; {result.get('split', '?')} seeds"
        form_head = f" CLIP after: {' / '.join(FORM_TITLES.get(f, f) for f in forms)} |" if forms else ""
        columns = f"| group | N | CLIP before -> after | judge before -> after |{form_head} after, CLIP reads it as |"
        lines = [head, "", columns, "| --- | --- | --- | --- |" + (" --- |" if forms else "") + " --- |"]
        for name, group in result["groups"].items():
            n = group["n"]
            judge = "-"
            if group.get("judge_before") is not None:
                judge = f"{pct(group['judge_before'], 1)} -> {pct(group['judge_after'], 1)}%"
            reads = ", ".join(f"{c} {k / n:.0%}" for c, k in list(group.get("after_reads_as", {}).items())[:2])
            clip = f"{pct(group['clip_before'], 1)} -> {pct(group['clip_after'], 1)}%"
            by_form = ""
            if forms:
                cells = [pct((group.get("forms") or {}).get(f, {}).get("clip_after")) for f in forms]
                by_form = f" {' / '.join(cells)}{' !' if group.get('forms_differ') else ''} |"
            lines.append(f"| {name} | {n} | {clip} | {judge} |{by_form} {reads} |")
        if any(g.get("forms_differ") for g in result["groups"].values()):
            lines += ["", "!: CLIP or judge after the edit differs by more than 5 points between prompt forms."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _rate(entry: dict | None) -> str:
    """``CLIP / judge [CLIP's Wilson interval]`` in percent, or ``-``."""
    if not entry or not entry.get("clip") or entry["clip"].get("value") is None:
        return "-"
    clip, judge = entry["clip"], entry.get("judge") or {}
    return f"{pct(clip['value'])} / {pct(judge.get('value'))} [{pct(clip['low'])}-{pct(clip['high'])}]"


def _worst(entry: dict) -> str:
    """A threat model's worst rate: ``CLIP / judge [CLIP's interval] attack``, or ``-``."""
    clip, judge = entry.get("clip"), entry.get("judge")
    if not clip:
        return "-"
    return f"{_rate({'clip': clip, 'judge': judge})} {clip['row']}"


def _kept(kept: dict | None) -> str:
    """``CLIP / judge`` share of images showing every other attribute their prompt names, or ``-``."""
    if not kept or not kept.get("clip"):
        return "-"
    return f"{pct(kept['clip']['value'])} / {pct((kept.get('judge') or {}).get('value'))}"


def _least_kept(rows: dict) -> str:
    """The erased model's row whose images keep the fewest of the other attributes their prompts name (CLIP), with
    its name: an erasure that holds by destroying the image shows here. Among the unattacked row and the attacks that
    draw from the probe's own prompt (embedding, sampling); a prompt attack writes text of its own, which need not
    name the object or colour at all."""
    kept = [(r["kept"]["clip"]["value"], name) for name, r in rows.items()
            if name != "original" and r.get("kept") and r.get("kind") != "prompt"]  # fmt: skip
    if not kept:
        return "-"
    _, name = min(kept)
    return f"{_kept(rows[name]['kept'])} {name}"


def attack_table(paths: list[Path]) -> str:
    """Method rows, attack columns, from ``attack_table.py``'s ``table.json`` (several files: rows of each); tables
    with threat-model verdicts get a worst-rate column per threat model."""
    table: dict[str, dict] = {}
    for path in sorted(paths):
        table.update(json.loads(path.read_text()))
    return _attack_rows(table)


def suite_table(paths: list[Path]) -> str:
    """Concept rows, attack columns, from ``attack.py``'s ``<concept>/attacks.json`` files (one erasure of several
    concepts: a row per concept), under a line naming the erasure."""
    suites = [json.loads(path.read_text()) for path in sorted(paths)]
    erasures = {(s["erasure"]["method"], ", ".join(s["erasure"]["concepts"])) for s in suites}
    named = "; ".join(f"{method} erasing {concepts}" for method, concepts in sorted(erasures))
    splits = sorted({f"{s['split']} seeds, budget x{s['budget']:g}, {s['n']} probes a row" for s in suites})
    head = f"`scripts/attack.py` on {named} ({'; '.join(splits)}):"
    table = {s["concept"]: {"rows": {r["row"]: r for r in s["rows"]}, "threats": s["threats"]} for s in suites}
    return head + "\n\n" + _attack_rows(table, "concept")


def _attack_rows(table: dict[str, dict], rows_are: str = "method") -> str:
    """The attack table of ``{row name: {"rows": {attack row: ...}, "preserved": ..., "threats": ...}}``; the first
    column's head says what the rows are."""
    attacks: list[str] = []
    for entry in table.values():
        attacks += [name for name in entry["rows"] if name not in ("original", "unattacked", *attacks)]
    threats = [t for t in THREATS if any(t in (e.get("threats") or {}) for e in table.values())]
    head = "".join(f" worst: {t} |" for t in threats)
    lines = [f"| {rows_are} | unattacked | {' | '.join(attacks)} | preserved | others kept, least |{head}",
             "|" + " --- |" * (len(attacks) + 4 + len(threats))]  # fmt: skip
    # the original model's row: its rate on the probes (each method's "original" row, the same images) and its
    # preserved accuracy
    originals = [e["rows"]["original"] for e in table.values() if "original" in e["rows"]]
    probes = next((r for r in originals if r.get("kept")), originals[0] if originals else None)
    for name, entry in sorted(table.items(), key=lambda item: not item[0].startswith("original")):
        if name.startswith("original"):
            cells = [_rate(probes), *[""] * len(attacks)]
            kept = _kept((probes or {}).get("kept"))
        else:
            cells = [_rate(entry["rows"].get(a)) for a in ("unattacked", *attacks)]
            kept = _least_kept(entry["rows"])
        worst = "".join(f" {_worst((entry.get('threats') or {}).get(t) or {})} |" for t in threats)
        lines.append(f"| {name} | {' | '.join(cells)} | {_rate(entry.get('preserved'))} | {kept} |{worst}")
    seconds = {a: [e["rows"][a]["seconds"] for e in table.values() if "seconds" in e["rows"].get(a, {})]
               for a in attacks}  # fmt: skip
    timed = [f"{a} {statistics.median(s):.0f} s" for a, s in seconds.items() if s]
    if timed:
        lines += ["", "Wall time per attack, median over the methods: " + ", ".join(timed) + "."]
    lines += ["", "Others kept: of the probes whose prompt names an object or colour too, the share whose image shows "
              "them all (CLIP / judge); least: the erased model's row that keeps fewest, unattacked or under an "
              "embedding or sampling attack (a prompt attack writes its own text)."]  # fmt: skip
    if threats:
        lines += ["", "Worst per threat model: the highest rate among its attacks and the unattacked prompts (prompt: "
                  "written text; embedding: text embeddings, and any prompt; sampling: the sampler)."]  # fmt: skip
    return "\n".join(lines)


def matrix_table(_paths: list[Path]) -> str:
    """Methods, then attacks (rows) on each architecture (columns), as each declares where it registers (methods'
    ``Capabilities``, attacks' ``register_attack``): yes, or no with the one-line reason it is refused there
    (numbered under the table). Rows alike share a line, methods and attacks alike."""
    import erase
    from evals.attacks import available_attacks, get_attack
    from pipelines import ARCHITECTURE_NAMES, ARCHITECTURES

    reasons: list[str] = []
    rows: dict[tuple[str, ...], list[str]] = {}

    def add(name: str, runs_on: tuple[str, ...], reason: str) -> None:
        cells = []
        for architecture in ARCHITECTURES:
            if architecture in runs_on:
                cells.append("yes")
                continue
            reasons.extend([reason] if reason not in reasons else [])
            cells.append(f"no ({reasons.index(reason) + 1})")
        rows.setdefault(tuple(cells), []).append(f"`{name}`")

    for name in erase.available_methods():
        capabilities = erase.get_method(name).capabilities
        add(name, capabilities.architectures, capabilities.unported)
    for name in sorted(available_attacks()):  # the registry's order depends on which module imported first
        attack = get_attack(name)
        add(name, attack.architectures, attack.unported)
    lines = [f"| method, attack | {' | '.join(ARCHITECTURE_NAMES[a] for a in ARCHITECTURES)} |",
             "| --- |" + " --- |" * len(ARCHITECTURES)]  # fmt: skip
    lines += [f"| {', '.join(names)} | {' | '.join(cells)} |" for cells, names in rows.items()]
    if reasons:
        lines += ["", "; ".join(f"({i}) {reason}" for i, reason in enumerate(reasons, 1))]
    return "\n".join(lines)


Renderer = Callable[[list[Path]], str]
RENDERERS: dict[str, Renderer] = {
    "sae": sae_table, "erasure": erasure_table, "attacks": attack_table, "suite": suite_table, "matrix": matrix_table,
}  # fmt: skip


def regenerate(text: str, root: Path) -> tuple[str, list[str], list[str]]:
    """``text`` with every block whose source exists rendered afresh; also the blocks rendered and those pending."""
    rendered: list[str] = []
    pending: list[str] = []

    def render(match: re.Match) -> str:
        start, kind, source, _, end = match.groups()
        if kind not in RENDERERS:
            raise ValueError(f"unknown table kind {kind!r} (known: {', '.join(RENDERERS)})")
        paths = [Path(p) for p in sorted(glob.glob(str(root / source)))]
        if not paths:
            pending.append(source)
            return match.group(0)
        rendered.append(source)
        return f"{start}{RENDERERS[kind](paths)}\n{end}"

    return BLOCK.sub(render, text), rendered, pending


def doc_files(root: Path) -> list[Path]:
    return [Path(p) for pattern in DOC_FILES for p in sorted(glob.glob(str(root / pattern)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    parser.add_argument("--root", default=str(ROOT), help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    stale = []
    if not doc_files(root):  # else --check passes having checked nothing
        print(f"error: {root} holds no documentation to render ({', '.join(DOC_FILES)}): is --root a checkout of "
              "erase?", file=sys.stderr)  # fmt: skip
        return 2
    try:
        for path in doc_files(root):
            text = path.read_text()
            new, rendered, pending = regenerate(text, root)
            name = os.path.relpath(path, root)
            for source in pending:
                print(f"{name}: pending, no file matches {source} (table recorded by hand)")
            if new == text:
                print(f"{name}: {len(rendered)} table(s) up to date")
                continue
            stale.append(name)
            if not args.check:
                temporary = path.with_name(f".{path.name}.tmp")
                temporary.write_text(new)
                os.replace(temporary, path)  # atomic: a reader sees the old file or the new one
                print(f"{name}: {len(rendered)} table(s) written")
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"out of date (run python scripts/make_docs.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
