"""Batch generation audits: the original model and each erased artifact on one prompt suite, under identical seeds.

:func:`run_audit` generates every (prompt, seed) image of the suite with the base model and with each erasure
artifact applied temporarily (``wrapper.weight_deltas``), scores them with CLIP (and the micro world's judge when
given one), and writes::

    OUT/
      audit.json                   what the folder holds: the settings that fix the pixels (model, fingerprint,
                                   steps, guidance, size, scheduler, batch size, processes), the suite, the erasures
      suite.csv                    the expanded suite: one row per image
      generation-<p>.json          process p's last run: images it generated, seconds, images per second
      images/<model-key>/<sha1(prompt)[:10]>-<seed>.png
      grids/<category>.png         a labelled grid per category: rows concept x model, columns seeds
      metrics.json                 everything below
      report.html                  self-contained report: the verdict, charts, tables, images (:mod:`.report`)

``<model-key>`` is ``original`` or ``<artifact folder name>-<sha1(erasure.json)[:8]>``.

Running (resume, settings guard, several processes) is described in :mod:`.run`.

**metrics.json** (``"schema_version": 1``; :data:`METRICS_SCHEMA` is its JSON Schema)::

    {
      "schema_version": 1,
      "protocol": {model, model_fingerprint, scheduler, steps, guidance, height, width, negative_prompt,
                   batch_size, images_per_prompt, num_processes, scorer, judge (bool), erase_version,
                   suite: {name, source, file, rows, prompts, roles, labels: {category: [concept, ...]}},
                   seeds: {count, min, max}},
      "models": [                                  # "original" first, then one entry per artifact
        {key, label, images,
         artifact: null | {folder, method, concepts, guides, preserve, base_model, base_fingerprint,
                           weight_format, config, created, erase_version},
         clip:  {efficacy, generality, specificity, preservation: ACC, harmonic_mean: float | null},
         judge: null | the same, with the judge's verdicts instead of CLIP's,
         clip_score: {all, target, synonym, neighbour, unrelated: STAT},
         vs_original: null (for "original") | {image_similarity: {all, <role>...: STAT},
                                                cmmd: {all, <role>...: float | null}},
         per_concept: [{concept, category, role, clip: ACC, judge: ACC | null, clip_score: STAT,
                        clip_reads_as: {label: images},
                        image_similarity: STAT | null (null for "original"; absent from older audits)}],
         per_category: {category: {clip: float | null, judge: float | null, concepts: int}},
         forms: {form: {rows, clip: {efficacy, ...: ACC, harmonic_mean}, judge: the same | null}}}
                                                   # per prompt form (evals.probes.PROMPT_FORMS, read from each
                                                   # prompt); absent from older audits
      ]
    }

    ACC  = {value: k/n | null, low, high: Wilson 95% bounds | null, n, k}
    STAT = {mean | null, std | null, n}

Accuracy is the fraction of images whose zero-shot verdict among the category's labels is the row's concept; the
role metrics (efficacy = target rows, generality = synonym, specificity = neighbour, preservation = unrelated) and
CLIP score, image similarity and CMMD are defined in :mod:`evals.metrics`. ``per_category`` is the unweighted mean
of that category's ``per_concept`` accuracies over all roles (kept for compatibility: the report and the tables give
accuracies per role instead, so that an erased concept is not averaged with the kept ones). ``harmonic_mean`` is 0 for
the original by construction (it erased nothing); the report and tables show it as not applicable.
``clip_reads_as`` counts the zero-shot verdicts of a (concept, role)'s images, most common first: what an erased
concept's prompts turn into.

The package is split by what changes together: :mod:`.common` (the names all parts share), :mod:`.run` (the folder,
generation, resume), :mod:`.scoring` (``metrics.json``) and :mod:`.report` (the verdict, the tables and
``report.html``, laid out by ``templates/report.html.j2``; its charts' geometry in :mod:`.charts`).
"""

from .common import ORIGINAL, SCHEMA_VERSION, AuditError, AuditModel, image_name
from .report import (
    KEPT_MAX_LOSS,
    SYNONYM_MAX,
    TARGET_MAX,
    Verdict,
    per_concept_table,
    render_report,
    summary_table,
    verdict_text,
    verdicts,
)
from .run import (
    check_audit_folder,
    check_output_folder,
    generate_audit_images,
    generation_summary,
    rewrite_report,
    run_audit,
)
from .scoring import METRICS_SCHEMA

__all__ = [
    "KEPT_MAX_LOSS",
    "METRICS_SCHEMA",
    "ORIGINAL",
    "SCHEMA_VERSION",
    "SYNONYM_MAX",
    "TARGET_MAX",
    "AuditError",
    "AuditModel",
    "Verdict",
    "check_audit_folder",
    "check_output_folder",
    "generate_audit_images",
    "generation_summary",
    "image_name",
    "per_concept_table",
    "render_report",
    "rewrite_report",
    "run_audit",
    "summary_table",
    "verdict_text",
    "verdicts",
]
