"""The one writer of long jobs and the claim on an output folder (shared/reports/reliability-2026-12-07.md, D1 D4 D9
D10): real faults (a file size limit, a full or read-only tmpfs, long names, a file where a folder should be), real
processes racing for one folder."""

import errno
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import file_size_limit, private_tmpfs_available, run_on_tmpfs
from safetensors.torch import load_file

from pipelines.files import (
    FolderInUseError,
    WriteError,
    atomic_output,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    check_name_lengths,
    claim_folder,
    claim_path,
    move_into_place,
    temporary_sibling,
)

ROOT = Path(__file__).resolve().parents[1]
ERASE = ROOT / "scripts" / "erase.py"


def _everything(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: BaseException, *parts: str) -> str:
    text = str(err)
    assert "\n" not in text and all(part in text for part in parts), text
    return text


# ------------------------------------------------------------------------------------------------ the writer
def test_a_write_past_the_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
    """EFBIG, a real failure as root too: safetensors, bytes and whole folders; the old version stays."""
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    atomic_save_safetensors(tensors, tmp_path / "w.safetensors")
    atomic_write_json(tmp_path / "state.json", {"step": 1})
    before = _everything(tmp_path)
    big = {"w": torch.zeros(8192)}
    with file_size_limit(4096):
        with pytest.raises(WriteError) as caught:
            atomic_save_safetensors(big, tmp_path / "w.safetensors")  # safetensors' own error, made one line
        assert caught.value.errno == errno.EFBIG
        _one_line(caught.value, f"cannot write {tmp_path / 'w.safetensors'}", "File too large")
        with pytest.raises(WriteError, match="File too large"):
            atomic_write_bytes(tmp_path / "state.json", b"x" * 10000)
        with pytest.raises(WriteError, match="step-2"):
            with atomic_output(tmp_path / "step-2", folder=True) as tmp:
                (tmp / "small.json").write_text("{}")
                (tmp / "large.bin").write_bytes(b"x" * 10000)
    assert _everything(tmp_path) == before  # no temporaries, the old files intact
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], tensors["w"])


