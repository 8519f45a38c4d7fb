"""The audit's report and verdict on the tiny pipeline with a tiny random CLIP: relations between metrics.json and
what the report says (the verdict's figures and flags, per-role accuracies, image order), never golden HTML."""

from __future__ import annotations

import contextlib
import html
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_clip import save_clip_folder, tiny_clip_config
from transformers import CLIPModel

import erase
from erase import ConceptSpec, erase_concepts
from erase.workflow import audit_models
from evals.audit import (
    KEPT_MAX_LOSS,
    ORIGINAL,
    SYNONYM_MAX,
    TARGET_MAX,
    AuditModel,
    rewrite_report,
    run_audit,
    summary_table,
    verdict_text,
    verdicts,
)
from evals.audit.charts import Bar, Group, grouped_chart
from evals.scorer import ClipScorer
from evals.suites import ROLES, Suite, world_suite
from pipelines import load_pipeline

STEPS = 2


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> ClipScorer:
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(image_size=32, patch_size=8)).eval()
    return ClipScorer.from_pretrained(str(save_clip_folder(model, tmp_path_factory.mktemp("clip"))), progress=False)


@pytest.fixture(scope="module")
def wrapper():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def suite() -> Suite:
    """Two prompts per role from the world suite for van gogh: 8 rows."""
    full = world_suite(["van gogh"])
    rows = []
    for role in ROLES:
        rows += [r for r in full.rows if r.role == role][:2]
    return Suite("small", tuple(rows), full.labels, "test")


