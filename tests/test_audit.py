"""Generation audits on the tiny pipeline with a tiny random CLIP: suites, resume, multi-process, outputs, script."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from launch import two_process_launcher
from PIL import Image

from erase import ArtifactMismatchError
from erase.workflow import audit_models
from evals import metrics as M
from evals.audit import (
    METRICS_SCHEMA,
    ORIGINAL,
    AuditError,
    generation_summary,
    image_name,
    per_concept_table,
    run_audit,
    summary_table,
)
from evals.microworld.judge import Judge, JudgeConfig
from evals.suites import (
    ROLES,
    Suite,
    SuiteError,
    SuiteRow,
    concept_suite,
    load_suite,
    resolve_suite,
    shipped_suites,
    world_suite,
)
from pipelines import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "audit.py"
STEPS = 2


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def small_suite() -> Suite:
    """Two prompts per role from the world suite for van gogh: 8 rows."""
    full = world_suite(["van gogh"])
    rows = []
    for role in ROLES:
        rows += [r for r in full.rows if r.role == role][:2]
    return Suite("small", tuple(rows), full.labels, "test")


def _audit(wrapper, suite, artifacts, out, scorer, **kw):
    kw = {"images_per_prompt": 2, "batch_size": 3, "steps": STEPS, "progress": False, **kw}
    return run_audit(wrapper, suite, audit_models(wrapper, artifacts), out, scorer, **kw)


# ----------------------------------------------------------------------------------------------------------------
# suites


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "prompt,seed,concept,category,role\na cat,1,cat,object,target\na dog,2,dog,object,foo\n",
            "line 3: role 'foo'",
        ),
        ("prompt,seed,concept,category\na cat,1,cat,object\n", "line 1: header lacks role"),
        ("prompt,seed,concept,category,role\na cat,x,cat,object,target\n", "line 2: seed 'x'"),
        ("prompt,seed,concept,category,role\n,1,cat,object,target\n", "line 2: prompt is empty"),
        (
            "prompt,seed,concept,category,role\na cat,1,cat,object,target\na cat,1,cat,object,target\n",
            "repeats line 2",
        ),
        ("prompt,seed,concept,category,role\na cat,1,cat,object\n", "line 2: 4 fields"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "prompts.csv"
    path.write_text(content)
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert str(err.value).startswith(f"{path} line") and message in str(err.value)


def test_jsonl_suite_and_errors(tmp_path):
    good = [{"prompt": "a cat", "seed": 1, "concept": "cat", "category": "object", "role": "unrelated"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    suite = load_suite(path)
    assert suite.rows == (SuiteRow("a cat", 1, "cat", "object", "unrelated"),) and suite.labels == {"object": ("cat",)}
    path.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(SuiteError, match=r"p.jsonl line 2: not JSON"):
        load_suite(path)
    path.write_text(json.dumps({**good[0], "role": "foo"}) + "\n")
    with pytest.raises(SuiteError, match=r"line 1: role 'foo' is not one of target, synonym, neighbour, unrelated"):
        load_suite(path)


def test_world_suite_has_all_roles_and_expands():
    suite = world_suite(["van gogh"], images_per_prompt=1)
    assert suite.roles() == list(ROLES)
    by_role = {role: {r.concept for r in suite.rows if r.role == role} for role in ROLES}
    assert by_role["target"] == by_role["synonym"] == {"van gogh"} and by_role["neighbour"] == {"monet"}
    assert "red" in by_role["unrelated"] and "plain" not in by_role["unrelated"]
    assert any("vincent van gogh" in r.prompt for r in suite.rows if r.role == "synonym")
    assert world_suite(["van gogh"], 3) == suite.expand(3) and len(suite.expand(3).rows) == 3 * len(suite.rows)
    # a prompt's seeds do not depend on the targets: original-model images are shared across audits
    other = {r.prompt: r.seed for r in world_suite(["red"]).rows}
    assert all(other[r.prompt] == r.seed for r in suite.rows if r.prompt in other)
    with pytest.raises(SuiteError, match="not a micro-world concept"):
        world_suite(["eiffel tower"])


def test_concept_suite_for_hub_models():
    suite = concept_suite(["van gogh"], ["claude monet", "van gogh", "a dog"])
    assert suite.roles() == ["target", "unrelated"]
    assert suite.labels == {"concept": ("van gogh", "claude monet", "a dog")}
    assert len(suite.rows) == 3 + 2 * 2 and len(concept_suite(["x"], [], 2).rows) == 6


def test_shipped_suites_resolve():
    assert {"world", "art_styles", "objects", "general"} <= set(shipped_suites())
    for name in shipped_suites():
        assert resolve_suite(name, ["van gogh"]).rows
    assert resolve_suite("art_styles").roles() == list(ROLES)
    with pytest.raises(SuiteError, match="unknown suite"):
        resolve_suite("nope")


# ----------------------------------------------------------------------------------------------------------------
# metrics


def test_metric_functions():
    low, high = M.wilson_interval(0, 10)
    assert low == 0.0 and 0.27 < high < 0.285  # 0.2775 for 0/10
    assert M.accuracy([True, False, True, True]) == pytest.approx(
        {"value": 0.75, "low": 0.3006, "high": 0.9544, "n": 4, "k": 3}, abs=1e-3
    )
    assert M.accuracy([])["value"] is None and M.harmonic_mean(0.2, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(40, 8, generator=g) + 2.0, dim=-1)
    # unbiased estimator against a direct double loop
    k = lambda a, b: float(torch.exp(-((a - b) ** 2).sum() / 200.0))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
    yy = sum(k(y[i], y[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
    xy = sum(k(x[i], y[j]) for i in range(40) for j in range(40)) / 1600
    assert M.cmmd(x, y) == pytest.approx(1000 * (xx + yy - 2 * xy), rel=1e-6) and M.cmmd(x, y) > 0
    assert M.cmmd(x[:1], y) is None


# ----------------------------------------------------------------------------------------------------------------
# the audit


@pytest.mark.slow
def test_audit_outputs_schema_and_report(wrapper, small_suite, artifact_dir, scorer, tmp_path):
    judge = Judge(JudgeConfig(widths=(4,))).eval()  # random, but exercises the judge column
    result = _audit(wrapper, small_suite, [artifact_dir], tmp_path, scorer, judge=judge, scorer_name="tiny-clip")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == result
    jsonschema.validate(saved, METRICS_SCHEMA)
    original, erased = saved["models"]
    assert original["key"] == ORIGINAL and original["vs_original"] is None and original["artifact"] is None
    assert erased["artifact"]["concepts"] == ["van gogh"] and erased["artifact"]["method"] == "uce"
    assert original["clip"]["efficacy"]["n"] == 4 and original["judge"]["preservation"]["n"] == 4
    assert erased["vs_original"]["image_similarity"]["all"]["n"] == 16
    assert isinstance(erased["vs_original"]["cmmd"]["all"], float)
    assert {c["role"] for c in original["per_concept"]} == set(ROLES)
    # what each group's images read as: one verdict an image, the concept's own count is the accuracy's k
    for entry in original["per_concept"] + erased["per_concept"]:
        reads_as, clip = entry["clip_reads_as"], entry["clip"]
        assert sum(reads_as.values()) == clip["n"] and reads_as.get(entry["concept"], 0) == clip["k"]
        assert set(reads_as) <= set(small_suite.labels[entry["category"]])
    # the text table marks each (row, model) whose images mostly read as another concept, and only those
    lines = per_concept_table(result).splitlines()[2:]
    for i, line in enumerate(lines):
        concept = original["per_concept"][i]["concept"]
        counts = [m["per_concept"][i]["clip_reads_as"] for m in (original, erased)]
        tops = [next(iter(n)) for n in counts]
        marks = [f"-> {t}" for t, n in zip(tops, counts, strict=True) if t != concept and n[t] > n.get(concept, 0)]
        assert line.count("->") == len(marks) and all(mark in line for mark in marks)
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert len(images) == 2 * 16 and not list(tmp_path.rglob("*.tmp"))
    row = small_suite.rows[0]
    assert (tmp_path / "images" / ORIGINAL / image_name(row.prompt, row.seed)).is_file()
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 * 16 and "<svg" in report
    assert (
        "uce" in report
        and "van gogh" in report
        and report.count("reads as ") == 2 * len({(r.role, r.concept) for r in small_suite.rows})
    )
    assert {p.name for p in (tmp_path / "grids").iterdir()} == {"object.png", "style.png"}
    assert "efficacy (clip)" in summary_table(result)
    generation = json.loads((tmp_path / "generation-0.json").read_text())
    assert generation["images_generated"] == 2 * 16 and generation["images_per_second"] > 0
    assert generation_summary(tmp_path).startswith("generation: 32 images in ")
    # a rerun finds everything on disk
    _audit(wrapper, small_suite, [artifact_dir], tmp_path, scorer, judge=judge, scorer_name="tiny-clip")
    assert "nothing to generate" in generation_summary(tmp_path)
    # unchanged weights after the audit: the artifact was applied temporarily
    again = wrapper.generate([row.prompt], [row.seed], steps=STEPS, progress=False)[0]
    on_disk = np.asarray(Image.open(tmp_path / "images" / ORIGINAL / image_name(row.prompt, row.seed)))
    assert np.array_equal(np.asarray(again), on_disk)


class _Interrupt(Exception):
    pass


def _counting(wrapper, monkeypatch, log):
    real = wrapper.generate

    def generate(prompts, seeds, **kw):
        log.extend(zip(prompts, seeds, strict=True))
        return real(prompts, seeds, **kw)

    monkeypatch.setattr(wrapper, "generate", generate)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_metrics(wrapper, small_suite, artifact_dir, scorer, tmp_path, monkeypatch):
    reference = _audit(wrapper, small_suite, [artifact_dir], tmp_path / "ref", scorer)
    calls: list = []
    _counting(wrapper, monkeypatch, calls)
    written: list[Path] = []

    def stop_after(k):
        def on_image(path):
            written.append(path)
            if len(written) == k:
                raise _Interrupt

        return on_image

    out = tmp_path / "resumed"
    # 16 images per model in batches of 3 (3, 3, 3, 3, 3, 1). Killed first on a batch boundary (after 6 images)...
    with pytest.raises(_Interrupt):
        _audit(wrapper, small_suite, [artifact_dir], out, scorer, on_image=stop_after(6))
    assert len(calls) == 6 and len(list(out.rglob("*.png"))) == 6
    # ...then in the middle of the erased model's third batch (2 of its 3 images written)
    with pytest.raises(_Interrupt):
        _audit(wrapper, small_suite, [artifact_dir], out, scorer, on_image=stop_after(16 + 8))
    original_pass = calls[:16]
    assert len(set(original_pass)) == 16, "an original-model image was generated twice"
    assert len(calls) == 16 + 9
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*.png")}
    assert len(stamps) == 24
    calls.clear()
    result = _audit(wrapper, small_suite, [artifact_dir], out, scorer)
    # only the erased model's remaining batches run; the half-written one runs again whole (3 + 3 + 3 + 1 images),
    # so every image's pixels come from the same batch as in an uninterrupted run; no file is written twice
    assert len(calls) == 10
    for path, stamp in stamps.items():
        assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp, f"{path} was rewritten"
    assert result == reference
    assert (out / "metrics.json").read_bytes() == (tmp_path / "ref" / "metrics.json").read_bytes()
    # a complete audit reruns without generating anything
    calls.clear()
    assert _audit(wrapper, small_suite, [artifact_dir], out, scorer) == result and calls == []


@pytest.mark.slow
def test_two_processes_match_one(wrapper, small_suite, artifact_dir, scorer, tmp_path):
    one = _audit(wrapper, small_suite, [artifact_dir], tmp_path / "one", scorer)
    two = tmp_path / "two"
    # process 1 first: process 0 computes the metrics, which needs everything on disk
    assert _audit(wrapper, small_suite, [artifact_dir], two, None, process_index=1, num_processes=2) == {
        "process_index": 1,
        "images_generated": 16,
    }
    result = _audit(wrapper, small_suite, [artifact_dir], two, scorer, process_index=0, num_processes=2)
    for a in (tmp_path / "one" / "images").rglob("*.png"):
        b = two / a.relative_to(tmp_path / "one")
        pa, pb = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
        assert np.abs(pa - pb).max() <= 2
    assert result["protocol"]["num_processes"] == 2
    for m1, m2 in zip(one["models"], result["models"], strict=True):
        assert m1["clip"] == m2["clip"]


@pytest.mark.slow
def test_missing_share_is_reported(wrapper, small_suite, scorer, tmp_path):
    with pytest.raises(AuditError, match="images are missing"):
        _audit(wrapper, small_suite, [], tmp_path, scorer, process_index=0, num_processes=2)


@pytest.mark.slow
def test_foreign_artifact_and_changed_settings_are_refused(wrapper, small_suite, artifact_dir, scorer, tmp_path):
    other = load_pipeline("tiny", seed=1)
    with pytest.raises(ArtifactMismatchError):
        _audit(other, small_suite, [artifact_dir], tmp_path / "a", scorer)
    assert not (tmp_path / "a" / "images").exists()
    _audit(wrapper, small_suite, [], tmp_path / "b", scorer)
    with pytest.raises(AuditError, match="other settings.*steps 2 -> 3"):
        _audit(wrapper, small_suite, [], tmp_path / "b", scorer, steps=3)


# ----------------------------------------------------------------------------------------------------------------
# the script


def _run(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text(
        "prompt,seed,concept,category,role\n"
        "a painting in the style of van gogh,1,van gogh,style,target\n"
        "a painting in the style of vincent van gogh,2,van gogh,style,synonym\n"
        "a painting in the style of monet,3,monet,style,neighbour\n"
        "a red star,4,star,object,unrelated\n"
        "a blue circle,5,circle,object,unrelated\n"
    )
    return path


def test_script_bad_input_is_one_line_exit_2(tmp_path, clip_dir, artifact_dir, capsys):
    script = runpy.run_path(str(SCRIPT), run_name="audit_script")  # main() in-process: no interpreter start-up
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,seed,concept,category,role\na,1,a,b,target\nb,2,b,b,foo\n")
    common = ["--model", "tiny", "--scorer", str(clip_dir), "--steps", "2", "--quiet"]
    assert script["main"]([*common, "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.csv line 3: role 'foo'" in errors[0]
    # an artifact made for other base weights
    foreign = tmp_path / "foreign"
    shutil.copytree(artifact_dir, foreign)
    meta = json.loads((foreign / "erasure.json").read_text())
    (foreign / "erasure.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 64}))
    assert script["main"]([*common, "--erasure", str(foreign), "--out", str(tmp_path / "o2")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was made for base model" in errors[0]
    assert not (tmp_path / "o2" / "images").exists()
    assert script["main"]([*common, "--images-per-prompt", "0", "--out", str(tmp_path / "o3")]) == 2
    assert "--images-per-prompt must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_two_processes_matches_in_process(tmp_path, clip_dir, artifact_dir, wrapper, scorer):
    launcher = two_process_launcher()
    if launcher is None:
        pytest.skip("accelerate launcher not installed")
    prompts = _prompt_file(tmp_path)
    out = tmp_path / "launched"
    args = ["--model", "tiny", "--prompts", str(prompts), "--erasure", str(artifact_dir), "--scorer", str(clip_dir)]
    args += ["--steps", str(STEPS), "--images-per-prompt", "2", "--batch-size", "3", "--quiet", "--device", "cpu"]
    args += ["--out", str(out)]
    result = _run(*args, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "efficacy (clip)" in result.stdout
    launched = json.loads((out / "metrics.json").read_text())
    assert launched["protocol"]["num_processes"] == 2
    reference = _audit(wrapper, load_suite(prompts), [artifact_dir], tmp_path / "ref", scorer)
    for a in (tmp_path / "ref" / "images").rglob("*.png"):
        b = out / a.relative_to(tmp_path / "ref")
        pa, pb = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
        assert np.abs(pa - pb).max() <= 2
    assert [m["clip"] for m in launched["models"]] == [m["clip"] for m in reference["models"]]