def _python_on_tmpfs(disk: Path, options: str, code: str) -> list[str]:
    """The lines ``code`` prints, run by this Python with a private tmpfs on ``disk`` (its path: ``sys.argv[1]``)."""
    found = run_on_tmpfs(disk, options, [sys.executable, "-c", code, str(disk)], timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert found.returncode == 0, found.stderr
    return found.stdout.splitlines()


def test_a_full_disk_is_one_line_and_leaves_no_temporaries(tmp_path):
    """ENOSPC on a real 64 KiB tmpfs (a private mount: no root needed)."""
    if not private_tmpfs_available(tmp_path):
        pytest.skip("no private tmpfs (user namespaces) on this system")
    code = (
        "import os, sys, torch\n"
        "from pipelines.files import WriteError, atomic_save_safetensors\n"
        "out = sys.argv[1]\n"
        "atomic_save_safetensors({'a': torch.zeros(4096)}, out + '/a.safetensors')\n"
        "try:\n"
        "    atomic_save_safetensors({'b': torch.zeros(65536)}, out + '/b.safetensors')\n"
        "except WriteError as err:\n"
        "    print('error:', err)\n"
        "print(sorted(os.listdir(out)))\n"
    )
    disk = tmp_path / "disk"
    error, listing = _python_on_tmpfs(disk, "size=64k", code)
    assert error.startswith(f"error: cannot write {disk / 'b.safetensors'}: No space left on device;"), error
    assert "rerun the same command to resume" in error
    assert listing == "['a.safetensors']"


def test_a_read_only_file_system_is_one_line(tmp_path):
    if not private_tmpfs_available(tmp_path):
        pytest.skip("no private tmpfs (user namespaces) on this system")
    code = (
        "import sys\n"
        "from pipelines.files import WriteError, atomic_write_json, claim_folder\n"
        "for write in (lambda: atomic_write_json(sys.argv[1] + '/ck/run.json', {}),\n"
        "              lambda: claim_folder(sys.argv[1] + '/out').__enter__()):\n"
        "    try:\n"
        "        write()\n"
        "    except WriteError as err:\n"
        "        print('error:', err)\n"
    )
    disk = tmp_path / "ro"
    lines = _python_on_tmpfs(disk, "ro,size=16k", code)
    assert len(lines) == 2 and all("Read-only file system" in line for line in lines), lines
    assert lines[0].startswith(f"error: cannot write {disk / 'ck'}")


def test_a_file_where_a_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("keep")
    for path in (tmp_path / "afile" / "ck" / "pool.safetensors", tmp_path / "afile" / "pool.safetensors"):
        with pytest.raises(WriteError) as caught:
            atomic_save_safetensors({"a": torch.zeros(2)}, path)
        _one_line(caught.value, f"cannot write {path}: ", "afile", "a file, not a folder")
    assert (tmp_path / "afile").read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_names_too_long_for_the_temporary_are_refused_up_front(tmp_path):
    """The check measures the real temporary's name (fixed width), which is longer than the file's own."""
    fits = tmp_path / ("a" * 200)
    check_name_lengths(fits)
    assert len(temporary_sibling(fits).name) == len(temporary_sibling(tmp_path / ("b" * 200)).name)
    deep = tmp_path.joinpath(*["d" * 200] * 20)  # every name fits, the whole path does not (PATH_MAX)
    for path, entries in ((tmp_path / ("a" * 240), ()), (tmp_path / ("a" * 256) / "x", ()),
                          (tmp_path / "ok", ("c" * 240,)), (deep, ())):  # fmt: skip
        with pytest.raises(WriteError) as caught:
            check_name_lengths(path, entries)
        assert caught.value.errno == errno.ENAMETOOLONG
        _one_line(caught.value, "longer than this", "allows", "choose a shorter name")
    with pytest.raises(WriteError, match="File name too long"):  # the writer itself, if nothing checked
        atomic_write_bytes(tmp_path / ("a" * 240), b"x")
    assert os.listdir(tmp_path) == []


def test_the_final_move_refuses_what_appeared_meanwhile_but_takes_over_an_empty_folder(tmp_path):
    dest, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "new.json").write_text("new")
    dest.mkdir()
    (dest / "erasure.json").write_text("another run's")
    with pytest.raises(FileExistsError):
        move_into_place(tmp, dest, replace=False)
    assert (dest / "erasure.json").read_text() == "another run's" and (tmp / "new.json").exists()
    (dest / "erasure.json").unlink()  # an empty folder (made by the user, say) is taken over
    move_into_place(tmp, dest, replace=False)
    assert (dest / "new.json").read_text() == "new" and not tmp.exists()
    other = tmp_path / ".other.tmp"
    other.mkdir()
    move_into_place(other, dest, replace=True)  # replace: swapped whole, the old one removed
    assert os.listdir(dest) == [] and sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------------ claims
_HOLD = "import sys, time\nfrom pipelines.files import claim_folder\nwith claim_folder(sys.argv[1]):\n" \
        "    print('held', flush=True)\n    time.sleep(600)\n"  # fmt: skip


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that claims ``folder`` and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_claims_on_one_folder_conflict_in_one_process(tmp_path):
    out = tmp_path / "out"
    with claim_folder(out):
        with pytest.raises(FolderInUseError) as caught, claim_folder(tmp_path / "x" / ".." / "out"):
            pass
        _one_line(caught.value, str(out), f"process {os.getpid()}", "another --out")
        with claim_folder(tmp_path / "other"):  # another folder is another claim
            pass
    assert not claim_path(out).exists()  # released and removed
    with claim_folder(out):
        pass


def test_a_claim_held_by_another_process_fails_at_once_and_a_killed_holders_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        start = time.perf_counter()
        with pytest.raises(FolderInUseError, match=f"process {holder.pid}"), claim_folder(out):
            pass
        assert time.perf_counter() - start < 1.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert claim_path(out).exists()  # the dead holder's lock file is still there, its lock is not
    with claim_folder(out):
        pass