@pytest.fixture(scope="module")
def erased(wrapper, suite, scorer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A real van gogh erasure audited: (folder, metrics)."""
    artifact = erase_concepts(wrapper, ConceptSpec(("van gogh",), preserve=("monet",)), "uce")
    folder = tmp_path_factory.mktemp("art") / "vg"
    erase.save_artifact(artifact, folder, wrapper, export_pipeline=False)
    out = tmp_path_factory.mktemp("audit")
    result = run_audit(
        wrapper, suite, audit_models(wrapper, [folder]), out, scorer, images_per_prompt=2, steps=STEPS, progress=False
    )
    return out, result


class _SeesVanGoghEverywhere(torch.nn.Module):
    """A judge that takes every image for van gogh: an erasure that changes nothing keeps its target at 100%."""

    def __init__(self, labels: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.config = SimpleNamespace(classes={c: list(v) for c, v in labels.items()})

    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        return {c: ["van gogh" if "van gogh" in v else v[0]] * len(images) for c, v in self.config.classes.items()}


def _section(report: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', report, re.S)
    assert match, f"no {name} section"
    return match.group(1)


@pytest.mark.slow
def test_verdict_states_the_erased_concepts_figures(erased):
    out, result = erased
    original, vg = result["models"]
    report = (out / "report.html").read_text()
    verdict = _section(report, "verdict")
    # the verdict opens the report, before any chart or table
    assert report.index('<section id="verdict">') < report.index("<svg") and "<pre>" not in report
    (found,) = verdicts(result)
    assert found.label == vg["label"] and found.concepts == ("van gogh",)
    roles = [c.role for c in found.checks]
    assert roles == ["target", "synonym", "neighbour", "unrelated"]
    for check in found.checks:
        clip = check.measure("CLIP")
        entries = [
            (b, a)
            for b, a in zip(original["per_concept"], vg["per_concept"], strict=True)
            if b["role"] == check.role and (check.role not in ("target", "synonym") or b["concept"] == "van gogh")
        ]
        k_before, k_after = (sum(e[i]["clip"]["k"] for e in entries) for i in (0, 1))
        n = sum(a["clip"]["n"] for _, a in entries)
        assert (clip.before["k"], clip.after["k"], clip.after["n"]) == (k_before, k_after, n)
        # the flag follows the stated limit
        if check.role == "target":
            assert clip.passed == (k_after / n <= TARGET_MAX)
        elif check.role == "synonym":
            assert clip.passed == (k_after / n <= SYNONYM_MAX)
        else:
            assert clip.passed == ((k_before - k_after) / n <= KEPT_MAX_LOSS + 1e-9)
        # the report shows each check's before -> after, with the judge's figures beside CLIP's
        assert check.subject in html.unescape(verdict)
        assert f"{clip.before['value']:.0%} &rarr; {clip.after['value']:.0%}" in verdict
    target = found.checks[0].measure("CLIP")
    assert f"{target.after['low']:.0%}, {target.after['high']:.0%}]" in verdict
    assert ("PASS" if found.passed else "FAIL") in verdict and found.headline in html.unescape(verdict)
    assert verdict_text(result).startswith(f"{vg['label']} (uce): {found.headline}")


@pytest.mark.slow
def test_report_tables_and_image_order(erased):
    out, result = erased
    report = (out / "report.html").read_text()
    # settings as HTML tables: no JSON dumped anywhere in the settings and provenance
    settings = _section(report, "settings")
    config = result["models"][1]["artifact"]["config"]
    assert config and all(f"<th>{html.escape(k)}</th>" in settings for k in config)
    for raw in ('{"', "{&#34;", '["', "[&#34;", "&#39;:"):
        assert raw not in settings
    assert "<li>monet</li>" in settings  # the preserve list, as a list
    # the per-concept table, one row per (concept, role), with the flag of what the images were taken for
    concepts = _section(report, "concepts")
    assert concepts.count("<tr>") == 1 + len(result["models"][0]["per_concept"])
    flagged = 0
    for model in result["models"]:
        for c in model["per_concept"]:
            top, counts = next(iter(c["clip_reads_as"])), c["clip_reads_as"]
            flagged += top != c["concept"] and counts[top] > counts.get(c["concept"], 0)
    assert concepts.count('class="pill">&rarr;') == 1 + flagged  # and once in the legend above the table
    # images: the erased concept's groups first, then the kept ones, most changed (lowest similarity) first
    images = _section(report, "images")
    similarity = r'(?: <span class="muted">&middot; image similarity to the original ([\d.]+)</span>)?'
    heads = re.findall(rf"<h3>(\w+): ([^<]+?){similarity}</h3>", images)
    assert [h[0] for h in heads[:2]] == ["target", "synonyms"]
    kept = [float(h[2]) for h in heads[2:]]
    assert len(kept) == len(heads) - 2 and kept == sorted(kept)
    entries = {(c["role"], c["concept"]): c for c in result["models"][1]["per_concept"]}
    lowest = min(
        (c for c in entries.values() if c["role"] in ("neighbour", "unrelated")),
        key=lambda c: c["image_similarity"]["mean"],
    )
    assert heads[2][1] == lowest["concept"]
    # the original's harmonic mean is not applicable; accuracies per role, never a category mean across roles
    table = summary_table(result)
    harmonic = next(line for line in table.splitlines() if line.startswith("harmonic mean"))
    assert harmonic.split()[3] == "n/a" and "mean accuracy" not in table and "mean accuracy" not in report
    pairs = {(c["category"], c["role"]) for c in result["models"][0]["per_concept"]}
    assert {line.split("  ")[0] for line in table.splitlines() if line.startswith("accuracy: ")} == {
        f"accuracy: {category}, {role}" for category, role in pairs
    }
    # the report is rebuilt from the folder alone, identically
    before = (out / "report.html").read_bytes()
    rewrite_report(out)
    assert (out / "report.html").read_bytes() == before


@pytest.mark.slow
def test_an_erasure_that_leaves_its_target_fails_and_the_report_is_escaped(wrapper, suite, scorer, tmp_path):
    config = {"scale": 1.0, "layers": ["a", "b"], "note": "<script>alert(1)</script>", "inner": {"k": [1, 2]}}
    noop = AuditModel(
        "noop-00000000",
        "<b>noop</b>",
        "somewhere",
        lambda _wrapper: contextlib.nullcontext(),  # no change: the erased images are the original's
        {"method": "none", "concepts": ["van gogh"], "preserve": ["monet & co"], "config": config},
    )
    judge = _SeesVanGoghEverywhere(suite.labels)
    result = run_audit(wrapper, suite, [noop], tmp_path, scorer, judge, steps=STEPS, progress=False)
    original, kept = result["models"]
    assert original["key"] == ORIGINAL
    assert [c["clip"] for c in original["per_concept"]] == [c["clip"] for c in kept["per_concept"]]
    (found,) = verdicts(result)
    target = found.checks[0]
    assert target.role == "target" and target.subject == "van gogh"
    assert target.measure("judge").after["value"] == 1.0 and not target.passed and not found.passed
    assert target.word == "not erased" and found.headline.startswith("van gogh not erased")
    assert all(c.passed for c in found.checks if c.role in ("neighbour", "unrelated"))  # nothing else moved
    report = (tmp_path / "report.html").read_text()
    verdict = _section(report, "verdict")
    assert "FAIL" in verdict and "PASS" not in verdict and "not erased" in verdict
    assert "100% &rarr; 100%" in verdict and f"at most {TARGET_MAX:.0%} after" in verdict
    assert "[FAIL]" in verdict_text(result)
    # every text is escaped: labels, settings, preserve list
    assert "<script>" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "<b>noop</b>" not in report and "&lt;b&gt;noop&lt;/b&gt;" in report
    assert "monet &amp; co" in report
    settings = _section(report, "settings")
    assert "{&#34;" not in settings and "<th>inner</th>" in settings and "<th>k</th>" in settings
    assert json.loads((tmp_path / "metrics.json").read_text()) == result


def test_original_alone_has_no_verdict(wrapper, suite, scorer, tmp_path):
    result = run_audit(wrapper, suite, [], tmp_path, scorer, steps=STEPS, progress=False)
    assert verdicts(result) == [] and "original model alone" in verdict_text(result)
    report = (tmp_path / "report.html").read_text()
    assert "original model alone" in _section(report, "verdict") and "<svg" in report


def test_grouped_chart_geometry():
    bars = [Bar("original", 1.0, 0.5, 1.0), Bar("erased", 0.25, 0.0, 0.5), Bar("none", None)]
    chart = grouped_chart("t", [Group("target", "efficacy", bars, 0.1, [1])], [])
    heights = [r["height"] for r in chart.rects]
    assert len(heights) == 2 and heights[0] == pytest.approx(4 * heights[1], abs=0.2)
    limit = [line for line in chart.lines if line["cls"] == "limit"]
    zero = max(r["y"] + r["height"] for r in chart.rects)
    assert len(limit) == 1 and zero - limit[0]["y1"] == pytest.approx(0.1 * heights[0], abs=0.2)
    assert any(t["text"] == "n/a" for t in chart.texts) and any(t["text"] == "25%" for t in chart.texts)
