"""Bad inputs and faults around audits (reliability report 2026-11-30, audit.py rows): each is one ``error:`` line and
exit code 2 from the script (an :class:`AuditError` from the library), found before any model loads where it can be,
with nothing written or lost; a damaged image is generated again and a killed run's temporary files are removed."""

from __future__ import annotations

import errno
import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from erase.workflow import audit_models
from evals.audit import AuditError, check_output_folder, image_name, run_audit
from evals.scorer import ClipScorer
from evals.suites import ROLES, Suite, world_suite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "audit.py"
STEPS = 2
PROMPTS = (
    "prompt,seed,concept,category,role\n"
    "a painting in the style of van gogh,1,van gogh,style,target\n"
    "a painting in the style of monet,3,monet,style,neighbour\n"
    "a red star,4,star,object,unrelated\n"
)


# ----------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def suite() -> Suite:
    """One prompt per role from the world suite for van gogh: 4 rows."""
    full = world_suite(["van gogh"])
    return Suite("small", tuple(next(r for r in full.rows if r.role == role) for role in ROLES), full.labels, "test")


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(str(SCRIPT), run_name="audit_script")["main"]  # in-process: no interpreter start-up


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text(PROMPTS)
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make loading the model or the scorer fail the test: the error must come before either."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr("pipelines.load_pipeline", boom)
    monkeypatch.setattr(ClipScorer, "from_pretrained", boom)


def _audit(wrapper, suite, artifacts, out, scorer, **kw):
    kw = {"images_per_prompt": 1, "batch_size": 2, "steps": STEPS, "progress": False, **kw}
    return run_audit(wrapper, suite, audit_models(wrapper, artifacts), out, scorer, **kw)


def _args(clip_dir: Path, prompts: Path, out: Path, *more: str) -> list[str]:
    common = ["--model", "tiny", "--scorer", str(clip_dir), "--prompts", str(prompts), "--steps", str(STEPS)]
    return [*common, "--images-per-prompt", "1", "--batch-size", "2", "--quiet", "--out", str(out), *more]


