"""The project as a user installs it: the wheel and the sdist carry every file of the packages, and the wheel,
installed into a fresh folder outside the checkout, erases with ``uce`` and ``itd`` on the micro model from there
(``itd`` reads its SAE from ``pipelines/saes/``, which only an installed wheel's data can give it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erase", "pipelines", "evals")
#: Files read at run time through package-relative paths, named so that a failure says which one went missing.
RUNTIME_DATA = (
    "pipelines/micro/model_index.json",
    "pipelines/micro/world.json",
    "pipelines/micro/unet/diffusion_pytorch_model.safetensors",
    "pipelines/saes/micro-text_encoder.encoder.layers.2/sae.safetensors",
    "pipelines/saes/micro-text_encoder.encoder.layers.2/sae.json",
    "pipelines/saes/micro-text_encoder.encoder.layers.2/prompts.txt",
    "pipelines/saes/micro-unet.up_blocks.0.attentions.1/sae.safetensors",
    "evals/microworld/clip/model.safetensors",
    "evals/microworld/judge/model.safetensors",
    "evals/microworld/world.png",
    "evals/suites/general.csv",
    "evals/audit/templates/report.html.j2",
)

pytestmark = pytest.mark.slow


def _checkout_files() -> list[str]:
    """The checkout's files as git sees them (tracked, and new ones not ignored): no caches, runs or builds."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to tell the project's files from local leftovers")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(name for name in listed.split("\0") if name and (ROOT / name).is_file())


def _python_env(site: Path) -> dict[str, str]:
    """The environment of a process that sees the installed wheel only, not the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[str]]:
    """A copy of the checkout (a build writes ``build/`` and ``*.egg-info`` next to its sources, and a stale
    ``build/lib`` would leak into the wheel), its wheel and sdist, and the wheel installed into a fresh folder."""
    files = _checkout_files()
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(dist)], cwd=tmp)
    build_sdist = f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"
    _run([sys.executable, "-c", build_sdist], cwd=source)
    (wheel,) = dist.glob("erase-*.whl")
    (sdist,) = dist.glob("erase-*.tar.gz")
    site = tmp / "site"
    _run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)], cwd=tmp)
    return {"files": files, "wheel": wheel, "sdist": sdist, "site": site, "tmp": tmp}


def test_wheel_and_sdist_hold_every_file_of_the_packages(built) -> None:
    expected = [name for name in built["files"] if name.split("/")[0] in PACKAGES]
    assert set(RUNTIME_DATA) <= set(expected), sorted(set(RUNTIME_DATA) - set(expected))
    wheel = zipfile.ZipFile(built["wheel"])
    in_wheel = set(wheel.namelist())
    assert not [name for name in expected if name not in in_wheel], "missing from the wheel"
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert not [name for name in expected if name not in in_sdist], "missing from the sdist"
    (entry_points,) = [name for name in in_wheel if name.endswith(".dist-info/entry_points.txt")]
    assert "erase-concept = erase.cli:main" in wheel.read(entry_points).decode().splitlines()
    stray = [name for name in in_wheel if "__pycache__" in name or name.endswith(".pyc") or name.startswith("tests/")]
    assert not stray


def test_installed_wheel_erases_with_uce_and_itd_outside_the_checkout(built) -> None:
    site, env = built["site"], _python_env(built["site"])
    work = built["tmp"] / "work"
    work.mkdir()
    where = "import json, erase, erase.cli, pipelines, evals; print(json.dumps([m.__file__ for m in "
    where += "(erase, erase.cli, pipelines, evals)]))"
    files = json.loads(_run([sys.executable, "-c", where], cwd=work, env=env).stdout)
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in files), files
    assert not work.resolve().is_relative_to(ROOT) and not site.resolve().is_relative_to(ROOT)

    command = str(site / "bin" / "erase-concept")
    listed = _run([sys.executable, "-m", "erase.cli", "--list-methods"], cwd=work, env=env).stdout
    assert {"uce", "itd"} <= {line.split()[0] for line in listed.splitlines()}
    summaries = {}
    for method in ("uce", "itd"):
        out = work / method
        argv = [command, "--concept", "van gogh", "--method", method, "--no-check", "--json", "--out", str(out)]
        summaries[method] = json.loads(_run(argv, cwd=work, env=env).stdout)
        assert summaries[method]["method"] == method and (out / "erasure.json").is_file()
        assert Path(summaries[method]["out"]).resolve() == out.resolve()
    assert summaries["itd"]["weight_format"] == "intervention"

    # Both load into a plain diffusers pipeline of the installed micro model: uce's edit changes the cross-attention
    # keys and values only; itd's intervention changes the text encoder's output for the concept, and its handle
    # restores it exactly.
    load = "\n".join(
        [
            "import json, sys, torch, erase, pipelines",
            "from pathlib import Path",
            "from diffusers import StableDiffusionPipeline",
            "base = Path(pipelines.__file__).resolve().parent / 'micro'",
            "pipe = StableDiffusionPipeline.from_pretrained(str(base))",
            "unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}",
            f"erase.load(pipe, {str(work / 'uce')!r})",
            "changed = sorted(k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, unet[k]))",
            "ids = pipe.tokenizer('van gogh', padding='max_length', return_tensors='pt').input_ids",
            "encode = lambda: pipe.text_encoder(ids)[0].detach().clone()",
            "before = encode()",
            summaries["itd"]["load_code"],
            "during = encode()",
            "handle.remove()",
            "after = encode()",
            "print(json.dumps({'changed': changed, 'moved': not torch.equal(before, during),",
            "                  'restored': torch.equal(before, after)}))",
        ]
    )
    result = json.loads(_run([sys.executable, "-c", load], cwd=work, env=env).stdout.strip().splitlines()[-1])
    assert result["changed"] and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in result["changed"])
    assert result["moved"] and result["restored"], result
