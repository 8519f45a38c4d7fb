"""No network, said plainly: something the hub serves, with the hub unreachable and HF_HUB_OFFLINE unset, is one line
and exit 2 within seconds (no download retries) for every script, or loads from the cache when the files are there.

The hub is made unreachable by pointing huggingface_hub's endpoint at a closed local port: in-process by setting
``huggingface_hub.constants`` (read when a load starts), in a subprocess by ``HF_ENDPOINT`` with ``HF_HUB_OFFLINE``
removed from its environment. Nothing here reaches the network.
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import free_port

from pipelines.hub import HubUnreachableError, hub_unreachable, load_from_hub

ROOT = Path(__file__).resolve().parents[1]
#: Well under the download retries' own waits, and over the probe's timeout with room for a loaded machine.
WITHIN_S = 10.0


@pytest.fixture
def closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, closed_endpoint: str) -> str:
    """In-process: HF_HUB_OFFLINE off and the endpoint a closed port."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint)
    return closed_endpoint


@pytest.fixture
def listening_endpoint(monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        yield


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_refused_connection_is_unreachable_at_once(no_hub):
    start = time.perf_counter()
    reason = hub_unreachable()
    assert reason is not None and "127.0.0.1" in reason and time.perf_counter() - start < 2


def test_an_open_endpoint_is_reachable(listening_endpoint):
    assert hub_unreachable() is None


def test_a_connection_that_hangs_is_unreachable_after_the_timeout(monkeypatch, no_hub):
    def hang(*args, **kwargs):
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert hub_unreachable(timeout=0.3) == f"{no_hub.removeprefix('http://')}: no answer within 0.3 s"
    assert time.perf_counter() - start < 2


def test_load_from_hub_reads_the_cache_alone_without_the_hub(no_hub, monkeypatch):
    asked: list[bool] = []

    def cached(local_files_only: bool) -> str:
        asked.append(local_files_only)
        return "pipeline"

    def missing(local_files_only: bool) -> str:
        raise FileNotFoundError("no such file in the cache")

    def broken(local_files_only: bool) -> str:
        raise ValueError("model_index.json names no pipeline class")

    assert load_from_hub("model 'org/name'", cached) == "pipeline" and asked == [True]
    with pytest.raises(HubUnreachableError) as err:
        load_from_hub("model 'org/name'", missing)
    line = _one_line(str(err.value))
    assert line.startswith(f"no network: the model hub {no_hub} cannot be reached")
    assert "model 'org/name' is not (fully) in the local cache" in line
    assert "--model micro" in line and "HF_HUB_OFFLINE=1 once the files are cached" in line
    with pytest.raises(ValueError, match="names no pipeline class"):  # not a cache miss: its own error
        load_from_hub("model 'org/name'", broken)
    # offline mode: the cache alone, no connection tried
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("pipelines.hub._connection_error", lambda *a: pytest.fail("a connection was tried"))
    asked.clear()
    assert load_from_hub("model 'org/name'", cached) == "pipeline" and asked == [True]
    with pytest.raises(HubUnreachableError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        load_from_hub("model 'org/name'", missing)


def test_load_from_hub_goes_online_when_the_hub_answers(listening_endpoint):
    assert load_from_hub("model 'org/name'", lambda local_files_only: local_files_only) is False


def _run_script(script: str, args: list[str], capsys) -> tuple[int, str, float]:
    main = runpy.run_path(str(ROOT / "scripts" / script), run_name=f"{Path(script).stem}_script")["main"]
    capsys.readouterr()
    start = time.perf_counter()
    code = main(args)
    return code, capsys.readouterr().err, time.perf_counter() - start


def test_every_script_says_no_network_in_one_line_within_seconds(no_hub, artifact_dir, tmp_path, capsys):
    """A hub id (the pipeline's loader) or an open_clip tag (the scorer's): the same line from every script."""
    hub_model = "no-such-org/no-such-model"
    runs = {
        "erase.py": ["--model", hub_model, "--concept", "x", "--no-check", "--out", str(tmp_path / "e")],
        "train_sae.py": ["--model", hub_model, "--hook", "unet.mid_block.attentions.0", "--out", str(tmp_path / "s")],
        "audit.py": ["--model", hub_model, "--suite", "art_styles", "--out", str(tmp_path / "a")],
        "attack.py": ["--erasure", str(artifact_dir), "--scorer", "open_clip:ViT-B-32/openai", "--no-judge",
                      "--out", str(tmp_path / "k")],
    }  # fmt: skip
    for script, args in runs.items():
        code, err, seconds = _run_script(script, args, capsys)
        line = _one_line(err)
        assert code == 2 and line.startswith("error: no network: the model hub"), (script, err)
        assert "not (fully) in the local cache" in line and "HF_HUB_OFFLINE=1" in line, (script, line)
        scorer = "the CLIP scorer" in line  # audit.py loads its scorer before the model
        instead = "--scorer with a local CLIP folder" if scorer else "a local folder or --model micro"
        assert instead in line, (script, line)
        assert seconds < WITHIN_S, (script, seconds)
    assert not any((tmp_path / name).exists() for name in "esak")


def test_an_open_clip_tag_in_the_cache_names_offline_mode(no_hub, tmp_path, monkeypatch):
    """Cached open_clip weights still make open_clip try the hub first: the line says how to use them offline."""
    from evals.scorer import ClipScorer

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo_id, filename, **kw: "/cache/file")
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError) as err:
        ClipScorer.from_pretrained("open_clip:ViT-B-32/openai")
    line = _one_line(str(err.value))
    assert line.startswith("no network") and line.endswith(
        "is in the local cache: set HF_HUB_OFFLINE=1 to use it offline"
    )
    assert time.perf_counter() - start < WITHIN_S


