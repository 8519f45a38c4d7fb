"""The README's training and picture commands, run as a user would with tiny step counts (the real runs take hours)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _main(script: str, *args: str, capsys) -> str:  # noqa: ANN001 - pytest's capsys fixture
    """The script's ``main`` in this process, as a follow-up command to one run with ``_run`` (no interpreter
    start-up: importing torch and transformers is most of a short run); returns what it printed."""
    main = runpy.run_path(str(ROOT / "scripts" / script), run_name=f"{Path(script).stem}_script")["main"]
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_train_micro_command_runs_every_stage(tmp_path, capsys):
    sd, clip, work = tmp_path / "sd", tmp_path / "clip", tmp_path / "work"
    caps = ["--max-steps", "2", "--pool-size", "64", "--batch-size", "8", "--eval-images", "1", "--eval-steps", "2",
            "--workers", "1"]  # fmt: skip
    paths = ["--out-sd", str(sd), "--out-clip", str(clip), "--work", str(work)]
    result = _run("train_micro.py", "--preset", "cpu", "--device", "cpu", *caps, *paths, "--no-progress", cwd=tmp_path)
    assert "all done" in result.stdout
    assert (sd / "model_index.json").is_file() and (sd / "world.json").is_file()
    assert (clip / "config.json").is_file()
    evaluation = json.loads((work / "eval.json").read_text())
    assert set(evaluation["agreement"]) == {"object", "colour", "style"}
    # rerunning resumes: every stage is already complete, nothing trains again
    again = _main("train_micro.py", "--preset", "cpu", "--device", "cpu", *caps, *paths, "--stages", "clip,vae,unet",
                  "--no-progress", capsys=capsys)  # fmt: skip
    assert "all done" in again
    # another eval seed draws other images from the same models
    grid = (work / "eval_object.png").read_bytes()
    _main("train_micro.py", "--preset", "cpu", "--device", "cpu", *caps, *paths, "--stages", "eval",
          "--eval-seed", "1", "--no-progress", capsys=capsys)  # fmt: skip
    assert (work / "eval_object.png").read_bytes() != grid

    # the README's continuation: more CLIP steps with its text tower (the UNet's text encoder) frozen, more UNet steps
    text_file = sd / "text_encoder" / "model.safetensors"
    unet_file = sd / "unet" / "diffusion_pytorch_model.safetensors"
    text_before, unet_before = text_file.read_bytes(), unet_file.read_bytes()
    more = ["--clip-steps", "4", "--clip-freeze-text-after", "2", "--unet-steps", "4"]
    caps = caps[2:]  # no --max-steps: the step overrides decide
    _main("train_micro.py", "--preset", "cpu", "--device", "cpu", *caps, *paths, "--stages", "clip,unet,export", *more,
          "--no-progress", capsys=capsys)  # fmt: skip
    assert text_file.read_bytes() == text_before and unet_file.read_bytes() != unet_before
    assert json.loads((work / "unet" / "ckpt.json").read_text())["file"].endswith("00000004.safetensors")

    # the README's restart from the exported models in a new work dir (checkpoints do not outlive their machine)
    sd2, clip2 = tmp_path / "sd2", tmp_path / "clip2"
    restart = ["--init-from", str(sd), str(clip), "--work", str(tmp_path / "work2"), "--out-sd", str(sd2),
               "--out-clip", str(clip2), "--stages", "clip,unet,export", "--clip-steps", "2", "--unet-steps", "2",
               "--unet-lr", "1e-3", "--clip-class-prompt-weight", "0.5", "--no-progress"]  # fmt: skip
    first = _main("train_micro.py", "--preset", "cpu", "--device", "cpu", *caps, *restart, capsys=capsys)
    assert "imported" in first
    assert (sd2 / "text_encoder" / "model.safetensors").read_bytes() == text_before
    unet_after = (sd2 / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert unet_after != unet_file.read_bytes()
    again = _main("train_micro.py", "--preset", "cpu", "--device", "cpu", *caps, *restart, capsys=capsys)
    assert "resuming" in again  # the same command resumes; nothing trains twice
    assert (sd2 / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_after


@pytest.mark.slow
def test_train_micro_recipe_replays_the_shipped_runs(tmp_path, capsys):
    sd, clip, work = tmp_path / "sd", tmp_path / "clip", tmp_path / "work"
    caps = ["--max-steps", "2", "--pool-size", "64", "--batch-size", "8", "--eval-images", "1", "--eval-steps", "2",
            "--workers", "1"]  # fmt: skip
    recipe = [
        "--recipe",
        "shipped",
        "--work",
        str(work),
        "--out-sd",
        str(sd),
        "--out-clip",
        str(clip),
        "--no-progress",
    ]
    result = _run("train_micro.py", *caps, *recipe, cwd=tmp_path)
    runs = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("=== ")]
    assert runs == ["run1", "run2", "run3", "run4", "run5", "run6", "run7", "run11", "run13", "run14"]
    assert all((work / f"{run}.done").is_file() for run in runs)
    # the later runs start from the run before's export and keep its text tower (the UNet's text encoder) and UNet
    text, unet = "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"
    for name in (text, unet):
        assert (sd / name).read_bytes() == (work / "run7" / "sd" / name).read_bytes()
    assert (clip / "model.safetensors").read_bytes() != (work / "run13" / "clip" / "model.safetensors").read_bytes()
    assert json.loads((work / "run14" / "eval.json").read_text())["images"]["object"] == 8
    # rerunning skips every finished run
    again = _main("train_micro.py", *caps, *recipe, capsys=capsys)
    assert again.count("done before, skipped") == len(runs)
    # the recipe sets the runs' options itself
    with pytest.raises(SystemExit) as refused:
        _main("train_micro.py", *recipe, "--clip-steps", "5", capsys=capsys)
    assert refused.value.code == 2 and "--recipe sets --clip-steps itself" in capsys.readouterr().err


@pytest.mark.slow
def test_train_judge_command(tmp_path):
    out = tmp_path / "judge"
    args = ["--steps", "2", "--batch-size", "8", "--pool-size", "32", "--eval-size", "16", "--widths", "4", "4"]
    result = _run("train_judge.py", *args, "--workers", "1", "--device", "cpu", "--no-progress", "--out", str(out),
                  cwd=tmp_path)  # fmt: skip
    assert f"saved to {out}" in result.stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_world_sheet_command(tmp_path):
    out = tmp_path / "world.png"
    _run("world_sheet.py", "--out", str(out), "--scale", "1", cwd=tmp_path)
    with Image.open(out) as sheet:
        assert sheet.width >= 8 * 64 and sheet.height == 7 * 64  # 8 objects by 7 styles


def test_world_sheet_replaces_only_its_own_sheet(tmp_path, monkeypatch, capsys):
    """``world_sheet.py --out`` replaced any existing .png, a user's picture too, and wrote through a symbolic link
    to nothing (creating its target)."""
    main = runpy.run_path(str(ROOT / "scripts" / "world_sheet.py"), run_name="world_sheet_script")["main"]
    mine = tmp_path / "holiday.png"
    Image.new("RGB", (4, 4), "red").save(mine)
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere.png")
    before = mine.read_bytes()
    for out, message in [(mine, "is not an earlier world sheet"), (tmp_path / "link.png", "link to nothing")]:
        monkeypatch.setattr(sys, "argv", ["world_sheet.py", "--out", str(out), "--scale", "1"])
        with pytest.raises(SystemExit) as refused:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert refused.value.code == 2 and message in err[-1], err
    assert mine.read_bytes() == before and not (tmp_path / "nowhere.png").exists()
    sheet = tmp_path / "sheet.png"
    for args in (["--out", str(sheet)], ["--out", str(sheet), "--no-labels"], ["--out", str(mine), "--overwrite"]):
        monkeypatch.setattr(sys, "argv", ["world_sheet.py", *args, "--scale", "1"])
        main()  # a new file, an earlier sheet replaced, a user's file with --overwrite
    assert "wrote" in capsys.readouterr().out
    with Image.open(sheet) as first, Image.open(mine) as second:
        assert first.size != second.size  # the rerun without labels replaced the first sheet


@pytest.mark.slow
def test_bench_lora_prints_cost_memory_and_the_efficacy_curve(tmp_path):
    args = ["--set", "pool_images=1", "--set", "pool_steps=4", "--repeats", "1", "--threads", "1"]
    result = _run("bench_lora.py", "--model", "tiny", "--set", "steps=2", *args, cwd=tmp_path)
    assert "per training step" in result.stdout and "x one UNet forward+backward" in result.stdout
    assert "x the process after load_pipeline" in result.stdout
    result = _run("bench_lora.py", "--set", "steps=1", "--efficacy-at", "1,2", "--images", "2", *args, cwd=tmp_path)
    lines = [line for line in result.stdout.splitlines() if "CPU-s  'van gogh'" in line]
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("bench_uce.py", ["--skip-sd14", "--repeats", "0"], "--repeats must be >= 1"),
        ("bench_uce.py", ["--skip-sd14", "--threads", "-1"], "--threads must be >= 1"),
        ("bench_uce.py", ["--skip-sd14", "--save-sd14", str(ROOT / "README.md" / "x")], "cannot write"),
        ("bench_lora.py", ["--model", "tiny", "--repeats", "0"], "--repeats must be >= 1"),
        ("bench_lora.py", ["--model", "tiny", "--method", "nope"], "unknown erasure method 'nope'"),
        ("bench_lora.py", ["--model", "tiny", "--method", "uce"], "no method that trains"),
        ("bench_lora.py", ["--model", "tiny", "--concept", " "], "concept to erase is empty"),
        ("bench_lora.py", ["--model", "tiny", "--set", "nope=1"], "has no setting 'nope'"),
        ("bench_lora.py", ["--model", "no/such/folder/"], "does not exist"),
        ("bench_audit.py", ["--model", "tiny", "--images", "0"], "--images must be >= 1"),
        ("bench_audit.py", ["--model", "tiny", "--batch-size", "0"], "--batch-size must be >= 1"),
        ("bench_audit.py", ["--model", "tiny", "--device", "nonsense"], "unknown device 'nonsense'"),
        ("world_sheet.py", ["--scale", "0"], "--scale must be >= 1"),
        ("world_sheet.py", ["--seed", str(2**32)], "--seed must be an integer in [0, 4294967295]"),
        ("train_micro.py", ["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
        ("train_micro.py", ["--eval-seed", str(10**20)], "--eval-seed must be an integer in [0, 4294967295]"),
        ("world_sheet.py", ["--out", "sheet.txt"], "must name a .png file"),
        ("world_sheet.py", ["--out", str(ROOT / "README.md" / "sheet.png")], "cannot write"),
        ("train_judge.py", ["--steps", "0"], "steps must be >= 1"),
        ("train_judge.py", ["--device", "nonsense"], "unknown device 'nonsense'"),
        ("train_judge.py", ["--out", str(ROOT / "README.md" / "judge")], "cannot write"),
    ],
)
def test_benchmark_and_world_scripts_refuse_bad_input_in_one_line(script, args, message, monkeypatch, capsys):
    """Before any model, render or training: argparse's usage, then one ``error:`` line, and exit 2."""
    main = runpy.run_path(str(ROOT / "scripts" / script), run_name=script)["main"]
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as refused:
        main()
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and err.splitlines()[-1].startswith(f"{script}: error:"), err
    assert message in err.splitlines()[-1], err