def _erase_in_process(capsys, *args: str) -> tuple[int, str]:
    code = runpy.run_path(str(ERASE))["main"](list(args))
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_erase_to_a_folder_another_run_holds_fails_before_the_edit(tmp_path, capsys, monkeypatch):  # D4
    out = tmp_path / "out"
    holder = _holder(out)
    monkeypatch.setattr("erase.workflow.erase_stack", lambda *a, **k: pytest.fail("the edit ran"))
    try:
        code, err = _erase_in_process(capsys, "--model", "tiny", "--concept", "van gogh", "--no-check",
                                      "--out", str(out))  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert code == 2 and f"being written by another run (process {holder.pid})" in _error_line(err)
    assert not out.exists()


@pytest.mark.slow
def test_two_erase_runs_racing_for_one_folder_leave_one_artifact(tmp_path):  # D4
    out = tmp_path / "x"
    command = [sys.executable, str(ERASE), "--model", "tiny", "--no-check", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(
            [*command, "--concept", concept], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        for concept in ("monet", "van gogh")
    ]
    results = [(run.wait(timeout=600), err) for run in runs for _, err in [run.communicate(timeout=600)]]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = ["monet", "van gogh"][[code for code, _ in results].index(0)]
    line = _error_line(next(err for code, err in results if code == 2))
    assert "being written by another run" in line or "already holds another erasure artifact" in line, line
    assert json.loads((out / "erasure.json").read_text())["concepts"] == [winner]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporaries, no claim left


# ------------------------------------------------------------------------------------------------ erase.py up front
def test_an_out_whose_temporary_name_is_too_long_is_refused_before_the_model_loads(tmp_path):  # D10
    for out in ("a" * 240, "b" * 256 + "/out", "/".join(["c" * 200] * 20)):  # a name, a parent's, the whole path
        result = subprocess.run([sys.executable, str(ERASE), "--model", "/no/such/model", "--concept", "van gogh",
                                 "--out", out], capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
        line = _error_line(result.stderr)
        assert result.returncode == 2 and "allows" in line and line.endswith("choose a shorter name"), line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["equal", "inside", "spelled_with_dots", "link_into_out", "holding_out"])
def test_a_checkpoint_dir_in_the_output_folder_is_refused_before_training(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "a"
    checkpoints = {"equal": out, "inside": out / "ck", "spelled_with_dots": tmp_path / "b" / ".." / "a" / "ck",
                   "link_into_out": tmp_path / "link", "holding_out": tmp_path}[where]  # fmt: skip
    if where == "link_into_out":
        out.mkdir()
        (tmp_path / "link").symlink_to(out / "ck", target_is_directory=True)
    monkeypatch.setattr("erase.workflow.erase_stack", lambda *a, **k: pytest.fail("training ran"))
    code, err = _erase_in_process(capsys, "--model", "tiny", "--concept", "van gogh", "--method", "esd",
                                  "--steps", "2", "--no-check", "--set", f"checkpoint_dir={checkpoints}",
                                  "--out", str(out))  # fmt: skip
    assert code == 2 and "choose a checkpoint_dir apart from --out" in _error_line(err)
    assert not (out / "ck").exists() and (not out.exists() or os.listdir(out) == [])


@pytest.mark.slow
def test_a_full_checkpoint_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):  # D1, the report's case
    if not private_tmpfs_available(tmp_path):
        pytest.skip("no private tmpfs (user namespaces) on this system")
    disk = tmp_path / "disk"
    listing = "import os, sys\nfor r, ds, fs in os.walk(sys.argv[1]):\n    print(*[os.path.join(r, f) for f in fs])"
    script = (f'{sys.executable} {ERASE} --model tiny --concept "van gogh" --method esd --steps 4 --no-check '
              f'--quiet --set pool_images=2 --set pool_steps=4 --set checkpoint_every=2 '
              f'--set checkpoint_dir={disk}/ck --out {tmp_path}/art; echo "rc=$?"; '
              f'{sys.executable} -c "{listing}" {disk}')  # fmt: skip
    found = run_on_tmpfs(disk, "size=150k", ["sh", "-c", script], timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert "rc=2" in found.stdout, (found.stdout, found.stderr)
    line = _error_line(found.stderr)
    assert line.startswith(f"error: cannot write {disk}/ck/step-00000004: No space left on device"), line
    files = " ".join(found.stdout.splitlines()[1:]).split()
    names = sorted(os.path.relpath(f, disk) for f in files)
    assert names == ["ck/pool.safetensors", "ck/run.json", "ck/step-00000002/lora.safetensors",
                     "ck/step-00000002/optimizer.safetensors", "ck/step-00000002/state.json"], names  # fmt: skip
    assert not (tmp_path / "art").exists()


def test_erase_names_a_damaged_checkpoint_and_restart_starts_afresh(tmp_path, capsys):  # D1
    checkpoints = tmp_path / "ck"
    run = ["--model", "tiny", "--concept", "van gogh", "--method", "esd", "--steps", "2", "--no-check", "--quiet",
           "--set", "pool_images=2", "--set", "pool_steps=4", "--set", f"checkpoint_dir={checkpoints}"]  # fmt: skip
    assert _erase_in_process(capsys, *run, "--out", str(tmp_path / "a"))[0] == 0
    (checkpoints / "step-00000002" / "state.json").write_text('{"step": 2, "losses": [0.1')
    code, err = _erase_in_process(capsys, *run, "--out", str(tmp_path / "b"))
    line = _error_line(err)
    assert code == 2 and f"the checkpoint file {checkpoints / 'step-00000002' / 'state.json'} is damaged" in line
    assert "--restart" in line and not (tmp_path / "b").exists()
    assert _erase_in_process(capsys, *run, "--restart", "--out", str(tmp_path / "b"))[0] == 0
    first, again = (load_file(str(tmp_path / f / "pytorch_lora_weights.safetensors")) for f in "ab")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    code, err = _erase_in_process(capsys, "--model", "tiny", "--concept", "van gogh", "--restart", "--out", "c")
    assert code == 2 and "--restart does not apply to method 'uce'" in _error_line(err)


# ------------------------------------------------------------------------------------------------ folder names
def test_folder_names_are_distinct_even_for_texts_that_spell_another_ones_hashed_name():  # D7
    """Per-concept folders (attack suites, audits), the default --out, the robustness table's rows and the SAE store's
    folders: distinct texts get distinct names, and a text made to spell another text's hashed name (its slug plus
    digest) does not get that name."""
    from erase.core.layout import default_output_folder
    from pipelines.files import folder_name
    from pipelines.tokenizer import concept_folder, concept_text

    texts = ["van gogh", "van-gogh", "van_gogh", "Van-Gogh!", "\U0001f3a8", "\U0001f58c\ufe0f", "a" * 59 + "b",
             "a" * 59 + "c", "uce +world preserve", "uce-world-preserve"]  # fmt: skip
    folders = {concept_folder(t) for t in texts}
    assert len(folders) == len({concept_text(t) for t in texts}) and concept_folder("Van Gogh") == "van-gogh"
    for text in texts:
        name = concept_folder(text)
        spelling = name.replace("-", " ").replace("_", " ")  # the hashed name as a concept's words
        assert spelling == concept_text(text) or concept_folder(spelling) != name, (text, name)
    assert folder_name("uce +world preserve") != folder_name("uce-world-preserve") and folder_name("uce") == "uce"
    assert folder_name("") and folder_name("") != folder_name("-")
    many = [c * 30 for c in "abc"]
    cut = default_output_folder(many, "uce").name.removesuffix("-uce")
    spelled = [part.replace("-", " ").replace("_", " ") for part in cut.split("+")]
    assert default_output_folder(spelled, "uce") != default_output_folder(many, "uce")
    assert len(default_output_folder(many, "uce").name) <= 90
    sae_folder = runpy.run_path(str(ROOT / "scripts" / "train_sae.py"), run_name="train_sae_script")["sae_folder"]
    hook = "text_encoder.encoder.layers.2"
    assert sae_folder("s", "micro", hook).name == f"micro-{hook}"  # the shipped SAEs' folder names
    assert sae_folder("s", "/x/sd", hook) != sae_folder("s", "/y/sd", hook)
    assert sae_folder("s", "org/sd", hook) != sae_folder("s", "sd", hook)
