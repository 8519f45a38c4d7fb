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


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The script's main() in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = runpy.run_path(str(SCRIPT))["main"](list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_prints_usage():
    result = run_script("--help")
    assert result.returncode == 0 and "--concept" in result.stdout


@pytest.mark.slow
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
        (["--concept", "x", "--model", "/no/such/folder/anywhere"], "does not exist"),
        (["--concept", "\u200b"], "no visible characters"),  # E05
        (["--concept", "van gogh", "--set", "nope=1"], "has no setting 'nope'"),
        (["--concept", "van gogh", "--method", "spm", "--set", "facilitated_transport=1"], "true or false"),
        (["--concept", "van gogh", "--preserve", "monet", "--preserve", "Van Gogh"], "both erased and preserved"),
        (["--concept", "van gogh", "--guide", "van gogh"], "is the concept itself"),  # E28
        (["--concept", "van gogh", "--device", "nonsense"], "unknown device"),  # E19
        (["--concept", "van gogh", "--device", "cuda"], "CUDA is not available"),  # E18
        (["--concept", "van gogh", "--method", "time", "--preserve", "monet"], "no preserve term"),  # E35
        (["--concept", "van gogh", "--set", "nope=1"], "nope"),
        (["--concept", "van gogh", "--set", "lamb"], "KEY=VALUE"),
        (["--concept", "van gogh", "--check-images", "0"], "--check-images must be >= 1"),
        (["--concept", "van gogh", "--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
        (["--concept", "van gogh", "--seed", str(2**64)], "--seed must be an integer in [0, 4294967295]"),
        (["--concept", "van gogh", "--check-guidance", "nan"], "--check-guidance must be >= 0"),
        (["--concept", "van gogh", "--steps", "100"], "--steps does not apply to method 'uce'"),
        (["--concept", "van gogh", "--method", "esd", "--lr", "2"], "--lr must be in (0, 1)"),
        (["--concept", "van gogh", "--method", "esd", "--rank", "0"], "--rank must be >= 1"),
        (["--concept", "van gogh", "--method", "esd", "--steps", "3", "--set", "steps=4"], "both given"),
        (["--concept", "van gogh", "--set", "lamb=NaN"], "lamb must be a finite number > 0, got nan"),
        (["--concept", "van gogh", "--set", "erase_scale=true"], "erase_scale must be a finite number > 0, got True"),
        (["--concept", "van gogh", "--method", "esd", "--set", "lr=Infinity"], "lr must be a finite number in (0, 1)"),
        (["--concept", "van gogh", "--check-guidance", "inf"], "--check-guidance must be >= 0 (a finite number)"),
        (
            ["--concept", "\uff56\uff41\uff4e \uff47\uff4f\uff47\uff48", "--concept", "Van Gogh"],
            "all read as 'van gogh'",
        ),
        (["--concept", "&nbsp;"], "reads as empty text"),
        (
            ["--concept", "van gogh", "--set", "layers=attn2"],
            'layers must be a list of texts or null (a JSON list: layers=["',
        ),
        (["--concept", "van gogh", "--method", "esd", "--set", "checkpoint_dir=5"], "checkpoint_dir must be a text"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = run_in_process(capsys, "--model", "tiny", "--out", str(out), "--no-check", *args)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()


@pytest.mark.parametrize("where", ["parent_is_a_file", "cwd"])
def test_unusable_out_is_refused_before_the_model_loads(tmp_path, where):  # E23b, E24
    (tmp_path / "afile.txt").write_text("x")
    out = str(tmp_path / "afile.txt" / "sub") if where == "parent_is_a_file" else "."
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "/no/such/model", "--concept", "van gogh", "--out", out],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "cannot load model" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_no_scorer_offline_fails_before_the_edit_and_keeps_the_old_artifact(tmp_path, capsys):  # E32a-d
    """In process (an exception escaping main() fails the test, as a traceback would)."""
    out = tmp_path / "vg"
    assert run_in_process(capsys, "--model", "tiny", "--concept", "van gogh", "--out", str(out), "--no-check")[0] == 0
    before = (out / "erasure.json").read_bytes()
    for scorer in ([], ["--scorer", "/nope"]):  # the default open_clip scorer is not cached offline; /nope is nothing
        code, _, err = run_in_process(capsys, "--model", "tiny", "--concept", "monet", "--out", str(out),
                                      "--overwrite", *scorer)  # fmt: skip
        assert code == 2 and "--no-check" in err and len(err.strip().splitlines()) == 1
        assert (out / "erasure.json").read_bytes() == before
    fresh = tmp_path / "fresh"
    assert run_in_process(capsys, "--model", "tiny", "--concept", "monet", "--out", str(fresh))[0] == 2
    assert not fresh.exists()


@pytest.mark.slow
def test_list_methods():
    result = run_script("--list-methods")
    assert result.returncode == 0 and {"uce", "time"} <= {line.split()[0] for line in result.stdout.splitlines()}


@pytest.mark.slow
def test_tiny_sdxl_load_line_works_in_a_fresh_plain_process(tmp_path):
    out = tmp_path / "vg"
    result = run_script("--model", "tiny-sdxl", "--concept", "van gogh", "--out", str(out), "--no-check", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    code = "\n".join(
        [
            "import json, sys, torch",
            "from pipelines.tiny import tiny_sdxl_pipeline",
            "pipe = tiny_sdxl_pipeline(0)  # the base, as a user's from_pretrained would give it",
            "unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}",
            f"pipe.load_lora_weights({summary['out']!r})",
            "pipe.fuse_lora()",
            "pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers",
            "changed = [k for k, v in pipe.unet.state_dict().items() if k in unet and not torch.equal(v, unet[k])]",
            "print(json.dumps(changed))",
        ]
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    changed = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)


@pytest.mark.slow
def test_sd_folder_lora_fuses_to_the_same_key_value_weights(tmp_path):
    """A local SD 1.x folder (the tiny one, saved), --no-check: plain load_lora_weights + fuse_lora gives our K/V."""
    from diffusers import StableDiffusionPipeline

    import erase
    from pipelines.tiny import tiny_sd_pipeline

    tiny_sd_pipeline(0).save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "vg"
    # the README's command for a local folder
    result = run_script("--model", str(tmp_path / "base"), "--concept", "a church", "--concept-type", "object",
                        "--no-check", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    artifact = erase.load_artifact(out)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for name, delta in artifact.deltas.items():
        key = name.removeprefix("unet.") + ".weight"
        expected = base[key].double() + delta.double()
        assert (fused[key].double() - expected).norm() / expected.norm() <= 1e-5, key


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


def test_a_multi_process_launch_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_in_process(capsys, "--model", "tiny", "--concept", "van gogh", "--out", str(tmp_path / "o"))
    assert code == 2 and "runs as one process" in err and not (tmp_path / "o").exists()


def test_an_edit_larger_than_the_weights_is_one_warning_line_beside_the_json_summary(tmp_path, capsys):
    big = ["--set", "token_positions=from_first", "--set", "erase_scale=50", "--set", "lamb=0.01"]
    code, out, err = run_in_process(
        capsys, "--model", "tiny", "--concept", "van gogh", "--concept", "monet", "--no-check", *big, "--json",
        "--out", str(tmp_path / "big"),
    )  # fmt: skip
    warnings = json.loads(out)["warnings"]
    assert code == 0 and len(warnings) == 1 and "larger than the weights" in warnings[0] and "median " in warnings[0]
    assert err.splitlines() == [f"warning: {warnings[0]}"], err


def test_the_printed_load_line_is_python_whatever_the_folder_is_named(tmp_path, capsys):
    """A folder named with a quote, a backslash or a newline printed a load line that was no Python string."""
    import ast

    out = tmp_path / 'odd "name"\\ with\na newline'
    code, printed, err = run_in_process(capsys, "--model", "tiny", "--concept", "van gogh", "--no-check", "--json",
                                        "--out", str(out))  # fmt: skip
    assert code == 0, err
    call = ast.parse(json.loads(printed)["load_code"]).body[0].value
    assert ast.literal_eval(call.args[1]) == str(out) and (out / "erasure.json").is_file()