def _one_error(capsys) -> str:
    """The script's stderr must be exactly one ``error:`` line; returns it."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------------
# the device (U21, U21b)


def test_bad_device_is_one_line_before_anything_loads(main, clip_dir, prompts, tmp_path, capsys, nothing_loads):
    out = tmp_path / "out"
    assert main(_args(clip_dir, prompts, out, "--device", "nonsense")) == 2
    assert "nonsense" in _one_error(capsys)
    if not torch.cuda.is_available():
        assert main(_args(clip_dir, prompts, out, "--device", "cuda")) == 2
        assert "CUDA is not available" in _one_error(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# the output folder (U22, U23, U30)


@pytest.mark.parametrize("case", ["file", "under-a-file", "dangling-link"])
def test_out_in_the_way_is_refused_early(main, clip_dir, prompts, tmp_path, capsys, nothing_loads, case):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    out = {"file": afile, "under-a-file": afile / "sub", "dangling-link": tmp_path / "link" / "sub"}[case]
    before = _snapshot(tmp_path)
    assert main(_args(clip_dir, prompts, out)) == 2
    line = _one_error(capsys)
    assert {"file": "notes.txt is a file, not a folder", "under-a-file": "notes.txt is a file, not a folder"}.get(
        case, "link to nothing"
    ) in line
    assert _snapshot(tmp_path) == before and not (tmp_path / "nowhere").exists()


def test_a_folder_of_other_files_is_refused_before_the_model_loads(
    main, clip_dir, prompts, tmp_path, capsys, monkeypatch, wrapper, suite
):
    """An audit wrote report.html, metrics.json and images/ over a user's files of those names in any --out."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my thesis")
    (out / "metrics.json").write_text("{}")
    before = _snapshot(out)
    with monkeypatch.context() as patch:
        patch.setattr("pipelines.load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
        assert main(_args(clip_dir, prompts, out)) == 2
    assert "holds files but no audit (metrics.json, report.html)" in _one_error(capsys)
    with pytest.raises(AuditError, match="holds files but no audit"):  # the library alone too
        _audit(wrapper, suite, [], out, None)
    assert _snapshot(out) == before


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder this process cannot write to: permissions for a user, a read-only bind mount for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep me")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"root, and no bind mount here: {bind.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only: {ro.stderr.decode().strip()}")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_out_is_refused_early(main, clip_dir, prompts, read_only_dir, capsys, monkeypatch, wrapper, suite):
    for out in (read_only_dir, read_only_dir / "audit"):
        with monkeypatch.context() as patch:
            patch.setattr("pipelines.load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
            assert main(_args(clip_dir, prompts, out)) == 2
        assert f"{read_only_dir} is not writable" in _one_error(capsys)
    with pytest.raises(AuditError, match="is not writable"):
        check_output_folder(read_only_dir / "a" / "b")
    # the library alone: one AuditError naming the folder, not an OSError
    with pytest.raises(AuditError, match=r"cannot (create the folder|write) .*ro"):
        _audit(wrapper, suite, [], read_only_dir / "audit", None)
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["keep.txt"]


def test_an_out_another_audit_holds_is_refused_before_the_model_loads(
    main, clip_dir, prompts, tmp_path, capsys, nothing_loads
):  # D4 of reliability-2026-12-07
    from pipelines.files import claim_folder

    with claim_folder(tmp_path / "out"):
        assert main(_args(clip_dir, prompts, tmp_path / "out")) == 2
    assert f"being written by another run (process {os.getpid()})" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_audit_resumes(main, clip_dir, prompts, tmp_path, capsys, monkeypatch):
    assert main(_args(clip_dir, prompts, tmp_path / "ref")) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the disk fills up after audit.json (1 fsync), suite.csv and two images (file and folder: 2)
        calls.append(fd)
        if len(calls) > 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(_args(clip_dir, prompts, out)) == 2
    line = _one_error(capsys)
    assert f"cannot write {out / 'images' / 'original'}" in line and "No space left on device" in line
    assert "rerun the same command to resume" in line
    assert not _temporaries(out)
    kept = sorted((out / "images").rglob("*.png"))
    assert len(kept) == 2
    for path in kept:
        with Image.open(path) as image:
            image.load()
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    assert main(_args(clip_dir, prompts, out)) == 0
    assert (out / "metrics.json").read_bytes() == (tmp_path / "ref" / "metrics.json").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# what the folder holds (U12b, U13, U29)


@pytest.mark.slow
def test_another_suite_or_erasure_set_is_refused(wrapper, suite, artifact_dir, scorer, tmp_path):
    _audit(wrapper, suite, [artifact_dir], tmp_path, scorer)
    before = _snapshot(tmp_path)
    other = Suite("other", suite.rows[:3], suite.labels, "test")
    with pytest.raises(AuditError, match=r"other settings \(suite 'small' \(4 images, .*\) -> 'other' \(3 images"):
        _audit(wrapper, other, [artifact_dir], tmp_path, scorer)
    # the same suite name with other rows, and the same rows with another number of images per prompt
    renamed = Suite("small", suite.rows[:3], suite.labels, "test")
    with pytest.raises(AuditError, match=r"suite 'small' \(4 images, sha256 \w+\) -> 'small' \(3 images"):
        _audit(wrapper, renamed, [artifact_dir], tmp_path, scorer)
    with pytest.raises(AuditError, match=r"suite 'small' \(4 images, .*\) -> 'small' \(8 images"):
        _audit(wrapper, suite, [artifact_dir], tmp_path, scorer, images_per_prompt=2)
    with pytest.raises(AuditError, match=r"erasures \[vg-\w{8}\] -> \[\]\); use another output folder"):
        _audit(wrapper, suite, [], tmp_path, scorer)
    assert _snapshot(tmp_path) == before, "the earlier audit was changed"
    # an audit.json of an older version, which did not record the suite, erasures and batching
    saved = json.loads((tmp_path / "audit.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("batch_size", "num_processes", "suite", "erasures")}
    (tmp_path / "audit.json").write_text(json.dumps(old))
    with pytest.raises(AuditError, match=r"older version \(its audit.json does not record batch_size, num_processes"):
        _audit(wrapper, suite, [artifact_dir], tmp_path, scorer)


@pytest.mark.slow
def test_another_batching_is_refused(wrapper, suite, scorer, tmp_path):
    _audit(wrapper, suite, [], tmp_path, scorer)
    before = _snapshot(tmp_path)
    with pytest.raises(AuditError, match=r"other settings \(batch_size 2 -> 3\)"):
        _audit(wrapper, suite, [], tmp_path, scorer, batch_size=3)
    with pytest.raises(AuditError, match=r"other settings \(num_processes 1 -> 2\)"):
        _audit(wrapper, suite, [], tmp_path, scorer, process_index=1, num_processes=2)
    assert _snapshot(tmp_path) == before


def test_script_refuses_another_suite_in_one_line(main, clip_dir, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(clip_dir, prompts, out)) == 0
    capsys.readouterr()
    before = _snapshot(out)
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(PROMPTS.splitlines(keepends=True)[:3]))
    assert main(_args(clip_dir, fewer, out)) == 2
    line = _one_error(capsys)
    assert "other settings (suite 'prompts' (3 images" in line and "-> 'fewer' (2 images" in line
    assert line.endswith("use another output folder")
    assert _snapshot(out) == before


@pytest.mark.parametrize("content", [b"[]", b"5", b"{not json", b"\xff\xfe{}", b'"audit"'])
def test_audit_json_that_is_not_an_object_is_named(wrapper, suite, scorer, tmp_path, content):
    (tmp_path / "audit.json").write_bytes(content)
    with pytest.raises(
        AuditError, match=r"audit.json is (corrupt|not an audit's settings).*use another output folder"
    ):
        _audit(wrapper, suite, [], tmp_path, scorer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json"]


def test_script_audit_json_list_is_one_line(main, clip_dir, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "audit.json").write_text("[]")
    assert main(_args(clip_dir, prompts, out)) == 2
    assert f"{out / 'audit.json'} is not an audit's settings (a JSON list, not an object)" in _one_error(capsys)


# ----------------------------------------------------------------------------------------------------------------
# images on disk (U17, U14b)


@pytest.mark.slow
def test_damaged_images_are_generated_again(wrapper, suite, artifact_dir, scorer, tmp_path, caplog):
    reference = _audit(wrapper, suite, [artifact_dir], tmp_path / "ref", scorer)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    pngs = {p.parent.name: p for p in sorted((out / "images").rglob("*.png"))}
    truncated, garbage = pngs["original"], next(p for k, p in pngs.items() if k != "original")
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage.write_bytes(b"not a png at all")
    small = Image.new("RGB", (8, 8))
    resized = next(p for p in sorted((out / "images" / "original").iterdir()) if p != truncated)
    small.save(resized)
    untouched = {
        p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png") if p not in (truncated, garbage, resized)
    }
    with caplog.at_level("WARNING", logger="evals.audit"):
        result = _audit(wrapper, suite, [artifact_dir], out, scorer)
    assert result == reference
    assert (out / "metrics.json").read_bytes() == (tmp_path / "ref" / "metrics.json").read_bytes()
    for path in (truncated, garbage, resized):
        assert path.read_bytes() == (tmp_path / "ref" / path.relative_to(out)).read_bytes()
        assert any(str(path) in message for message in caplog.messages), f"{path} regenerated without a word"
    assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())


@pytest.mark.slow
def test_an_image_still_damaged_at_scoring_is_named(wrapper, suite, scorer, tmp_path):
    # process 1's share is on disk, then one of its images is damaged: process 0 does not regenerate other shares
    _audit(wrapper, suite, [], tmp_path, None, process_index=1, num_processes=2)
    row = suite.rows[1]
    path = tmp_path / "images" / "original" / image_name(row.prompt, row.seed)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(AuditError, match=rf"cannot read the image {path} \(.*\); delete it and rerun"):
        _audit(wrapper, suite, [], tmp_path, scorer, process_index=0, num_processes=2)


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.mark.slow
def test_a_killed_runs_temporary_files_are_removed(wrapper, suite, scorer, tmp_path):
    _audit(wrapper, suite, [], tmp_path, scorer)
    row = suite.rows[0]
    images = tmp_path / "images" / "original"
    dead, old = _dead_pid(), time.time() - 120
    stale = [
        images / f".{image_name(row.prompt, row.seed)}.{dead}.0123456789ab.tmp",
        tmp_path / f".metrics.json.{dead}.0123456789ab.tmp",
        tmp_path / "grids" / f".style.png.{dead}.0123456789ab.tmp",
    ]
    kept = [
        images / f".{image_name(row.prompt, row.seed)}.{os.getpid()}.abcdefabcdef.tmp",  # a live writer's
        images / f".other.png.{dead}.bbbbbbbbbbbb.tmp",  # just written: perhaps by another machine's process
        images / "notes.tmp",  # not one of ours
    ]
    for path in stale + kept:
        path.write_bytes(b"partial")
    for path in [*stale, kept[0], kept[2]]:
        os.utime(path, (old, old))
    _audit(wrapper, suite, [], tmp_path, scorer)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


# ----------------------------------------------------------------------------------------------------------------
# the scorer (U32) and loading bars


def test_pickle_checkpoint_and_unloadable_scorer_are_one_line(main, prompts, tmp_path, capsys, monkeypatch):
    import open_clip

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(Payload()))
    monkeypatch.setattr("pipelines.load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    base = ["--model", "tiny", "--prompts", str(prompts), "--quiet", "--out", str(out)]
    assert main([*base, "--scorer", f"open_clip:ViT-B-32/{evil}"]) == 2
    assert f"refusing to load the open_clip checkpoint {evil}: only .safetensors" in _one_error(capsys)
    assert not marker.exists()

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': cannot reach the hub\nmore detail")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    monkeypatch.setattr("evals.scorer._open_clip_cached", lambda repo_id, filename: False)
    assert main([*base, "--scorer", "open_clip:ViT-B-32/openai"]) == 2  # offline and not cached: said before open_clip
    line = _one_error(capsys)
    assert line.startswith("error: the CLIP scorer 'open_clip:ViT-B-32/openai' is not in the local cache")
    monkeypatch.setattr("evals.scorer._open_clip_cached", lambda repo_id, filename: True)
    assert main([*base, "--scorer", "open_clip:ViT-B-32/openai"]) == 2  # cached, yet open_clip fails: its reason
    line = _one_error(capsys)
    assert line.startswith("error: cannot load the CLIP scorer 'open_clip:ViT-B-32/openai': Failed to download")
    assert not out.exists()


@pytest.mark.slow
def test_quiet_shows_no_loading_bars(clip_dir, prompts, tmp_path):
    # a subprocess: the library verbosity the script sets is process-wide
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(SCRIPT), *_args(clip_dir, prompts, tmp_path / "out")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "" and "efficacy (clip)" in result.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]["batch_size"] == 2
