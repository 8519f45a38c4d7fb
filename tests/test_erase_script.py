"""scripts/erase.py as users type it (on the tiny model; the micro-world run is in test_micro_erasure.py)."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "erase.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_help_prints_usage():
    result = run_script("--help")
    assert result.returncode == 0 and "--concept" in result.stdout


def test_json_summary_and_artifact(tmp_path):
    out = tmp_path / "vg"
    result = run_script("--model", "tiny", "--concept", "van gogh", "--out", str(out), "--no-check", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["concepts"] == ["van gogh"] and summary["method"] == "uce" and summary["out"] == str(out)
    assert (out / "erasure.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concept", ""], "empty"),
        (["--concept", "word " * 90], "tokens"),
        (["--concept", "x", "--method", "nope"], "unknown erasure method"),
        (["--concept", "x", "--model", "/no/such/folder/anywhere"], "cannot load model"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_script("--model", "tiny", "--out", str(out), "--no-check", *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_existing_artifact_needs_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "vg"
    argv = ["erase.py", "--model", "tiny", "--concept", "van gogh", "--out", str(out), "--no-check"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as first:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert first.value.code == 0
    before = (out / "erasure.json").read_bytes()
    with pytest.raises(SystemExit) as second:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert second.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "erasure.json").read_bytes() == before
    monkeypatch.setattr(sys, "argv", [*argv, "--overwrite"])
    with pytest.raises(SystemExit) as third:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert third.value.code == 0