def test_an_open_clip_tag_missing_from_the_cache_in_offline_mode_is_one_line_at_once(monkeypatch):
    """Offline mode: no download is tried, and the line is ours, not open_clip's 'check your connection'."""
    from huggingface_hub import constants

    from evals.scorer import ClipScorer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo_id, filename, **kw: None)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError) as err:
        ClipScorer.from_pretrained("open_clip:ViT-B-32/openai")
    line = _one_line(str(err.value))
    assert line.startswith("the CLIP scorer 'open_clip:ViT-B-32/openai' is not in the local cache and HF_HUB_OFFLINE")
    assert line.endswith("or pass --scorer with a local CLIP folder") and time.perf_counter() - start < 1.0


def test_the_checks_scorer_without_the_hub_is_one_line_naming_no_check(no_hub):
    """erase.py loads the check's scorer before the edit; its line names the scorer's way out and --no-check once."""
    from types import SimpleNamespace

    from erase.workflow import load_check_scorer

    with pytest.raises(HubUnreachableError) as err:
        load_check_scorer(SimpleNamespace(model_id="micro", device="cpu"), "open_clip:ViT-B-32/openai")
    line = _one_line(str(err.value))
    assert line.startswith("no network") and "--scorer with a local CLIP folder" in line, line
    assert line.endswith("(the check needs it: --no-check skips the check)") and line.count("--scorer") == 1, line


def _fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """The tiny pipeline as huggingface_hub caches a downloaded repository: ``models--owner--name`` with a snapshot
    and ``refs/main`` naming it. Returns the snapshot folder."""
    from pipelines.tiny import tiny_sd_pipeline

    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    tiny_sd_pipeline(0).save_pretrained(snapshot, safe_serialization=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _env(cache: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {
        **env,
        "HF_HUB_CACHE": str(cache),
        "HF_ENDPOINT": endpoint,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_a_cached_hub_id_loads_without_network_and_a_partly_cached_one_is_one_line(tmp_path, closed_endpoint):
    """The real environment: HF_ENDPOINT a closed port, HF_HUB_OFFLINE unset, a hub cache of our own. A repository
    whose files are all cached loads (from the cache alone, within seconds); with one weights file missing, the
    script says no network in one line and exits 2. One interpreter for both: the cache folder is read at import."""
    repo_id = "erase-test/tiny-sd"
    snapshot = _fake_hub_cache(tmp_path / "cache", repo_id)
    args = ["--model", repo_id, "--concept", "x", "--no-check", "--out", str(tmp_path / "out")]
    program = f"""
import runpy, time
from pathlib import Path
from pipelines import load_pipeline, set_library_verbosity
set_library_verbosity(False)
start = time.perf_counter()
wrapper = load_pipeline({repo_id!r})
print(wrapper.model_id, len(wrapper.generate(['a cat'], [0], steps=2, progress=False)))
print(f'{{time.perf_counter() - start:.1f}}')
Path({str(snapshot / "unet" / "diffusion_pytorch_model.safetensors")!r}).unlink()
main = runpy.run_path({str(ROOT / "scripts" / "erase.py")!r}, run_name="erase_script")["main"]
print("exit", main({args!r}))
"""
    env = _env(tmp_path / "cache", closed_endpoint)
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, seconds, code = done.stdout.splitlines()[:3]
    assert loaded == f"{repo_id} 1" and float(seconds) < 3 * WITHIN_S
    line = _one_line(done.stderr)
    assert code == "exit 2" and line.startswith(f"error: no network: the model hub {closed_endpoint}"), done.stderr
    assert f"model '{repo_id}' is not (fully) in the local cache" in line and not (tmp_path / "out").exists()
