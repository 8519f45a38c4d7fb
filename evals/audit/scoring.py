"""Scoring an audit: ``metrics.json`` from the images on disk (CLIP zero-shot verdicts, the judge's, CLIP score,
image similarity and CMMD to the original), and :data:`METRICS_SCHEMA`, its JSON Schema.

Everything here is a function of the images and the suite alone (never of how a run was split or interrupted), so a
resumed audit scores byte for byte like an uninterrupted one. The layout of ``metrics.json`` is in
:mod:`evals.audit`'s docstring.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import metrics as M
from ..probes import GENERIC_TEMPLATES, PROMPT_FORMS, prompt_form
from ..scorer import TEMPLATES, ClipScorer
from ..suites import ROLES, Suite, SuiteRow
from .common import ORIGINAL, SCHEMA_VERSION, AuditModel

__all__ = ["METRICS_SCHEMA", "compute_metrics"]

logger = logging.getLogger(__name__)


def _judge_usable(judge: torch.nn.Module | None, suite: Suite) -> bool:
    if judge is None:
        return False
    classes = getattr(getattr(judge, "config", None), "classes", None) or {}
    usable = all(cat in classes and set(labels) <= set(classes[cat]) for cat, labels in suite.labels.items())
    if not usable:
        logger.info("the judge's classes do not cover this suite's labels: judge accuracies are left out")
    return usable


def _role_block(correct: Sequence[bool], rows: Sequence[SuiteRow]) -> dict[str, Any]:
    block = {
        name: M.accuracy([c for c, r in zip(correct, rows, strict=True) if r.role == role])
        for role, name in M.ROLE_METRICS.items()
    }
    block["harmonic_mean"] = M.harmonic_mean(block["efficacy"]["value"], block["preservation"]["value"])
    return block


def _by_form(
    clip_ok: Sequence[bool], judge_ok: Sequence[bool] | None, rows: Sequence[SuiteRow], forms: Sequence[str]
) -> dict[str, Any]:
    """The role accuracies of each prompt form's rows (:func:`evals.probes.prompt_form`), in
    :data:`evals.probes.PROMPT_FORMS` order; empty when no row has a form (categories outside the world)."""
    out = {}
    for form in PROMPT_FORMS:
        idx = [i for i, f in enumerate(forms) if f == form]
        if idx:
            picked = [rows[i] for i in idx]
            out[form] = {
                "rows": len(idx),
                "clip": _role_block([clip_ok[i] for i in idx], picked),
                "judge": _role_block([judge_ok[i] for i in idx], picked) if judge_ok is not None else None,
            }
    return out


def _by_role(values: Sequence[float], rows: Sequence[SuiteRow]) -> dict[str, dict]:
    out = {"all": M.mean_std(values)}
    for role in ROLES:
        out[role] = M.mean_std([v for v, r in zip(values, rows, strict=True) if r.role == role])
    return out


def compute_metrics(
    suite: Suite,
    models: Sequence[AuditModel],
    unique: Sequence[tuple[str, int]],
    images: dict[str, list[np.ndarray]],
    scorer: ClipScorer,
    judge: torch.nn.Module | None,
    protocol: dict[str, Any],
) -> dict[str, Any]:
    """``metrics.json``'s content: one entry per model (``models[0]`` the original), under ``protocol``.

    ``unique`` are the suite's distinct (prompt, seed) pairs and ``images[key][i]`` model ``key``'s image of
    ``unique[i]``; the suite's rows (one per image and role) index into them.
    """
    rows = suite.rows
    index = {key: i for i, key in enumerate(unique)}
    row_image = [index[(r.prompt, r.seed)] for r in rows]
    class_embeddings = {
        cat: scorer.class_embeddings(list(labels), TEMPLATES.get(cat, GENERIC_TEMPLATES))
        for cat, labels in suite.labels.items()
    }
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    prompt_embeddings = dict(zip(prompts, scorer.text_embeddings(prompts), strict=True))
    text = torch.stack([prompt_embeddings[r.prompt] for r in rows])
    use_judge = _judge_usable(judge, suite)
    forms = [prompt_form(r.prompt, r.category) for r in rows]
    embeddings: dict[str, torch.Tensor] = {}
    entries = []
    for model in models:
        emb = scorer.image_embeddings(images[model.key])[row_image]
        embeddings[model.key] = emb
        clip_ok, clip_verdicts = [False] * len(rows), [""] * len(rows)
        for cat, labels in suite.labels.items():
            idx = [i for i, r in enumerate(rows) if r.category == cat]
            ok, verdicts = M.zero_shot_correct(emb[idx], class_embeddings[cat], labels, [rows[i].concept for i in idx])
            for i, flag, verdict in zip(idx, ok, verdicts, strict=True):
                clip_ok[i], clip_verdicts[i] = flag, verdict
        judge_ok: list[bool] | None = None
        if use_judge:
            predictions = judge.predict(np.stack(images[model.key]))
            judge_ok = [predictions[r.category][row_image[i]] == r.concept for i, r in enumerate(rows)]
        scores = M.clip_scores(emb, text).tolist()
        vs_original, similarity = None, None
        if model.key != ORIGINAL:
            base = embeddings[ORIGINAL]
            similarity = M.paired_similarity(base, emb).tolist()
            cmmd = {"all": M.cmmd(base, emb)}
            for role in ROLES:
                idx = [i for i, r in enumerate(rows) if r.role == role]
                cmmd[role] = M.cmmd(base[idx], emb[idx])
            vs_original = {"image_similarity": _by_role(similarity, rows), "cmmd": cmmd}
        per_concept = []
        groups = dict.fromkeys((r.concept, r.category, r.role) for r in rows)
        for concept, category, role in groups:
            idx = [i for i, r in enumerate(rows) if (r.concept, r.category, r.role) == (concept, category, role)]
            per_concept.append(
                {
                    "concept": concept,
                    "category": category,
                    "role": role,
                    "clip": M.accuracy([clip_ok[i] for i in idx]),
                    "judge": M.accuracy([judge_ok[i] for i in idx]) if judge_ok is not None else None,
                    "clip_score": M.mean_std([scores[i] for i in idx]),
                    "clip_reads_as": dict(Counter(clip_verdicts[i] for i in idx).most_common()),
                    # Added after schema 1's first release (optional in the schema): which prompts' images the
                    # erasure changed most, so that the report can show those first.
                    "image_similarity": M.mean_std([similarity[i] for i in idx]) if similarity is not None else None,
                }
            )
        per_category = {}
        for cat in suite.labels:
            mine = [c for c in per_concept if c["category"] == cat]
            clip_values = [c["clip"]["value"] for c in mine]
            judge_values = [c["judge"]["value"] for c in mine if c["judge"] is not None]
            per_category[cat] = {
                "clip": float(np.mean(clip_values)) if clip_values else None,
                "judge": float(np.mean(judge_values)) if judge_values else None,
                "concepts": len({c["concept"] for c in mine}),
            }
        entries.append(
            {
                "key": model.key,
                "label": model.label,
                "images": len(unique),
                "artifact": _provenance(model),
                "clip": _role_block(clip_ok, rows),
                "judge": _role_block(judge_ok, rows) if judge_ok is not None else None,
                "clip_score": _by_role(scores, rows),
                "vs_original": vs_original,
                "per_concept": per_concept,
                "per_category": per_category,
                # Added after schema 1's first release (optional in the schema): the role accuracies per prompt form.
                "forms": _by_form(clip_ok, judge_ok, rows, forms),
            }
        )
    return {"schema_version": SCHEMA_VERSION, "protocol": protocol, "models": entries}


def _provenance(model: AuditModel) -> dict[str, Any] | None:
    if model.edit is None:
        return None
    meta = model.metadata or {}
    return {
        "folder": model.folder,
        "method": meta.get("method"),
        "concepts": meta.get("concepts", []),
        "guides": meta.get("guides", []),
        "preserve": meta.get("preserve", []),
        "base_model": meta.get("base_model"),
        "base_fingerprint": meta.get("base_fingerprint"),
        "weight_format": meta.get("weight_format"),
        "config": meta.get("config", {}),
        "created": meta.get("created"),
        "erase_version": meta.get("erase_version"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Schema

_NUM = {"type": ["number", "null"]}
_ACC = {
    "type": "object",
    "required": ["value", "low", "high", "n", "k"],
    "properties": {
        "value": _NUM,
        "low": _NUM,
        "high": _NUM,
        "n": {"type": "integer", "minimum": 0},
        "k": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}
_STAT = {
    "type": "object",
    "required": ["mean", "std", "n"],
    "properties": {"mean": _NUM, "std": _NUM, "n": {"type": "integer", "minimum": 0}},
    "additionalProperties": False,
}
_ROLE_KEYS = ["all", *ROLES]
_BY_ROLE_STAT = {
    "type": "object",
    "required": _ROLE_KEYS,
    "properties": {k: _STAT for k in _ROLE_KEYS},
    "additionalProperties": False,
}
_ROLE_BLOCK = {
    "type": "object",
    "required": [*M.ROLE_METRICS.values(), "harmonic_mean"],
    "properties": {**{name: _ACC for name in M.ROLE_METRICS.values()}, "harmonic_mean": _NUM},
    "additionalProperties": False,
}
#: JSON Schema (draft 2020-12) of ``metrics.json``.
METRICS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "erase audit metrics",
    "type": "object",
    "required": ["schema_version", "protocol", "models"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "attacks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model", "label", "concept", "n", "seed", "rows", "comparison"],
                "properties": {
                    "rows": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["row", "kind", "clip", "judge"],
                            "properties": {"clip": _ACC, "judge": {"anyOf": [_ACC, {"type": "null"}]}},
                        },
                    }
                },
            },
        },
        "protocol": {
            "type": "object",
            "required": [
                "model",
                "model_fingerprint",
                "scheduler",
                "steps",
                "guidance",
                "height",
                "width",
                "batch_size",
                "images_per_prompt",
                "num_processes",
                "scorer",
                "judge",
                "suite",
                "seeds",
            ],
            "properties": {
                "model": {"type": "string"},
                "model_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "steps": {"type": "integer", "minimum": 1},
                "guidance": {"type": "number"},
                "images_per_prompt": {"type": "integer", "minimum": 1},
                "judge": {"type": "boolean"},
                "suite": {
                    "type": "object",
                    "required": ["name", "source", "file", "rows", "prompts", "roles", "labels"],
                    "properties": {
                        "roles": {"type": "array", "items": {"enum": list(ROLES)}},
                        "labels": {
                            "type": "object",
                            "additionalProperties": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
                "seeds": {
                    "type": "object",
                    "required": ["count", "min", "max"],
                    "properties": {k: {"type": "integer"} for k in ("count", "min", "max")},
                },
            },
        },
        "models": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "key",
                    "label",
                    "images",
                    "artifact",
                    "clip",
                    "judge",
                    "clip_score",
                    "vs_original",
                    "per_concept",
                    "per_category",
                ],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "label": {"type": "string"},
                    "images": {"type": "integer", "minimum": 0},
                    "artifact": {
                        "type": ["object", "null"],
                        "required": ["folder", "method", "concepts", "base_model", "base_fingerprint"],
                    },
                    "clip": _ROLE_BLOCK,
                    "judge": {"anyOf": [_ROLE_BLOCK, {"type": "null"}]},
                    "clip_score": _BY_ROLE_STAT,
                    "vs_original": {
                        "anyOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "required": ["image_similarity", "cmmd"],
                                "additionalProperties": False,
                                "properties": {
                                    "image_similarity": _BY_ROLE_STAT,
                                    "cmmd": {
                                        "type": "object",
                                        "required": _ROLE_KEYS,
                                        "properties": {k: _NUM for k in _ROLE_KEYS},
                                        "additionalProperties": False,
                                    },
                                },
                            },
                        ]
                    },
                    "per_concept": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "concept",
                                "category",
                                "role",
                                "clip",
                                "judge",
                                "clip_score",
                                "clip_reads_as",
                            ],
                            "additionalProperties": False,
                            "properties": {
                                "concept": {"type": "string"},
                                "category": {"type": "string"},
                                "role": {"enum": list(ROLES)},
                                "clip": _ACC,
                                "judge": {"anyOf": [_ACC, {"type": "null"}]},
                                "clip_score": _STAT,
                                "clip_reads_as": {
                                    "type": "object",
                                    "additionalProperties": {"type": "integer", "minimum": 1},
                                },
                                "image_similarity": {"anyOf": [_STAT, {"type": "null"}]},
                            },
                        },
                    },
                    "per_category": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["clip", "judge", "concepts"],
                            "additionalProperties": False,
                            "properties": {"clip": _NUM, "judge": _NUM, "concepts": {"type": "integer"}},
                        },
                    },
                    "forms": {
                        "type": "object",
                        "propertyNames": {"enum": list(PROMPT_FORMS)},
                        "additionalProperties": {
                            "type": "object",
                            "required": ["rows", "clip", "judge"],
                            "additionalProperties": False,
                            "properties": {
                                "rows": {"type": "integer", "minimum": 1},
                                "clip": _ROLE_BLOCK,
                                "judge": {"anyOf": [_ROLE_BLOCK, {"type": "null"}]},
                            },
                        },
                    },
                },
            },
        },
    },
}