def test_run_script_writes_a_failed_output_in_one_line_escapes_what_it_cannot_encode_and_ends_quietly_on_a_pipe(
    monkeypatch, capsys
):
    """A script's output that cannot be written (a full disk: ``>/dev/full``), or encoded (``LC_ALL=C``), was a
    traceback after the work was done (the artifact saved, the audit finished)."""
    import errno
    import io

    from pipelines.checks import run_script

    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(Full()))
    assert run_script(lambda: print("Erased 'van gogh'") or 0) == 1
    assert capsys.readouterr().err == "error: No space left on device\n"

    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    assert run_script(lambda: print("Erased 'café'") or 0) == 0  # a UnicodeEncodeError after the work
    ascii_out.seek(0)
    assert ascii_out.read() == "Erased 'caf\\xe9'\n"

    def gone() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO()))  # no file number: nothing to redirect
    assert run_script(gone) == 1
    assert run_script(lambda: 2) == 2 and run_script(lambda: None) == 0


@pytest.mark.parametrize("script", ["measure_erasure.py", "bench_uce.py"])
def test_a_result_file_that_is_not_an_earlier_result_is_never_replaced(script, tmp_path, capsys, monkeypatch):
    """``measure_erasure.py --json <an artifact's erasure.json>`` replaced it with the measurement, after it."""
    target = tmp_path / "erasure.json"
    target.write_text('{"schema_version": 2, "method": "uce"}')
    main = runpy.run_path(str(ROOT / "scripts" / script), run_name=f"{Path(script).stem}_script")["main"]
    args = {"measure_erasure.py": ["--concept", "van gogh", "--images", "1"], "bench_uce.py": ["--skip-sd14"]}
    monkeypatch.setattr(sys, "argv", [script, *args[script], "--json", str(target)])
    try:
        code = main()
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is not an earlier result of this command" in err[-1], err
    assert target.read_text() == '{"schema_version": 2, "method": "uce"}'


@pytest.mark.parametrize("script", ["attack.py", "audit.py"])
def test_an_erasure_folder_that_is_none_is_refused_before_torch_is_imported(script, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(tmp_path / "empty"): "is not an erasure artifact",
        str(tmp_path / "file"): "not a folder",
        " ": "--erasure is empty",
    }
    probe = (
        "import runpy, sys\n"
        f"main = runpy.run_path({str(ROOT / 'scripts' / script)!r}, run_name='script')['main']\n"
        f"for folder in {list(cases)!r}:\n"
        f"    print(main(['--erasure', folder, '--out', {str(tmp_path / 'out')!r}]), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False"] * len(cases), result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(cases) and all(m in e for m, e in zip(cases.values(), errors, strict=True)), errors
    assert not (tmp_path / "out").exists()
